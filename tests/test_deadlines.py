"""Deadlines of one attempt, against the simulator generating at a set pace: a plain answer is bounded only by
`timeout_s` (Groq sends nothing of it until all of it is generated), a stream by `first_byte_timeout_s` until its
first event and by `timeout_s` after it.

The generation time is set well apart from each deadline (three times and more), so the outcome never depends on
how busy the machine is.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from proxy.sim.simulator import SimulatorConfig, build_simulator_app
from tests.test_fallback import MESSAGES, attempt_lines, call, chat, config_with, data_events

MODELS = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")
TOKENS = 41  # at 20 tokens/s: the last token 2 s after the first
GENERATION_S = (TOKENS - 1) / 20


async def slow_simulator(aiohttp_server, *, first_byte_s: float, total_s: float) -> str:
    """The proxy, in front of a simulator that generates 20 tokens a second; chain: two of its models."""
    sim = await aiohttp_server(build_simulator_app(SimulatorConfig(tokens_per_s=20)))
    provider = {"base_url": f"http://127.0.0.1:{sim.port}/openai/v1", "first_byte_timeout_s": first_byte_s,
                "timeout_s": total_s}
    return config_with({"sim": provider}, {"tier-test": [f"sim:{m}" for m in MODELS]})


async def test_plain_answer_longer_than_the_first_byte_timeout_is_answered(aiohttp_server, start_proxy, proxy_log):
    base = await start_proxy(await slow_simulator(aiohttp_server, first_byte_s=0.6, total_s=30))
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="tier-test", messages=MESSAGES, max_tokens=TOKENS)
    took = loop.time() - start
    completion = raw.parse()
    assert completion.usage.completion_tokens == TOKENS
    assert raw.headers["x-groq-proxy-model"] == MODELS[0] and raw.headers["x-groq-proxy-attempts"] == "1"
    assert took >= GENERATION_S  # it did take longer than first_byte_timeout_s: nothing came before the end
    assert [(x["outcome"], x.get("reason")) for x in attempt_lines(proxy_log)] == [("answered", None)]


async def test_plain_answer_longer_than_timeout_s_times_out(aiohttp_server, start_proxy, proxy_log):
    base = await start_proxy(await slow_simulator(aiohttp_server, first_byte_s=0.6, total_s=0.6))
    r = await call(base, chat(max_tokens=TOKENS))
    assert r.status == 504
    assert [(x["outcome"], x["reason"]) for x in attempt_lines(proxy_log)] == [("fell_over", "timeout")] * 2


async def test_stream_longer_than_the_first_byte_timeout_is_answered(aiohttp_server, start_proxy, proxy_log):
    # The first event comes at once; the rest takes three times first_byte_timeout_s. After the first event
    # only timeout_s bounds the stream.
    base = await start_proxy(await slow_simulator(aiohttp_server, first_byte_s=0.6, total_s=30))
    r = await call(base, chat(stream=True, max_tokens=TOKENS))
    assert r.status == 200
    events = data_events(r.body)
    assert events[-1] == b"[DONE]" and not [e for e in events if e.startswith(b'{"error"')]
    assert [(x["outcome"], x.get("reason")) for x in attempt_lines(proxy_log)] == [("answered", None)]


async def test_stream_longer_than_timeout_s_breaks_after_its_first_event(aiohttp_server, start_proxy, proxy_log):
    base = await start_proxy(await slow_simulator(aiohttp_server, first_byte_s=0.6, total_s=0.6))
    r = await call(base, chat(stream=True, max_tokens=TOKENS))
    assert r.status == 200
    assert b'"code":"timeout"' in data_events(r.body)[-1]
    assert [(x["outcome"], x["reason"]) for x in attempt_lines(proxy_log)] == [("failed_after_commit", "timeout")]
