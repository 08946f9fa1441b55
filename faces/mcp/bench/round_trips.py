"""Round trips of labctl's MCP tools with the official Python SDK over streamable HTTP (docs/mcp.md, Figures).

Usage: python faces/mcp/bench/round_trips.py http://127.0.0.1:PORT/mcp [DYE_MIX_JSON]
against `labctl run --sim --mcp 127.0.0.1:0`, as planner-bo (the simulated lab's development planner).
"""
import asyncio, json, sys, time, statistics
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
url = sys.argv[1]
dye = json.load(open(sys.argv[2] if len(sys.argv) > 2 else 'protocols/examples/dye-mix.json'))
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs)-1, int(p/100*len(xs)))]
async def main():
    t0 = time.perf_counter()
    http = create_mcp_http_client(auth=httpx2.BasicAuth("planner-bo", "planner-dev"))
    async with streamable_http_client(url, http_client=http) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            t_init = (time.perf_counter() - t0) * 1000
            for name, args, n in [("list_instruments", {}, 300), ("validate_protocol", {"protocol": dye}, 200), ("dry_run_protocol", {"protocol": dye}, 50)]:
                xs = []
                for _ in range(n):
                    a = time.perf_counter(); res = await s.call_tool(name, args); xs.append((time.perf_counter() - a) * 1000)
                    assert not res.is_error
                print(f"{name}: n={n} p50={pct(xs,50):.2f} ms p99={pct(xs,99):.2f} ms")
    print(f"first connection (login with argon2 + initialize): {t_init:.1f} ms")
asyncio.run(main())
