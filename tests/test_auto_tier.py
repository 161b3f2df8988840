"""The automatic tier: a request for `[routing] auto_model` gets its tier from `x-model-tier`, else from its
`x-request-type` through `[routing.request_types]`, and with a latency target the fastest tier expected to meet
it. The body keeps the upstream's `model`; `x-groq-proxy-model` and the metrics name the tier chosen."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from proxy.app.config import ConfigError
from proxy.app.server import STATE, build_app
from tests.conftest import post_chat, routing_config
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)

MESSAGES = [{"role": "user", "content": "hi"}]
TIERS = {"tier-fast": ["m1"], "tier-standard": ["m2"], "tier-premium": ["m3"]}
ROUTING = {"auto_model": "auto", "request_types": {"default": "tier-fast", "chat": "tier-standard",
                                                   "summarization": "tier-standard",
                                                   "contentGeneration": "tier-premium"}}


async def proxy(aiohttp_server, url):
    server = await aiohttp_server(build_app(routing_config(url, TIERS, routing=ROUTING)))
    return f"http://127.0.0.1:{server.port}", server.app[STATE]


@pytest.mark.parametrize("headers, tier, model", [
    ({}, "tier-fast", "m1"),
    ({"x-request-type": "chat"}, "tier-standard", "m2"),
    ({"x-request-type": "contentGeneration"}, "tier-premium", "m3"),
    ({"x-request-type": "unknownType"}, "tier-fast", "m1"),  # not in the table: its `default`
    ({"x-model-tier": "premium"}, "tier-premium", "m3"),
    ({"x-model-tier": "tier-standard", "x-request-type": "contentGeneration"}, "tier-standard", "m2"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_tier_is_chosen_from_the_headers(headers, tier, model, stream, upstream, aiohttp_server):
    scripted, url = upstream
    base, _ = await proxy(aiohttp_server, url)
    code, got, raw = await post_chat(base, {"model": "auto", "messages": MESSAGES, "stream": stream}, headers)
    assert code == 200 and got["x-groq-proxy-model"] == tier
    assert scripted.models_sent() == [model]
    if not stream:
        assert orjson.loads(raw)["model"] == model  # the upstream's own model name is kept in the body


async def test_with_a_latency_target_the_fastest_tier_expected_to_meet_it(upstream, aiohttp_server):
    scripted, url = upstream
    base, state = await proxy(aiohttp_server, url)
    observed = state.pipeline.routing.observed
    for key, ms in (("up:m1", 80.0), ("up:m2", 900.0), ("up:m3", 2500.0)):
        for _ in range(5):
            observed.add(key, False, ms)
    ask = {"model": "auto", "messages": MESSAGES}
    code, got, _ = await post_chat(base, ask, {"x-request-type": "chat", "x-max-latency-ms": "200"})
    assert code == 200 and got["x-groq-proxy-model"] == "tier-fast"
    code, got, _ = await post_chat(base, ask, {"x-request-type": "chat", "x-max-latency-ms": "1000"})
    assert code == 200 and got["x-groq-proxy-model"] == "tier-standard"  # its own tier meets it: kept
    assert scripted.models_sent() == ["m1", "m2"]


async def test_the_routing_hints_are_not_sent_upstream(upstream, aiohttp_server):
    scripted, url = upstream
    base, _ = await proxy(aiohttp_server, url)
    hints = {"x-model-tier": "fast", "x-request-type": "chat", "x-max-latency-ms": "5000", "x-hedge": "off",
             "x-hedge-after-ms": "100"}
    assert (await post_chat(base, {"model": "auto", "messages": MESSAGES}, hints))[0] == 200
    sent = {name.lower() for name in scripted.requests[0]["headers"]}
    assert not sent & set(hints)


async def test_the_metrics_name_the_tier_chosen(upstream, aiohttp_server):
    scripted, url = upstream
    base, _ = await proxy(aiohttp_server, url)
    assert (await post_chat(base, {"model": "auto", "messages": MESSAGES}, {"x-model-tier": "standard"}))[0] == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_requests_total{virtual_model="tier-standard",model="m2",status="200"} 1' in text


async def test_an_unknown_tier_is_a_400_naming_the_header(upstream, aiohttp_server):
    scripted, url = upstream
    base, _ = await proxy(aiohttp_server, url)
    code, _, raw = await post_chat(base, {"model": "auto", "messages": MESSAGES}, {"x-model-tier": "turbo"})
    error = orjson.loads(raw)["error"]
    assert code == 400 and error["param"] == "x-model-tier" and "turbo" in error["message"]
    assert "fast" in error["message"] and scripted.requests == []


async def test_the_auto_model_is_listed_and_retrievable(upstream, aiohttp_server):
    scripted, url = upstream
    base, _ = await proxy(aiohttp_server, url)
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/models/auto") as resp:
            assert resp.status == 200 and (await resp.json())["id"] == "auto"


@pytest.mark.parametrize("routing, message", [
    ({"request_types": {"default": "tier-fast"}}, "routing.request_types: needs auto_model"),
    ({"auto_model": "auto", "request_types": {"chat": "tier-turbo"}}, "routing.request_types.chat: must name"),
    ({"auto_model": "tier-fast"}, "routing.auto_model: 'tier-fast' is already a virtual model"),
])
def test_config_errors_name_the_key(routing, message):
    with pytest.raises(ConfigError) as err:
        routing_config("http://127.0.0.1:1/v1", TIERS, routing=routing)
    assert str(err.value).startswith(message)


async def test_the_span_names_the_tier_chosen(upstream, otlp, aiohttp_server):  # noqa: F811
    scripted, url = upstream
    config = routing_config(url, TIERS, routing=ROUTING,
                            telemetry={"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05})
    server = await aiohttp_server(build_app(config))
    code, headers, _ = await post_chat(f"http://127.0.0.1:{server.port}", {"model": "auto", "messages": MESSAGES},
                                       {"x-request-type": "summarization"})
    assert code == 200
    span, attempts = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert span.attributes["groq_proxy.virtual_model"] == "tier-standard"
    assert span.attributes["gen_ai.request.model"] == "auto" and span.attributes["gen_ai.response.model"] == "m2"
    assert attempts[0].attributes["groq_proxy.virtual_model"] == "tier-standard"
