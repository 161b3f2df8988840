"""Redis behind Sentinel: the master is killed in the middle of a run. While it is gone each policy follows its
`on_error`; once the sentinel has promoted the replica the store finds the new master through the sentinels,
loads its scripts there (NOSCRIPT) and the limits hold again with the counts the replica had copied."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson

from policies.stores.base import GCRA, Claim
from policies.stores.redis import RedisStore
from policies.stores.redis_connect import Connect
from tests.conftest import config_for, free_port

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}


async def post(base: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
            return resp.status, orjson.loads(await resp.read())


async def store_status(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/readyz") as resp:
            assert resp.status == 200
            return (await resp.json())["store"]


async def until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def script_loads(group, port: int) -> int:
    stats = group.ask(port, "INFO", "commandstats")
    return int(stats.get("cmdstat_script", {}).get("calls", 0))


async def test_policies_follow_on_error_while_the_master_is_gone_and_recover_on_the_promoted_replica(
        upstream, start_proxy, redis_sentinel, caplog):
    caplog.set_level(logging.INFO, logger="groq_proxy")
    _, url = upstream
    group = redis_sentinel
    # Two sentinels in the URL, the first one dead: the store asks the next.
    sentinel_url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{group.port}/{group.service}/0"
    limit = [{"use": "rate_limit", "requests_per_minute": 3}]
    # 5 s for Redis to answer (the default is 1 s): on a loaded machine a slow answer made the store unavailable
    # again after the failover, and on_error = "open" then admitted everything (7 of 3 seen under load).
    store = {"backend": "redis", "url": sentinel_url, "timeout_s": 5}
    open_base = await start_proxy(config_for(url, store={**store, "prefix": "o:"}, policies=limit))
    closed_base = await start_proxy(config_for(url, store={**store, "prefix": "c:"},
                                               policies=[{**limit[0], "on_error": "closed"}]))
    counted_at = {}
    for base in (open_base, closed_base):
        assert (await store_status(base))["status"] == "ok"
        assert [(await post(base))[0] for _ in range(2)] == [200, 200]  # 2 of the 3 a minute
        counted_at[base] = time.monotonic()
    group.ask(group.master.port, "WAIT", 1, 5000)  # the replica has the counts
    group.ask(group.replica.port, "SCRIPT", "FLUSH")  # so the new master must be sent the scripts again
    loads_before = script_loads(group, group.replica.port)

    group.master.kill()
    status, _ = await post(open_base)
    assert status == 200  # on_error = "open": served, counted as an error decision
    status, body = await post(closed_base)
    assert status == 503 and body["error"]["code"] == "policy_unavailable"  # on_error = "closed"
    assert (await store_status(open_base))["status"] == "unavailable"

    await asyncio.get_running_loop().run_in_executor(None, group.promoted)
    for base in (open_base, closed_base):
        await until(lambda: _ok(base), "the store never found the promoted replica")

    # The limit holds on the new master with the counts the replica copied: one left of three, plus one for
    # every 20 s the bucket refilled since (a busy machine can take that long); with the counts lost, three more.
    for base in (open_base, closed_base):
        admitted = 0
        while (answer := await post(base))[0] == 200 and admitted < 6:
            admitted += 1
        refilled = int((time.monotonic() - counted_at[base]) // 20)
        assert answer[0] == 429 and answer[1]["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= admitted <= 1 + refilled, (admitted, refilled)
    assert script_loads(group, group.replica.port) > loads_before  # NOSCRIPT on the new master: loaded, retried

    events = [r.getMessage() for r in caplog.records]
    assert "store_unavailable" in events and "store_recovered" in events
    async with aiohttp.ClientSession() as session:
        async with session.get(open_base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_policy_decisions_total{policy="rate_limit",decision="error",mode="enforce"} 1' in text


async def _ok(base: str) -> bool:
    return (await store_status(base))["status"] == "ok"


async def test_store_on_sentinel_reads_and_writes_through_the_master_it_names(redis_sentinel):
    group = redis_sentinel
    store = RedisStore(f"redis+sentinel://127.0.0.1:{group.port}/{group.service}", prefix="s:",
                       connect=Connect(connect_timeout_s=2, timeout_s=2, pool_size=2))
    await store.start()
    try:
        claim = Claim(GCRA, "k", limit=2, amount=1, param=60.0)
        assert [(await store.admit([claim])).ok for _ in range(3)] == [True, True, False]
        assert group.ask(group.master.port, "EXISTS", "s:k") == 1
        assert store.status() == {"backend": "redis", "status": "ok",
                                  "url": f"redis+sentinel://127.0.0.1:{group.port}/{group.service}/0"}
    finally:
        await store.close()


async def test_a_planned_failover_moves_the_store_to_the_new_master(upstream, start_proxy, redis_sentinel):
    """`SENTINEL FAILOVER` (maintenance): the old master lives on as a replica, so connections to it must not
    keep serving the store; the next calls go to the promoted one and the counts carry over."""
    _, url = upstream
    group = redis_sentinel
    base = await start_proxy(config_for(url, store={
        "backend": "redis", "url": f"redis+sentinel://127.0.0.1:{group.port}/{group.service}"},
        policies=[{"use": "rate_limit", "requests_per_minute": 3, "on_error": "closed"}]))
    assert [(await post(base))[0] for _ in range(2)] == [200, 200]
    group.ask(group.master.port, "WAIT", 1, 5000)
    group.ask(group.port, "SENTINEL", "FAILOVER", group.service)
    await asyncio.get_running_loop().run_in_executor(None, group.promoted)

    async def demoted() -> bool:  # the sentinel turns the old master into a replica of the new one
        return group.ask(group.master.port, "ROLE")[0] == "slave"

    await until(demoted, "the old master was never turned into a replica")
    calls_before = evalsha_calls(group, group.replica.port)

    async def served() -> bool:
        status, _ = await post(base)
        assert status in (200, 503)  # 503 policy_unavailable while the store finds the new master
        return status == 200

    await until(served, "the store never moved to the promoted master")
    status, body = await post(base)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"  # the counts carried over
    assert evalsha_calls(group, group.replica.port) >= calls_before + 2  # on the new master, not the old one


def evalsha_calls(group, port: int) -> int:
    return int(group.ask(port, "INFO", "commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
