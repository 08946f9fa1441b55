#!/usr/bin/env python3
"""Reference figures for Bluesky's RunEngine, the peer labctl's step overhead is compared with.

Measures, on this machine, in one process:
  1. a RunEngine ``scan([det], motor, -1, 1, N)`` over ophyd's simulated devices (``ophyd.sim``:
     zero-delay ``SynAxis`` motor, ``SynGauss`` detector), with one no-op document callback as the
     only subscriber (no live table, no plots, no databroker): ms per scan point and points per second;
  2. the RunEngine's bare per-message cost: a plan yielding N ``Msg('null')``: us per message.
Each figure is the median of ``--repeats`` timed runs after one untimed warm-up run. The last line
printed is one JSON object, for scripts.

Install its deps into the project venv (``scripts/test`` creates ``.venv`` with ``python3 -m venv .venv``;
pure-Python/manylinux wheels, no Debian package needed):

    python3 -m venv .venv            # if missing
    .venv/bin/pip install bluesky ophyd

Run:

    .venv/bin/python scripts/bench-bluesky.py [--points 1000] [--msgs 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=1000, help="scan points per scan (default 1000)")
    ap.add_argument("--msgs", type=int, default=10000, help="bare Msg('null') per plan (default 10000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is kept (default 5)")
    args = ap.parse_args()
    if args.points < 2 or args.msgs < 1 or args.repeats < 1:
        ap.error("--points must be >= 2, --msgs and --repeats >= 1")

    try:
        from bluesky import RunEngine
        from bluesky.plans import scan
        from bluesky.utils import Msg
        from ophyd.sim import det, motor
    except ImportError as e:
        print(f"bench-bluesky: {e}; install with: .venv/bin/pip install bluesky ophyd", file=sys.stderr)
        return 2

    RE = RunEngine({})
    docs = {"n": 0}

    def sink(name, doc):  # stands in for the one writer a real deployment would subscribe
        docs["n"] += 1

    RE.subscribe(sink)

    def timed(make_plan) -> float:
        t0 = time.perf_counter()
        RE(make_plan())
        return time.perf_counter() - t0

    def median_of(make_plan) -> float:
        timed(make_plan)  # warm-up: imports, caches, first-run setup
        return statistics.median(timed(make_plan) for _ in range(args.repeats))

    # 1. scan over simulated devices
    n = args.points
    docs["n"] = 0
    timed(lambda: scan([det], motor, -1, 1, n))
    docs_per_scan = docs["n"]
    t_scan = median_of(lambda: scan([det], motor, -1, 1, n))
    ms_per_point = t_scan / n * 1e3
    points_per_s = n / t_scan
    print(f"bluesky {version('bluesky')}, ophyd {version('ophyd')}, python {sys.version.split()[0]}")
    print(
        f"scan([det], motor, -1, 1, {n}): {t_scan * 1e3:.1f} ms per scan (median of {args.repeats}), "
        f"{ms_per_point:.3f} ms per point, {points_per_s:.0f} points/s, {docs_per_scan} documents per scan"
    )

    # 2. bare messages
    m = args.msgs

    def nulls():
        for _ in range(m):
            yield Msg("null")

    t_msgs = median_of(nulls)
    t_empty = median_of(lambda: iter(()))  # fixed cost of one RE(...) call with no message
    us_per_msg = t_msgs / m * 1e6
    print(
        f"{m} x Msg('null'): {t_msgs * 1e3:.1f} ms per plan (median of {args.repeats}), "
        f"{us_per_msg:.2f} us per message (RE call with an empty plan: {t_empty * 1e3:.2f} ms)"
    )

    print(
        json.dumps(
            {
                "bluesky_version": version("bluesky"),
                "ophyd_version": version("ophyd"),
                "scan_points": n,
                "ms_per_point": round(ms_per_point, 4),
                "points_per_s": round(points_per_s, 1),
                "us_per_msg": round(us_per_msg, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
