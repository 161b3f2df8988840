"""The store seam, both versions through the same tests: all-or-nothing admission across claims, budgets
reserved then settled, GCRA throughput, slots; and what only Redis has: leases that free a dead replica's
slots, NOSCRIPT after a flush, keys that expire with their periods, and surviving Redis going away."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from policies.stores.base import BUDGET, GCRA, SLOT, Claim, Settlement, StoreUnavailable
from policies.stores.memory import MemoryStore
from policies.stores.redis import RedisStore
from tests.conftest import until


def budget(key: str, limit: int, amount: int, soft: bool = False) -> Claim:
    return Claim(BUDGET, key, limit, amount, time.time() + 3600, soft=soft)


async def test_admission_is_all_or_nothing(store):
    rpm = Claim(GCRA, "r", 2, 1, 60.0)
    assert (await store.admit([rpm, budget("b", 100, 60)])).ok
    refused = await store.admit([rpm, budget("b", 100, 60)])  # the budget does not fit: nothing is taken
    assert not refused.ok and refused.failed == 1
    assert await store.read([rpm, budget("b", 100, 0)]) == [(1, 0), (0, 60)]
    assert (await store.admit([rpm, budget("b", 100, 40)])).ok
    third = await store.admit([rpm])
    assert not third.ok and third.failed == 0 and 0 < third.retry_after <= 30


async def test_budget_reserves_then_settles_to_what_was_used(store):
    claim = budget("tb", 100, 70)
    admitted = await store.admit([claim])
    assert admitted.ok and list(admitted.remaining) == [30]
    assert not (await store.admit([budget("tb", 100, 31)])).ok
    await store.settle([Settlement(BUDGET, "tb", reserved=70, used=12, param=claim.param)])
    assert await store.read([claim]) == [(12, 0)]
    assert (await store.admit([budget("tb", 100, 88)])).ok
    assert not (await store.admit([budget("tb", 100, 1)])).ok


async def test_gcra_tokens_settle_to_actual_usage(store):
    tpm = Claim(GCRA, "tpm", 1000, 800, 60.0, header="tokens")
    first = await store.admit([tpm])
    assert first.ok and first.remaining[0] == pytest.approx(200, abs=1)
    assert not (await store.admit([Claim(GCRA, "tpm", 1000, 300, 60.0)])).ok
    await store.settle([Settlement(GCRA, "tpm", reserved=800, used=100, limit=1000, param=60.0)])
    assert (await store.admit([Claim(GCRA, "tpm", 1000, 800, 60.0)])).ok
    whole = await store.admit([Claim(GCRA, "tpm", 1000, 1001, 60.0)])
    assert not whole.ok and whole.retry_after < 0  # more than a minute holds: never


async def test_slots_and_soft_claims(store):
    slot = lambda lease: Claim(SLOT, "cc", 2, 1, 0.0, lease=lease)  # noqa: E731
    assert (await store.admit([slot("a")])).ok and (await store.admit([slot("b")])).ok
    assert not (await store.admit([slot("c")])).ok
    shadow = Claim(SLOT, "cc", 2, 1, 0.0, soft=True, lease="d")
    admitted = await store.admit([shadow])
    assert admitted.ok and admitted.over == (0,)  # over the limit, reported, not refused
    await store.settle([Settlement(SLOT, "cc", lease="a"), Settlement(SLOT, "cc", lease="d")])
    assert await store.read([slot("x")]) == [(1, 0)]
    assert (await store.admit([slot("c")])).ok


async def test_memory_store_wakes_a_waiting_slot_on_release():
    store = MemoryStore()
    claim = Claim(SLOT, "cc", 1, 1, 0.0, lease="a")
    assert (await store.admit([claim])).ok
    waiter = asyncio.ensure_future(store.changed(30))
    await asyncio.sleep(0)
    await store.settle([Settlement(SLOT, "cc", lease="a")])
    await asyncio.wait_for(waiter, 5)


async def test_redis_lease_of_a_dead_replica_frees_itself(redis_url):
    prefix = f"t{os.urandom(6).hex()}:"
    dead = RedisStore(redis_url, prefix=prefix, lease_s=0.3)
    await dead.start()
    assert (await dead.admit([Claim(SLOT, "cc", 1, 1, 0.0, lease="dead")])).ok
    dead._task.cancel()  # the replica dies: no renewal, no settlement
    await dead.close()
    alive = RedisStore(redis_url, prefix=prefix, lease_s=30)
    await alive.start()
    try:
        assert not (await alive.admit([Claim(SLOT, "cc", 1, 1, 0.0, lease="new")])).ok

        async def admitted():
            return (await alive.admit([Claim(SLOT, "cc", 1, 1, 0.0, lease="new")])).ok

        deadline = time.monotonic() + 10
        while not await admitted():
            assert time.monotonic() < deadline, "the dead replica's slot never freed"
            await asyncio.sleep(0.05)
    finally:
        await alive.close()


async def test_redis_renews_the_leases_it_holds(redis_url):
    store = RedisStore(redis_url, prefix=f"t{os.urandom(6).hex()}:", lease_s=1.5)
    await store.start()
    try:
        assert (await store.admit([Claim(SLOT, "cc", 1, 1, 0.0, lease="held")])).ok
        trips = store.round_trips
        # Four renewals (every 0.5 s) span more than a lease: without them the slot would have lapsed.
        await until(lambda: store.renewals >= 4, timeout=30, what="four lease renewals")
        assert not (await store.admit([Claim(SLOT, "cc", 1, 1, 0.0, lease="other")])).ok
        assert store.round_trips == trips + 1  # renewals are not request round trips
    finally:
        await store.close()


async def test_redis_keys_expire_with_their_periods_and_noscript_is_handled(redis_url):
    from redis.asyncio import Redis

    prefix = f"t{os.urandom(6).hex()}:"
    store = RedisStore(redis_url, prefix=prefix)
    await store.start()
    raw = Redis.from_url(redis_url)
    try:
        end = time.time() + 120
        assert (await store.admit([Claim(BUDGET, "b", 10, 1, end), Claim(GCRA, "g", 10, 1, 60.0),
                                   Claim(SLOT, "s", 10, 1, 0.0, lease="l")])).ok
        ttl_budget = await raw.ttl(prefix + "b")
        assert end - time.time() < ttl_budget <= end - time.time() + 62  # the period, and a minute to read it
        assert 0 < await raw.pttl(prefix + "g") <= 7000  # one request of 10/min: 6 s of bucket, plus a second
        assert 0 < await raw.pttl(prefix + "s") <= 30000
        await raw.script_flush()
        assert (await store.admit([Claim(GCRA, "g", 10, 1, 60.0)])).ok  # NOSCRIPT: loaded again, call repeated
    finally:
        await raw.aclose()
        await store.close()


async def test_redis_going_away_and_coming_back(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="groq_proxy")
    store = RedisStore(redis_server.url, prefix="x:")
    await store.start()
    try:
        claim = Claim(GCRA, "g", 100, 1, 60.0)
        assert (await store.admit([claim])).ok and store.status()["status"] == "ok"
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.admit([claim])
        assert store.status()["status"] == "unavailable"
        with pytest.raises(StoreUnavailable):  # no connect attempt per request while it is down
            await store.admit([claim])
        assert any(r.getMessage() == "store_unavailable" for r in caplog.records)
        redis_server.start()
        await until(lambda: store.available, timeout=10, what="the store's probe to find Redis again")
        assert (await store.admit([claim])).ok
        assert any(r.getMessage() == "store_recovered" for r in caplog.records)
    finally:
        await store.close()


async def test_redis_down_at_start_is_reported_not_fatal(redis_server):
    redis_server.stop()
    store = RedisStore(redis_server.url, prefix="x:")
    await store.start()
    try:
        assert store.status() == {"backend": "redis", "status": "unavailable", "url": redis_server.url}
        redis_server.start()
        await until(lambda: store.available, timeout=10, what="recovery after a start without Redis")
        assert (await store.admit([Claim(GCRA, "g", 100, 1, 60.0)])).ok
    finally:
        await store.close()


async def test_redis_batches_concurrent_requests_each_still_all_or_nothing(redis_url):
    store = RedisStore(redis_url, prefix=f"t{os.urandom(6).hex()}:")
    await store.start()
    try:
        before = store.round_trips
        results = await asyncio.gather(*(
            store.admit([Claim(SLOT, "s", 100, 1, 0.0, lease=f"l{i}"), Claim(GCRA, "g", 10, 1, 60.0)])
            for i in range(50)))
        assert sum(r.ok for r in results) == 10
        assert [r.failed for r in results if not r.ok] == [1] * 40  # the limit refused them, not the slot
        assert await store.read([Claim(SLOT, "s", 100, 1, 0.0)]) == [(10, 0)]  # refused ones took no slot
        assert store.round_trips - before < 50  # they shared calls
        await asyncio.gather(*(store.settle([Settlement(SLOT, "s", lease=f"l{i}")]) for i in range(50)))
        assert await store.read([Claim(SLOT, "s", 100, 1, 0.0)]) == [(0, 0)]
    finally:
        await store.close()


async def test_redis_gives_back_what_a_cancelled_request_was_admitted(redis_url):
    """A request whose client left while its admission was on the way: the slot must not stay taken (its
    lease would be renewed for ever by this replica)."""
    store = RedisStore(redis_url, prefix=f"t{os.urandom(6).hex()}:")
    await store.start()
    try:
        slot = Claim(SLOT, "s", 1, 1, 0.0, lease="gone")
        budget_claim = budget("b", 100, 40)
        waiting = asyncio.ensure_future(store.admit([slot, budget_claim]))
        await asyncio.sleep(0)  # queued: its call is on the way
        waiting.cancel()
        await until(lambda: not store.busy, what="the store's calls to finish")
        assert await store.read([slot, budget_claim]) == [(0, 0), (0, 0)]
        assert not store._leases
    finally:
        await store.close()


async def test_redis_settlements_and_admissions_that_wait_together_share_one_call(redis_url):
    """What queued while nothing was on the way goes in one call, settlements first: a slot given back in the
    same call as a new admission is free for it, and settlements of one counter are summed exactly."""
    store = RedisStore(redis_url, prefix=f"t{os.urandom(6).hex()}:")
    await store.start()
    try:
        slot = lambda lease: Claim(SLOT, "s", 1, 1, 0.0, lease=lease)  # noqa: E731
        end = time.time() + 3600
        assert (await store.admit([slot("a"), Claim(BUDGET, "b", 1000, 90, end)])).ok
        before = store.round_trips
        settled, admitted = (await asyncio.gather(
            store.settle([Settlement(SLOT, "s", lease="a"), Settlement(BUDGET, "b", reserved=30, used=10, param=end)]),
            store.admit([slot("b")]),
            *(store.settle([Settlement(BUDGET, "b", reserved=30, used=used, param=end)]) for used in (11, 12)),
        ))[:2]
        assert admitted.ok  # the slot given back in the same call was free for it
        assert store.round_trips == before + 1
        assert await store.read([slot("x"), Claim(BUDGET, "b", 1000, 0, end)]) == [(1, 0), (33, 0)]
    finally:
        await store.close()


async def test_redis_that_stops_answering_fails_calls_within_the_timeout_then_recovers(redis_server):
    from redis.asyncio import Redis

    store = RedisStore(redis_server.url, prefix="x:", timeout_s=0.3)
    await store.start()
    raw = Redis.from_url(redis_server.url)
    try:
        claim = Claim(GCRA, "g", 100, 1, 60.0)
        assert (await store.admit([claim])).ok
        await raw.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # Redis holds every other client's commands
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.admit([claim]), 10)  # fails by the store's own timeout, no hang
        assert store.status()["status"] == "unavailable"
        await until(lambda: store.available, timeout=15, what="the store to find Redis answering again")
        assert (await asyncio.wait_for(store.admit([claim]), 10)).ok  # on a new connection
    finally:
        await raw.aclose()
        await store.close()


async def test_redis_password_and_database_come_from_the_url(tmp_path, caplog):
    from redis.asyncio import Redis

    from tests.conftest import RedisServer

    caplog.set_level(logging.INFO, logger="groq_proxy")
    server = RedisServer(str(tmp_path), "--requirepass", "pw-7f3a9c")
    server.start()
    try:
        url = f"redis://:pw-7f3a9c@127.0.0.1:{server.port}/3"
        store = RedisStore(url, prefix="x:")
        await store.start()
        try:
            assert (await store.admit([Claim(GCRA, "g", 100, 1, 60.0)])).ok
            raw = Redis.from_url(url)
            assert await raw.exists("x:g") == 1  # on database 3
            await raw.aclose()
            assert "pw-7f3a9c" not in str(store.status())
        finally:
            await store.close()
        wrong = RedisStore(f"redis://:nope@127.0.0.1:{server.port}/3", prefix="x:")
        await wrong.start()
        try:
            assert wrong.status()["status"] == "unavailable"
            with pytest.raises(StoreUnavailable):
                await wrong.admit([Claim(GCRA, "g", 100, 1, 60.0)])
        finally:
            await wrong.close()
        assert not any("pw-7f3a9c" in r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    finally:
        server.stop()


async def test_redis_settles_in_the_background_and_a_read_comes_after_it(redis_url):
    """The chain does not wait for a settlement on Redis (settle_soon); a usage read made right after still
    sees it, as it would have when the answer waited."""
    store = RedisStore(redis_url, prefix=f"t{os.urandom(6).hex()}:")
    await store.start()
    try:
        claim = budget("b", 1000, 50)
        assert (await store.admit([claim])).ok
        landed = store.settle_soon([Settlement(BUDGET, "b", reserved=50, used=7, param=claim.param)])
        assert not landed.done()
        read_script, seen = store._call, []

        async def reading(*args):  # the read goes to Redis only once the settlement has landed
            seen.append(landed.done())
            return await read_script(*args)

        store._call = reading
        assert await store.read([claim]) == [(7, 0)]
        assert seen == [True] and landed.exception() is None
    finally:
        await store.close()
