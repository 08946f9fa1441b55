#!/usr/bin/env python3
"""Closed-loop reference planner in Python: a (1+1)-ES matching a target spectrum, over MQTT or MCP.

    export LABCTL_MQTT_USER=planner-bo LABCTL_MQTT_PASSWORD=planner-dev
    .venv/bin/python examples/planner.py --mqtt mqtt://127.0.0.1:PORT \
        --target-red 300 --target-yellow 150 --target-blue 450 --budget 40
    .venv/bin/python examples/planner.py --mcp http://127.0.0.1:PORT/mcp ...         # streamable HTTP
    .venv/bin/python examples/planner.py --mcp-stdio http://127.0.0.1:PORT/mcp ...   # through `labctl mcp`

The optimiser, the dye-mix protocol and the error are the same whatever the transport: a lab is anything
with `measure(protocol) -> absorbance`, over MQTT (paho-mqtt) or over MCP's tools (the official `mcp` SDK).
The target spectrum is measured once from a vial of the hidden volumes (Python has no access to the Rust
model); the optimiser sees that spectrum only. Exit 0 when the RMS error < --threshold (0.02 AU) within the
budget, 1 when not, 2 on a usage, connection or lab error (a rejected protocol, a run ending without its
spectrum, no spectrum within --per-experiment seconds).
"""
import argparse, asyncio, json, math, os, queue, sys, time

AGENT = {"name": "labctl-reference-planner", "version": "0.1.0"}


class LabError(Exception):
    """The lab did not give a spectrum: the planner stops (exit 2)."""


def protocol(pid, pos, ul):
    disp = lambda i, pump, v: {"type": "action", "id": i, "instrument": pump, "action": "dispense",
                               "params": {"vessel": "mix1", "volume_ul": round(v), "rate_ul_per_min": 1000}}
    act = lambda i, inst, action, params: {"type": "action", "id": i, "instrument": inst, "action": action, "params": params}
    return {"version": 1,
            "metadata": {"name": "Dye mix", "proposal_id": pid, "planner": {"id": "planner-bo", "model": "one-plus-one-es"}},
            "labware": [{"id": "mix1", "kind": "vial", "location": pos, "capacity_ul": 20000}],
            "steps": [act("home", "gantry", "home", {}),
                      act("to-vial", "gantry", "move_to", {"position": pos, "feed_mm_per_min": 3000}),
                      disp("red", "pump-red", ul[0]), disp("yellow", "pump-yellow", ul[1]), disp("blue", "pump-blue", ul[2]),
                      act("to-stirrer", "gantry", "transfer", {"vessel": "mix1", "to": "H1"}),
                      act("stir", "hotplate", "set_stir_speed", {"speed_rpm": 1000}),
                      {"type": "wait", "id": "mix", "duration_s": 60},
                      act("stir-off", "hotplate", "stir_off", {}),
                      {"type": "measure", "id": "spectrum", "instrument": "spectro", "action": "spectrum",
                       "params": {"start_nm": 380, "stop_nm": 780, "step_nm": 5}, "result": "spectrum", "timeout_s": 30, "on_error": "pause"},
                      act("to-rack", "gantry", "transfer", {"vessel": "mix1", "to": pos})]}


def rmse(spectrum, target):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(spectrum, target)) / len(target))


# A run in one of these states will not give its spectrum (the measure step pauses its run on error).
STOPPED = ("failed", "aborted", "interrupted", "paused", "rejected")


class MqttLab:
    """The lab over MQTT: submit on `protocols/submit`, the reply, then the run's `spectrum` result."""

    def __init__(self, url, lab, user, password, per_experiment):
        import paho.mqtt.client as mqtt
        host, port = url.removeprefix("mqtt://").rstrip("/").rsplit(":", 1)
        self.lab, self.per_experiment, self.inbox = lab, per_experiment, queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"planner-py-{os.getpid()}")
        self.c.username_pw_set(user, password)
        self.c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, json.loads(m.payload)))
        subscribed = queue.Queue()
        self.c.on_subscribe = lambda _c, _u, mid, _codes, _p: subscribed.put(mid)
        self.c.connect(host, int(port), keepalive=10)
        self.c.loop_start()
        mids = {self.c.subscribe(f"labctl/{lab}/{t}", qos=1)[1]
                for t in ("protocols/replies/#", "runs/+/results", "runs/+/status")}
        deadline = time.monotonic() + 10
        while mids:  # SUBACKs, so no reply can be missed
            try:
                mids.discard(subscribed.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                raise LabError(f"{url}: no SUBACK within 10 s (wrong password?)")

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.c.loop_stop()
        self.c.disconnect()

    async def measure(self, proto):
        self.c.publish(f"labctl/{self.lab}/protocols/submit", json.dumps(proto), qos=1)
        return await asyncio.to_thread(self._spectrum, proto["metadata"]["proposal_id"])

    def _spectrum(self, pid):
        run_id, deadline = None, time.monotonic() + self.per_experiment
        while time.monotonic() < deadline:
            try:
                topic, m = self.inbox.get(timeout=max(min(deadline - time.monotonic(), 1), 0))
            except queue.Empty:
                continue
            if topic.endswith(f"/replies/{pid}"):
                if not m.get("accepted"):
                    raise LabError(f"{pid} rejected: {m}")
                run_id = m["run_id"]
            elif run_id and topic == f"labctl/{self.lab}/runs/{run_id}/results" and m.get("name") == "spectrum":
                return m["value"]["absorbance"]
            elif run_id and topic == f"labctl/{self.lab}/runs/{run_id}/status" and m["state"] in STOPPED:
                raise LabError(f"{run_id} ended before its spectrum: {m}")
        raise LabError(f"{pid}: no spectrum within {self.per_experiment} s")


class McpLab:
    """The lab through MCP's tools: `submit_protocol`, then `wait_for_run` until the run has a result past
    the cursor, then `run_results` from it. Over streamable HTTP (Basic auth), or over stdio by starting
    `labctl mcp --url URL` as a desktop agent does."""

    def __init__(self, url, user, password, per_experiment, labctl=None):
        self.url, self.user, self.password, self.labctl = url, user, password, labctl
        self.per_experiment = per_experiment

    async def __aenter__(self):
        from contextlib import AsyncExitStack
        from mcp import ClientSession, types
        self.stack = AsyncExitStack()
        await self.stack.__aenter__()
        try:
            if self.labctl:
                from mcp.client.stdio import StdioServerParameters, stdio_client
                env = {"LABCTL_MQTT_USER": self.user, "LABCTL_MQTT_PASSWORD": self.password}
                server = StdioServerParameters(command=self.labctl, args=["mcp", "--url", self.url], env=env)
                read, write = await self.stack.enter_async_context(stdio_client(server))
            else:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client
                from mcp.shared._httpx_utils import create_mcp_http_client
                http = create_mcp_http_client(auth=httpx2.BasicAuth(self.user, self.password))
                read, write = await self.stack.enter_async_context(streamable_http_client(self.url, http_client=http))
            self.s = await self.stack.enter_async_context(
                ClientSession(read, write, client_info=types.Implementation(**AGENT)))
            await asyncio.wait_for(self.s.initialize(), 30)
        except BaseException:
            await self.stack.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc):
        await self.stack.__aexit__(*exc)

    async def tool(self, name, args):
        r = await self.s.call_tool(name, args)
        if r.is_error or r.structured_content is None:
            raise LabError(f"{name}: {' '.join(getattr(c, 'text', '') for c in r.content)}")
        return r.structured_content

    async def measure(self, proto):
        pid = proto["metadata"]["proposal_id"]
        out = await self.tool("submit_protocol", {"protocol": proto, "agent_model": "one-plus-one-es"})
        if out["outcome"] != "accepted":
            raise LabError(f"{pid} {out['outcome']}: {out}")
        run_id, cursor = out["run_id"], 0
        deadline = time.monotonic() + self.per_experiment
        while (left := deadline - time.monotonic()) > 0:
            # One call until something happens, instead of polling run_status.
            waited = await self.tool("wait_for_run", {"run_id": run_id, "after_result": cursor,
                                                      "timeout_s": min(left, 120)})
            if waited["results"] > cursor:
                page = await self.tool("run_results", {"run_id": run_id, "after": cursor})
                for r in page["results"]:
                    if r["name"] == "spectrum":
                        return r["value"]["absorbance"]
                cursor = page["next_cursor"]
            elif waited["ended_by"] != "timeout":
                raise LabError(f"{run_id} ended before its spectrum: {waited['state']} ({waited.get('reason')})")
        raise LabError(f"{pid}: no spectrum within {self.per_experiment} s")


class Rng:
    """xorshift64* with Box-Muller normals, as examples/planner/planner_core.rs: with the same seed both
    reference planners propose the same volumes for the same errors."""

    M = (1 << 64) - 1

    def __init__(self, seed):
        self.s = (seed * 0x9E3779B97F4A7C15) & self.M | 1

    def uniform(self):
        s = self.s
        s ^= s >> 12
        s ^= (s << 25) & self.M
        s ^= s >> 27
        self.s = s
        return ((((s * 0x2545F4914F6CDD1D) & self.M) >> 11) + 0.5) / (1 << 53)

    def normal(self):
        u, v = self.uniform(), self.uniform()
        return math.sqrt(-2 * math.log(u)) * math.cos(math.tau * v)


class OnePlusOne:
    """(1+1)-ES with the 1/5th success rule on log volumes (a dye-only spectrum depends on the ratios): ask
    the next volumes (the start point first), tell their error."""

    def __init__(self, max_ul, seed):
        self.max_ul, self.rng = max_ul, Rng(seed)
        self.parent, self.parent_f, self.sigma = [max_ul / 2] * 3, math.inf, 0.3

    def ask(self):
        x = self.parent
        if self.parent_f != math.inf:
            x = [min(max(v * math.exp(self.sigma * self.rng.normal()), 1.0), self.max_ul) for v in x]
        return [math.floor(v + 0.5) for v in x]  # Rust's round (half away from zero; volumes are positive)

    def tell(self, x, f):
        if self.parent_f == math.inf:
            self.parent_f = f
            return
        if f <= self.parent_f:
            self.parent, self.parent_f, self.sigma = x, f, self.sigma * 1.5
        else:
            self.sigma *= 1.5 ** -0.25
        self.sigma = min(max(self.sigma, 0.002), 1.5)


async def optimise(lab, a):
    """The closed loop: returns (experiments, best volumes, best error), the target's vial not counted."""
    session, n_runs = f"py-{int(time.time() * 1000)}", 0

    async def measure(ul):
        nonlocal n_runs
        pid, pos = f"{session}-{n_runs:03d}", "ABCD"[(n_runs // 6) % 4] + str(n_runs % 6 + 1)
        n_runs += 1
        return await lab.measure(protocol(pid, pos, ul))

    target = await measure([a.target_red, a.target_yellow, a.target_blue])
    es, n, best, best_f = OnePlusOne(a.max_ul, a.seed), 0, None, math.inf
    while n < a.budget and best_f >= a.threshold:
        x = es.ask()
        f = rmse(await measure(x), target)
        es.tell(x, f)
        n += 1
        if f < best_f:
            best, best_f = x, f
        print(f"{n:3} red {x[0]:6.0f} yellow {x[1]:6.0f} blue {x[2]:6.0f} uL  rmse {f:.4f} AU  best {best_f:.4f} AU", flush=True)
    return n, best, best_f


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    t = p.add_mutually_exclusive_group()
    t.add_argument("--mqtt", metavar="mqtt://HOST:PORT", help="MQTT broker (default mqtt://127.0.0.1:1883)")
    t.add_argument("--mcp", metavar="URL", help="labctl's MCP endpoint over streamable HTTP (labctl run --mcp)")
    t.add_argument("--mcp-stdio", metavar="URL", help="the same endpoint through `labctl mcp --url URL` on stdio")
    p.add_argument("--labctl", default="labctl", help="the labctl program --mcp-stdio starts")
    p.add_argument("--lab-id", default="sim", help="MQTT topics' lab id")
    for dye, v in (("red", 300), ("yellow", 150), ("blue", 450)):
        p.add_argument(f"--target-{dye}", type=float, default=v)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--threshold", type=float, default=0.02)
    p.add_argument("--max-ul", type=float, default=150.0)  # 10 mL syringes, no refill: see docs/mqtt.md
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--per-experiment", type=float, default=120.0, help="longest wait for one spectrum (s)")
    p.add_argument("--json", action="store_true", help="the summary as one JSON line (for scripts)")
    a = p.parse_args()
    if a.budget < 1 or not 1.0 <= a.max_ul <= 1500.0 or a.threshold <= 0 or a.per_experiment <= 0:
        p.error("--budget must be at least 1, --max-ul within [1, 1500], --threshold and --per-experiment positive")
    user, password = os.environ.get("LABCTL_MQTT_USER", "planner-bo"), os.environ.get("LABCTL_MQTT_PASSWORD", "")

    async def run():
        if a.mcp or a.mcp_stdio:
            lab = McpLab(a.mcp or a.mcp_stdio, user, password, a.per_experiment, labctl=a.labctl if a.mcp_stdio else None)
        else:
            lab = MqttLab(a.mqtt or "mqtt://127.0.0.1:1883", a.lab_id, user, password, a.per_experiment)
        async with lab:
            return await optimise(lab, a)

    started = time.time()
    try:
        n, best, best_f = asyncio.run(run())
    except Exception as e:  # a refused login, a lost connection, a LabError: say which and stop
        while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:  # the MCP SDK's task groups
            e = e.exceptions[0]
        print(f"planner: {e}", file=sys.stderr)
        sys.exit(2)
    ok, wall_s = best_f < a.threshold, time.time() - started
    if a.json:
        print(json.dumps({"transport": "mcp-stdio" if a.mcp_stdio else "mcp" if a.mcp else "mqtt", "converged": ok,
                          "experiments": n, "best_ul": best, "rmse": best_f, "threshold": a.threshold,
                          "wall_s": round(wall_s, 2)}))
    else:
        print(f"{'converged' if ok else 'not converged'} after {n} experiments (+1 target) in {wall_s:.1f} s: "
              f"best {best} uL, rmse {best_f:.4f} AU (threshold {a.threshold})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
