"""The response cache on the suite's real Redis: shared by two proxy processes, every entry with a TTL, each
entry's size limited, the policy's keys bounded by max_entries and max_bytes."""

from __future__ import annotations

import uuid

import orjson
import redis.asyncio as aioredis

from policies.cache.entry import from_plain
from policies.cache.store_redis import RedisCache
from proxy.sim.testing import completion
from tests.conftest import config_for, post_chat
from tests.procs import clean_env, start_serving

ASK = {"model": "tier-test", "messages": [{"role": "user", "content": "Say hello"}]}


def entry(key: str, model: str = "tier-test", content: str = "Hello there!"):
    return from_plain(key, model, "all", "m1", orjson.dumps(completion("m1", content)))


async def test_an_answer_cached_by_one_proxy_process_is_a_hit_on_another(upstream, tmp_path, redis_url):
    scripted, url = upstream
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    config = tmp_path / "cache.toml"
    config.write_text(f'[providers.up]\nbase_url = "{url}"\napi_key_env = "CACHE_TEST_KEY"\n'
                      '[models.tier-test]\nchain = ["up:m1"]\n'
                      f'[store]\nbackend = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
                      '[[policies]]\nuse = "cache"\nttl_s = 60\n')
    env = clean_env(CACHE_TEST_KEY="sk-test-cache")
    one, base_one = await start_serving(tmp_path, "one", "--config", str(config), env=env)
    two, base_two = await start_serving(tmp_path, "two", "--config", str(config), env=env)
    try:
        miss = await post_chat(base_one, {**ASK, "stream": True})
        assert miss[1]["x-groq-proxy-cache"] == "MISS"
        client = aioredis.from_url(redis_url)
        try:
            for _ in range(500):  # the put goes out after the answer: wait until it has landed
                if await client.zcard(f"{prefix}cache:cache:index"):
                    break
                import asyncio

                await asyncio.sleep(0.01)
        finally:
            await client.aclose()
        hit = await post_chat(base_two, ASK)
        streamed_hit = await post_chat(base_two, {**ASK, "stream": True})
    finally:
        await one.stop()
        await two.stop()
    assert hit[1]["x-groq-proxy-cache"] == "HIT"
    assert orjson.loads(hit[2])["choices"][0]["message"]["content"] == "Hello there!"
    assert streamed_hit[1]["x-groq-proxy-cache"] == "HIT"
    assert streamed_hit[2] == miss[2]  # the same events, byte for byte, and [DONE]
    assert len(scripted.requests) == 1


async def redis_cache(redis_url, **bounds) -> RedisCache:
    options = {"ttl_s": 30, "max_entries": 100, "max_bytes": 10**6, "max_entry_bytes": 10**5, **bounds}
    cache = RedisCache(redis_url, "c", prefix=f"t{uuid.uuid4().hex[:8]}:", **options)
    await cache.start()
    return cache


async def settle(cache: RedisCache) -> None:
    import asyncio

    await asyncio.gather(*cache._tasks)


async def test_every_entry_has_a_ttl_and_the_bookkeeping_expires_too(redis_url):
    cache = await redis_cache(redis_url, ttl_s=30)
    client = aioredis.from_url(redis_url)
    try:
        stored = entry("k1")
        assert cache.keep(stored)
        await settle(cache)
        got = await cache.get("k1", "tier-test")
        assert got is not None and got.plain == entry("k1").plain
        for name in (cache.redis_key("tier-test", "k1"), cache.index, cache.sizes, cache.total):
            ttl = await client.pttl(name)
            assert 0 < ttl <= 31000, (name, ttl)
        assert cache.held() == (1, len(stored.dumps()))
    finally:
        await client.aclose()
        await cache.close()


async def test_an_entry_over_the_size_limit_is_never_stored(redis_url):
    cache = await redis_cache(redis_url, max_entry_bytes=300)
    try:
        assert not cache.keep(entry("big", content="x" * 1000))
        await settle(cache)
        assert await cache.get("big", "tier-test") is None
    finally:
        await cache.close()


async def test_max_entries_and_max_bytes_bound_what_redis_holds(redis_url):
    cache = await redis_cache(redis_url, max_entries=3)
    size = len(entry("k0").dumps())  # about 1.1 KB; entries differ by a byte or two (the digits of their time)
    small = await redis_cache(redis_url, max_bytes=size * 2 + 30)
    client = aioredis.from_url(redis_url)
    try:
        for i in range(10):
            cache.keep(entry(f"k{i}"))
            await settle(cache)
        assert cache.held()[0] == 3
        keys = [k async for k in client.scan_iter(match=cache.base + "*")]
        assert len(keys) == 3 + 3  # three entries and the index, sizes and total
        assert await cache.get("k9", "tier-test") is not None and await cache.get("k0", "tier-test") is None
        for i in range(5):
            small.keep(entry(f"k{i}"))
            await settle(small)
        entries, held = small.held()
        assert entries == 2 and held <= size * 2 + 30
        assert await small.get("k4", "tier-test") is not None and await small.get("k2", "tier-test") is None
    finally:
        await client.aclose()
        await cache.close()
        await small.close()


async def test_delete_by_model_by_key_and_all(redis_url):
    cache = await redis_cache(redis_url)
    try:
        for key, model in (("a", "tier-a"), ("b", "tier-a"), ("c", "tier-b"), ("d", "tier-b")):
            cache.keep(entry(key, model))
        await settle(cache)
        assert await cache.delete(key="c") == 1
        assert await cache.get("c", "tier-b") is None
        assert await cache.delete(model="tier-a") == 2
        assert cache.held()[0] == 1
        assert await cache.delete() == 1
        assert cache.held() == (0, 0)
    finally:
        await cache.close()


async def test_a_redis_that_is_down_is_a_miss_not_an_error(upstream, start_proxy):
    from tests.conftest import closed_port_url

    scripted, url = upstream
    down = closed_port_url().replace("http://", "redis://").replace("/openai/v1", "/0")
    config = config_for(url, {"tier-test": ["m1"]}, store={"backend": "redis", "url": down, "timeout_s": 0.2},
                        policies=[{"use": "cache"}])
    base = await start_proxy(config)
    for _ in range(2):
        answer = await post_chat(base, ASK)
        assert answer[0] == 200 and answer[1]["x-groq-proxy-cache"] == "MISS"
    assert len(scripted.requests) == 2


async def test_a_redis_that_does_not_answer_is_not_tried_again_by_every_request(upstream, start_proxy, raw_server,
                                                                                 proxy_log):
    """A Redis that accepts and never answers: the first lookup waits out store.timeout_s and is a miss; the
    requests right after it are misses without a Redis call of their own (and nothing is sent to store)."""

    async def silent(reader, writer):
        await reader.read()  # never answers; ends when the proxy gives up the connection

    port = await raw_server(silent)
    scripted, url = upstream
    config = config_for(url, {"tier-test": ["m1"]},
                        store={"backend": "redis", "url": f"redis://127.0.0.1:{port}/0", "timeout_s": 0.2},
                        policies=[{"use": "cache"}])
    base = await start_proxy(config)
    answers = [await post_chat(base, ASK) for _ in range(3)]
    assert [a[0] for a in answers] == [200] * 3
    assert [a[1]["x-groq-proxy-cache"] for a in answers] == ["MISS"] * 3
    assert config.policies.policies[0].store.calls == 1
    assert [r for r in proxy_log.records if r.getMessage() == "cache_store_unavailable"]


async def test_a_hit_from_redis_is_one_call(upstream, start_proxy, redis_url):
    scripted, url = upstream
    config = config_for(url, {"tier-test": ["m1"]}, policies=[{"use": "cache"}],
                        store={"backend": "redis", "url": redis_url, "prefix": f"t{uuid.uuid4().hex[:8]}:"})
    base = await start_proxy(config)
    cache = config.policies.policies[0]
    await post_chat(base, ASK)
    await settle(cache.store)
    before = cache.store.calls
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "HIT"
    assert cache.store.calls == before + 1


async def test_lookups_that_arrive_together_go_out_pipelined_on_one_connection(redis_url):
    import asyncio

    cache = await redis_cache(redis_url)
    try:
        stored = [entry(f"k{i}", content=f"answer {i}") for i in range(10)]
        for e in stored:
            cache.keep(e)
        await settle(cache)
        conn = cache._conn
        got = await asyncio.gather(*(cache.get(f"k{i}", "tier-test") for i in range(10)), cache.get("none", "x"))
        assert [g.plain for g in got[:10]] == [e.plain for e in stored] and got[10] is None
        assert cache._conn is conn  # one connection, every reply matched to its call
        again = await cache.get("k3", "tier-test")
        assert again is got[3]  # the same bytes: the entry decoded before, not a new one
    finally:
        await cache.close()
