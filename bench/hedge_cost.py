"""What hedging costs when it does not fire (issue 10, item 9): two proxies on the same canned upstream, one
plain, one whose tier hedges after 10 s (never reached: the canned upstream answers at once), measured by wrk in
interleaved rounds (order rotated each round), medians reported: throughput, and the proxy process's CPU per
request (steadier than throughput on a shared machine). Target: within 5% of the plain proxy.

    python -m bench.hedge_cost --rounds 5 --duration 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.load import Wrk, measure
from bench.sides import HOST, PROXY_PATH, check_answers, start_proxy, start_upstream

HEDGED = "hedge = true\nhedge_after_ms = 10000\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", default="1,16")
    parser.add_argument("--modes", default="non-stream,stream")
    parser.add_argument("--calibrate", action="store_true",
                        help="both proxies plain: shows the spread between two identical sides on this machine")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hedge-cost-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_port = start_upstream(workdir, False, None)
        procs = {}
        try:
            for side, extra in (("proxy", ""), ("proxy+hedge", "" if args.calibrate else HEDGED)):
                procs[side] = start_proxy(workdir, upstream_port, "info", None, side, tier_extra=extra)
                check_answers(procs[side][1], PROXY_PATH, via_proxy=True)
            wrk = Wrk(workdir, 1, None)
            watched = {side: proc.pid for side, (proc, _) in procs.items()}
            watched["upstream"] = upstream.pid
            sides = list(procs)
            print(f"{'mode':<11}{'conn':>5}  {'proxy req/s':>12}  {'proxy+hedge req/s':>18}  {'ratio':>6}"
                  f"  {'proxy CPU us/req':>17}  {'proxy+hedge CPU us/req':>23}  {'ratio':>6}")
            for mode in args.modes.split(","):
                for connections in map(int, args.connections.split(",")):
                    rps = {side: [] for side in sides}
                    cpu = {side: [] for side in sides}
                    for round_ in range(args.rounds):
                        for side in sides[round_ % 2:] + sides[:round_ % 2]:
                            url = f"http://{HOST}:{procs[side][1]}{PROXY_PATH}"
                            measure(wrk, url, mode, connections, 1, side, watched)  # warm-up
                            run = measure(wrk, url, mode, connections, args.duration, side, watched)
                            rps[side].append(run.rps)
                            cpu[side].append(run.cpu_us_per_request)
                    plain, hedged = (statistics.median(rps[s]) for s in sides)
                    plain_cpu, hedged_cpu = (statistics.median(cpu[s]) for s in sides)
                    print(f"{mode:<11}{connections:>5}  {plain:>12,.0f}  {hedged:>18,.0f}  {hedged / plain:>6.3f}"
                          f"  {plain_cpu:>17.1f}  {hedged_cpu:>23.1f}  {hedged_cpu / plain_cpu:>6.3f}", flush=True)
        finally:
            for proc, _ in procs.values():
                proc.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
