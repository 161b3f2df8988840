"""A client that leaves while its admission is on its way to Redis: whatever the store reserved for it comes
back (the concurrency slot, the token budget's reservation), instead of staying taken until the lease or the
period ends. The real Redis of the suite, paused with CLIENT PAUSE so the admission is slow."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from proxy.app.server import STATE, build_app
from tests.conftest import config_for, until

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 40}


async def _usage(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/usage") as resp:
            return orjson.loads(await resp.read())


@pytest.mark.parametrize("moment", ["in_flight", "landing"])
async def test_a_client_gone_during_a_slow_admission_gives_its_reservations_back(
        moment, upstream, aiohttp_server, redis_url, monkeypatch):
    """`in_flight`: the client leaves while Redis holds the call (the store gives it back when it lands).
    `landing`: Redis answers and the client's leaving is seen in the same turn of the loop, before the handler
    resumes to read its admission (the case that left the reservation behind: 48 tokens still reserved)."""
    scripted, url = upstream
    store = {"backend": "redis", "url": redis_url, "prefix": f"t{os.urandom(6).hex()}:", "timeout_s": 60}
    config = config_for(url, store=store, policies=[
        {"use": "concurrency", "per": "global", "limit": 1},
        {"use": "token_budget", "per": "global", "tokens": 100000, "period": "day"}])
    app = build_app(config)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    redis_store = app[STATE].generation.pipeline.policies.store
    raw = Redis.from_url(redis_url)
    handlers: list[asyncio.Task] = []
    if moment == "landing":
        admitted = redis_store._admitted

        def admitted_then_gone(admits, result):
            admitted(admits, result)  # the admission's future has its result ...
            for task in handlers:
                task.cancel()  # ... and aiohttp cancels the handler of a connection whose client left

        monkeypatch.setattr(redis_store, "_admitted", admitted_then_gone)
    try:
        async with aiohttp.ClientSession() as session:
            await raw.execute_command("CLIENT", "PAUSE", 30000, "WRITE")  # the admission's script waits
            try:
                before = redis_store.round_trips
                request = asyncio.ensure_future(session.post(base + "/v1/chat/completions", json=BODY))
                await until(lambda: redis_store.round_trips > before, what="the admission to be on its way")
                # the connection's handler task, the one aiohttp cancels when its client leaves
                handlers += [t for t in asyncio.all_tasks()
                             if getattr(t.get_coro(), "__qualname__", "") == "RequestHandler.start"]
                assert len(handlers) == 1
                if moment == "in_flight":
                    request.cancel()  # the client leaves while Redis holds the call
                    await until(lambda: handlers[0].done(), timeout=20, what="the handler to be cancelled")
            finally:
                await raw.execute_command("CLIENT", "UNPAUSE")
            await until(lambda: handlers[0].done() and not redis_store.busy, timeout=20,
                        what="the store's calls to land")
            if not request.done():
                request.cancel()
        usage = await _usage(base)
    finally:
        await raw.aclose()
    assert len(scripted.requests) == 0  # nothing went upstream
    budget = usage["budgets"][0]
    assert budget["used"] == 0 and budget["reserved"] == 0, budget
    async with aiohttp.ClientSession() as session:  # the one concurrency slot is free again
        async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
            assert resp.status == 200, await resp.text()
