"""The built-ins' plan (policies/plan.py) through the real proxy, as clients meet it: many requests at once on one
key's slots, a streamed answer whose client leaves, a refused slot queued with wait_s, upstream errors and a
fall-over, against the same requests on the generic path (the plan turned off)."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.app.server import STATE, build_app
from proxy.sim.testing import ChatUpstream, completion, status, stream_events
from tests.conftest import config_for, until
from tests.test_reload import env, proxy, reload, toml  # noqa: F401  (env and proxy are fixtures)

SAFETY_S = 20  # a hang guard only: every wait below ends on an event


class Gate(ChatUpstream):
    """Answers once `opened` is set; a streamed request gets its first event at once and the rest then."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.arrived = 0
        self.arrivals = asyncio.Condition()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        async with self.arrivals:
            self.arrived += 1
            self.arrivals.notify_all()
        model = body["model"]
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        if not body.get("stream"):
            await self.opened.wait()
            return web.Response(body=orjson.dumps({**completion(model), "usage": usage}),
                                content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = stream_events(model)
        await response.write(events[0])
        await self.opened.wait()
        for event in events[1:]:
            await response.write(event)
        await response.write_eof()
        return response

    async def until_arrived(self, n: int) -> None:
        async with self.arrivals:
            await asyncio.wait_for(self.arrivals.wait_for(lambda: self.arrived >= n), SAFETY_S)


async def proxy_over(aiohttp_server, url: str, policies: list[dict], planned: bool):
    config = config_for(url, {"tier-test": ["m1"]}, policies=policies)
    app = build_app(config)
    server = await aiohttp_server(app)
    chain = app[STATE].generation.pipeline.policies
    if not planned:
        chain._plans, chain.planned = None, False
    assert chain.planned is planned
    return f"http://127.0.0.1:{server.port}", chain


def body(user: str = "ann", **fields) -> dict:
    return {"model": "tier-test", "messages": [{"role": "user", "content": "hello"}], "user": user, **fields}


@pytest.mark.parametrize("planned", [True, False])
async def test_two_hundred_at_once_on_fifty_slots_admit_exactly_fifty(aiohttp_server, planned):
    gate = Gate()
    up = await aiohttp_server(gate.app())
    policies = [{"use": "concurrency", "per": "global", "limit": 50},
                {"use": "token_budget", "per": "global", "tokens": 1_000_000},
                {"use": "rate_limit", "per": "global", "requests_per_minute": 10_000}]
    base, chain = await proxy_over(aiohttp_server, f"http://127.0.0.1:{up.port}/openai/v1", policies, planned)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> int:
            async with session.post(base + "/v1/chat/completions", json=body()) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.create_task(one()) for _ in range(200)]
        done = await asyncio.wait_for(_first(tasks, 150), SAFETY_S)  # the refused answer at once
        assert sorted(done) == [429] * 150
        await gate.until_arrived(50)
        assert chain.store._slots == {"cc:concurrency:all": 50}
        gate.opened.set()
        statuses = await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_S)
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert gate.arrived == 50
    assert chain.store._slots == {}
    used, reserved, _ = next(iter(chain.store._budgets.values()))
    assert (used, reserved) == (50 * 12, 0)


async def _first(tasks: list, n: int) -> list:
    out = []
    for future in asyncio.as_completed(tasks):
        out.append(await future)
        if len(out) == n:
            return out
    return out


@pytest.mark.parametrize("planned", [True, False])
async def test_a_streamed_client_that_leaves_frees_its_slot_once(aiohttp_server, planned):
    gate = Gate()
    up = await aiohttp_server(gate.app())
    policies = [{"use": "concurrency", "per": "global", "limit": 2},
                {"use": "token_budget", "per": "global", "tokens": 100_000}]
    base, chain = await proxy_over(aiohttp_server, f"http://127.0.0.1:{up.port}/openai/v1", policies, planned)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    held = asyncio.create_task(client.chat.completions.create(**body("bo")))  # in flight, holding a slot
    await gate.until_arrived(1)
    stream = await client.chat.completions.create(**body(), stream=True)
    async for _ in stream:
        break  # the first event came: the client leaves mid-stream
    await stream.close()
    await until(lambda: chain.store._slots == {"cc:concurrency:all": 1}, SAFETY_S, "the leaver's slot freed")
    gate.opened.set()
    await asyncio.wait_for(held, SAFETY_S)
    await until(lambda: chain.store._slots == {}, SAFETY_S, "every slot freed")
    _, reserved, _ = next(iter(chain.store._budgets.values()))
    assert reserved == 0
    await client.close()


@pytest.mark.parametrize("planned", [True, False])
async def test_a_request_queued_for_a_slot_is_admitted_when_a_planned_one_gives_it_back(aiohttp_server, planned):
    gate = Gate()
    up = await aiohttp_server(gate.app())
    policies = [{"use": "concurrency", "per": "global", "limit": 1, "wait_s": SAFETY_S},
                {"use": "rate_limit", "per": "user", "requests_per_minute": 100, "tokens_per_minute": 100_000}]
    base, chain = await proxy_over(aiohttp_server, f"http://127.0.0.1:{up.port}/openai/v1", policies, planned)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    first = asyncio.create_task(client.chat.completions.with_raw_response.create(**body()))
    await gate.until_arrived(1)
    second = asyncio.create_task(client.chat.completions.with_raw_response.create(**body()))
    await until(lambda: chain.store._waiting == 1, SAFETY_S, "the second request queued")
    gate.opened.set()
    answers = await asyncio.wait_for(asyncio.gather(first, second), SAFETY_S)
    assert [a.http_response.status_code for a in answers] == [200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["99", "98"]
    assert chain.store._slots == {}
    text = await _metrics(base)
    assert 'groq_proxy_policy_decisions_total{policy="concurrency",decision="continue",mode="enforce"} 2' in text
    await client.close()


async def _metrics(base: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            return await resp.text()


async def test_a_planned_stream_admitted_before_a_reload_gives_back_to_the_store_the_new_chain_counts_on(
        aiohttp_server, proxy):
    gate = Gate()
    up = await aiohttp_server(gate.app())
    url = f"http://127.0.0.1:{up.port}/openai/v1"
    tables = ('[[policies]]\nuse = "concurrency"\nper = "global"\nlimit = {limit}\n'
              '[[policies]]\nuse = "token_budget"\nper = "user"\ntokens = 100000\n')
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}, tables.format(limit=2)))
    old = state.generation.pipeline.policies
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(**body(), stream=True)
    chunks = aiter(stream)
    await anext(chunks)  # admitted by the old chain's plan, its slot held
    path.write_text(toml(url, {"tier-test": ["m1"]}, tables.format(limit=1)))
    assert (await reload(base))[0] == 200
    new = state.generation.pipeline.policies
    assert new is not old and new.store is old.store and new.planned
    with pytest.raises(openai.RateLimitError):  # the one slot of the new limit is the old stream's
        await client.chat.completions.create(**body("bo"))
    gate.opened.set()
    async for _ in chunks:
        pass
    await until(lambda: new.store._slots == {}, SAFETY_S, "the old stream's slot given back")
    answer = await client.chat.completions.with_raw_response.create(**body("bo"))
    assert answer.http_response.status_code == 200
    # Each user's budget charged what its request used, nothing left reserved: the stream (without usage) its
    # estimate, 3 + 4 + 2 for the prompt and one a content event; the plain answer its reported 12.
    assert {k.split(":")[3]: v[:2] for k, v in new.store._budgets.items()} == {"ann": [10, 0], "bo": [12, 0]}
    await client.close()


async def test_every_operation_leaves_the_same_counts_planned_as_the_generic_way(api, aiohttp_server):
    """Chat (plain, streamed, lowered, refused), the Responses API, embeddings and audio (no tokens), with a
    fall-over from a failing first model: two proxies, one planning and one not, fed the same requests."""
    scripted, url = api
    scripted.behaviours["m1"] = status(503)  # every request falls over to m2: the failed attempt used nothing
    policies = [{"use": "request_budget", "types": {"default": {"prompt": 200, "completion": 60}}},
                {"use": "token_budget", "per": "user", "tokens": 2000},
                {"use": "rate_limit", "per": "user", "requests_per_minute": 1000, "tokens_per_minute": 1_000_000},
                {"use": "concurrency", "per": "model", "limits": {"tier-test": 10}}]
    sides = []
    for planned in (True, False):
        config = config_for(url, {"tier-test": ["m1", "m2"]}, policies=policies)
        app = build_app(config)
        server = await aiohttp_server(app)
        chain = app[STATE].generation.pipeline.policies
        if not planned:
            chain._plans, chain.planned = None, False
        sides.append((openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k", max_retries=0),
                      chain, f"http://127.0.0.1:{server.port}"))

    async def each(call):
        out = []
        for client, _, _ in sides:
            try:
                raw = await call(client)
                out.append((raw.http_response.status_code, raw.headers.get("x-groq-proxy-completion-limit"),
                            raw.headers.get("x-ratelimit-limit-tokens"), raw.headers.get("x-ratelimit-limit-requests")))
            except openai.APIStatusError as error:
                out.append((error.status_code, error.body))
        assert out[0] == out[1]
        return out[0]

    chat = lambda **k: (lambda c: c.chat.completions.with_raw_response.create(  # noqa: E731
        model="tier-test", messages=[{"role": "user", "content": "hello there"}], **k))
    assert (await each(chat(user="ann")))[:2] == (200, None)
    assert (await each(chat(user="ann", max_tokens=500)))[:2] == (200, "60; lowered from 500")
    assert (await each(chat(user="bo", max_completion_tokens=20, extra_headers={"x-request-type": "odd"})))[0] == 200
    assert (await each(chat(user="cy", max_tokens=10)))[0] == 200
    assert (await each(lambda c: c.chat.completions.with_raw_response.create(
        model="tier-test", messages=[{"role": "user", "content": "x" * 2000}], user="ann")))[0] == 400

    async def streamed(client):
        raw = await client.chat.completions.with_raw_response.create(
            model="tier-test", messages=[{"role": "user", "content": "hi"}], user="ann", stream=True)
        async for _ in raw.parse():
            pass
        return raw

    assert (await each(streamed))[0] == 200
    assert (await each(lambda c: c.responses.with_raw_response.create(
        model="tier-test", input="a question", user="ann", max_output_tokens=500)))[0] == 200
    assert (await each(lambda c: c.embeddings.with_raw_response.create(
        model="tier-test", input=["one", "two"], user="ann")))[0] == 200
    assert (await each(lambda c: c.audio.transcriptions.with_raw_response.create(
        model="tier-test", file=("a.wav", b"RIFF" + bytes(100)))))[0] == 200
    assert (await each(lambda c: c.audio.speech.with_raw_response.create(
        model="tier-test", input="say this", voice="x")))[0] == 200

    (_, planned, base_a), (_, generic, base_b) = sides
    await until(lambda: not planned.store._slots and not generic.store._slots, SAFETY_S, "every slot given back")
    assert planned.store._budgets == generic.store._budgets
    assert all(reserved == 0 for _, reserved, _ in planned.store._budgets.values())
    async with aiohttp.ClientSession() as session:  # the usage API reads the same counters
        for user in ("ann", "bo", "cy"):
            reports = []
            for base in (base_a, base_b):
                async with session.get(base + "/v1/usage", params={"user": user}) as resp:
                    report = await resp.json()
                    reports.append((resp.status, report["budgets"], report["total_usage_percent"]))
            assert reports[0] == reports[1] and reports[0][1][0]["used"] > 0 and reports[0][1][0]["reserved"] == 0
    text_a, text_b = await _metrics(base_a), await _metrics(base_b)
    decisions = lambda text: sorted(line for line in text.splitlines()  # noqa: E731
                                    if line.startswith("groq_proxy_policy_decisions_total"))
    assert decisions(text_a) == decisions(text_b) and decisions(text_a)
    for client, _, _ in sides:
        await client.close()
