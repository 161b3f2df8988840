"""Real client libraries against the real proxy: openai-python (sync and async) and the groq SDK.

The proxy runs in the test's event loop, so the sync clients are driven from a worker thread.
"""

from __future__ import annotations

import asyncio

import groq
import openai
import pytest
from aiohttp import web

from proxy.sim.testing import Behaviour, sse, status, stream_events
from tests.conftest import config_for

MESSAGES = [{"role": "user", "content": "Say hello"}]
SCRIPTED_TEXT = "Hello there!"  # what the scripted upstream answers, streamed or not
SIM_MODEL = "openai/gpt-oss-20b"


def sim_config():
    """A config for the embedded simulator (its URL replaces this placeholder on start-up)."""
    return config_for("http://127.0.0.1:9/openai/v1", {"tier-sim": [SIM_MODEL]})


# --- openai-python ----------------------------------------------------------------------------------------


async def test_openai_sync_completion_falls_over_and_reports_the_model(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config_for(url))

    def call():
        with openai.OpenAI(base_url=f"{base}/v1", api_key="client-key") as client:
            return client.chat.completions.create(model="tier-test", messages=MESSAGES)

    completion = await asyncio.to_thread(call)
    assert completion.choices[0].message.content == SCRIPTED_TEXT
    assert completion.usage.total_tokens == 10
    assert scripted.models_sent() == ["m1", "m2"]
    # The client's own key never reaches the upstream; the provider's key does.
    sent = scripted.requests[-1]["headers"]
    assert sent["Authorization"] == "Bearer sk-test-secret-upstream-key"
    assert "client-key" not in str(sent)


async def test_openai_async_completion(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        completion = await client.chat.completions.create(model="tier-test", messages=MESSAGES, max_tokens=5)
    assert completion.choices[0].message.content == SCRIPTED_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert scripted.requests[0]["body"]["max_tokens"] == 5
    assert scripted.models_sent() == ["m1"]


async def test_openai_with_raw_response_headers(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(429, "rate_limit_exceeded", retry_after="1")
    base = await start_proxy(config_for(url))

    def call():
        with openai.OpenAI(base_url=f"{base}/v1", api_key="x") as client:
            raw = client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES)
            return raw.headers, raw.parse()

    headers, completion = await asyncio.to_thread(call)
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-groq-proxy-model"] == "m2"
    assert headers["x-groq-proxy-attempts"] == "2"
    assert headers["x-upstream-request-id"] == "req_up"
    assert completion.choices[0].message.content == SCRIPTED_TEXT


async def test_openai_async_raw_response_request_ids_differ(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        first = await client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES)
        second = await client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES)
    assert first.headers["x-groq-proxy-model"] == "m1"
    assert first.headers["x-groq-proxy-attempts"] == "1"
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_openai_sync_stream_assembles_the_upstream_text(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(500)
    base = await start_proxy(config_for(url))

    def call():
        with openai.OpenAI(base_url=f"{base}/v1", api_key="x") as client:
            raw = client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES, stream=True)
            with raw.parse() as stream:
                return raw.headers, list(stream)

    headers, chunks = await asyncio.to_thread(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPTED_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-groq-proxy-model"] == "m2"
    assert all(r["body"]["stream"] is True for r in scripted.requests)


async def test_openai_async_stream_assembles_the_upstream_text(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        async with stream:
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == SCRIPTED_TEXT
    assert scripted.models_sent() == ["m1"]


async def test_openai_stream_usage_with_include_usage_through_the_simulator(start_proxy):
    base = await start_proxy(sim_config(), simulate=True)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        whole = await client.chat.completions.create(model="tier-sim", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="tier-sim", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async with stream:
            chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


async def test_openai_sync_stream_usage_through_the_simulator(start_proxy):
    base = await start_proxy(sim_config(), simulate=True)

    def call():
        with openai.OpenAI(base_url=f"{base}/v1", api_key="x") as client:
            with client.chat.completions.create(
                model="tier-sim", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
                max_tokens=7,
            ) as stream:
                return list(stream)

    chunks = await asyncio.to_thread(call)
    assert chunks[-1].usage.completion_tokens == 7
    words = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()
    assert len(words) == 7


async def test_openai_simulated_answers_say_so(start_proxy):
    base = await start_proxy(sim_config(), simulate=True)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        raw = await client.chat.completions.with_raw_response.create(model="tier-sim", messages=MESSAGES)
    assert raw.headers["x-groq-proxy-simulated"] == "true"
    assert raw.headers["x-groq-proxy-model"] == SIM_MODEL
    assert raw.parse().model == SIM_MODEL


async def test_openai_unknown_model_is_not_found(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    err = info.value
    assert err.status_code == 404
    assert err.code == "model_not_found"
    assert err.param == "model"
    assert err.type == "invalid_request_error"
    assert "tier-test" in err.message
    assert scripted.requests == []


async def test_openai_sync_bad_request_is_bad_request_error(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))

    def call():
        with openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
            client.chat.completions.create(model="tier-test", messages=[])

    with pytest.raises(openai.BadRequestError) as info:
        await asyncio.to_thread(call)
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert scripted.requests == []


async def test_openai_all_models_failed_raises_status_error(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(503)
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="tier-test", messages=MESSAGES)
    err = info.value
    assert isinstance(err, openai.InternalServerError)
    assert err.status_code == 502
    assert err.code == "all_models_failed"
    assert err.response.headers["x-should-retry"] == "false"
    for m in ("up:m1", "up:m2", "up:m3"):
        assert m in err.message
    assert scripted.models_sent() == ["m1", "m2", "m3"]


async def test_openai_default_retries_are_not_multiplied_when_the_proxy_says_so(upstream, start_proxy):
    """x-should-retry: false on all-failed: a client with default retries still sends one request."""
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(500)
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="tier-test", messages=MESSAGES)
    assert len(scripted.requests) == 3


async def test_openai_stream_all_failed_raises_before_any_chunk(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(503)
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
    assert info.value.status_code == 502


async def error_after_first_chunk_upstream(aiohttp_server, got_first: asyncio.Event, models: list) -> str:
    """An upstream that streams two events, waits until the client holds a chunk (so the proxy is past its
    commit point), then sends an error event. Returns its base URL."""

    async def chat(request):
        body = await request.json()
        models.append(body["model"])
        events = stream_events(body["model"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(events[:2]))
        await got_first.wait()
        await resp.write(sse({"error": {"message": "overloaded mid-stream", "type": "server_error"}}))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/openai/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/openai/v1"


async def test_openai_stream_error_after_commit_raises_api_error(aiohttp_server, start_proxy):
    """Data reached the client, then the upstream sent an error event: the SDK raises, no fall-over."""
    got_first, models = asyncio.Event(), []
    url = await error_after_first_chunk_upstream(aiohttp_server, got_first, models)
    base = await start_proxy(config_for(url))
    got = []
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        async with stream:
            with pytest.raises(openai.APIError) as info:
                async for chunk in stream:
                    got.append(chunk)
                    got_first.set()
    assert "overloaded mid-stream" in str(info.value)
    assert "".join(c.choices[0].delta.content or "" for c in got) == "Hello"
    assert models == ["m1"]


async def test_groq_stream_error_after_commit_raises_api_error(aiohttp_server, start_proxy):
    got_first, models = asyncio.Event(), []
    url = await error_after_first_chunk_upstream(aiohttp_server, got_first, models)
    base = await start_proxy(config_for(url))
    async with groq.AsyncGroq(base_url=base, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        with pytest.raises(groq.APIError) as info:
            async for _ in stream:
                got_first.set()
        await stream.close()
    assert "overloaded mid-stream" in str(info.value)
    assert models == ["m1"]


async def test_openai_all_rate_limited_is_rate_limit_error_with_retry_after(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(429, "rate_limit_exceeded", retry_after="7")
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="tier-test", messages=MESSAGES)
    err = info.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.response.headers["retry-after"] == "7"
    assert len(scripted.requests) == 3


async def test_groq_all_timed_out_is_504(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang")
    config = config_for(url, {"tier-slow": ["m1"]}, provider={"timeout_s": 0.2, "first_byte_timeout_s": 0.2})
    base = await start_proxy(config)
    async with groq.AsyncGroq(base_url=base, api_key="x", max_retries=0) as client:
        with pytest.raises(groq.InternalServerError) as info:
            await client.chat.completions.create(model="tier-slow", messages=MESSAGES)
    assert info.value.status_code == 504
    assert "not complete in 0.2s" in info.value.body["error"]["message"]  # a plain answer has only timeout_s


async def test_openai_embeddings_through_the_simulator_base64_default(start_proxy):
    config = config_for("http://127.0.0.1:9/openai/v1", {"tier-embed": ["nomic-embed-text"]})
    base = await start_proxy(config, simulate=True)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        result = await client.embeddings.create(model="tier-embed", input=["one", "two"])
        floats = await client.embeddings.create(model="tier-embed", input="one", encoding_format="float")
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert result.data[0].embedding == pytest.approx(floats.data[0].embedding)
    assert result.model == "nomic-embed-text"
    assert result.usage.prompt_tokens == 2


# --- groq SDK ---------------------------------------------------------------------------------------------


async def test_groq_sync_uses_the_openai_prefix(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config_for(url))

    def call():
        with groq.Groq(base_url=base, api_key="x") as client:
            raw = client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES)
            return str(raw.http_request.url), raw.headers, raw.parse()

    request_url, headers, completion = await asyncio.to_thread(call)
    assert request_url == f"{base}/openai/v1/chat/completions"
    assert headers["x-groq-proxy-model"] == "m2"
    assert headers["x-groq-proxy-attempts"] == "2"
    assert completion.choices[0].message.content == SCRIPTED_TEXT
    assert scripted.models_sent() == ["m1", "m2"]


async def test_groq_sync_stream(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))

    def call():
        with groq.Groq(base_url=base, api_key="x") as client:
            stream = client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
            with stream:
                return list(stream)

    chunks = await asyncio.to_thread(call)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SCRIPTED_TEXT
    # Groq's own usage field in the finish chunk passes through untouched.
    assert chunks[-1].x_groq.usage.total_tokens == 10


async def test_groq_async_completion_and_stream(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    async with groq.AsyncGroq(base_url=base, api_key="x") as client:
        completion = await client.chat.completions.create(model="tier-test", messages=MESSAGES)
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream]
        await stream.close()
    assert completion.choices[0].message.content == SCRIPTED_TEXT
    assert "".join(parts) == SCRIPTED_TEXT
    assert len(scripted.requests) == 2


async def test_groq_async_stream_through_the_simulator(start_proxy):
    base = await start_proxy(sim_config(), simulate=True)
    async with groq.AsyncGroq(base_url=base, api_key="x") as client:
        whole = await client.chat.completions.create(model="tier-sim", messages=MESSAGES)
        stream = await client.chat.completions.create(model="tier-sim", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        await stream.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


async def test_groq_unknown_model_is_not_found(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    async with groq.AsyncGroq(base_url=base, api_key="x", max_retries=0) as client:
        with pytest.raises(groq.NotFoundError) as info:
            await client.chat.completions.create(model="llama3-8b-8192", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.body["error"]["code"] == "model_not_found"
    assert scripted.requests == []


async def test_groq_sync_all_failed_and_bad_request(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(401, "invalid_api_key")
    base = await start_proxy(config_for(url))

    def call(**kwargs):
        with groq.Groq(base_url=base, api_key="x", max_retries=0) as client:
            client.chat.completions.create(**kwargs)

    with pytest.raises(groq.APIStatusError) as info:
        await asyncio.to_thread(call, model="tier-test", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["error"]["code"] == "all_models_failed"
    assert "sk-test-secret-upstream-key" not in str(info.value.body)

    with pytest.raises(groq.BadRequestError) as bad:
        await asyncio.to_thread(call, model="tier-test", messages=MESSAGES, temperature="hot")
    assert bad.value.body["error"]["param"] == "temperature"
    assert len(scripted.requests) == 3
