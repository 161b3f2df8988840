"""Redis down at start-up or stopped in the middle of a run: the proxy starts and serves, says so in its log
and on /readyz, each policy follows its on_error, and it recovers when Redis is back."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson

from tests.conftest import config_for

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}


async def post(base: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
            return resp.status, orjson.loads(await resp.read())


async def readyz(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/readyz") as resp:
            assert resp.status == 200
            return await resp.json()


async def store_back(base: str, timeout: float = 15.0) -> None:
    """Waits until /readyz says the store is reachable again (the store probes Redis once a second)."""
    deadline = time.monotonic() + timeout
    while (await readyz(base))["store"]["status"] != "ok":
        assert time.monotonic() < deadline, "the store never came back"
        await asyncio.sleep(0.05)


async def test_redis_down_at_start_then_back_then_gone_again(upstream, start_proxy, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="groq_proxy")
    scripted, url = upstream
    redis_server.stop()
    store = {"backend": "redis", "url": redis_server.url}
    open_base = await start_proxy(config_for(url, store=store, policies=[
        {"use": "rate_limit", "requests_per_minute": 1}]))
    closed_base = await start_proxy(config_for(url, store=store, policies=[
        {"use": "rate_limit", "requests_per_minute": 1, "on_error": "closed"}]))
    assert (await readyz(open_base))["store"] == {"backend": "redis", "status": "unavailable", "url": redis_server.url}
    assert any(r.getMessage() == "store_unavailable" for r in caplog.records)
    assert [(await post(open_base))[0] for _ in range(3)] == [200, 200, 200]  # open: served, counted as errors
    assert len([r for r in caplog.records if r.getMessage() == "policy_store_unavailable"]) == 1  # not one a request
    status, body = await post(closed_base)
    assert status == 503 and body["error"]["code"] == "policy_unavailable"

    redis_server.start()
    for base in (open_base, closed_base):
        await store_back(base)
    assert (await post(open_base))[0] == 200
    status, body = await post(open_base)  # the limit holds again: 1 a minute
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"

    redis_server.stop()
    assert (await post(open_base))[0] == 200
    assert (await post(closed_base))[0] == 503
    async with aiohttp.ClientSession() as session:
        async with session.get(open_base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_policy_decisions_total{policy="rate_limit",decision="error",mode="enforce"} 4' in text
    assert redis_server.url.split("//")[1] in (await readyz(open_base))["store"]["url"]


async def test_memory_store_says_its_limits_are_per_process(upstream, start_proxy, caplog):
    _, url = upstream
    await start_proxy(config_for(url, policies=[{"use": "concurrency", "per": "global", "limit": 3}]))
    lines = [r for r in caplog.records if r.getMessage() == "policy_store_memory"]
    assert lines and lines[0].levelno == logging.WARNING


def test_several_workers_on_the_memory_store_are_refused():
    import pytest

    from policies.config import check_workers
    from proxy.app.config import ConfigError

    config = config_for("http://127.0.0.1:1/v1", policies=[{"use": "rate_limit", "requests_per_minute": 5}])
    check_workers(config.policies, 1)
    with pytest.raises(ConfigError, match="store.backend: 4 worker processes on the memory store"):
        check_workers(config.policies, 4)
    redis = config_for("http://127.0.0.1:1/v1", store={"backend": "redis", "url": "redis://127.0.0.1:1/0"},
                       policies=[{"use": "rate_limit", "requests_per_minute": 5}])
    check_workers(redis.policies, 4)


def test_several_workers_with_a_memory_cache_are_refused():
    # each worker would keep its own cache: a hit on one is a miss on the next, and coalescing splits by process
    import pytest

    from policies.config import check_workers
    from proxy.app.config import ConfigError

    config = config_for("http://127.0.0.1:1/v1", policies=[{"use": "cache"}])
    check_workers(config.policies, 1)
    with pytest.raises(ConfigError, match="store.backend: 2 worker processes on the memory store"):
        check_workers(config.policies, 2)
    redis = config_for("http://127.0.0.1:1/v1", store={"backend": "redis", "url": "redis://127.0.0.1:1/0"},
                       policies=[{"use": "cache"}])
    check_workers(redis.policies, 2)
