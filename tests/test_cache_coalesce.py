"""Coalescing: identical requests in flight share one upstream call. The upstream here is gated by events the
test opens, so "in flight" and "before the leader's stream ends" are states, not timings."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from proxy.sim.testing import ChatUpstream, completion, stream_events
from tests.conftest import config_for, post_chat, until

MESSAGES = [{"role": "user", "content": "Say hello"}]
ASK = {"model": "tier-test", "messages": MESSAGES}
TEXT = "Hello there!"


class GatedUpstream(ChatUpstream):
    """Answers after `first` opens (a stream: its first event), and ends a stream after `rest` opens. With
    `fail_first`, the first call answers 500 once `first` opens."""

    def __init__(self, fail_first: bool = False, cut_first: bool = False) -> None:
        self.first, self.rest = asyncio.Event(), asyncio.Event()
        self.calls = 0
        self.fail_first = fail_first
        self.cut_first = cut_first  # the first call's stream breaks after its first event
        self.finished = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.calls += 1
        call = self.calls
        await self.first.wait()
        if self.fail_first and call == 1:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=500)
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(completion(body["model"], TEXT)), content_type="application/json")
        events = stream_events(body["model"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(events[0])
        await self.rest.wait()
        if self.cut_first and call == 1:
            request.transport.close()
            return resp
        for event in events[1:]:
            await resp.write(event)
        await resp.write_eof()
        self.finished += 1
        return resp


async def gated(aiohttp_server, start_proxy, fail_first=False, cut_first=False, **cache):
    upstream = GatedUpstream(fail_first, cut_first)
    server = await aiohttp_server(upstream.app())
    config = config_for(f"http://127.0.0.1:{server.port}/openai/v1", {"tier-test": ["m1"]},
                        policies=[{"use": "cache", **cache}])
    base = await start_proxy(config)
    return upstream, base, config.policies.policies[0]


def text_of(raw: bytes, stream: bool) -> str:
    if not stream:
        return orjson.loads(raw)["choices"][0]["message"]["content"]
    out = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in orjson.loads(event[6:]).get("choices") or ():
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


async def leader_and_followers(upstream, base, cache, followers: int, leading: dict = ASK) -> tuple:
    """A leader (`leading`) upstream, then `followers` identical requests (every other one streamed) waiting on it."""
    leader = asyncio.ensure_future(post_chat(base, leading))
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    bodies = [{**ASK, "stream": i % 2 == 0} for i in range(followers)]
    waiting = [asyncio.ensure_future(post_chat(base, b)) for b in bodies]
    flight = next(iter(cache.flights.values()))
    await until(lambda: flight.followers == followers, what=f"{followers} followers waiting")
    return leader, waiting, bodies


async def test_fifty_identical_requests_streamed_and_not_make_one_upstream_call(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy)
    leader, followers, bodies = await leader_and_followers(upstream, base, cache, 49, {**ASK, "stream": True})
    upstream.first.set()
    upstream.rest.set()
    answers = await asyncio.gather(leader, *followers)
    assert upstream.calls == 1
    assert [a[0] for a in answers] == [200] * 50
    assert answers[0][1]["x-groq-proxy-cache"] == "MISS"
    assert {a[1]["x-groq-proxy-cache"] for a in answers[1:]} == {"COALESCED"}
    for (_, _, raw), body in zip(answers[1:], bodies):
        assert text_of(raw, body["stream"]) == TEXT
    assert not cache.flights


async def test_followers_of_a_dripping_stream_get_its_first_chunk_before_it_ends(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy)
    async with aiohttp.ClientSession() as session:
        leading = asyncio.ensure_future(session.post(base + "/v1/chat/completions", json={**ASK, "stream": True}))
        await until(lambda: upstream.calls == 1, what="the leader upstream")
        follow = [asyncio.ensure_future(session.post(base + "/v1/chat/completions", json={**ASK, "stream": True}))
                  for _ in range(3)]
        flight = next(iter(cache.flights.values()))
        await until(lambda: flight.followers == 3, what="3 followers waiting")
        upstream.first.set()  # the first event only: the upstream holds the rest
        leader, *responses = await asyncio.gather(leading, *follow)
        assert leader.status == 200
        for resp in responses:
            assert resp.headers["x-groq-proxy-cache"] == "COALESCED"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: {") and b'"role":"assistant"' in first
        assert not upstream.rest.is_set() and upstream.finished == 0  # the leader's stream has not ended
        upstream.rest.set()
        leader_text = text_of(await leader.read(), True)
        rests = [first + await resp.read() for resp in responses]
    assert leader_text == TEXT
    assert all(text_of(raw, True) == TEXT and raw.endswith(b"data: [DONE]\n\n") for raw in rests)
    assert upstream.calls == 1


async def test_followers_of_a_leader_that_failed_go_upstream_themselves(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy, fail_first=True)
    leader, followers, bodies = await leader_and_followers(upstream, base, cache, 6)
    upstream.rest.set()
    upstream.first.set()
    answers = await asyncio.gather(leader, *followers)
    assert answers[0][0] == 502  # the leader's own answer: every model failed
    assert [a[0] for a in answers[1:]] == [200] * 6
    assert all(text_of(raw, body["stream"]) == TEXT for (_, _, raw), body in zip(answers[1:], bodies))
    assert upstream.calls == 2  # one of the followers led the next call; the others waited for it
    assert sorted(a[1]["x-groq-proxy-cache"] for a in answers[1:]).count("MISS") == 1


async def test_a_leader_whose_client_leaves_mid_stream_keeps_the_upstream_call_for_its_followers(
        aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy)
    upstream.first.set()
    async with aiohttp.ClientSession() as leader_session, aiohttp.ClientSession() as session:
        leader = await leader_session.post(base + "/v1/chat/completions", json={**ASK, "stream": True})
        await leader.content.readuntil(b"\n\n")  # the leader has its first event: the stream is committed
        follow = [asyncio.ensure_future(session.post(base + "/v1/chat/completions", json={**ASK, "stream": True}))
                  for _ in range(2)]
        responses = await asyncio.gather(*follow)
        flight = next(iter(cache.flights.values()))
        assert flight.followers == 2
        leader.close()  # the leader's client goes away mid-stream
        await leader_session.close()
        await until(lambda: flight.handed, what="the stream kept for the followers")
        upstream.rest.set()
        raws = [await resp.read() for resp in responses]
    assert all(text_of(raw, True) == TEXT and raw.endswith(b"data: [DONE]\n\n") for raw in raws)
    assert upstream.calls == 1
    hit = await post_chat(base, ASK)  # and the answer was stored
    assert hit[1]["x-groq-proxy-cache"] == "HIT" and text_of(hit[2], False) == TEXT


async def test_coalescing_off_sends_every_request_upstream(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy, coalesce=False)
    calls = [asyncio.ensure_future(post_chat(base, ASK)) for _ in range(3)]
    await until(lambda: upstream.calls == 3, what="three upstream calls")
    upstream.first.set()
    answers = await asyncio.gather(*calls)
    assert {a[1]["x-groq-proxy-cache"] for a in answers} == {"MISS"}


async def test_followers_of_a_plain_leader_whose_client_left_go_upstream_themselves(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy)
    leader = asyncio.ensure_future(post_chat(base, ASK))
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    followers = [asyncio.ensure_future(post_chat(base, {**ASK, "stream": i == 0})) for i in range(3)]
    flight = next(iter(cache.flights.values()))
    await until(lambda: flight.followers == 3, what="3 followers waiting")
    leader.cancel()  # the leader's client hangs up while its call is upstream
    await until(lambda: upstream.calls == 2, what="a follower leading the next call")
    upstream.first.set()
    upstream.rest.set()
    answers = await asyncio.gather(*followers)
    assert [a[0] for a in answers] == [200] * 3
    assert all(text_of(raw, i == 0) == TEXT for i, (_, _, raw) in enumerate(answers))
    assert upstream.calls == 2


async def test_a_stream_too_large_to_store_still_reaches_its_followers_and_is_not_kept(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy, max_entry_bytes=100)
    leading = asyncio.ensure_future(post_chat(base, {**ASK, "stream": True}))
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    following = asyncio.ensure_future(post_chat(base, {**ASK, "stream": True}))
    flight = next(iter(cache.flights.values()))
    await until(lambda: flight.followers == 1, what="a follower waiting")
    upstream.first.set()
    upstream.rest.set()
    leader, follower = await asyncio.gather(leading, following)
    assert text_of(leader[2], True) == text_of(follower[2], True) == TEXT
    assert follower[1]["x-groq-proxy-cache"] == "COALESCED"
    assert follower[2].endswith(b"data: [DONE]\n\n") and b'"error"' not in follower[2]
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "MISS"  # too large: never stored


async def test_live_followers_of_a_stream_that_breaks_end_with_an_error_event(aiohttp_server, start_proxy):
    upstream, base, cache = await gated(aiohttp_server, start_proxy, cut_first=True)
    leading = asyncio.ensure_future(post_chat(base, {**ASK, "stream": True}))
    await until(lambda: upstream.calls == 1, what="the leader upstream")
    following = [asyncio.ensure_future(post_chat(base, {**ASK, "stream": True})) for _ in range(2)]
    flight = next(iter(cache.flights.values()))
    await until(lambda: flight.followers == 2, what="2 followers waiting")
    upstream.first.set()
    await until(lambda: flight.followers == 2 and len(flight.events) == 1, what="the first event out")
    upstream.rest.set()  # and then the upstream breaks
    leader, *followers = await asyncio.gather(leading, *following)
    for answer in (leader, *followers):
        last = answer[2].rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert answer[0] == 200 and b'"error"' in last, answer[2]
    assert {f[1]["x-groq-proxy-cache"] for f in followers} == {"COALESCED"}
    assert upstream.calls == 1
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "MISS"  # a broken stream is not stored
