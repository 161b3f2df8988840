"""Spans of the Responses API and audio, exported to a real OTLP receiver: tokens from `response.completed`
on a Responses attempt, the audio's size in place of tokens on an audio request."""

from __future__ import annotations

import io

import aiohttp
import orjson
import pytest

from proxy.sim.testing import status
from proxy.sim.testing_api import AUDIO
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)
from tests.test_tracing import traced_config


async def test_a_streamed_response_span_carries_its_usage_after_a_fallover(api, otlp, start_proxy):  # noqa: F811
    scripted, url = api
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(traced_config(url, otlp.url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses", data=orjson.dumps(
                {"model": "tier-test", "input": "hi", "stream": True, "max_output_tokens": 30})) as resp:
            assert resp.status == 200
            await resp.read()
            request_id = resp.headers["x-request-id"]
    server, (failed, answered) = await otlp.wait_for_request(request_id, attempts=2)
    assert server.attributes["gen_ai.operation.name"] == "responses"
    assert server.attributes["groq_proxy.stream"] is True
    assert failed.attributes["groq_proxy.attempt.outcome"] == "fell_over"
    a = answered.attributes
    assert answered.name == "responses m2"
    assert a["groq_proxy.attempt.outcome"] == "answered" and a["gen_ai.response.id"] == "resp_test"
    assert a["gen_ai.usage.input_tokens"] == 7 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ["completed"]
    assert a["gen_ai.request.max_tokens"] == 30  # the Responses API's max_output_tokens


async def test_audio_spans_carry_bytes_instead_of_tokens(api, otlp, start_proxy):  # noqa: F811
    scripted, url = api
    base = await start_proxy(traced_config(url, otlp.url))
    upload = b"\x01\x02" * 3000
    form = aiohttp.FormData()
    form.add_field("model", "tier-test")
    form.add_field("file", io.BytesIO(upload), filename="a.wav", content_type="audio/wav")
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/transcriptions", data=form) as resp:
            assert resp.status == 200
            transcript = await resp.read()
            transcription_id = resp.headers["x-request-id"]
        async with session.post(base + "/v1/audio/speech",
                                json={"model": "tier-test", "voice": "v", "input": "hello"}) as resp:
            assert await resp.read() == AUDIO
            speech_id = resp.headers["x-request-id"]
    server, (attempt,) = await otlp.wait_for_request(transcription_id, attempts=1)
    assert server.attributes["gen_ai.operation.name"] == "transcription"
    for span in (server, attempt):
        assert span.attributes["groq_proxy.audio.request_bytes"] == len(upload)
        assert span.attributes["groq_proxy.audio.response_bytes"] == len(transcript)
        assert "gen_ai.usage.input_tokens" not in span.attributes
    server, (attempt,) = await otlp.wait_for_request(speech_id, attempts=1)
    assert attempt.name == "speech m1"
    assert attempt.attributes["groq_proxy.audio.response_bytes"] == len(AUDIO)
    assert server.attributes["groq_proxy.audio.request_bytes"] == len("hello")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_record_content_records_the_responses_input_and_output(api, otlp, start_proxy, stream):  # noqa: F811
    scripted, url = api
    base = await start_proxy(traced_config(url, otlp.url, telemetry={"record_content": True}))
    body = {"model": "tier-test", "instructions": "Be brief.", "stream": stream,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses", data=orjson.dumps(body)) as resp:
            assert resp.status == 200
            await resp.read()
            request_id = resp.headers["x-request-id"]
    server, (attempt,) = await otlp.wait_for_request(request_id, attempts=1)
    assert orjson.loads(server.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Say hello"}]}]
    [output] = orjson.loads(attempt.attributes["gen_ai.output.messages"])
    assert output["role"] == "assistant" and output["parts"] == [{"type": "text", "content": "Hello there!"}]
