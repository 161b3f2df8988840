"""The four built-in policies through the real proxy, on the memory store (the Redis store runs the same
decisions through its Lua scripts: see test_policy_exactness.py for them against a real Redis)."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest

from aiohttp import web

from policies.estimate import estimate
from policies.identity import hash_key
from proxy.sim.testing import Behaviour, completion, stream_events
from tests.conftest import config_for, post_chat, until
from tests.policy_examples import UsageUpstream

MESSAGES = [{"role": "user", "content": "hi"}]
BODY = {"model": "tier-test", "messages": MESSAGES}
KEY = "gp-builtin-test-key"
AUTH = {"keys": [{"id": "app", "sha256": hash_key(KEY), "team": "search"}]}


async def post(base: str, body: dict = BODY, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=body, headers=headers or {}) as resp:
            return resp.status, resp.headers, await resp.read()


async def get(base: str, path: str, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path, headers=headers or {}) as resp:
            return resp.status, await resp.json()


# --- request_budget -------------------------------------------------------------------------------------------


async def test_request_budget_prompt_over_budget_is_refused_with_estimate_and_budget(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "request_budget"}]))
    long = [{"role": "user", "content": "x" * 4400}]  # about 1,100 tokens: over `default` (1,000), under `chat`
    status, _, body = await post(base, {"model": "tier-test", "messages": long})
    error = orjson.loads(body)["error"]
    assert status == 400 and error["code"] == "request_budget_exceeded"
    assert "estimated at 1107 tokens, over the 1000-token prompt budget of request type `default`" in error["message"]
    status, _, _ = await post(base, {"model": "tier-test", "messages": long}, {"x-request-type": "chat"})
    assert status == 200 and len(scripted.requests) == 1


async def test_request_budget_lowers_or_sets_the_completion_limit(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[
        {"use": "request_budget", "types": {"chat": {"completion": 500}}}]))
    status, headers, _ = await post(base, {**BODY, "max_tokens": 5000})
    assert status == 200 and headers["x-groq-proxy-completion-limit"] == "1000; lowered from 5000"
    status, headers, _ = await post(base, {**BODY, "max_completion_tokens": 300}, {"x-request-type": "chat"})
    assert "x-groq-proxy-completion-limit" not in headers
    await post(base, BODY, {"x-request-type": "contentGeneration"})
    await post(base, BODY, {"x-request-type": "chat"})
    sent = [r["body"] for r in scripted.requests]
    assert sent[0]["max_tokens"] == 1000 and "max_completion_tokens" not in sent[0]
    assert sent[1]["max_completion_tokens"] == 300
    assert sent[2]["max_completion_tokens"] == 4000  # no limit: the type's budget becomes the limit
    assert sent[3]["max_completion_tokens"] == 500  # types.chat overrides the default 1000


async def test_request_budget_over_completion_reject(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "request_budget", "over_completion": "reject"}]))
    status, _, body = await post(base, {**BODY, "max_completion_tokens": 1001})
    error = orjson.loads(body)["error"]
    assert status == 400 and error["code"] == "request_budget_exceeded" and error["param"] == "max_completion_tokens"
    assert scripted.requests == []


async def test_request_budget_in_shadow_changes_nothing(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "request_budget", "mode": "shadow"}]))
    long = [{"role": "user", "content": "x" * 8000}]
    status, headers, _ = await post(base, {"model": "tier-test", "messages": long, "max_tokens": 9000})
    assert status == 200 and "x-groq-proxy-completion-limit" not in headers
    assert scripted.requests[0]["body"]["max_tokens"] == 9000
    status, metrics = 0, ""
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            metrics = await resp.text()
    assert 'groq_proxy_policy_decisions_total{policy="request_budget",decision="reject",mode="shadow"} 1' in metrics


# --- token_budget ---------------------------------------------------------------------------------------------


async def test_token_budget_reserves_settles_and_refuses_when_spent(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, auth=AUTH, policies=[
        {"use": "token_budget", "per": "key", "tokens": 50, "period": "day"}]))
    auth = {"Authorization": f"Bearer {KEY}"}
    # Each request reserves its prompt estimate (about 8) plus max_tokens 20 and is charged USAGE (10 tokens).
    small = {**BODY, "max_tokens": 20}
    assert [(await post(base, small, auth))[0] for _ in range(3)] == [200, 200, 200]
    status, usage = await get(base, "/v1/usage", auth)
    assert status == 200
    [budget] = usage["budgets"]
    assert budget == {"policy": "token_budget", "per": "key", "period": "day", "limit": 50, "used": 30,
                      "reserved": 0, "usage_percent": 60.0, "resets_at": budget["resets_at"]}
    assert budget["resets_at"].endswith("T00:00:00Z")
    assert usage["total_usage_percent"] == 60.0 and usage["is_within_budget"] is True
    # 20 left, a request needs up to 28: refused, and the real client does not retry it.
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=2)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="tier-test", messages=MESSAGES, max_tokens=20)
    await client.close()
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    response = info.value.response
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-groq-proxy-budget-resets-at"] == budget["resets_at"]
    assert budget["resets_at"] in info.value.message
    assert len(scripted.requests) == 3


async def test_token_budget_settles_a_cut_stream_to_an_estimate(aiohttp_server, start_proxy):
    hold = asyncio.Event()
    up = UsageUpstream(words=50, hold=hold)
    server = await aiohttp_server(up.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1", policies=[
        {"use": "token_budget", "per": "global", "tokens": 100000}]))
    async with aiohttp.ClientSession() as session:
        body = {**BODY, "stream": True, "max_tokens": 200}
        async with session.post(base + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readany()
            status, usage = await get(base, "/v1/usage")
            assert usage["budgets"][0]["reserved"] > 200  # prompt estimate + max_tokens, held while it streams
    hold.set()

    async def settled():
        return (await get(base, "/v1/usage"))[1]["budgets"][0]

    for _ in range(200):
        budget = await settled()
        if budget["reserved"] == 0:
            break
        await asyncio.sleep(0.02)
    # The client left after the role chunk: charged the prompt's estimate and what went out, never the
    # whole reservation, and never nothing.
    assert budget["reserved"] == 0 and 8 <= budget["used"] < 60


async def test_a_cut_stream_is_charged_per_data_event_not_per_data_text_inside_one(aiohttp_server, start_proxy):
    """The estimate of a stream cut without usage counts the data events that went out: a content that itself
    says `data:` is one event, not two (the pipeline counted `data:` in the bytes before the scanner counted
    events: it counted 7 events where 4 went out, and charged 6 tokens for 3 words)."""
    words = ["data: {", "x data: y", "data:"]

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in stream_events("m1", words)[:-2]:  # role chunk and the words; no finish chunk, no [DONE]
            await resp.write(event)
        await resp.write_eof()  # the upstream ends the stream early: failed after the commit point
        return resp

    app = web.Application()
    app.router.add_post("/openai/v1/chat/completions", cut)
    server = await aiohttp_server(app)
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1", policies=[
        {"use": "token_budget", "per": "global", "tokens": 100000}]))
    body = {**BODY, "stream": True, "max_tokens": 200}
    status, _, raw = await post(base, body)
    assert status == 200 and b"upstream_closed" in raw
    for _ in range(500):  # settled in the request's after(), which may finish just after the body went out
        budget = (await get(base, "/v1/usage"))[1]["budgets"][0]
        if budget["reserved"] == 0:
            break
        await asyncio.sleep(0.01)
    assert budget["reserved"] == 0
    assert budget["used"] == estimate(body) + len(words)  # one token a content event; the role chunk none


# --- rate_limit -----------------------------------------------------------------------------------------------


async def test_rate_limit_refuses_with_retry_after_and_its_headers_replace_groqs(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("status", status=200, body=completion("m1"), headers={
        "x-ratelimit-limit-requests": "14400", "x-ratelimit-remaining-requests": "14399"})  # Groq's view
    base = await start_proxy(config_for(url, policies=[
        {"use": "rate_limit", "requests_per_minute": 3, "tokens_per_minute": 100000}]))
    answers = [await post(base) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1]["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    assert answers[0][1]["x-ratelimit-limit-requests"] == "3"  # the proxy's limit, not Groq's 14400
    assert answers[0][1]["x-ratelimit-limit-tokens"] == "100000"
    assert answers[0][1]["x-ratelimit-reset-requests"].endswith("s")
    status, headers, body = await post(base)
    error = orjson.loads(body)["error"]
    assert status == 429 and error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert 1 <= int(headers["retry-after"]) <= 20 and headers["x-ratelimit-remaining-requests"] == "0"
    assert len(scripted.requests) == 3


async def test_rate_limit_with_wait_s_waits_for_capacity(upstream, start_proxy):
    scripted, url = upstream
    # 120 a minute: a burst of 120, then one every 0.5 s. The 5 over the burst wait their turn (2.5 s at most).
    base = await start_proxy(config_for(url, policies=[
        {"use": "rate_limit", "requests_per_minute": 120, "wait_s": 5}]))
    results = await asyncio.gather(*(post(base) for _ in range(125)))
    assert all(r[0] == 200 for r in results)  # waited, not refused
    no_wait = await start_proxy(config_for(url, policies=[{"use": "rate_limit", "requests_per_minute": 120}]))
    statuses = [r[0] for r in await asyncio.gather(*(post(no_wait) for _ in range(125)))]
    assert statuses.count(429) >= 1


async def test_rate_limit_tokens_settle_to_reported_usage(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "rate_limit", "tokens_per_minute": 100}]))
    # Each request reserves 8 + 50 tokens and is charged 10 (USAGE): five fit in the minute (4 x 10 + 58),
    # where only one would if the reservations were kept.
    statuses = [(await post(base, {**BODY, "max_tokens": 50}))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]


# --- concurrency ----------------------------------------------------------------------------------------------


async def test_concurrency_holds_a_slot_for_a_whole_stream_then_frees_it(aiohttp_server, start_proxy):
    hold = asyncio.Event()
    up = UsageUpstream(hold=hold)
    server = await aiohttp_server(up.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1", policies=[
        {"use": "concurrency", "per": "model", "limits": {"tier-test": 1}}]))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json={**BODY, "stream": True}) as resp:
            assert resp.status == 200
            await resp.content.readany()  # the stream is open, its slot held
            status, _, body = await post(base)
            assert status == 429 and orjson.loads(body)["error"]["code"] == "concurrency_limit_exceeded"
            hold.set()
            await resp.read()
    assert (await post(base))[0] == 200  # the stream's end gave its slot back


async def test_concurrency_queues_up_to_wait_s(aiohttp_server, start_proxy):
    hold = asyncio.Event()
    up = UsageUpstream(hold=hold)
    server = await aiohttp_server(up.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1", policies=[
        {"use": "concurrency", "per": "global", "limit": 1, "wait_s": 30}]))
    first = asyncio.ensure_future(post(base, {**BODY, "stream": True}))
    await until(lambda: up.started == 1, what="the first stream to start")
    second = asyncio.ensure_future(post(base, {**BODY, "stream": True}))
    await asyncio.sleep(0.1)
    assert up.started == 1 and not second.done()  # queued, not refused
    hold.set()
    assert (await first)[0] == 200 and (await second)[0] == 200
    assert up.started == 2


# --- shadow mode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_shadow_limits_count_but_never_refuse(upstream, start_proxy, redis_store_table, backend):
    scripted, url = upstream
    store = {"store": redis_store_table} if backend == "redis" else {}
    base = await start_proxy(config_for(url, **store, policies=[
        {"use": "rate_limit", "requests_per_minute": 2, "mode": "shadow"},
        {"use": "concurrency", "per": "global", "limit": 1, "mode": "shadow"}]))
    statuses = [r[0] for r in await asyncio.gather(*(post(base) for _ in range(5)))]
    assert statuses == [200] * 5
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            metrics = await resp.text()
    line = 'groq_proxy_policy_decisions_total{policy="rate_limit",decision="reject",mode="shadow"} 3'
    assert line in metrics
    assert 'groq_proxy_policy_decisions_total{policy="rate_limit",decision="continue",mode="shadow"} 2' in metrics


async def test_a_stream_carries_the_proxys_ratelimit_headers_not_groqs(upstream, start_proxy):
    scripted, url = upstream  # its streams say x-ratelimit-remaining-requests: 99
    base = await start_proxy(config_for(url, policies=[{"use": "rate_limit", "requests_per_minute": 7}]))
    status, headers, body = await post(base, {**BODY, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and body.endswith(b"data: [DONE]\n\n")
    assert headers["x-ratelimit-limit-requests"] == "7" and headers["x-ratelimit-remaining-requests"] == "6"


async def test_the_estimator_is_replaceable(upstream, start_proxy):
    from policies import set_estimator

    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "request_budget"}]))
    set_estimator(lambda body: 5000)
    try:
        status, _, body = await post(base)
    finally:
        set_estimator(None)
    assert status == 400 and "estimated at 5000 tokens" in orjson.loads(body)["error"]["message"]
    assert (await post(base))[0] == 200


async def test_a_request_bigger_than_a_minutes_tokens_is_refused_for_good(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "rate_limit", "tokens_per_minute": 100}]))
    status, headers, body = await post(base, {**BODY, "max_tokens": 500})
    error = orjson.loads(body)["error"]
    assert status == 429 and error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    assert "more than the limit of 100 tokens per minute" in error["message"]
    assert scripted.requests == []


async def test_concurrency_per_key_counts_each_key_apart(aiohttp_server, start_proxy):
    hold = asyncio.Event()
    up = UsageUpstream(hold=hold)
    server = await aiohttp_server(up.app())
    other = "gp-builtin-other-key"
    auth = {"keys": [*AUTH["keys"], {"id": "other", "sha256": hash_key(other)}]}
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1", auth=auth, policies=[
        {"use": "concurrency", "per": "key", "limit": 1}]))
    first = asyncio.ensure_future(post(base, {**BODY, "stream": True}, {"x-api-key": KEY}))
    await until(lambda: up.started == 1, what="the first key's stream to start")
    assert (await post(base, BODY, {"x-api-key": KEY}))[0] == 429  # the same key: its one slot is taken
    second = asyncio.ensure_future(post(base, {**BODY, "stream": True}, {"x-api-key": other}))
    await until(lambda: up.started == 2, what="the other key's stream to start")  # its own slot
    hold.set()
    assert (await first)[0] == 200 and (await second)[0] == 200


async def test_an_estimator_that_raises_at_the_end_still_frees_the_slot(aiohttp_server, start_proxy):
    """An answer without usage is settled to the prompt's estimate; a replaced estimator that raises there must
    not stop the settlement: the slot is freed (a reservation would stand as the charge)."""
    from aiohttp import web

    from policies import set_estimator

    async def chat(request: web.Request) -> web.Response:
        answer = completion((await request.json())["model"])
        del answer["usage"]  # settled to the estimate
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    config = config_for(str(server.make_url("/v1")), policies=[
        {"use": "concurrency", "per": "global", "limit": 1},
        {"use": "token_budget", "per": "global", "tokens": 100000}])
    base = await start_proxy(config)
    def estimator(body):
        raise RuntimeError("estimator broke")  # token_budget is passed over (on_error open); the slot is taken

    set_estimator(estimator)
    try:
        first = await post(base)
        second = await post(base)
    finally:
        set_estimator(None)
    assert first[0] == 200 and second[0] == 200  # the first request's slot was freed


async def test_a_concurrency_limit_naming_no_virtual_model_is_said_at_start(upstream, start_proxy, proxy_log):
    """`limits` keyed by a name that is no virtual model nor alias (a typo) limits only requests naming exactly
    that model: the start says so, naming the key; a virtual model's own limit is not mentioned."""
    _, url = upstream
    table = {"use": "concurrency", "per": "model", "limits": {"tier-test": 2, "tier-tset": 1}}
    base = await start_proxy(config_for(url, policies=[table]))
    warned = [r.fields for r in proxy_log.records if r.getMessage() == "policy_limit_unknown_model"]
    assert [w["key"] for w in warned] == ["policies[0].limits.tier-tset"]
    status, _, _ = await post_chat(base, {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200  # it starts and serves: the name may be a real model asked for directly
