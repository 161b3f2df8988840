"""Latency targets: `x-max-latency-ms` (or the tier's `max_latency_ms`) starts the chain with a model expected
to meet the target, by each model's observed latency, and is a deadline for the whole request: past it the
client gets 504 `deadline_exceeded` (or the SSE error event on a stream begun) and the upstream call is
cancelled. Observations are fed to the running proxy's state directly: which model goes first is the
behaviour under test, not how fast the machine is."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.app.server import STATE, build_app
from proxy.routing.observed import ObservedLatency
from proxy.sim.testing import Behaviour, ChatUpstream, chat_chunk, sse, status
from tests.conftest import attempt_fields, post_chat, routing_config, until

MESSAGES = [{"role": "user", "content": "hi"}]


def test_order_keeps_the_configured_order_among_models_that_meet_the_target():
    from proxy.app.config import Target

    observed = ObservedLatency(["p:a", "p:b", "p:c", "p:d"])
    chain = tuple(Target("p", m) for m in "abcd")
    for ms, key in ((900, "p:a"), (80, "p:b"), (400, "p:c"), (50, "p:d")):
        for _ in range(5):
            observed.add(key, True, ms)
    assert [t.model for t in observed.order(chain, 100, True)] == ["b", "d", "c", "a"]
    assert [t.model for t in observed.order(chain, 1000, True)] == ["a", "b", "c", "d"]
    assert observed.order(chain, 100, False) == chain  # plain requests have their own series: none observed yet


async def proxy(aiohttp_server, config):
    server = await aiohttp_server(build_app(config))
    return f"http://127.0.0.1:{server.port}", server.app[STATE]


def seed(state, stream: bool, **ms):
    for model, value in ms.items():
        for _ in range(5):
            state.pipeline.routing.observed.add(f"up:{model}", stream, value)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_latency_target_starts_with_a_model_expected_to_meet_it(stream, upstream, aiohttp_server):
    scripted, url = upstream
    base, state = await proxy(aiohttp_server, routing_config(url, {"tier-x": ["m1", "m2", "m3"]}))
    seed(state, stream, m1=900, m2=400, m3=60)
    ask = {"model": "tier-x", "messages": MESSAGES, "stream": stream}

    code, headers, _ = await post_chat(base, ask, {"x-max-latency-ms": "5000"})  # all meet it: configured order
    assert code == 200 and headers["x-groq-proxy-model"] == "m1"
    code, headers, _ = await post_chat(base, ask, {"x-max-latency-ms": "500"})
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    code, headers, _ = await post_chat(base, ask, {"x-max-latency-ms": "100"})
    assert code == 200 and headers["x-groq-proxy-model"] == "m3"
    code, headers, _ = await post_chat(base, ask)  # no target: the configured order
    assert code == 200 and headers["x-groq-proxy-model"] == "m1"


async def test_the_tier_max_latency_ms_is_the_default_target(upstream, aiohttp_server):
    scripted, url = upstream
    base, state = await proxy(aiohttp_server, routing_config(url, {"tier-x": {"chain": ["m1", "m2"],
                                                                              "max_latency_ms": 300}}))
    seed(state, False, m1=900, m2=100)
    code, headers, _ = await post_chat(base, {"model": "tier-x", "messages": MESSAGES})
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    code, headers, _ = await post_chat(base, {"model": "tier-x", "messages": MESSAGES}, {"x-max-latency-ms": "2000"})
    assert code == 200 and headers["x-groq-proxy-model"] == "m1"  # the header wins over the tier


async def test_answers_are_observed_per_model(upstream, aiohttp_server):
    scripted, url = upstream
    base, state = await proxy(aiohttp_server, routing_config(url, {"tier-x": ["m1"]}))
    for stream in (False, False, False, True, True, True):
        assert (await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "stream": stream}))[0] == 200
    view = state.pipeline.routing.observed.view("up:m1")
    assert view["total_samples"] == 3 and view["ttft_samples"] == 3
    assert view["total_p50_ms"] > 0 and view["ttft_p90_ms"] > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_past_the_deadline_the_client_gets_504_and_the_upstream_call_is_cancelled(stream, upstream,
                                                                                        start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    scripted.behaviours["m2"] = Behaviour("hang", delay_s=60)
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}))

    code, headers, raw = await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "stream": stream},
                                         {"x-max-latency-ms": "1000"})

    assert code == 504
    error = orjson.loads(raw)["error"]
    assert error["code"] == "deadline_exceeded" and error["type"] == "server_error" and "1000 ms" in error["message"]
    # The fallback ran inside the deadline, and the upstream saw its call closed.
    assert scripted.models_sent() == ["m1", "m2"]
    await until(lambda: scripted.closed(scripted.requests[1]), what="the upstream connection closed")
    last = attempt_fields(proxy_log)[-1]
    assert last["target"] == "up:m2" and last["outcome"] == "cancelled" and last["reason"] == "deadline_exceeded"


class FirstEventThenStall(ChatUpstream):
    """Streams one data event, then nothing until the proxy hangs up; records that it did."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chat_chunk("m1", "Hel")))
        try:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.01)
        finally:  # aiohttp may cancel this handler when the connection is lost, or it sees the close above
            self.disconnected.set()
        return response


async def test_a_stream_begun_ends_with_the_error_event_at_its_deadline(aiohttp_server, start_proxy):
    stall = FirstEventThenStall()
    up = await aiohttp_server(stall.app())
    base = await start_proxy(routing_config(f"http://127.0.0.1:{up.port}/openai/v1", {"tier-x": ["m1"]}))
    code, _, raw = await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "stream": True},
                                   {"x-max-latency-ms": "1500"})
    assert code == 200
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[0].startswith(b"data: ") and b"Hel" in events[0]
    error = orjson.loads(events[-1][len(b"data: "):])["error"]
    assert error["code"] == "deadline_exceeded"
    await asyncio.wait_for(stall.disconnected.wait(), 10)
    async with aiohttp.ClientSession() as session:  # counted as the 504 it is, not as a client gone (499)
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_requests_total{virtual_model="tier-x",model="none",status="504"} 1' in text


async def test_the_openai_client_gets_a_504_it_can_read(upstream, start_proxy):
    import openai

    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=60)
    base = await start_proxy(routing_config(url, {"tier-x": ["m1"]}))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="tier-x", messages=MESSAGES,
                                                 extra_headers={"x-max-latency-ms": "200"})
    assert err.value.status_code == 504 and err.value.code == "deadline_exceeded"


@pytest.mark.parametrize("header, value", [
    ("x-max-latency-ms", "fast"), ("x-max-latency-ms", "0"), ("x-max-latency-ms", "nan"), ("x-max-latency-ms", "-5"),
    ("x-hedge", "maybe"), ("x-hedge-after-ms", "-1"), ("x-hedge-after-ms", "inf"),
])
async def test_a_bad_header_value_is_a_400_naming_the_header(header, value, upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(routing_config(url, {"tier-x": ["m1"]}))
    code, _, raw = await post_chat(base, {"model": "tier-x", "messages": MESSAGES}, {header: value})
    error = orjson.loads(raw)["error"]
    assert code == 400 and error["param"] == header and header in error["message"]
    assert error["code"] == "invalid_header" and scripted.requests == []
