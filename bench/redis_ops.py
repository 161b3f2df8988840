"""Redis commands per request, by feature: what the README's "Scaling out" table is measured with.

    python -m bench.redis_ops                      # 400 requests a feature, one at a time and 32 at a time

For each feature (proxy keys alone, each built-in policy alone, all of them) a proxy runs in this process on a
redis-server of its own, answering from the built-in simulator; `INFO commandstats` is read before and after N
requests, and the difference (less the INFO calls themselves) divided by N is the figure. Sequential requests
show the cost of a lone request; concurrent ones show the batching (requests that reach the store while a call
is on its way share the next one). Redis's CPU per request comes from its process (/proc), and the time its
commands took from commandstats' `usec`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import tomllib
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.policies import start_redis
from bench.procfs import cpu_seconds
from policies.identity import hash_key
from proxy.app.config import parse_config
from proxy.app.server import build_app

KEY = "gp-bench-key"
AUTH = f'[auth]\n[[auth.keys]]\nid = "bench"\nsha256 = "{hash_key(KEY)}"\n'
POLICIES = {
    "request_budget": '[[policies]]\nuse = "request_budget"\n',
    "token_budget": '[[policies]]\nuse = "token_budget"\nper = "key"\ntokens = 1000000000000\nperiod = "day"\n',
    "rate_limit": '[[policies]]\nuse = "rate_limit"\nper = "global"\nrequests_per_minute = 100000000\n'
                  'tokens_per_minute = 100000000000\n',
    "concurrency": '[[policies]]\nuse = "concurrency"\nper = "model"\nlimits = { "tier-fast" = 100000 }\n',
}
FEATURES = {
    "auth only": [],
    "request_budget": ["request_budget"],
    "token_budget": ["token_budget"],
    "rate_limit": ["rate_limit"],
    "concurrency": ["concurrency"],
    "all four": ["request_budget", "token_budget", "rate_limit", "concurrency"],
}
BODY = {"model": "tier-fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def config_text(policies: list[str], redis_port: int, prefix: str) -> str:
    text = ('[server]\nlog_level = "warning"\n\n[providers.groq]\nbase_url = "http://127.0.0.1:9/openai/v1"\n\n'
            '[models.tier-fast]\nchain = ["groq:openai/gpt-oss-20b"]\n\n' + AUTH)
    if policies:
        text += f'\n[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{redis_port}/0"\nprefix = "{prefix}"\n\n'
        text += "\n".join(POLICIES[p] for p in policies)
    return text


def commandstats(port: int) -> dict[str, tuple[int, int]]:
    import redis

    with redis.Redis(port=port) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for name, v in stats.items()
            if name != "cmdstat_info"}


async def run_feature(name: str, policies: list[str], redis_port: int, redis_pid: int, n: int,
                      concurrency: int) -> dict:
    config = parse_config(tomllib.loads(config_text(policies, redis_port, f"b{abs(hash(name)) % 10**6}:")), env={})
    runner = web.AppRunner(build_app(config, simulate=True))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    out = {"feature": name}
    try:
        async with aiohttp.ClientSession() as session:
            async def one() -> None:
                async with session.post(url, json=BODY, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{name}: {resp.status}")

            await one()  # warm: connections open, scripts loaded
            await asyncio.sleep(0.2)
            for label, width in (("sequential", 1), (f"{concurrency} at a time", concurrency)):
                before, cpu_before = commandstats(redis_port), cpu_seconds(redis_pid)
                queue = list(range(n))

                async def worker() -> None:
                    while queue:
                        queue.pop()
                        await one()

                await asyncio.gather(*(worker() for _ in range(width)))
                await asyncio.sleep(0.3)  # settlements land after the answer
                after, cpu_after = commandstats(redis_port), cpu_seconds(redis_pid)
                calls = {c: after[c][0] - before.get(c, (0, 0))[0] for c in after
                         if after[c][0] != before.get(c, (0, 0))[0]}
                # A script's own commands are counted too, and its usec holds theirs: the round trips are the
                # EVALSHA calls, Redis's time is EVALSHA's usec (plus any command sent on its own).
                connection = {"client", "hello", "ping", "script"}  # connecting, probing, loading a script
                inside = {c: v for c, v in calls.items() if c not in connection and c != "evalsha"}
                usec = after.get("evalsha", (0, 0))[1] - before.get("evalsha", (0, 0))[1]
                out[label] = {"round_trips_per_request": round(calls.get("evalsha", 0) / n, 3),
                              "commands_in_scripts_per_request": round(sum(inside.values()) / n, 2),
                              "by_command": {c: round(v / n, 2) for c, v in sorted(inside.items())},
                              "redis_script_us_per_request": round(usec / n, 1),
                              "redis_cpu_us_per_request": round((cpu_after - cpu_before) * 1e6 / n, 1)}
    finally:
        await runner.cleanup()
    return out


async def main_async(n: int, concurrency: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        redis, redis_port = start_redis(Path(tmp))
        try:
            return [await run_feature(name, policies, redis_port, redis.pid, n, concurrency)
                    for name, policies in FEATURES.items()]
        finally:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args.requests, args.concurrency))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"Redis per request ({args.requests} requests a feature)")
    print("| feature | requests | round trips (EVALSHA) | commands inside the scripts | Redis µs in scripts | "
          "redis-server CPU µs |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for label, m in row.items():
            if label == "feature":
                continue
            by = ", ".join(f"{c} {v:g}" for c, v in m["by_command"].items())
            print(f"| {row['feature']} | {label} | {m['round_trips_per_request']:g} | "
                  f"{m['commands_in_scripts_per_request']:g}{f' ({by})' if by else ''} | "
                  f"{m['redis_script_us_per_request']} | {m['redis_cpu_us_per_request']} |")


if __name__ == "__main__":
    main()
