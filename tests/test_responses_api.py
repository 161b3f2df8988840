"""The Responses API through the proxy, with the real openai client: chains, the commit point of a named-event
stream, the Responses `error` event after it, usage into metrics and budgets, and 400s for bad input."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai
import orjson
import pytest

from policies.identity import hash_key
from proxy.sim import responses as rs
from proxy.sim.testing import Behaviour, status
from tests.conftest import config_for


async def test_plain_response_falls_over_and_reports_usage(api, start_proxy):
    scripted, url = api
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        raw = await client.responses.with_raw_response.create(model="tier-test", input="hi", max_output_tokens=50)
        response = raw.parse()
    assert response.output_text == "Hello there!"
    assert response.usage.input_tokens == 7 and response.usage.output_tokens == 3
    assert scripted.models_sent() == ["m1", "m2"]
    assert [r["path"] for r in scripted.requests] == ["/openai/v1/responses"] * 2
    assert scripted.requests[1]["body"] == {"model": "m2", "input": "hi", "max_output_tokens": 50}
    assert raw.headers["x-groq-proxy-model"] == "m2" and raw.headers["x-groq-proxy-attempts"] == "2"


async def test_groq_sdk_path_and_plain_failed_response_falls_over(api, start_proxy):
    """A 200 whose response failed is no answer: the next model is tried (the groq SDK's /openai/v1 path)."""
    scripted, url = api
    failed = rs.response_object("m1", None, status="failed")
    failed["error"] = {"code": "server_error", "message": "the model broke"}
    scripted.behaviours["m1"] = Behaviour("ok", body=failed)
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/openai/v1/responses", json={"model": "tier-test", "input": "hi"}) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["output"][0]["content"][0]["text"] == "Hello there!"
    assert scripted.models_sent() == ["m1", "m2"]


async def test_stream_falls_over_before_the_commit_point_and_passes_bytes_through(api, start_proxy):
    """m1 sends its preamble (created, in_progress) and then an error event: nothing of it reached the client,
    so m2 answers, and the client gets m2's stream byte for byte."""
    scripted, url = api
    scripted.behaviours["m1"] = Behaviour("error_event", cut_after=2)
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses",
                                json={"model": "tier-test", "input": "hi", "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            received = await resp.read()
    assert received == b"".join(rs.stream_events("m2"))
    assert scripted.models_sent() == ["m1", "m2"]


async def test_openai_stream_after_a_cut_before_commit(api, start_proxy):
    scripted, url = api
    scripted.behaviours["m1"] = Behaviour("cut", cut_after=1)  # response.created, then the connection closes
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.responses.create(model="tier-test", input="hi", stream=True)
        events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there!"
    assert events[-1].response.model == "m2" and events[-1].response.usage.total_tokens == 10
    assert scripted.models_sent() == ["m1", "m2"]


async def test_failure_after_the_commit_point_ends_with_the_responses_error_event(api, start_proxy):
    """m1 gets past the preamble (its output item went out) and then breaks: no fall-over, and the stream
    ends with the Responses API's own `error` event, which openai-python yields as a ResponseErrorEvent."""
    scripted, url = api
    scripted.behaviours["m1"] = Behaviour("cut", cut_after=5)  # created, in_progress, item, part, one delta
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.responses.create(model="tier-test", input="hi", stream=True)
        events = [event async for event in stream]
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "error"]
    error = events[-1]
    assert error.code == "upstream_closed" and "m1" in error.message
    assert error.sequence_number == 5
    assert scripted.models_sent() == ["m1"]


async def test_upstream_error_event_after_commit_is_passed_through(api, start_proxy):
    """The upstream's own error event, once the client has the output item: passed on, and nothing else tried."""
    scripted, url = api
    scripted.behaviours["m1"] = Behaviour("error_event", cut_after=4)
    scripted.stream_hold = asyncio.Event()  # the error waits until the client has seen the committed events
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.responses.create(model="tier-test", input="hi", stream=True)
        events = []
        async for event in stream:
            events.append(event)
            if event.type == "response.content_part.added":
                scripted.stream_hold.set()
    assert [e.type for e in events][-2:] == ["response.content_part.added", "error"]
    assert events[-1].message == "overloaded mid-stream"
    assert scripted.models_sent() == ["m1"]


async def test_usage_of_response_completed_feeds_metrics(api, start_proxy):
    scripted, url = api
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.responses.create(model="tier-test", input="hi", stream=True)
        [event async for event in stream]
        await client.responses.create(model="tier-test", input="hi")
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_tokens_total{virtual_model="tier-test",model="m1",type="input"} 14' in text
    assert 'groq_proxy_tokens_total{virtual_model="tier-test",model="m1",type="output"} 6' in text
    assert re.search(r'gen_ai_client_token_usage_count\{gen_ai_operation_name="responses",'
                     r'gen_ai_request_model="tier-test",gen_ai_token_type="input"\} 2', text)


KEY = "gp-responses-test-key"


async def test_token_budget_is_charged_the_responses_usage(api, start_proxy):
    scripted, url = api
    base = await start_proxy(config_for(url, auth={"keys": [{"id": "app", "sha256": hash_key(KEY)}]}, policies=[
        {"use": "token_budget", "per": "key", "tokens": 1000, "period": "day"}]))
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        body = {"model": "tier-test", "input": "hi", "stream": True, "max_output_tokens": 20}
        async with session.post(base + "/v1/responses", json=body) as resp:
            assert resp.status == 200
            await resp.read()
        async with session.post(base + "/v1/responses", json={**body, "stream": False}) as resp:
            assert resp.status == 200
        async with session.get(base + "/v1/usage") as resp:
            usage = await resp.json()
    assert usage["budgets"][0]["used"] == 20  # 10 tokens (response.usage.total_tokens) each
    assert usage["budgets"][0]["reserved"] == 0


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief. " * 400},
                                           {"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"instructions": "Be brief. " * 400, "input": "hi"}),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "function", "name": "lookup",
                                                  "description": "Looks it up. " * 400, "parameters": {}}]}),
])
async def test_the_token_limit_counts_instructions_and_tools_as_for_chat(api, start_proxy, path, body):
    """4000 bytes of system prompt are about 1000 tokens, over a limit of 500 a minute whichever API carries
    them: refused up front, nothing sent."""
    scripted, url = api
    base = await start_proxy(config_for(url, policies=[
        {"use": "rate_limit", "per": "global", "tokens_per_minute": 500, "default_completion": 10}]))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + path, json={"model": "tier-test", **body}) as resp:
            error = (await resp.json())["error"]
    assert resp.status == 429 and "tokens" in error["message"], error
    assert scripted.requests == []


@pytest.mark.parametrize("body, param, fragment", [
    ({"input": "hi"}, "model", "model"),
    ({"model": "tier-test"}, "input", "required"),
    ({"model": "tier-test", "input": 3}, "input", "not a number"),
    ({"model": "tier-test", "input": []}, "input", "at least one"),
    ({"model": "tier-test", "input": ["hi"]}, "input[0]", "object"),
    ({"model": "tier-test", "input": ""}, "input", "non-empty"),
    ({"model": "tier-test", "input": "hi", "stream": "yes"}, "stream", "boolean"),
    ({"model": "tier-test", "input": "hi", "max_output_tokens": 0}, "max_output_tokens", "at least 1"),
    ({"model": "tier-test", "input": "hi", "temperature": "hot"}, "temperature", "number"),
    ({"model": "tier-test", "input": "hi", "instructions": 5}, "instructions", "string"),
    ({"model": "tier-test", "input": "hi", "tools": {}}, "tools", "array"),
])
async def test_bad_input_gets_an_openai_shaped_400(api, start_proxy, body, param, fragment):
    scripted, url = api
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses", data=orjson.dumps(body)) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert error["param"] == param and fragment in error["message"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert scripted.requests == []


async def test_the_simulator_serves_responses(start_proxy):
    """`make serve` without a key: the embedded simulator answers the Responses API, plain and streamed."""
    base = await start_proxy(config_for("http://127.0.0.1:9/openai/v1", {"tier-sim": ["openai/gpt-oss-20b"]}),
                             simulate=True)
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        response = await client.responses.create(model="tier-sim", input="hello there", max_output_tokens=5)
        stream = await client.responses.create(model="tier-sim", input="hello there", stream=True,
                                               max_output_tokens=5)
        events = [event async for event in stream]
    assert response.status == "incomplete" and len(response.output_text.split()) == 5
    assert response.usage.output_tokens == 5
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert events[-1].type == "response.completed"


async def test_every_model_failing_after_keepalives_ends_with_the_responses_error_event(api, start_proxy):
    """Keep-alive comments went out (the 200 with them): when every model then fails, the error is the
    Responses API's own event, not chat's."""
    scripted, url = api
    scripted.behaviours["m1"] = status(503)
    scripted.behaviours["m2"] = status(503)
    scripted.stream_hold = asyncio.Event()  # the upstream answers once the client has had a keep-alive
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}, server={"keepalive_s": 0.05}))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses",
                                json={"model": "tier-test", "input": "hi", "stream": True}) as resp:
            assert resp.status == 200
            received = await resp.content.readuntil(b"\n\n")
            assert received == b": keep-alive\n\n"
            scripted.stream_hold.set()
            rest = await resp.read()
    name, data = rest.rstrip(b"\n").split(b"\n")
    assert name == b"event: error"
    event = orjson.loads(data.removeprefix(b"data: "))
    assert event["type"] == "error" and event["code"] == "all_models_failed" and event["sequence_number"] == 0
    assert scripted.models_sent() == ["m1", "m2"]


async def test_a_tiers_chat_params_reach_the_responses_api_in_its_own_names(api, start_proxy):
    """tier-fast's `reasoning_effort = "low"` (a chat name) goes to /responses as `reasoning.effort`; a chain
    entry's `max_completion_tokens` as `max_output_tokens`; what the client set in the Responses names wins."""
    from tests.conftest import routing_config

    scripted, url = api
    base = await start_proxy(routing_config(url, {"tier-fast": {
        "chain": [{"model": "m1", "params": {"max_completion_tokens": 64}}], "params": {"reasoning_effort": "low"}}}))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        await client.responses.create(model="tier-fast", input="hi")
        await client.responses.create(model="tier-fast", input="hi", reasoning={"effort": "high"},
                                      max_output_tokens=16)
    first, second = (r["body"] for r in scripted.requests)
    assert first == {"model": "m1", "input": "hi", "reasoning": {"effort": "low"}, "max_output_tokens": 64}
    assert second == {"model": "m1", "input": "hi", "reasoning": {"effort": "high"}, "max_output_tokens": 16}


async def test_error_event_sequence_number_follows_the_last_event_sent(api, start_proxy):
    """The error event after the commit point is numbered after the last event the client got, whatever its
    bytes hold: a delta whose text says `data:` and an event whose JSON spans two `data:` lines are one event
    each (counting `data:` in the bytes numbered this error 8)."""
    scripted, url = api
    item = {"id": "msg_test", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    pending = rs.response_object("m1", None, None, status="in_progress")
    split = (b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "item_id": '
             b'"msg_test", "output_index": 0, "content_index": 0, "delta": " two lines", "logprobs": [],\n'
             b'data: "sequence_number": 5}\n\n')
    events = [rs.event("response.created", 0, response=pending), rs.event("response.in_progress", 1, response=pending),
              rs.event("response.output_item.added", 2, output_index=0, item=item),
              rs.event("response.content_part.added", 3, item_id="msg_test", output_index=0, content_index=0,
                       part=part),
              rs.event("response.output_text.delta", 4, item_id="msg_test", output_index=0, content_index=0,
                       delta="see data: here", logprobs=[]),
              split]
    scripted.behaviours["m1"] = Behaviour("cut", cut_after=len(events), events=events)
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.responses.create(model="tier-test", input="hi", stream=True)
        received = [event async for event in stream]
    assert [e.sequence_number for e in received] == [0, 1, 2, 3, 4, 5, 6]
    assert received[-1].type == "error" and received[-1].code == "upstream_closed"
    assert "".join(e.delta for e in received if e.type == "response.output_text.delta") == "see data: here two lines"
