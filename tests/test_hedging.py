"""Hedged requests: when the attempt in flight has produced no first data event after the hedge delay, the
next model starts in parallel; the first data event (a stream) or whole valid answer (plain) wins, the other is
cancelled at once and its upstream connection closed. Assertions are on which model answered and which
connections were closed, never on timings."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from proxy.sim.testing import Behaviour, status
from tests.conftest import attempt_fields, post_chat, routing_config, until
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)

MESSAGES = [{"role": "user", "content": "hi"}]


def hedged(chain, **table):
    return {"tier-x": {"chain": chain, "hedge": True, "hedge_after_ms": 50, **table}}


def ask(stream: bool = False) -> dict:
    return {"model": "tier-x", "messages": MESSAGES, "stream": stream}


def model_tasks() -> list[asyncio.Task]:
    """Hedge tasks still alive (each runs Pipeline._model)."""
    return [t for t in asyncio.all_tasks() if not t.done() and getattr(t.get_coro(), "__qualname__", "").endswith("._model")]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_slow_first_model_is_beaten_by_the_hedge_and_its_connection_closed(stream, upstream, start_proxy,
                                                                                   proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=60)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"])))

    code, headers, raw = await post_chat(base, ask(stream))

    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    assert b"Hello" in raw and headers["x-groq-proxy-attempts"] == "2"
    assert scripted.models_sent() == ["m1", "m2"]
    await until(lambda: scripted.closed(scripted.requests[0]), what="m1's connection closed")
    fields = attempt_fields(proxy_log)
    lost = next(f for f in fields if f["target"] == "up:m1")
    won = next(f for f in fields if f["target"] == "up:m2")
    assert lost["outcome"] == "hedge_lost" and lost["reason"] == "hedge_lost"
    assert won["outcome"] == "answered" and won["hedge"] is True
    assert model_tasks() == []


@pytest.mark.parametrize("stream", [False, True])
async def test_the_first_model_wins_when_it_answers_first_and_the_hedge_is_closed(stream, upstream, start_proxy,
                                                                                  proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=1.0)  # well after the hedge starts, at 50 ms
    scripted.behaviours["m2"] = Behaviour("hang", delay_s=60)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"])))

    code, headers, _ = await post_chat(base, ask(stream))

    assert code == 200 and headers["x-groq-proxy-model"] == "m1"
    assert scripted.models_sent() == ["m1", "m2"]
    await until(lambda: scripted.closed(scripted.requests[1]), what="the hedge's connection closed")
    lost = next(f for f in attempt_fields(proxy_log) if f["target"] == "up:m2")
    assert lost["outcome"] == "hedge_lost" and lost["hedge"] is True
    assert model_tasks() == []


async def test_a_lost_hedge_charges_no_cooldown(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=60)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"]), routing={"cooldown_after_failures": 1}))
    for _ in range(2):
        code, headers, _ = await post_chat(base, ask(True))
        assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m1", "m2", "m1", "m2"]  # m1 asked again: not cooling down


async def test_a_failed_hedge_lets_the_first_continue(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=1.0)
    scripted.behaviours["m2"] = status(503)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2", "m3"])))
    code, headers, _ = await post_chat(base, ask(True))
    assert code == 200 and headers["x-groq-proxy-model"] == "m1"
    assert scripted.models_sent() == ["m1", "m2"]


async def test_a_failed_first_lets_the_hedge_continue(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    # m1 fails at 1.0 s (timeout_s); the hedge starts at 0.5 s and answers at 1.25 s, before its own 1.5 s.
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=60)
    scripted.behaviours["m2"] = Behaviour("slow_first", delay_s=0.75)
    config = routing_config(url, hedged(["m1", "m2", "m3"], hedge_after_ms=500),
                            provider={"timeout_s": 1.0, "first_byte_timeout_s": 1.0})
    code, headers, _ = await post_chat(await start_proxy(config), ask(False))
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m1", "m2"]
    fields = {f["target"]: f for f in attempt_fields(proxy_log)}
    assert fields["up:m1"]["outcome"] == "fell_over" and fields["up:m1"]["reason"] == "timeout"


async def test_the_chain_continues_after_both_racers_fail_with_at_most_one_hedge(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=60)
    scripted.behaviours["m2"] = Behaviour("hang", delay_s=60)
    config = routing_config(url, hedged(["m1", "m2", "m3", "m4"]), provider={"timeout_s": 0.4,
                                                                             "first_byte_timeout_s": 0.4})
    code, headers, _ = await post_chat(await start_proxy(config), ask(False))
    assert code == 200 and headers["x-groq-proxy-model"] == "m3"
    assert scripted.models_sent() == ["m1", "m2", "m3"]
    fields = {f["target"]: f for f in attempt_fields(proxy_log)}
    assert fields["up:m1"]["reason"] == fields["up:m2"]["reason"] == "timeout"
    assert "hedge" not in fields["up:m3"]  # the one hedge was spent: m3 went alone
    await until(lambda: all(scripted.closed(r) for r in scripted.requests[:2]), what="the racers' connections closed")


async def test_x_hedge_turns_hedging_on_and_off_per_request(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=0.3)
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}))

    code, headers, _ = await post_chat(base, ask(True))  # the tier does not hedge
    assert code == 200 and headers["x-groq-proxy-model"] == "m1" and scripted.models_sent() == ["m1"]

    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=60)
    code, headers, _ = await post_chat(base, ask(True), {"x-hedge": "on", "x-hedge-after-ms": "20"})
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    lost = [f for f in attempt_fields(proxy_log) if f["outcome"] == "hedge_lost"]
    assert [f["target"] for f in lost] == ["up:m1"]  # raced, not fallen over after a first-byte timeout


async def test_x_hedge_off_wins_over_the_tier(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=0.3)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"])))
    code, headers, _ = await post_chat(base, ask(True), {"x-hedge": "off"})
    assert code == 200 and headers["x-groq-proxy-model"] == "m1" and scripted.models_sent() == ["m1"]


async def test_a_client_that_leaves_during_a_race_cancels_both_racers(upstream, start_proxy):
    import aiohttp

    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=60)
    scripted.behaviours["m2"] = Behaviour("hang", delay_s=60)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"])))
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.post(base + "/v1/chat/completions", data=orjson.dumps(ask())))
        await until(lambda: len(scripted.requests) == 2, what="both racers sent")
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await until(lambda: all(scripted.closed(r) for r in scripted.requests), what="both racers' connections closed")
    await until(lambda: model_tasks() == [], what="no hedge task left")


async def test_hedge_after_auto_waits_for_the_models_observed_p90(upstream, start_proxy, aiohttp_server):
    from proxy.app.server import STATE, build_app

    scripted, url = upstream
    server = await aiohttp_server(build_app(routing_config(url, hedged(["m1", "m2"], hedge_after_ms="auto"))))
    base = f"http://127.0.0.1:{server.port}"
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=60)
    # Not observed yet: "auto" has nothing to go by, so no hedge (the deadline here ends the wait).
    code, _, _ = await post_chat(base, ask(True), {"x-max-latency-ms": "300"})
    assert code == 504 and scripted.models_sent() == ["m1"]
    observed = server.app[STATE].pipeline.routing.observed
    for _ in range(5):
        observed.add("up:m1", True, 30.0)
    code, headers, _ = await post_chat(base, ask(True))
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"


def test_hedge_config_errors_name_the_key():
    from proxy.app.config import ConfigError

    with pytest.raises(ConfigError, match=r"^models\.tier-x\.hedge: must be true or false"):
        routing_config("http://127.0.0.1:1/v1", {"tier-x": {"chain": ["m1"], "hedge": "yes"}})
    with pytest.raises(ConfigError, match=r"^models\.tier-x\.hedge_after_ms: must be a number"):
        routing_config("http://127.0.0.1:1/v1", {"tier-x": {"chain": ["m1"], "hedge_after_ms": "soon"}})
    with pytest.raises(ConfigError, match=r"^models\.tier-x\.max_latency_ms: must be at least 1"):
        routing_config("http://127.0.0.1:1/v1", {"tier-x": {"chain": ["m1"], "max_latency_ms": 0}})


async def test_spans_show_the_hedge_the_loser_and_the_key(upstream, otlp, start_proxy):  # noqa: F811
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=60)
    config = routing_config(url, hedged(["m1", "m2"]), keys=("KEY_A", "KEY_B"),
                            telemetry={"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05})
    code, headers, _ = await post_chat(await start_proxy(config), ask(True))
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"

    server, attempts = await otlp.wait_for_request(headers["x-request-id"], attempts=2)
    by_model = {s.attributes["gen_ai.request.model"]: s.attributes for s in attempts}
    lost, won = by_model["m1"], by_model["m2"]
    assert lost["groq_proxy.attempt.outcome"] == "hedge_lost" and lost["groq_proxy.attempt.reason"] == "hedge_lost"
    assert "groq_proxy.attempt.hedge" not in lost
    assert won["groq_proxy.attempt.outcome"] == "answered" and won["groq_proxy.attempt.hedge"] is True
    assert {lost["groq_proxy.attempt.key"], won["groq_proxy.attempt.key"]} == {"KEY_A", "KEY_B"}
    assert server.attributes["groq_proxy.answered_by"] == "up:m2"
    every_value = repr([s.attributes for s in attempts]) + repr(server.attributes)
    assert "sk-test-pool-key" not in every_value


async def test_the_openai_client_streams_the_hedge_winner(upstream, start_proxy):
    import openai

    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=60)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"])))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-x", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    assert {c.model for c in chunks} == {"m2"}
    await until(lambda: scripted.closed(scripted.requests[0]), what="m1's connection closed")
    assert model_tasks() == []


@pytest.mark.parametrize("stream", [False, True])
async def test_the_deadline_ends_a_race_and_closes_both_racers(stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=60)
    scripted.behaviours["m2"] = Behaviour("hang", delay_s=60)
    base = await start_proxy(routing_config(url, hedged(["m1", "m2"])))
    code, _, raw = await post_chat(base, ask(stream), {"x-max-latency-ms": "1000"})
    assert code == 504 and orjson.loads(raw)["error"]["code"] == "deadline_exceeded"
    assert scripted.models_sent() == ["m1", "m2"]
    await until(lambda: all(scripted.closed(r) for r in scripted.requests), what="both racers' connections closed")
    assert model_tasks() == []
    reasons = {f["target"]: f["reason"] for f in attempt_fields(proxy_log)}
    assert reasons == {"up:m1": "deadline_exceeded", "up:m2": "deadline_exceeded"}


async def test_a_hedge_that_does_not_fire_makes_no_task(upstream, start_proxy, monkeypatch):
    scripted, url = upstream
    base = await start_proxy(routing_config(url, {"tier-x": {"chain": ["m1", "m2"], "hedge": True,
                                                             "hedge_after_ms": 10000}}))
    loop = asyncio.get_running_loop()
    made = []
    create_task = loop.create_task

    def counting(coro, **kwargs):
        made.append(getattr(coro, "__qualname__", ""))
        return create_task(coro, **kwargs)

    monkeypatch.setattr(loop, "create_task", counting)
    for stream in (False, True):
        code, headers, _ = await post_chat(base, ask(stream))
        assert code == 200 and headers["x-groq-proxy-model"] == "m1"
    assert not [name for name in made if name.endswith("._model")]
    assert scripted.models_sent() == ["m1", "m1"]
