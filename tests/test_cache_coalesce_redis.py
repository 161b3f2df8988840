"""Coalescing across replicas: two real proxy processes on the suite's Redis, identical requests split between
them, one upstream call in total. The upstream is gated by events the test opens, and the test reads each
replica's status page (`waiting`: requests waiting on an identical one), so "in flight" and "before the
leader's stream ends" are states, not timings."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.sim.testing import ChatUpstream, completion, stream_events
from tests.conftest import config_for, post_chat, until
from tests.procs import clean_env, start_serving
from tests.test_cache_coalesce import text_of

ASK = {"model": "tier-test", "messages": [{"role": "user", "content": "Say hello"}]}
TEXT = "Hello there!"


class GatedUpstream(ChatUpstream):
    """Counts its calls. The first `gated` calls wait for `first` (a stream: sends its first event, then waits
    for `rest`); with `fail_first` the first then answers 500. Every later call answers at once."""

    def __init__(self, fail_first: bool = False, gated: int = 1, finish: str = "stop") -> None:
        self.gated = gated
        self.finish = finish  # the answers' finish_reason
        self.first, self.rest = asyncio.Event(), asyncio.Event()
        self.calls = 0
        self.fail_first = fail_first
        self.first_sent = asyncio.Event()  # the first call's first event is written
        self.finished = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.calls += 1
        call = self.calls
        gated = call <= self.gated
        if gated:
            await self.first.wait()
            if self.fail_first and call == 1:
                return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=500)
        if not body.get("stream"):
            answer = completion(body["model"], TEXT)
            answer["choices"][0]["finish_reason"] = self.finish
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        events = stream_events(body["model"])
        events[-2] = events[-2].replace(b'"finish_reason":"stop"', b'"finish_reason":"%s"' % self.finish.encode())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(events[0])
        if gated:
            self.first_sent.set()
            await self.rest.wait()
        for event in events[1:]:
            await resp.write(event)
        await resp.write_eof()
        self.finished += 1
        return resp


async def waiting(base: str) -> int:
    """Requests waiting on an identical one in flight in this replica (the status page's cache block)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/status.json") as resp:
            data = await resp.json()
    return data["cache"]["stores"]["cache"]["waiting"]


async def until_waiting(base: str, n: int, what: str) -> None:
    for _ in range(3000):
        if await waiting(base) >= n:
            return
        await asyncio.sleep(0.01)
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/status.json") as resp:
            data = await resp.json()
    raise AssertionError(f"{what}: fewer than {n} waiting: {data['cache']}")


@pytest.fixture
async def replicas(aiohttp_server, tmp_path, redis_url):
    """`await replicas(redis_url=..., fail_first=..., **cache)`: a gated upstream and two proxy processes
    sharing one Redis (the suite's unless given) under a prefix of their own."""
    started = []

    async def start(redis: str | None = None, fail_first: bool = False, gated: int = 1, finish: str = "stop",
                    timeout_s: float = 0.5, pool_size: int = 32, **cache):
        upstream = GatedUpstream(fail_first, gated, finish)
        server = await aiohttp_server(upstream.app())
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        extra = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in cache.items())
        config = tmp_path / "coalesce.toml"
        config.write_text(f'[providers.up]\nbase_url = "http://127.0.0.1:{server.port}/openai/v1"\n'
                          'api_key_env = "CACHE_TEST_KEY"\n[models.tier-test]\nchain = ["up:m1"]\n'
                          f'[store]\nbackend = "redis"\nurl = "{redis or redis_url}"\nprefix = "{prefix}"\n'
                          f'timeout_s = {timeout_s}\npool_size = {pool_size}\n'
                          f'[[policies]]\nuse = "cache"\nttl_s = 60\n{extra}')
        env = clean_env(CACHE_TEST_KEY="sk-test-cache")
        bases = []
        for name in ("one", "two"):
            proc, base = await start_serving(tmp_path, name, "--config", str(config), env=env)
            started.append(proc)
            bases.append(base)
        start.prefix = prefix
        return upstream, started[-2:], bases

    start.prefix = ""
    yield start
    for proc in started:
        await proc.stop()


def send(base: str, body: dict) -> asyncio.Future:
    return asyncio.ensure_future(post_chat(base, body))


async def test_identical_requests_on_two_replicas_make_one_upstream_call(replicas):
    upstream, _, (one, two) = await replicas()
    leader = send(one, {**ASK, "stream": True})
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    bodies = [{**ASK, "stream": i % 2 == 0} for i in range(11)]
    followers = [send(one if i < 4 else two, b) for i, b in enumerate(bodies)]  # 4 here, 7 on the other
    await until_waiting(two, 7, "the other replica's followers")
    await until_waiting(one, 4, "the leader's replica's followers")
    upstream.first.set()
    upstream.rest.set()
    answers = await asyncio.gather(leader, *followers)
    assert upstream.calls == 1
    assert [a[0] for a in answers] == [200] * 12
    assert answers[0][1]["x-groq-proxy-cache"] == "MISS"
    assert {a[1]["x-groq-proxy-cache"] for a in answers[1:]} == {"COALESCED"}
    for (_, _, raw), body in zip(answers[1:], bodies):
        assert text_of(raw, body["stream"]) == TEXT
    async with aiohttp.ClientSession() as session:  # counted as in-process followers are
        async with session.get(two + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_cache_requests_total{virtual_model="tier-test",result="coalesced"} 7' in text
    assert 'result="miss"' not in text
    # a plain leader too: its answer reaches the other replica's followers, streamed and not
    plain_ask = {**ASK, "messages": [{"role": "user", "content": "Say hello, plainly"}]}
    upstream.calls = 0
    upstream.first.clear()
    leader = send(two, plain_ask)
    await until(lambda: upstream.calls == 1, what="the plain leader upstream")
    followers = [send(one, {**plain_ask, "stream": i == 0}) for i in range(3)]
    await until_waiting(one, 3, "the other replica's followers of the plain leader")
    upstream.first.set()
    answers = await asyncio.gather(leader, *followers)
    assert upstream.calls == 1
    assert [a[1]["x-groq-proxy-cache"] for a in answers] == ["MISS"] + ["COALESCED"] * 3
    assert all(text_of(raw, i == 1) == TEXT for i, (_, _, raw) in enumerate(answers))
    assert answers[1][2].endswith(b"data: [DONE]\n\n")


async def test_a_streaming_follower_on_the_other_replica_gets_the_first_chunk_before_the_stream_ends(replicas):
    upstream, _, (one, two) = await replicas()
    async with aiohttp.ClientSession() as session:
        url = "/v1/chat/completions"
        leading = asyncio.ensure_future(session.post(one + url, json={**ASK, "stream": True}))
        await until(lambda: upstream.calls == 1, what="the leader upstream")
        follow = [asyncio.ensure_future(session.post(two + url, json={**ASK, "stream": True})) for _ in range(3)]
        await until_waiting(two, 3, "the other replica's followers")
        upstream.first.set()  # the first event only: the upstream holds the rest
        leader, *responses = await asyncio.gather(leading, *follow)
        assert leader.status == 200
        firsts = []
        for resp in responses:
            assert resp.headers["x-groq-proxy-cache"] == "COALESCED"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: {") and b'"role":"assistant"' in first
            firsts.append(first)
        assert not upstream.rest.is_set() and upstream.finished == 0  # the leader's stream has not ended
        upstream.rest.set()
        leader_raw = await leader.read()
        rests = [first + await resp.read() for first, resp in zip(firsts, responses)]
    assert text_of(leader_raw, True) == TEXT
    for raw in rests:
        assert text_of(raw, True) == TEXT and raw.endswith(b"data: [DONE]\n\n")
        assert raw == leader_raw  # the same events, byte for byte
    assert upstream.calls == 1


@pytest.mark.parametrize("when", ["before_first_chunk", "mid_stream"])
async def test_followers_of_a_leader_whose_replica_is_killed_go_upstream_themselves(replicas, redis_url, when):
    # Redis's answers get 5 s here, not 0.5: on a loaded machine a late XREAD reply took the "Redis failed" path
    # (followers alone, no leader_lost line), and what this test watches is the lease, not a slow Redis.
    upstream, (proc_one, proc_two), (one, two) = await replicas(timeout_s=5)
    leader = send(one, {**ASK, "stream": True})
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    if when == "mid_stream":
        upstream.first.set()
        await asyncio.wait_for(upstream.first_sent.wait(), 30)
    bodies = [{**ASK, "stream": i % 2 == 0} for i in range(4)]
    followers = [send(two, b) for b in bodies]
    await until_waiting(two, 4, "the other replica's followers")
    if when == "mid_stream":  # the leader has published its first chunk for them
        client = aioredis.from_url(redis_url)
        try:
            async def published() -> bool:
                async for name in client.scan_iter(match=f"{replicas.prefix}cache:cache:flight:*"):
                    if await client.xlen(name):
                        return True
                return False

            for _ in range(3000):
                if await published():
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the leader never published its first chunk")
        finally:
            await client.aclose()
    proc_one.process.kill()  # the leader's replica dies: its lease is no longer renewed
    await proc_one.process.wait()
    upstream.first.set()
    answers = await asyncio.wait_for(asyncio.gather(*followers), 60)  # no hang
    with pytest.raises(aiohttp.ClientError):
        await leader
    assert upstream.calls == 2  # one of the followers went upstream; the others waited for it
    for (status, headers, raw), body in zip(answers, bodies):
        assert status == 200
        if when == "mid_stream" and body["stream"]:
            # it had relayed the first chunk: it cannot start again, and ends with an error event
            last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert b'"error"' in last and raw.startswith(b"data: {"), raw
        else:
            assert text_of(raw, body["stream"]) == TEXT
    assert [a[1]["x-groq-proxy-cache"] for a in answers].count("MISS") == 1
    await until(lambda: '"reason":"leader_lost"' in proc_two.stderr, 10.0, "cache_coalesce_gave_up logged")


async def test_followers_of_a_leader_whose_upstream_fails_go_upstream_once(replicas):
    upstream, _, (one, two) = await replicas(fail_first=True)
    leader = send(one, ASK)
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    bodies = [{**ASK, "stream": i % 2 == 0} for i in range(4)]
    followers = [send(two, b) for b in bodies]
    await until_waiting(two, 4, "the other replica's followers")
    upstream.first.set()
    leader_answer, *answers = await asyncio.wait_for(asyncio.gather(leader, *followers), 60)
    assert leader_answer[0] == 502
    assert [a[0] for a in answers] == [200] * 4
    assert all(text_of(raw, b["stream"]) == TEXT for (_, _, raw), b in zip(answers, bodies))
    assert upstream.calls == 2  # one follower led the next call, on the lease; the others waited for it
    assert sorted(a[1]["x-groq-proxy-cache"] for a in answers) == ["COALESCED"] * 3 + ["MISS"]


@pytest.mark.parametrize("leader_streams", [False, True])
async def test_followers_of_a_whole_answer_that_is_not_stored_get_it_without_going_upstream(replicas,
                                                                                            leader_streams):
    # content_filter is a whole answer the cache does not store: the plain followers (here and on the other
    # replica) used to go upstream each (three rounds, then all at once: 13 calls for 13 requests)
    upstream, _, (one, two) = await replicas(finish="content_filter")
    leader = send(one, {**ASK, "stream": leader_streams})
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    bodies = [{**ASK, "stream": i % 3 == 0} for i in range(12)]
    followers = [send(two if i % 2 else one, b) for i, b in enumerate(bodies)]
    await until_waiting(two, 6, "the other replica's followers")
    await until_waiting(one, 6, "the leader's replica's followers")
    upstream.first.set()
    upstream.rest.set()
    leader_answer, *answers = await asyncio.wait_for(asyncio.gather(leader, *followers), 60)
    assert upstream.calls == 1
    assert [a[0] for a in answers] == [200] * 12
    assert {a[1]["x-groq-proxy-cache"] for a in answers} == {"COALESCED"}
    for (_, _, raw), body in zip(answers, bodies):
        assert text_of(raw, body["stream"]) == TEXT
        assert b'"finish_reason":"content_filter"' in raw
    # and it was not stored: the next identical request goes upstream
    assert (await post_chat(two, ASK))[1]["x-groq-proxy-cache"] == "MISS"
    assert upstream.calls == 2


async def test_a_client_that_leaves_while_its_lease_is_asked_for_leaves_nothing_to_wait_on(replicas, redis_url):
    # The lead script is held by Redis (CLIENT PAUSE WRITE) while the client leaves: the request's task is
    # cancelled inside the claim. Its capture used to stay this replica's flight of the key for good, and every
    # later identical request here waited on it for ever.
    upstream, (proc_one, _), (one, _) = await replicas(gated=0, timeout_s=30)
    await post_chat(one, {**ASK, "messages": [{"role": "user", "content": "warm"}]})  # scripts loaded
    client = aioredis.from_url(redis_url)
    try:
        for _ in range(3000):  # its put and lease's end are through (they would be the script Redis holds)
            if await client.zcard(f"{replicas.prefix}cache:cache:index") and not [
                    k async for k in client.scan_iter(match=f"{replicas.prefix}*:lease")]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the warm answer was never stored")
        await client.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
        try:
            async with aiohttp.ClientSession() as session:
                leaving = asyncio.ensure_future(session.post(one + "/v1/chat/completions", json=ASK))

                async def held() -> bool:
                    return any(c.get("cmd") == "evalsha" and "b" in c.get("flags", "")
                               for c in await client.client_list())

                for _ in range(3000):
                    if await held():
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the lead script never reached Redis")
                leaving.cancel()
            await until(lambda: '"status":499' in proc_one.stderr, 30.0, "the request cancelled")
        finally:
            await client.execute_command("CLIENT", "UNPAUSE")
        status, headers, raw = await asyncio.wait_for(post_chat(one, ASK), 60)
        assert status == 200 and headers["x-groq-proxy-cache"] == "MISS" and text_of(raw, False) == TEXT
        assert upstream.calls == 2  # the warm one, and this one: the cancelled one never went upstream
        # the lease the script took after the client left was given up at once (its stream says so to anyone
        # who followed it), not left to expire
        ends = []
        async for name in client.scan_iter(match=f"{replicas.prefix}cache:cache:flight:*"):
            ends += [fields for _, fields in await client.xrange(name)]
        assert ends == [{b"e": b"failed", b"m": b""}]
    finally:
        await client.aclose()


async def test_a_redis_user_without_channels_still_coalesces_across_replicas(replicas, redis_server):
    # Redis 7 gives a new ACL user no channels (acl-pubsub-default resetchannels). The lead script's PUBLISH was
    # refused (NOPERM): the follower's replica took the whole script's failure for Redis down (cache off there
    # for a second, logged cache_store_unavailable) and went upstream. The followed set alone tells the leader.
    admin = aioredis.from_url(redis_server.url)
    try:
        await admin.execute_command("ACL", "SETUSER", "proxy", "on", ">s3cret-pw", "~*", "resetchannels", "+@all")
        url = f"redis://proxy:s3cret-pw@127.0.0.1:{redis_server.port}/0"
        upstream, procs, (one, two) = await replicas(redis=url)
        leader = send(one, {**ASK, "stream": True})
        await until(lambda: upstream.calls == 1, what="the leader upstream")
        bodies = [{**ASK, "stream": i == 0} for i in range(2)]
        followers = [send(two, b) for b in bodies]
        await until_waiting(two, 2, "the other replica's followers")
        upstream.first.set()
        upstream.rest.set()
        answers = await asyncio.wait_for(asyncio.gather(leader, *followers), 60)
        assert upstream.calls == 1
        assert [(a[0], a[1]["x-groq-proxy-cache"]) for a in answers] == [(200, "MISS")] + [(200, "COALESCED")] * 2
        assert all(text_of(raw, b["stream"]) == TEXT for (_, _, raw), b in zip(answers[1:], bodies))
        # a subscription Redis refuses is not asked for again at every miss
        dialled = (await admin.info("stats"))["total_connections_received"]
        for i in range(10):
            assert (await post_chat(one, {**ASK, "messages": [{"role": "user", "content": f"n{i}"}]}))[0] == 200
        assert (await admin.info("stats"))["total_connections_received"] - dialled <= 2
        for proc in procs:
            assert "cache_store_unavailable" not in proc.stderr and "s3cret-pw" not in proc.stderr
    finally:
        await admin.aclose()


async def test_a_follower_waits_at_most_coalesce_wait_s_then_goes_upstream(replicas):
    upstream, (_, proc_two), (one, two) = await replicas(coalesce_wait_s=0.5)
    leader = send(one, ASK)
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    followers = [send(two, {**ASK, "stream": i == 0}) for i in range(2)]
    answers = await asyncio.wait_for(asyncio.gather(*followers), 60)  # the leader is still held upstream
    assert not upstream.first.is_set() and upstream.calls == 2
    assert [a[0] for a in answers] == [200, 200]
    assert all(text_of(raw, i == 0) == TEXT for i, (_, _, raw) in enumerate(answers))
    await until(lambda: '"reason":"coalesce_wait_s"' in proc_two.stderr, 10.0, "cache_coalesce_gave_up logged")
    upstream.first.set()
    assert (await leader)[0] == 200


async def test_with_redis_stopped_requests_are_answered_and_coalesced_in_each_process(replicas, redis_server):
    upstream, _, (one, two) = await replicas(redis=redis_server.url, gated=2)
    redis_server.stop()
    leaders = [send(one, ASK)]
    await until(lambda: upstream.calls == 1, what="the first leader upstream")
    leaders.append(send(two, ASK))
    await until(lambda: upstream.calls == 2, what="the second replica's leader upstream")
    followers = [send(base, {**ASK, "stream": i % 2 == 0}) for i, base in enumerate((one, two, one, two))]
    await until_waiting(one, 2, "followers in the first process")
    await until_waiting(two, 2, "followers in the second process")
    upstream.first.set()
    answers = await asyncio.wait_for(asyncio.gather(*leaders, *followers), 60)
    assert [a[0] for a in answers] == [200] * 6
    assert upstream.calls == 2  # one a process: Redis is gone, in-process coalescing goes on
    assert [a[1]["x-groq-proxy-cache"] for a in answers] == ["MISS"] * 2 + ["COALESCED"] * 4


def test_coalesce_wait_s_is_checked_at_start():
    from proxy.app.config import ConfigError

    for bad, message in ((0, "must be more than 0"), ("soon", "coalesce_wait_s")):
        with pytest.raises(ConfigError, match="coalesce_wait_s") as caught:
            config_for("http://127.0.0.1:9/openai/v1", policies=[{"use": "cache", "coalesce_wait_s": bad}])
        assert message in str(caught.value)


# --- the same, two proxies in this process (their policies' state in reach) ----------------------------------


async def two_in_process(aiohttp_server, start_proxy, store: dict, upstream: GatedUpstream):
    server = await aiohttp_server(upstream.app())
    url = f"http://127.0.0.1:{server.port}/openai/v1"
    configs = [config_for(url, {"tier-test": ["m1"]}, store=store, policies=[{"use": "cache"}]) for _ in range(2)]
    bases = [await start_proxy(config) for config in configs]
    return bases, [config.policies.policies[0] for config in configs]


async def recording(aiohttp_server, start_proxy, store: dict):
    """A proxy whose cache's Redis commands are recorded (`sent`), and, at each upstream call, the commands
    sent before it (`at_upstream`): what a request waited on before it went upstream."""
    sent: list[str] = []
    at_upstream: list[list[str]] = []

    class Recording(GatedUpstream):
        async def _chat(self, request):
            at_upstream.append(list(sent))
            return await super()._chat(request)

    (base, _), (cache, _) = await two_in_process(aiohttp_server, start_proxy, store, Recording(gated=0))
    command = cache.store._command

    async def recorded(*args):
        sent.append(args[0])
        return await command(*args)

    cache.store._command = recorded
    return base, cache, sent, at_upstream


async def test_a_miss_on_redis_is_one_round_trip_more_than_a_hit_before_it_goes_upstream(
        aiohttp_server, start_proxy, redis_store_table):
    base, cache, sent, at_upstream = await recording(aiohttp_server, start_proxy, redis_store_table)
    await post_chat(base, {**ASK, "messages": [{"role": "user", "content": "warm"}]})  # the scripts loaded
    await until(lambda: not cache.store._tasks, what="the warm answer's put and end sent")
    sent.clear()
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "MISS"
    # the lookup and the lease; the tick's SPOP (every 50 ms while a lease is held) is nobody's wait
    assert [c for c in at_upstream[-1] if c != "SPOP"] == ["GET", "EVALSHA"]


async def test_a_request_whose_max_age_refuses_the_entry_takes_the_lease_at_once(
        aiohttp_server, start_proxy, redis_store_table):
    base, cache, sent, at_upstream = await recording(aiohttp_server, start_proxy, redis_store_table)
    await post_chat(base, ASK)
    await until(lambda: not cache.store._tasks, what="the answer's put and end sent")
    sent.clear()
    fresh = await post_chat(base, ASK, {"Cache-Control": "max-age=0"})
    assert fresh[1]["x-groq-proxy-cache"] == "MISS" and len(at_upstream) == 2
    # not the entry's existence asked again and again: the lookup and the lease
    assert [c for c in at_upstream[-1] if c != "SPOP"] == ["GET", "EVALSHA"]


async def test_a_follower_that_joins_after_the_leaders_last_look_is_still_answered(
        aiohttp_server, start_proxy, redis_store_table, monkeypatch):
    from policies.cache import coalesce_redis

    async def deaf(self) -> None:
        return None

    # the leader hears no message and never pops its set: only its end learns of the follower
    monkeypatch.setattr(coalesce_redis, "_TICK_S", 3600.0)
    monkeypatch.setattr(coalesce_redis.SharedFlights, "_subscribe", deaf)
    upstream = GatedUpstream()
    (one, two), (_, cache_two) = await two_in_process(aiohttp_server, start_proxy, redis_store_table, upstream)
    leader = send(one, ASK)
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    follower = send(two, {**ASK, "stream": True})
    await until(lambda: sum(f.followers for f in cache_two.flights.values()) == 1, what="the follower waiting")
    upstream.first.set()
    (status, _, _), (f_status, f_headers, f_raw) = await asyncio.wait_for(asyncio.gather(leader, follower), 30)
    assert status == f_status == 200 and f_headers["x-groq-proxy-cache"] == "COALESCED"
    assert text_of(f_raw, True) == TEXT and f_raw.endswith(b"data: [DONE]\n\n")
    assert upstream.calls == 1


async def test_an_entry_stored_between_the_lookup_and_the_lease_is_looked_up_again(redis_url):
    from policies.cache.coalesce import Capture
    from policies.cache.coalesce_redis import STORED, SharedFlights
    from policies.cache.entry import from_plain
    from policies.cache.policy import ResponseCache
    from policies.cache.store_redis import RedisCache

    store = RedisCache(redis_url, "cache", ttl_s=60, max_entries=10, max_bytes=1 << 20, max_entry_bytes=1 << 20,
                       prefix=f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    try:
        entry = from_plain("k" * 64, "tier-test", "all", "m1", orjson.dumps(completion("m1", TEXT)))
        await store.put(entry)
        cache = ResponseCache()
        cache.store = store
        shared = SharedFlights(store, 1.0)
        assert await shared.claim(Capture(cache, "k" * 64, "tier-test", "all")) == STORED
        await shared.close()
    finally:
        await store.close()


async def test_emptying_the_cache_leaves_the_requests_in_flight_alone(redis_url):
    from policies.cache.entry import from_plain
    from policies.cache.store_redis import RedisCache

    store = RedisCache(redis_url, "cache", ttl_s=60, max_entries=10, max_bytes=1 << 20, max_entry_bytes=1 << 20,
                       prefix=f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    client = aioredis.from_url(redis_url)
    try:
        entry = from_plain("k" * 64, "tier-test", "all", "m1", orjson.dumps(completion("m1", TEXT)))
        await store.put(entry)
        lease = store.redis_key("tier-test", "j" * 64) + ":lease"
        await client.set(lease, "abc:1", px=60_000)
        await client.xadd(store.base + "flight:abc:1", {"d": b"data: {}\n\n"})
        await client.sadd(store.base + "followed:abc", lease)
        assert await store.delete() == 1
        assert await store.delete(model="tier-test") == 0
        assert await client.exists(lease, store.base + "flight:abc:1", store.base + "followed:abc") == 3
    finally:
        await client.delete(lease, store.base + "flight:abc:1", store.base + "followed:abc")
        await client.aclose()
        await store.close()


async def test_a_leader_whose_client_leaves_mid_stream_reads_on_for_the_other_replicas_followers(
        aiohttp_server, start_proxy, redis_store_table):
    upstream = GatedUpstream()
    (one, two), (cache_one, cache_two) = await two_in_process(aiohttp_server, start_proxy, redis_store_table,
                                                              upstream)
    upstream.first.set()
    url = "/v1/chat/completions"
    async with aiohttp.ClientSession() as leader_session, aiohttp.ClientSession() as session:
        leader = await leader_session.post(one + url, json={**ASK, "stream": True})
        await leader.content.readuntil(b"\n\n")  # committed: the leader's first event is out
        follow = [asyncio.ensure_future(session.post(two + url, json={**ASK, "stream": True})) for _ in range(2)]
        flight = next(iter(cache_one.flights.values()))
        await until(lambda: flight.lease.published, what="the other replica following")
        responses = await asyncio.gather(*follow)
        leader.close()  # the leader's client goes away mid-stream; no request of its own replica waits
        await leader_session.close()
        await until(lambda: flight.handed, what="the stream kept for the other replica")
        upstream.rest.set()
        raws = [await resp.read() for resp in responses]
    assert all(r.headers["x-groq-proxy-cache"] == "COALESCED" for r in responses)
    assert all(text_of(raw, True) == TEXT and raw.endswith(b"data: [DONE]\n\n") for raw in raws)
    assert upstream.calls == 1
    await until(lambda: not cache_one.store._tasks, what="the answer's put")
    hit = await post_chat(two, ASK)  # stored once, by the leader's replica, and a hit on the other
    assert hit[1]["x-groq-proxy-cache"] == "HIT" and text_of(hit[2], False) == TEXT


async def test_a_reload_of_a_replica_that_reads_on_for_the_other_replicas_followers_does_not_cut_them(
        replicas, redis_url):
    # The leader's client leaves mid-stream: its replica reads on for the other replica's follower, and no request
    # of its own holds its config generation. A reload (SIGHUP) then closed the old cache policy at once: its
    # lease was no longer renewed, and the follower's stream ended with an error event, its answer complete
    # upstream.
    import signal

    upstream, (proc_one, _), (one, two) = await replicas()
    upstream.first.set()
    url = "/v1/chat/completions"
    client = aioredis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as leader_session, aiohttp.ClientSession() as session:
            leader = await leader_session.post(one + url, json={**ASK, "stream": True})
            await leader.content.readuntil(b"\n\n")
            follow = asyncio.ensure_future(session.post(two + url, json={**ASK, "stream": True}))
            await until_waiting(two, 1, "the other replica's follower")
            response = await follow
            first = await response.content.readuntil(b"\n\n")  # the leader's chunk, relayed
            leader.close()
            await leader_session.close()
            await until(lambda: '"status":499' in proc_one.stderr or '"status":200' in proc_one.stderr, 30.0,
                        "the leader's request ended")
            proc_one.process.send_signal(signal.SIGHUP)
            await until(lambda: "config_reloaded" in proc_one.stderr, 30.0, "the reload")
            lease = [k async for k in client.scan_iter(match=f"{replicas.prefix}*:lease")][0]
            reading = asyncio.ensure_future(response.read())
            renewed, last = 0, await client.pttl(lease)
            while renewed < 2 and not reading.done():  # two renewals after the reload, or the stream cut
                ttl = await client.pttl(lease)
                if ttl > last:
                    renewed += 1
                last = ttl
                await asyncio.sleep(0.05)
            upstream.rest.set()
            raw = first + await reading
    finally:
        await client.aclose()
    assert text_of(raw, True) == TEXT and raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    assert upstream.calls == 1


async def test_the_leader_hears_of_a_follower_on_another_replica_at_once(
        aiohttp_server, start_proxy, redis_store_table, monkeypatch):
    from policies.cache import coalesce_redis

    monkeypatch.setattr(coalesce_redis, "_TICK_S", 3600.0)  # its set never popped: only the message tells it
    upstream = GatedUpstream()
    (one, two), (cache_one, cache_two) = await two_in_process(aiohttp_server, start_proxy, redis_store_table,
                                                              upstream)
    url = "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        leading = asyncio.ensure_future(session.post(one + url, json={**ASK, "stream": True}))
        await until(lambda: upstream.calls == 1, what="the leader upstream")
        await until(lambda: cache_one.shared._subscriber is not None, what="the leader's replica subscribed")
        following = asyncio.ensure_future(session.post(two + url, json={**ASK, "stream": True}))
        flight = next(iter(cache_one.flights.values()))
        await until(lambda: flight.lease.published, what="the leader told of its follower")
        upstream.first.set()
        leader, follower = await asyncio.gather(leading, following)
        first = await follower.content.readuntil(b"\n\n")
        assert follower.headers["x-groq-proxy-cache"] == "COALESCED" and b'"role":"assistant"' in first
        assert upstream.finished == 0  # before the leader's stream ends
        upstream.rest.set()
        raw = first + await follower.read()
        await leader.read()
    assert text_of(raw, True) == TEXT and upstream.calls == 1


async def test_followers_whose_redis_dies_while_they_wait_go_upstream_from_their_replica(replicas, redis_server):
    upstream, _, (one, two) = await replicas(redis=redis_server.url, gated=2)
    leader = send(one, ASK)
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    bodies = [{**ASK, "stream": i % 2 == 0} for i in range(4)]
    followers = [send(two, b) for b in bodies]
    await until_waiting(two, 4, "the other replica's followers")
    redis_server.kill()  # their relay's XREAD loses its connection
    await until(lambda: upstream.calls == 2, what="the followers' own call")
    # Which follower makes that call is theirs to settle: a streamed one's call waits for `rest` after its first event
    upstream.first.set()
    upstream.rest.set()
    answers = await asyncio.wait_for(asyncio.gather(leader, *followers), 60)
    assert [a[0] for a in answers] == [200] * 5
    assert all(text_of(raw, b["stream"]) == TEXT for (_, _, raw), b in zip(answers[1:], bodies))
    assert upstream.calls == 2  # the followers' replica went upstream once, for all of them


class PerCallUpstream(ChatUpstream):
    """A stream per call, each held by events of its own: call i (from 0) waits for `opened[i]`, sends its first
    event (`first_sent[i]` set), waits for `finished[i]`, then sends the rest."""

    def __init__(self, held: int) -> None:
        self.opened = [asyncio.Event() for _ in range(held)]
        self.finished = [asyncio.Event() for _ in range(held)]
        self.first_sent = [asyncio.Event() for _ in range(held)]
        self.calls = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        call = self.calls
        self.calls += 1
        held = call < len(self.opened)
        if held:
            await self.opened[call].wait()
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(completion(body["model"], TEXT)), content_type="application/json")
        events = stream_events(body["model"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(events[0])
        if held:
            self.first_sent[call].set()
            await self.finished[call].wait()
        for event in events[1:]:
            await resp.write(event)
        await resp.write_eof()
        return resp


@pytest.mark.parametrize("new_lease_on", ["the_same_replica", "the_other_replica"])
async def test_a_leader_held_past_the_cap_leaves_the_next_lease_of_its_key_alone(
        aiohttp_server, start_proxy, redis_store_table, redis_url, new_lease_on):
    # A leader held past held_max_s (600 s) stops renewing its lease, which expires; the key's next miss takes a
    # new lease. When the old leader ended, it popped the key from its replica's leases: a new lease of its own
    # replica (the old answer grew past max_entry_bytes, so identical requests there no longer followed it) was
    # no longer renewed, and expired under its followers.
    upstream = PerCallUpstream(held=2)
    server = await aiohttp_server(upstream.app())
    url = f"http://127.0.0.1:{server.port}/openai/v1"
    small = [{"use": "cache", "max_entry_bytes": 1}]  # the old answer is unlisted at its first event
    configs = [config_for(url, {"tier-test": ["m1"]}, store=redis_store_table, policies=p)
               for p in (small, [{"use": "cache"}])]
    one, two = [await start_proxy(config) for config in configs]
    cache_one, cache_two = [config.policies.policies[0] for config in configs]
    old_leader_at, new_leader_at, follower_at = (one, one, two) if new_lease_on == "the_same_replica" else (
        one, two, one)
    leader_cache = cache_one if new_leader_at == one else cache_two
    follower_cache = cache_two if follower_at == two else cache_one
    client = aioredis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        try:
            await until(lambda: cache_one.shared is not None, what="the first replica's cache started")
            cache_one.shared.held_max_s = 0.01  # the old leader's lease is renewed no longer than this
            old = asyncio.ensure_future(session.post(old_leader_at + "/v1/chat/completions",
                                                     json={**ASK, "stream": True}))
            await until(lambda: upstream.calls == 1, 30.0, "the old leader upstream")
            lease_key = next(iter(cache_one.shared.leases))
            cache_one.shared.held_max_s = 600.0  # the new lease is held as any other
            upstream.opened[0].set()
            old = await old
            await old.content.readuntil(b"\n\n")  # its first event: past max_entry_bytes, unlisted
            for _ in range(3000):  # given up at the next renewal; expired in Redis 3 s after the last one
                if not await client.exists(lease_key) and lease_key not in cache_one.shared.leases:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the old leader's lease never expired")
            new = asyncio.ensure_future(session.post(new_leader_at + "/v1/chat/completions",
                                                     json={**ASK, "stream": True}))
            await until(lambda: upstream.calls == 2, 30.0, "the new leader upstream")
            new_capture = leader_cache.shared.leases[lease_key]
            new_token = new_capture.lease.token.encode()
            assert await client.get(lease_key) == new_token
            follower = send(follower_at, {**ASK, "stream": True})
            await until(lambda: new_capture.lease.published, 30.0, "the new leader told of its follower")
            assert sum(f.followers for f in follower_cache.flights.values()) == 1
            upstream.finished[0].set()  # the old leader ends now
            old_raw = await old.read()
            assert text_of(old_raw, True) == TEXT
            await until(lambda: not cache_one.store._tasks, 30.0, "the old leader's end sent")
            assert leader_cache.shared.leases.get(lease_key) is new_capture  # still renewed here
            assert await client.get(lease_key) == new_token  # and still its lease in Redis
            renewed, last = False, await client.pttl(lease_key)
            for _ in range(3000):  # renewed after the old leader's end
                ttl = await client.pttl(lease_key)
                if ttl > last:
                    renewed = True
                    break
                last = ttl
                await asyncio.sleep(0.01)
            assert renewed and await client.get(lease_key) == new_token
            upstream.opened[1].set()
            upstream.finished[1].set()
            new_raw = await (await new).read()
            status, headers, raw = await asyncio.wait_for(follower, 60)
        finally:
            await client.aclose()
    assert text_of(new_raw, True) == TEXT
    assert status == 200 and headers["x-groq-proxy-cache"] == "COALESCED" and text_of(raw, True) == TEXT
    assert upstream.calls == 2


async def test_an_old_leaders_end_leaves_the_next_leases_follower_mark_on_the_same_replica(redis_url):
    # The followed set names leases, not tokens: the end of a leader whose lease expired took the mark a follower
    # of the key's next lease (same replica) had left, and answered "publish" to the old leader instead.
    from policies.cache.store_redis import RedisCache

    store = RedisCache(redis_url, "cache", ttl_s=60, max_entries=10, max_bytes=1 << 20, max_entry_bytes=1 << 20,
                       prefix=f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    client = aioredis.from_url(redis_url)
    lease, followed = store.base + "k:lease", store.base + "followed:r"
    try:
        await client.set(lease, "r:2", px=60_000)  # the next lease, on the same replica
        await client.sadd(followed, lease)  # a follower of it
        end = store.script_file("flight_end.lua")
        again = await store.run_script(end, [lease, store.base + "flight:r:1", followed],
                                       ["r:1", 0, b"done", "m1", 10_000, 100])
        assert again == 0
        assert await client.smembers(followed) == {lease.encode()} and await client.get(lease) == b"r:2"
        await store.run_script(end, [lease, store.base + "flight:r:1", followed],
                               ["r:1", 1, b"done", "m1", 10_000, 100])  # published: its own stream only
        assert await client.smembers(followed) == {lease.encode()} and await client.get(lease) == b"r:2"
        assert await client.exists(store.base + "flight:r:2") == 0
    finally:
        await client.delete(lease, followed, store.base + "flight:r:1")
        await client.aclose()
        await store.close()


async def test_streaming_followers_name_the_model_that_answers_as_every_other_answer_does(replicas):
    # A follower streamed the leader's answer as it came (here, or relayed from the other replica) without
    # x-groq-proxy-model: its headers leave with the first piece, and the model was known only at the end.
    upstream, _, (one, two) = await replicas()
    url = "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        leading = asyncio.ensure_future(session.post(one + url, json={**ASK, "stream": True}))
        await until(lambda: upstream.calls == 1, what="the leader upstream")
        streamed = [asyncio.ensure_future(session.post(base + url, json={**ASK, "stream": True}))
                    for base in (two, two, one)]
        plain = send(two, ASK)
        await until_waiting(two, 3, "the other replica's followers")
        await until_waiting(one, 1, "the leader's replica's follower")
        upstream.first.set()  # the first event only: the leader's stream goes on
        leader, *followers = await asyncio.gather(leading, *streamed)
        firsts = [await resp.content.readuntil(b"\n\n") for resp in followers]
        assert not upstream.rest.is_set() and upstream.finished == 0  # live: the leader's stream has not ended
        assert leader.headers["x-groq-proxy-model"] == "m1"
        for resp, first in zip(followers, firsts):
            assert resp.headers["x-groq-proxy-cache"] == "COALESCED" and b'"role":"assistant"' in first
            assert resp.headers.get("x-groq-proxy-model") == "m1"
        upstream.rest.set()
        raws = [first + await resp.read() for first, resp in zip(firsts, followers)]
        await leader.read()
    status, headers, raw = await asyncio.wait_for(plain, 60)
    assert status == 200 and headers["x-groq-proxy-model"] == "m1" and text_of(raw, False) == TEXT
    assert all(text_of(r, True) == TEXT for r in raws)
    assert upstream.calls == 1


class FailingUpstream(GatedUpstream):
    """Its first `fails` calls answer 500 (the first once `first` is set); every later call answers."""

    def __init__(self, fails: int) -> None:
        super().__init__(gated=0)
        self.fails = fails

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.calls < self.fails:
            await request.read()
            self.calls += 1
            if self.calls == 1:
                await self.first.wait()
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=500)
        return await super()._chat(request)


async def test_followers_of_leaders_that_fail_again_and_again_make_one_upstream_call_a_round(
        aiohttp_server, start_proxy, redis_store_table):
    # Each request waited on at most three leaders that failed (_TRIES = 3), then went upstream on its own: with a
    # leader failing three times in a row, the remaining followers of both replicas all called upstream at once,
    # a call each, just when the upstream was failing.
    upstream = FailingUpstream(fails=3)
    (one, two), (cache_one, cache_two) = await two_in_process(aiohttp_server, start_proxy, redis_store_table,
                                                              upstream)
    leader = send(one, ASK)
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    bodies = [{**ASK, "stream": i % 2 == 0} for i in range(8)]
    followers = [send(one if i % 2 else two, b) for i, b in enumerate(bodies)]
    # four here, and the other replica as one (it follows through its relay)
    await until(lambda: sum(f.followers for f in cache_one.flights.values()) == 5, what="followers here")
    await until(lambda: sum(f.followers for f in cache_two.flights.values()) == 4, what="followers there")
    upstream.first.set()
    answers = await asyncio.wait_for(asyncio.gather(leader, *followers), 60)
    statuses = [a[0] for a in answers]
    # each failed round's leader gets its own error; the round after the third answers everyone else
    assert sorted(statuses) == [200] * 6 + [502] * 3, statuses
    assert upstream.calls == 4  # three failed calls, then one for the six requests still waiting
    answered = [(a, b) for a, b in zip(answers[1:], bodies) if a[0] == 200]
    assert sorted(a[1]["x-groq-proxy-cache"] for a, _ in answered) == ["COALESCED"] * 5 + ["MISS"]
    assert all(text_of(raw, b["stream"]) == TEXT for (_, _, raw), b in answered)


async def test_an_entry_that_cannot_be_read_is_a_miss_not_a_loop_of_lookups(
        aiohttp_server, start_proxy, redis_store_table, redis_url):
    # Redis says the entry is there (the lease script finds it), the lookup cannot read it: with no cap on a
    # follower's rounds, that round must not repeat for ever. It goes upstream, without the lease.
    upstream = GatedUpstream(gated=0)
    (one, _), (cache_one, _) = await two_in_process(aiohttp_server, start_proxy, redis_store_table, upstream)
    status, headers, _ = await post_chat(one, ASK)
    assert status == 200 and headers["x-groq-proxy-cache"] == "MISS"
    await until(lambda: not cache_one.store._tasks, what="the answer stored")
    client = aioredis.from_url(redis_url)
    try:
        entry_key = cache_one.store.redis_key("tier-test", headers["x-groq-proxy-cache-key"])
        assert await client.set(entry_key, b"not an entry", xx=True, keepttl=True)
        status, headers, raw = await asyncio.wait_for(post_chat(one, ASK), 60)
    finally:
        await client.aclose()
    assert status == 200 and headers["x-groq-proxy-cache"] == "MISS" and text_of(raw, False) == TEXT
    assert upstream.calls == 2


async def cache_block(base: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/status.json") as resp:
            return (await resp.json())["cache"]["stores"]["cache"]


async def test_a_replica_follows_at_most_pool_size_keys_of_another_and_the_rest_go_upstream(replicas, redis_url):
    # Each key followed on another replica holds a Redis connection (its relay's XREAD BLOCK): 1,000 distinct
    # keys in flight there opened 1,000 connections here. Past [store] pool_size, a miss goes upstream itself.
    upstream, (_, proc_two), (one, two) = await replicas(gated=5, pool_size=2)
    asks = [{**ASK, "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(5)]
    leaders = [send(one, ask) for ask in asks]
    await until(lambda: upstream.calls == 5, 30.0, "the five leaders upstream")
    followers = [send(two, ask) for ask in asks]
    # the leaders are still held: the three past the bound answered themselves (before: all five waited)
    await until(lambda: upstream.calls == 8, 30.0, "three followers past the bound upstream")
    await until_waiting(two, 2, "the two followers within the bound")
    block = await cache_block(two)
    assert block["relays"] == 2 and block["relays_full"] == 3 and block["waiting"] == 2
    upstream.first.set()
    answers = await asyncio.wait_for(asyncio.gather(*leaders, *followers), 60)
    assert [a[0] for a in answers] == [200] * 10
    assert all(text_of(raw, False) == TEXT for _, _, raw in answers)
    assert sorted(a[1]["x-groq-proxy-cache"] for a in answers[5:]) == ["COALESCED"] * 2 + ["MISS"] * 3
    assert upstream.calls == 8
    await until(lambda: '"reason":"relays_full"' in proc_two.stderr, 10.0, "cache_coalesce_gave_up logged")
    assert proc_two.stderr.count('"reason":"relays_full"') == 1  # three past the bound, one line
    for _ in range(3000):  # the relays' places are given back
        if (await cache_block(two))["relays"] == 0:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the relays' places were never given back")
