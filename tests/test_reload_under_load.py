"""A reload under load loses no request: the real `groq-proxy serve` in a subprocess, steady concurrent plain and
streamed traffic through it, reloaded six times (SIGHUP and POST /admin/reload, a bad file by each), and every
request answered in full, each new config taking effect while the traffic runs."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson

from proxy.sim.testing import Behaviour, ScriptedUpstream
from tests.conftest import ADMIN, ADMIN_KEY, until
from tests.procs import clean_env, start_serving

CLIENTS = 8
UPSTREAM_KEY = "sk-test-secret-upstream-key"


def config(url: str, model: str, extra_models: str = "") -> str:
    # A concurrency limit of twice the clients: a slot that a reload leaked would soon refuse requests.
    return f"""
[server]
admin_key_env = "TEST_ADMIN_KEY"

[providers.up]
base_url = "{url}"
api_key_env = "TEST_UPSTREAM_KEY"

[models.tier-test]
chain = ["up:{model}"]
{extra_models}
[[policies]]
use = "concurrency"
limit = {2 * CLIENTS}
"""


BAD = '\n[models.tier-bad]\nchain = ["nowhere:m1"]\n'


class Traffic:
    """CLIENTS loops of requests, plain and streamed in turn, until stopped; every outcome recorded."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.answered: list[str] = []  # the real model of each request answered in full
        self.failures: list[str] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._client(session, i) for i in range(CLIENTS)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        stream = i % 2 == 0
        while not self.stopping.is_set():
            body = {"model": "tier-test", "messages": [{"role": "user", "content": f"client {i}"}], "stream": stream}
            try:
                async with session.post(self.base + "/v1/chat/completions", json=body) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        self.failures.append(f"{resp.status}: {raw[:300]!r}")
                    elif stream and not raw.endswith(b"data: [DONE]\n\n"):
                        self.failures.append(f"stream not ended: {raw[-300:]!r}")
                    else:
                        self.answered.append(resp.headers["x-groq-proxy-model"])
            except aiohttp.ClientError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            stream = not stream

    async def progress(self, requests: int) -> None:
        """Waits until `requests` more have been answered: the traffic runs on across the step just taken."""
        goal = len(self.answered) + requests
        await until(lambda: len(self.answered) >= goal or self.failures, timeout=60, what=f"{requests} answers")


async def test_reloads_under_load_lose_no_request(aiohttp_server, tmp_path):
    # Every answer takes a moment upstream, so requests are in flight whenever a reload swaps the config.
    scripted = ScriptedUpstream({f"m{n}": Behaviour("slow_first", delay_s=0.01) for n in range(1, 6)})
    url = f"http://127.0.0.1:{(await aiohttp_server(scripted.app())).port}/openai/v1"
    path = tmp_path / "proxy.toml"
    path.write_text(config(url, "m1"))
    env = clean_env(TEST_UPSTREAM_KEY=UPSTREAM_KEY, TEST_ADMIN_KEY=ADMIN_KEY)
    proc, base = await start_serving(tmp_path, "proxy", "--config", str(path), "--no-check", env=env)
    traffic = Traffic(base)
    running = asyncio.create_task(traffic.run())

    async def admin_reload() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/admin/reload", headers=ADMIN) as resp:
                return resp.status, orjson.loads(await resp.read())

    async def sighup(expect: str, generation: int) -> dict:
        proc.process.send_signal(signal.SIGHUP)
        return await proc.wait_for_log(lambda line: line["event"] == expect and line["generation"] == generation)

    try:
        await traffic.progress(2 * CLIENTS)
        path.write_text(config(url, "m2"))
        assert (await sighup("config_reloaded", 2))["trigger"] == "SIGHUP"
        await traffic.progress(2 * CLIENTS)

        path.write_text(config(url, "m3") + BAD)
        code, answer = await admin_reload()
        assert code == 400 and "models.tier-bad.chain[0]: unknown provider 'nowhere'" in answer["error"]["message"]
        await traffic.progress(2 * CLIENTS)

        path.write_text(config(url, "m3", '[models.tier-new]\nchain = ["up:m1"]\n'))
        code, answer = await admin_reload()
        assert code == 200 and answer["generation"] == 3
        await traffic.progress(2 * CLIENTS)

        path.write_text(config(url, "m4") + BAD)
        refused = await sighup("config_reload_refused", 3)
        assert refused["trigger"] == "SIGHUP" and "unknown provider 'nowhere'" in refused["error"]
        await traffic.progress(2 * CLIENTS)

        path.write_text(config(url, "m4"))
        await sighup("config_reloaded", 4)
        await traffic.progress(2 * CLIENTS)

        path.write_text(config(url, "m5", '[models.tier-last]\nchain = ["up:m2"]\n'))
        code, answer = await admin_reload()
        assert code == 200 and answer["generation"] == 5
        await traffic.progress(2 * CLIENTS)
    finally:
        traffic.stopping.set()
        await asyncio.wait_for(running, 60)

    try:
        assert traffic.failures == []
        # Each config answered in its turn, while the traffic ran: m1 first, then every one after it.
        assert traffic.answered[0] == "m1" and set(traffic.answered) == {"m1", "m2", "m3", "m4", "m5"}
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/v1/models") as resp:
                ids = [m["id"] for m in (await resp.json())["data"]]
            body = {"model": "tier-test", "messages": [{"role": "user", "content": "last"}]}
            async with session.post(base + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200 and resp.headers["x-groq-proxy-model"] == "m5"
        assert "tier-last" in ids and "tier-new" not in ids and "tier-bad" not in ids
        assert not [line for line in proc.log_lines() if line["event"] == "internal_error"]
        assert proc.process.returncode is None
    finally:
        await proc.stop()
