#!/usr/bin/env python3
"""Closed-loop reference planner in Python: a (1+1)-ES over MQTT only (paho-mqtt).

    LABCTL_MQTT_USER=planner-bo LABCTL_MQTT_PASSWORD=planner-dev .venv/bin/python examples/planner.py \
        --mqtt mqtt://127.0.0.1:PORT --target-red 300 --target-yellow 150 --target-blue 450 --budget 40

The target spectrum is measured once from a vial of the hidden volumes (Python has no access to the Rust
model); the optimiser sees that spectrum only. Exit 0 when the RMS error < --threshold (0.02 AU) within the
budget, else 1.
"""
import argparse, json, math, os, queue, random, sys, time
import paho.mqtt.client as mqtt

p = argparse.ArgumentParser()
p.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
p.add_argument("--lab-id", default="sim")
for dye, v in (("red", 300), ("yellow", 150), ("blue", 450)):
    p.add_argument(f"--target-{dye}", type=float, default=v)
p.add_argument("--budget", type=int, default=40)
p.add_argument("--threshold", type=float, default=0.02)
p.add_argument("--max-ul", type=float, default=150.0)  # 10 mL syringes, no refill: see docs/mqtt.md
p.add_argument("--seed", type=int, default=1)
a = p.parse_args()
host, port = a.mqtt.removeprefix("mqtt://").rstrip("/").rsplit(":", 1)
lab = a.lab_id
inbox = queue.Queue()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"planner-py-{os.getpid()}")
c.username_pw_set(os.environ.get("LABCTL_MQTT_USER", "planner-bo"), os.environ.get("LABCTL_MQTT_PASSWORD", ""))
c.on_message = lambda _c, _u, m: inbox.put((m.topic, json.loads(m.payload)))
c.connect(host, int(port), keepalive=10)
for t in ("protocols/replies/#", "runs/+/results", "runs/+/status"):
    c.subscribe(f"labctl/{lab}/{t}", qos=1)
c.loop_start()
time.sleep(0.3)
session = f"py-{int(time.time() * 1000)}"
n_runs = 0


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


def measure(ul):
    """Submits one experiment and returns its absorbance spectrum."""
    global n_runs
    pid, pos = f"{session}-{n_runs:03d}", "ABCD"[(n_runs // 6) % 4] + str(n_runs % 6 + 1)
    n_runs += 1
    c.publish(f"labctl/{lab}/protocols/submit", json.dumps(protocol(pid, pos, ul)), qos=1)
    run_id, deadline = None, time.time() + 120
    while time.time() < deadline:
        try:
            topic, m = inbox.get(timeout=1)
        except queue.Empty:
            continue
        if topic.endswith(f"/replies/{pid}"):
            if not m.get("accepted"):
                sys.exit(f"{pid} rejected: {m}")
            run_id = m["run_id"]
        elif run_id and topic == f"labctl/{lab}/runs/{run_id}/results" and m.get("name") == "spectrum":
            return m["value"]["absorbance"]
        elif run_id and topic == f"labctl/{lab}/runs/{run_id}/status" and m["state"] in ("failed", "aborted", "interrupted", "paused"):
            sys.exit(f"{run_id} ended before its spectrum: {m}")
    sys.exit(f"{pid}: no spectrum within 120 s")


started = time.time()
target = measure([a.target_red, a.target_yellow, a.target_blue])
rmse = lambda s: math.sqrt(sum((x - y) ** 2 for x, y in zip(s, target)) / len(target))
rng = random.Random(a.seed)
parent, sigma = [a.max_ul / 2] * 3, 0.3  # log step: volumes change by a factor exp(0.3 N(0,1))
parent_f = rmse(measure(parent))
best, best_f, n = parent, parent_f, 1
print(f"{n:3} red {parent[0]:6.0f} yellow {parent[1]:6.0f} blue {parent[2]:6.0f} uL  rmse {parent_f:.4f} AU  best {best_f:.4f} AU")
while n < a.budget and best_f >= a.threshold:
    x = [round(min(max(v * math.exp(sigma * rng.gauss(0, 1)), 1.0), a.max_ul)) for v in parent]
    f = rmse(measure(x))
    n += 1
    if f <= parent_f:  # 1/5th success rule
        parent, parent_f, sigma = x, f, sigma * 1.5
    else:
        sigma *= 1.5 ** -0.25
    sigma = min(max(sigma, 0.002), 1.5)
    if f < best_f:
        best, best_f = x, f
    print(f"{n:3} red {x[0]:6.0f} yellow {x[1]:6.0f} blue {x[2]:6.0f} uL  rmse {f:.4f} AU  best {best_f:.4f} AU", flush=True)
ok = best_f < a.threshold
print(f"{'converged' if ok else 'not converged'} after {n} experiments (+1 target) in {time.time() - started:.1f} s: "
      f"best {best} uL, rmse {best_f:.4f} AU (threshold {a.threshold})")
c.loop_stop()
c.disconnect()
sys.exit(0 if ok else 1)
