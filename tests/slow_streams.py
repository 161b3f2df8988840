"""Many slow streams through a real `groq-proxy serve`, for the drain and worker tests: a slow `groq-proxy
simulate` upstream, a config with token_budget on the suite's Redis, streams opened together, and the budget
read back through a fresh proxy on the same Redis."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
import orjson

from proxy.app.config import load_config
from tests.procs import Proc, clean_env, start_serving

STREAMS = 50
SIM_KEY = "sk-test-drain-upstream-key"


async def start_simulator(tmp_path, tokens_per_s: float) -> tuple[Proc, str]:
    sim = await Proc(tmp_path, "sim").start("simulate", "--port", "0", "--tokens-per-s", str(tokens_per_s),
                                            env=clean_env())
    try:
        return sim, await sim.wait_listening("stdout")
    except BaseException:
        await sim.stop()
        raise


def write_config(tmp_path, sim_url: str, store: dict, server: dict, telemetry: str = "") -> str:
    path = tmp_path / "proxy.toml"
    store_lines = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in store.items())
    server_lines = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in server.items())
    path.write_text(f"""
[server]
{server_lines}
[providers.sim]
base_url = "{sim_url}/openai/v1"
api_key_env = "SIM_KEY"
[models.tier-test]
chain = ["sim:openai/gpt-oss-20b"]
[store]
{store_lines}
[[policies]]
use = "token_budget"
per = "global"
tokens = 100000000
{telemetry}
""")
    return str(path)


def body(i: int, max_tokens: int) -> dict:
    return {"model": "tier-test", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"stream number {i}"}]}


async def open_streams(base: str, max_tokens: int):
    """STREAMS streams, each on its own connection, once each has its first bytes (a stream refused instead
    fails here with the proxy's answer). Returns the session and the tasks; each ends with the whole raw body."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
    started: asyncio.Queue = asyncio.Queue()

    async def one(i: int) -> bytes:
        try:
            async with session.post(base + "/v1/chat/completions", json=body(i, max_tokens)) as resp:
                if resp.status != 200:
                    raise AssertionError(f"stream {i}: {resp.status} {await resp.text()}")
                got = await resp.content.readany()
                started.put_nowait(None)
                return got + await resp.read()
        except BaseException as exc:
            started.put_nowait(exc)
            raise

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    try:
        for _ in range(STREAMS):
            failed = await asyncio.wait_for(started.get(), 60)
            if failed is not None:
                raise failed
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        raise
    return session, tasks


def events(raw: bytes) -> list[bytes]:
    return [e[len(b"data: "):] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]


async def budget(start_proxy, config_path: str) -> dict:
    """The token budget as /v1/usage reports it, read through a fresh proxy on the same Redis."""
    base = await start_proxy(load_config(config_path, env={"SIM_KEY": SIM_KEY}))
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/usage") as resp:
            assert resp.status == 200
            return (await resp.json())["budgets"][0]


@dataclass
class Running:
    """A proxy serving STREAMS open streams (`streams`: tasks, each ending with its raw body)."""

    proxy: Proc
    base: str
    config: str
    session: aiohttp.ClientSession
    streams: list[asyncio.Task]


@contextlib.asynccontextmanager
async def streams_through_proxy(tmp_path, store: dict, server: dict, *, tokens_per_s: float, max_tokens: int,
                                telemetry: str = ""):
    """A slow simulator, a `groq-proxy serve` in front of it (this [server] table, token_budget on `store`) and
    STREAMS streams of `max_tokens` open through it. On the way out the session, the proxy and the simulator
    are stopped, whatever happened; the proxy's log stays readable."""
    sim, sim_url = await start_simulator(tmp_path, tokens_per_s)
    path = write_config(tmp_path, sim_url, store, server, telemetry)
    proxy = session = None
    try:
        proxy, base = await start_serving(tmp_path, "proxy", "--config", path, env=clean_env(SIM_KEY=SIM_KEY))
        session, streams = await open_streams(base, max_tokens)
        yield Running(proxy, base, path, session, streams)
    finally:
        if session is not None:
            await session.close()
        if proxy is not None:
            await proxy.stop()
        await sim.stop()
