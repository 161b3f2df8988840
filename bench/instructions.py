"""Instructions per request: the cost of a feature counted, not timed, so a shared, noisy machine cannot move it.

    python -m bench.instructions                                   # hedging configured but never firing
    python -m bench.instructions --sides proxy,policies-memory,policies-redis --requests 1000
    python -m bench.instructions --sides passthrough,proxy,cache-memory-hit,cache-redis-hit --log-level info

Each side is a proxy process run under valgrind's callgrind with instrumentation off until the measure (start-up
is not counted). A client in this process sends `--requests` requests at `--connections` at a time after a
warm-up; callgrind counts the instructions the proxy executed in between (`Ir`), divided by the requests.
Wall time, other processes and the CPU frequency do not enter into it; what still moves it is how requests
happen to group in the proxy's event loop turns, which the A/A control shows: `proxy` and `proxy-again` are two
identical proxies, and their difference is the measure's own noise.

Sides: proxy, proxy-again (A/A), proxy+hedge (a tier hedging after 10 s, never reached), policies-memory and
policies-redis (as bench.policies: [auth] and the four built-ins, limits too high to refuse), cache-memory-hit and
cache-redis-hit (the response cache of `bench.run --cache`, primed before the warm-up as there, so every measured
request is a hit), and passthrough (bench/passthrough.py under the same callgrind: the reference the throughput
figures compare with, so its `x pass` column is the ratio the wall-clock runs are about). `--upstream-chunked`
frames the canned upstream's streams as Groq does. Each round measures every side once, in rotated order. Under
callgrind a request takes about 50 times as long, so the proxy is the
bottleneck: on Redis more requests share a script call than under real load (the table says how many).
Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.errors import BenchError
from bench.load import PLAIN_BODY, STREAM_BODY
from bench.policies import KEY, POLICIES, script_calls, start_redis
from bench.processes import Process
from bench.sides import (DIRECT_PATH, HOST, PROXY_CONFIG, PROXY_PATH, cache_config, free_port, http_call,
                         prime_cache, proxy_argv, start_upstream)
from policies.identity import hash_key

SIDES = ("proxy", "proxy-again", "proxy+hedge", "policies-memory", "policies-redis", "cache-memory-hit",
         "cache-redis-hit", "passthrough")
CACHE_HITS = {"cache-memory-hit": "cache-memory", "cache-redis-hit": "cache-redis"}  # -> bench.sides' cache side
REDIS_SIDES = ("policies-redis", "cache-redis-hit")
HEDGED = "hedge = true\nhedge_after_ms = 10000\n"


def config_text(side: str, port: int, upstream_port: int, redis_port: int, log_level: str = "warning") -> str:
    text = PROXY_CONFIG.format(host=HOST, port=port, upstream_port=upstream_port, log_level=log_level)
    if side == "proxy+hedge":
        text += HEDGED  # PROXY_CONFIG ends inside [models.tier-fast]
    if side.startswith("policies"):
        store = (f'[store]\nbackend = "redis"\nurl = "redis://{HOST}:{redis_port}/0"\n'
                 if side == "policies-redis" else "")
        text += POLICIES.format(digest=hash_key(KEY), store=store)
    if side in CACHE_HITS:
        text += cache_config(CACHE_HITS[side], redis_port)
    return text


def start(workdir: Path, side: str, upstream_port: int, redis_port: int,
          log_level: str = "warning") -> tuple[Process, int]:
    port = free_port()
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={workdir}/{side}.cg.%p"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROQ", "OTEL_"))}
    if side == "passthrough":
        argv = [*valgrind, sys.executable, "-m", "bench.passthrough", "--upstream",
                f"http://{HOST}:{upstream_port}{DIRECT_PATH}", "--host", HOST, "--port", str(port)]
        ready = ("POST", PROXY_PATH, PLAIN_BODY)
    else:
        config = workdir / f"{side}.toml"
        config.write_text(config_text(side, port, upstream_port, redis_port, log_level))
        env["BENCH_KEY"] = "bench"
        argv = [*valgrind, *proxy_argv(), "serve", "--config", str(config), "--port", str(port), "--no-check"]
        ready = ("GET", "/readyz", None)
    proc = Process(side, argv, workdir / f"{side}.log", env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            status, _, body = http_call(port, *ready, timeout=30)
            if status == 200 and b'"unavailable"' not in body:
                return proc, port
        except (OSError, http.client.HTTPException):  # not yet listening, or cut short while starting up
            pass
        time.sleep(0.5)
    raise BenchError(f"{side} did not become ready under valgrind:\n{proc.tail()}")


async def drive(port: int, body: str, requests: int, connections: int, hit: bool = False) -> None:
    """`hit`: every answer must be a cache hit (a miss would measure the upstream call instead)."""
    import aiohttp

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    url = f"http://{HOST}:{port}{PROXY_PATH}"
    left = iter(range(requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one_connection() -> None:
            for _ in left:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise BenchError(f"status {resp.status} from the proxy")
                    if hit and resp.headers.get("x-groq-proxy-cache") != "HIT":
                        raise BenchError(f"not a cache hit: {dict(resp.headers)}")

        await asyncio.gather(*(one_connection() for _ in range(connections)))


def control(*args: str) -> str:
    return subprocess.run(["callgrind_control", *args], capture_output=True, text=True, timeout=120).stdout


def instructions(workdir: Path, side: str, pid: int, port: int, body: str, requests: int, connections: int,
                 warmup: int) -> float:
    """Ir per request of `side` over `requests` requests."""
    hit = side in CACHE_HITS
    control("-i", "on", str(pid))
    asyncio.run(drive(port, body, warmup, connections, hit))
    control("-z", str(pid))
    before = set(workdir.glob(f"{side}.cg.*"))
    asyncio.run(drive(port, body, requests, connections, hit))
    control("-d", str(pid))
    control("-i", "off", str(pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(workdir.glob(f"{side}.cg.*")) - before:
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    dump.unlink()
                    return int(line.split()[1]) / requests
        time.sleep(0.2)
    raise BenchError(f"no callgrind dump from {side}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="proxy,proxy-again,proxy+hedge", help="a comma-separated subset of "
                        + ", ".join(SIDES))
    parser.add_argument("--mode", choices=("non-stream", "stream"), default="non-stream")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream-chunked", action="store_true", help="streams framed chunked, as Groq does")
    parser.add_argument("--log-level", default="warning", help="the proxies' server.log_level (bench.run's is "
                        "info: one line per request, which a cache hit's cost includes)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise BenchError("valgrind is not installed (apt-get install valgrind)")
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise BenchError(f"unknown sides: {', '.join(sorted(unknown))}")
    body = STREAM_BODY if args.mode == "stream" else PLAIN_BODY
    procs: list[Process] = []
    results: dict[str, list[float]] = {side: [] for side in sides}
    trips: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        try:
            upstream, upstream_port = start_upstream(workdir, args.upstream_chunked, None)
            procs.append(upstream)
            redis_port = 0
            if set(REDIS_SIDES) & set(sides):
                redis, redis_port = start_redis(workdir)
                procs.append(redis)
            started = {}
            for side in sides:
                proc, port = start(workdir, side, upstream_port, redis_port, args.log_level)
                procs.append(proc)
                started[side] = (proc, port)
                if side in CACHE_HITS:  # every request of the measure is then a hit
                    prime_cache(port, args.mode, timeout=60)
            for r in range(args.rounds):
                for side in sides[r % len(sides):] + sides[: r % len(sides)]:
                    proc, port = started[side]
                    calls = script_calls(redis_port) if side == "policies-redis" else 0
                    ir = instructions(workdir, side, proc.pid, port, body, args.requests, args.connections,
                                      args.warmup)
                    if side == "policies-redis":
                        trips.append((script_calls(redis_port) - calls) / (args.requests + args.warmup))
                    results[side].append(ir)
                    print(f"round {r + 1} {side:16s} {ir:12,.0f} instructions/request", file=sys.stderr, flush=True)
        finally:
            for proc in reversed(procs):
                proc.stop()
    median = {side: statistics.median(v) for side, v in results.items()}
    base = median.get("proxy")
    framing = " (upstream chunked)" if args.upstream_chunked else ""
    thin = median.get("passthrough")
    print(f"\n{args.mode}{framing}, {args.connections} connections, {args.requests} requests a run, median of "
          f"{args.rounds} rounds (instructions the proxy process executed, per request)")
    print(f"{'side':18s} {'instr/request':>14s} {'x proxy':>8s} {'x pass':>8s} {'runs':>40s}")
    for side in sides:
        ratio = f"{median[side] / base:.4f}" if base else "-"
        to_thin = f"{median[side] / thin:.4f}" if thin else "-"
        runs = " ".join(f"{v / 1e6:.3f}M" for v in results[side])
        print(f"{side:18s} {median[side]:14,.0f} {ratio:>8s} {to_thin:>8s} {runs:>40s}")
    if trips:
        print(f"policies-redis: {statistics.median(trips):.2f} Redis script calls per request under callgrind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
