"""The benchmark: one command that loads a canned upstream directly and through the proxy, and prints the table.

    python -m bench.run                  # 10 s per measured run, then the 100,000-request memory phase
    python -m bench.run --quick          # 3 s runs
    python -m bench.run --json out.json  # also write every number
    python -m bench.run --tracing        # also a second proxy with tracing (every request) and metrics on
    python -m bench.run --cache          # also cache hits, memory and Redis store (with the pass-through)
    python -m bench.run --repeat 5       # each cell's sides measured 5 times, interleaved; medians printed
    python -m bench.run --workers 2      # also `serve --workers 2` ("proxy-2w") beside the one-worker proxy

For each mode (non-stream, stream) and connection count (1, 16) it measures wrk -> canned upstream ("direct")
and wrk -> proxy -> canned upstream ("proxy"), each after a short warm-up, and prints req/s, p50 and p99, the
proxy figures as ratios of the direct ones and the latency the proxy adds. With --tracing, a second proxy
("proxy+tracing": every request sampled, spans exported to bench/otlp_sink.py) is measured beside the first
and compared with it. With --repeat N, each cell's sides are measured in N interleaved rounds (the order rotated
each round) and the table shows each figure's median over the rounds. Then it drives at least 100,000
requests through the proxy and reads its resident memory. Targets are printed beside the figures; a missed
target is reported, never an error (the machine is shared and noisy). See bench/README.md.

This module is the command line and the order of the phases; each phase lives in a module of its own beside it
(bench/README.md, "Where the code is").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from bench.errors import BenchError
from bench.load import MODES
from bench.memory import memory_phase
from bench.meta import machine_meta
from bench.report import json_report, render
from bench.session import Bench
from bench.targets import TARGETS
from bench.tracing import collect_tracing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up before each run (default 2)")
    parser.add_argument("--quick", action="store_true", help="3 s runs after 1 s warm-ups")
    parser.add_argument("--connections", default="1,16", help="comma-separated connection counts (default 1,16)")
    parser.add_argument("--modes", default="non-stream,stream", help="non-stream, stream or both (default both)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the cores are shared)")
    parser.add_argument("--mem-requests", type=int, default=TARGETS.rss_after_requests,
                        help="requests of the memory phase (default 100000; 0 skips it)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="the proxy's server.log_level (default info, the proxy's own default)")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure the thinnest aiohttp pass-through (bench/passthrough.py) on the same load")
    parser.add_argument("--tracing", action="store_true",
                        help="also measure a proxy with tracing (every request sampled, exported to "
                             "bench/otlp_sink.py) and metrics on, beside the plain proxy")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also measure `groq-proxy serve --workers N` (side proxy-Nw) beside the one-worker "
                             "proxy, and report its req/s over one worker's (default: not measured)")
    parser.add_argument("--cache", action="store_true",
                        help="also measure cache hits: a proxy with the response cache on the memory store and one "
                             "on Redis (every request the same, so hits); implies --baseline")
    parser.add_argument("--upstream-chunked", action="store_true",
                        help="the canned upstream frames streams chunked (as Groq does) instead of Content-Length")
    parser.add_argument("--pin", action="store_true",
                        help="taskset: the proxy on cpu 1, the upstream and wrk on cpu 0 (default: not pinned)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure each cell's sides in N interleaved rounds (order rotated each round) and "
                             "report the medians (default 1)")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each run, wait up to this many seconds for other work to leave the cores "
                             "(default 30; 5 with --repeat > 1)")
    parser.add_argument("--remeasure", type=int, default=None,
                        help="measure a run disturbed by other work again, up to this many times "
                             "(default 1; 0 with --repeat > 1, where the median outvotes a disturbed round)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.cache:
        args.baseline = True  # the cache's targets are ratios to the pass-through
    if args.quick:
        args.duration = 3.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    # With repeats the median already outvotes a disturbed round, and waiting 30 s and measuring again before
    # each of N times as many runs could double the bench's time: a short wait, no re-measuring (unless asked).
    if args.quiet_wait is None:
        args.quiet_wait = 30.0 if args.repeat == 1 else 5.0
    if args.remeasure is None:
        args.remeasure = 1 if args.repeat == 1 else 0
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error("--connections: comma-separated integers, e.g. 1,16")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.connections or any(c < 1 for c in args.connections):
        parser.error("--connections: at least one count, each at least 1")
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error("--modes: non-stream, stream or both")
    if args.workers == 1 or args.workers < 0:
        parser.error("--workers: 2 or more (the one-worker proxy is always measured)")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs at least 2 cores")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (apt-get install wrk, or `make bench`)", file=sys.stderr)
        return 2
    # Ctrl-C, kill and a closed terminal all take the same way out: stop the children, print what was measured.
    # (SIGINT too, explicitly: a shell starting us in the background may have set it to be ignored.)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    meta = machine_meta()
    with tempfile.TemporaryDirectory(prefix="groq-proxy-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.start()
            bench.table_runs()
            collect_tracing(bench)
            memory_phase(bench)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; stopped what it started", file=sys.stderr)
            if bench.runs:
                print(render(bench, meta), flush=True)
            return 130
        finally:
            bench.stop()
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(render(bench, meta), flush=True)
    if args.json:
        report = json_report(bench, meta)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
