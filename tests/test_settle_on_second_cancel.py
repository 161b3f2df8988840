"""A request's policies settle however its handler ends: here the client leaves while keep-alive comments are
going out, and a second cancellation reaches the handler while it stops them (as a shutdown cancelling every
task would). The concurrency slot must still be given back."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.pipeline.client_stream import ClientStream
from proxy.sim.testing import Behaviour
from tests.conftest import config_for, post_chat

ASK = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_second_cancellation_while_keepalives_stop_still_frees_the_slot(upstream, start_proxy, monkeypatch):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=3)
    stopped = asyncio.Event()
    stop = ClientStream.stop_keepalive

    async def cancelled_again(self) -> None:
        asyncio.current_task().cancel()  # the second cancellation lands in the middle of the handler's clean-up
        stopped.set()
        await stop(self)

    monkeypatch.setattr(ClientStream, "stop_keepalive", cancelled_again)
    config = config_for(url, {"tier-test": ["m1"]}, server={"keepalive_s": 0.05},
                        provider={"first_byte_timeout_s": 10, "timeout_s": 10},
                        policies=[{"use": "concurrency", "per": "global", "limit": 1}])
    base = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(base + "/v1/chat/completions", json={**ASK, "stream": True})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b": keep-alive")  # the slot is held, comments flow
        resp.close()  # the client leaves: the handler is cancelled, its finally stops the comments
    await asyncio.wait_for(stopped.wait(), 10)
    scripted.behaviours["m1"] = Behaviour("ok")
    for _ in range(200):  # the handler's clean-up ends within a few turns; a slot never given back stays taken
        status, _, _ = await post_chat(base, ASK)
        if status == 200:
            break
        assert status == 429
        await asyncio.sleep(0.02)
    assert status == 200  # the one slot was given back
