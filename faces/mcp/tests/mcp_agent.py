"""An agent written with the official MCP Python SDK (`mcp` on PyPI), the independent client of
faces/mcp/tests/python_sdk.rs: it drives labctl's MCP face over streamable HTTP as a planner would.

Usage: mcp_agent.py URL USER PASSWORD DYE_MIX_JSON OTHER_USERS_RUN_ID

Prints one JSON line with what it saw (the Rust test checks it and the journal); exits non-zero, with the
reason on stderr, at the first thing that is not as labctl documents it (docs/mcp.md).
"""

import asyncio
import copy
import json
import sys
import time

import httpx2
from mcp import ClientSession
from mcp import types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

DEADLINE_S = 180.0


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def structured(result, tool):
    check(not result.is_error, f"{tool} failed: {result.content}")
    check(result.structured_content is not None, f"{tool}: no structured output")
    return result.structured_content


async def wait_for(session, run_id, done, what):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status = structured(
            await session.call_tool("run_status", {"run_id": run_id}), "run_status"
        )
        if done(status):
            return status
        check(
            time.monotonic() < deadline,
            f"run {run_id}: not {what} after {DEADLINE_S} s (state {status['state']})",
        )
        await asyncio.sleep(0.1)


async def wrong_password(url, user):
    # Straight HTTP first: the status code an agent's HTTP stack sees.
    async with httpx2.AsyncClient(auth=httpx2.BasicAuth(user, "not-the-password")) as http:
        response = await http.post(
            url,
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Accept": "application/json, text/event-stream"},
        )
        check(response.status_code == 401, f"wrong password: HTTP {response.status_code}")
        check("basic" in response.headers.get("www-authenticate", "").lower(), "no WWW-Authenticate")
    # And through the SDK: initialize must fail.
    refused = False
    try:
        http = create_mcp_http_client(auth=httpx2.BasicAuth(user, "not-the-password"))
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await asyncio.wait_for(session.initialize(), 30)
    except BaseException as e:  # the SDK raises from its task group
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        refused = True
    check(refused, "the SDK initialized with a wrong password")


async def agent(url, user, password, dye_mix, others_run):
    seen = {}
    await wrong_password(url, user)
    seen["wrong_password_refused"] = True

    http = create_mcp_http_client(auth=httpx2.BasicAuth(user, password))
    async with streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(
            read, write, client_info=types.Implementation(name="labctl-test-agent", version="1.2.3")
        ) as session:
            init = await session.initialize()
            check(init.server_info.name == "labctl", f"server {init.server_info}")
            seen["protocol_version"] = init.protocol_version

            tools = {t.name: t for t in (await session.list_tools()).tools}
            expected = {
                "list_instruments", "instrument_state", "validate_protocol", "dry_run_protocol",
                "submit_protocol", "run_status", "run_results", "wait_for_run", "pause_run", "resume_run",
                "abort_run",
            }
            check(set(tools) == expected, f"tools {sorted(tools)}")
            for name, tool in tools.items():
                check(tool.input_schema.get("type") == "object", f"{name}: input schema {tool.input_schema}")
                check(tool.output_schema is not None and tool.output_schema.get("type") == "object",
                      f"{name}: output schema {tool.output_schema}")
                check(tool.annotations is not None, f"{name}: no annotations")
            for name in ("list_instruments", "instrument_state", "validate_protocol", "dry_run_protocol",
                         "run_status", "run_results", "wait_for_run"):
                a = tools[name].annotations
                check(a.read_only_hint is True and a.destructive_hint is False, f"{name}: {a}")
            for name in ("submit_protocol", "abort_run"):
                a = tools[name].annotations
                check(a.read_only_hint is False and a.destructive_hint is True, f"{name}: {a}")
            check(tools["submit_protocol"].annotations.idempotent_hint is True, "submit is idempotent by proposal id")
            check("protocol" in tools["submit_protocol"].input_schema["properties"], "submit input")
            seen["tools"] = sorted(tools)

            resources = {str(r.uri) for r in (await session.list_resources()).resources}
            check({"labctl://protocol/schema", "labctl://lab/capabilities"} <= resources, f"resources {resources}")
            schema = json.loads((await session.read_resource("labctl://protocol/schema")).contents[0].text)
            check("steps" in json.dumps(schema) and "metadata" in json.dumps(schema), "the schema resource")
            caps = json.loads((await session.read_resource("labctl://lab/capabilities")).contents[0].text)
            check(any(i["id"] == "pump-red" for i in caps["instruments"]), "capabilities")
            prompt = await session.get_prompt("write_protocol", {"goal": "a greener mix"})
            text = prompt.messages[0].content.text
            check("dye mix" in text and "bo-2026-11-22-0001" in text and "a greener mix" in text, "the prompt")

            lab = structured(await session.call_tool("list_instruments", {}), "list_instruments")
            check(len(lab["instruments"]) == 7, f"instruments {lab}")
            pump = structured(await session.call_tool("instrument_state", {"instrument": "pump-red"}), "instrument_state")
            check(pump["envelope"]["volume_ul"] == [1.0, 5000.0], f"pump-red {pump}")
            unknown = await session.call_tool("instrument_state", {"instrument": "pump-green"})
            check(unknown.is_error and "pump-green" in unknown.content[0].text, "an unknown instrument")

            # A bad protocol: every finding, with the JSON pointer of the value to fix.
            bad = copy.deepcopy(dye_mix)
            bad["metadata"]["proposal_id"] = "mcp-bad-1"
            bad["steps"][2]["params"]["volume_ul"] = 999999
            bad["steps"][3]["instrument"] = "pump-green"
            report = structured(await session.call_tool("validate_protocol", {"protocol": bad}), "validate_protocol")
            paths = {f["path"] for f in report["findings"]}
            check(report["valid"] is False, "the bad protocol is invalid")
            check("/steps/2/params/volume_ul" in paths and "/steps/3/instrument" in paths, f"paths {paths}")
            seen["bad_paths"] = sorted(paths)
            rejected = structured(await session.call_tool("submit_protocol", {"protocol": bad}), "submit_protocol")
            check(rejected["outcome"] == "rejected" and rejected["findings"], f"bad submit {rejected}")

            dry = structured(await session.call_tool("dry_run_protocol", {"protocol": dye_mix}), "dry_run_protocol")
            check(dry["valid"] and dry["simulated"] and dry["estimated_duration_s"] > 30, f"dry run {dry}")

            # The dye mix, followed to completion, and its results from a cursor.
            good = copy.deepcopy(dye_mix)
            good["metadata"]["proposal_id"] = "mcp-dye-1"
            reply = structured(
                await session.call_tool("submit_protocol", {"protocol": good, "agent_model": "test-model-1"}),
                "submit_protocol",
            )
            check(reply["outcome"] == "accepted" and reply["run_id"], f"dye mix {reply}")
            run_id = reply["run_id"]
            again = structured(await session.call_tool("submit_protocol", {"protocol": good}), "submit_protocol")
            check(again["run_id"] == run_id and again["duplicate"], f"the same proposal again {again}")
            # Followed with wait_for_run and a progress token: first until its first result, then to its end,
            # one progress notification per state change, step and result on the way.
            async def follow(args):
                progress = []  # per call: a progress token belongs to one request

                async def on_progress(value, total, message):
                    progress.append((value, message))

                out = structured(
                    await session.call_tool("wait_for_run", {"run_id": run_id, **args}, progress_callback=on_progress),
                    "wait_for_run",
                )
                check(out["notifications"] == len(progress), f"{out} and {progress}")
                values = [v for v, _ in progress]
                check(values == sorted(set(values)), f"progress values do not grow: {values}")
                return out, [m for _, m in progress]

            waited, first = await follow({"after_result": 0, "timeout_s": 60})
            check(waited["ended_by"] == "result" and waited["results"] >= 1, f"first result {waited}")
            check(any(m.startswith("step_finished /steps/") for m in first), f"no step in {first}")
            check(any(m.startswith("result 1 spectrum") for m in first), f"no result in {first}")
            waited, rest = await follow({"timeout_s": 60})
            check(waited["ended_by"] == "finished" and waited["state"] == "completed", f"the end {waited}")
            check(any(m.startswith("state completed") for m in rest), f"no end in {rest}")
            messages = first + rest
            seen["progress"] = messages
            final = await wait_for(session, run_id, lambda s: s["finished"], "finished")
            check(final["state"] == "completed", f"dye mix ended {final['state']}: {final.get('reason')}")
            kinds = {e["kind"] for e in final["events"]}
            check({"submitted", "approval", "step_finished"} <= kinds, f"events {kinds}")
            first = structured(await session.call_tool("run_results", {"run_id": run_id, "limit": 1}), "run_results")
            check(len(first["results"]) == 1 and first["next_cursor"] == 1, f"first page {first}")
            rest = structured(
                await session.call_tool("run_results", {"run_id": run_id, "after": first["next_cursor"]}), "run_results"
            )
            names = [r["name"] for r in first["results"] + rest["results"]]
            check("spectrum" in names and rest["complete"], f"results {names} {rest['complete']}")
            seen["dye_run"] = run_id
            seen["results"] = names

            # Beyond the auto-approve envelope: it waits for a technician, with the reason.
            hold = {
                "version": 1,
                "metadata": {
                    "name": "long hold",
                    "objective": "wait longer than the lab approves by itself",
                    "proposal_id": "mcp-hold-1",
                    "planner": {"id": "planner-bo", "model": "test-model-1"},
                },
                "labware": [],
                "steps": [{"type": "wait", "id": "hold", "duration_s": 4000}],
            }
            waiting = structured(await session.call_tool("submit_protocol", {"protocol": hold}), "submit_protocol")
            check(waiting["outcome"] == "awaiting_approval" and waiting["approval_required_because"],
                  f"long hold {waiting}")
            hold_id = waiting["run_id"]
            seen["approval_because"] = waiting["approval_required_because"]
            # The test's technician approves it; the agent follows it and then controls its own run.
            await wait_for(session, hold_id, lambda s: s["state"] == "running", "running")
            # Pause and resume are requests the executor takes at its next check: follow them.
            short = structured(
                await session.call_tool("wait_for_run", {"run_id": hold_id, "timeout_s": 0.2}), "wait_for_run"
            )
            check(short["ended_by"] == "timeout" and short["state"] == "running", f"a short wait {short}")
            too_long = await session.call_tool("wait_for_run", {"run_id": hold_id, "timeout_s": 1000})
            check(too_long.is_error and "timeout_s" in too_long.content[0].text, f"timeout_s 1000 {too_long}")
            structured(await session.call_tool("pause_run", {"run_id": hold_id}), "pause_run")
            paused = structured(
                await session.call_tool("wait_for_run", {"run_id": hold_id, "timeout_s": 60}), "wait_for_run"
            )
            check(paused["ended_by"] == "paused" and paused["state"] == "paused", f"wait for the pause {paused}")
            structured(await session.call_tool("resume_run", {"run_id": hold_id}), "resume_run")
            await wait_for(session, hold_id, lambda s: s["state"] == "running", "running again")
            aborted = structured(await session.call_tool("abort_run", {"run_id": hold_id}), "abort_run")
            check(aborted["state"] == "aborted", f"abort {aborted}")
            again = await session.call_tool("resume_run", {"run_id": hold_id})
            check(again.is_error and "aborted" in again.content[0].text, f"resume an aborted run {again}")
            seen["hold_run"] = hold_id

            # Another user's run: refused, with a message that says so.
            refused = await session.call_tool("abort_run", {"run_id": others_run})
            check(refused.is_error, f"aborting another user's run succeeded: {refused}")
            message = refused.content[0].text
            check(message.startswith("refused"), f"refusal message {message!r}")
            seen["others_refusal"] = message

    # A client that can ask its user (elicitation): the operator confirms one submission and declines
    # another. The consent is bound to the protocol's digest and is no approval: the long hold still waits
    # for a technician.
    asked = []

    async def operator(context, params):
        asked.append(params.message)
        if "mcp-consent-yes" in params.message:
            return types.ElicitResult(action="accept", content={"submit": True})
        return types.ElicitResult(action="decline")

    http = create_mcp_http_client(auth=httpx2.BasicAuth(user, password))
    async with streamable_http_client(url, http_client=http) as (read, write):
        async with ClientSession(
            read,
            write,
            elicitation_callback=operator,
            client_info=types.Implementation(name="labctl-test-agent", version="1.2.3"),
        ) as session:
            await session.initialize()
            yes = copy.deepcopy(hold)
            yes["metadata"]["proposal_id"] = "mcp-consent-yes"
            reply = structured(await session.call_tool("submit_protocol", {"protocol": yes}), "submit_protocol")
            check(reply["outcome"] == "awaiting_approval", f"a consented long hold still waits: {reply}")
            check(len(asked) == 1 and "sha256 " in asked[0], f"the operator was asked once: {asked}")
            seen["consent_run"] = reply["run_id"]
            seen["consent_question"] = asked[0]
            no = copy.deepcopy(hold)
            no["metadata"]["proposal_id"] = "mcp-consent-no"
            declined = await session.call_tool("submit_protocol", {"protocol": no})
            check(declined.is_error and "declined" in declined.content[0].text, f"declined {declined}")
            check(len(asked) == 2, f"asked again for the second protocol: {asked}")
            seen["declined"] = declined.content[0].text
    print(json.dumps(seen), flush=True)


def main():
    url, user, password, dye_mix_path, others_run = sys.argv[1:6]
    with open(dye_mix_path) as f:
        dye_mix = json.load(f)
    asyncio.run(agent(url, user, password, dye_mix, others_run))


if __name__ == "__main__":
    main()
