"""Audio through the proxy with the real openai and groq clients: the held upload sent again on fall-over,
413 past server.max_audio_bytes, 400 for a form without its file, speech streamed as it arrives (and cut, not
completed, when the upstream breaks after its first bytes), request limits without token budgets, metrics."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import groq
import httpx
import openai
import pytest

from policies.identity import hash_key
from proxy.sim.testing import Behaviour, status
from proxy.sim.testing_api import AUDIO, TRANSCRIPT
from tests.conftest import attempt_fields, config_for

UPLOAD = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"  # binary, with CRLFs and dashes inside


async def test_transcription_falls_over_and_sends_the_upload_again(api, start_proxy):
    scripted, url = api
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="client-key", max_retries=0) as client:
        raw = await client.audio.transcriptions.with_raw_response.create(
            model="tier-test", file=("call.m4a", io.BytesIO(UPLOAD), "audio/m4a"), language="en",
            timestamp_granularities=["segment", "word"], response_format="verbose_json")
        result = raw.parse()
    assert result.text == TRANSCRIPT
    assert raw.headers["x-groq-proxy-model"] == "m2" and raw.headers["x-groq-proxy-attempts"] == "2"
    assert scripted.models_sent() == ["m1", "m2"]
    for record, model in zip(scripted.requests, ["m1", "m2"]):
        assert record["path"] == "/openai/v1/audio/transcriptions"
        assert record["file"] == UPLOAD and record["filename"] == "call.m4a"
        assert record["body"]["model"] == model and record["body"]["language"] == "en"
        grains = [v for k, v in record["all"] if k == "timestamp_granularities[]"]
        assert grains == ["segment", "word"]  # a repeated field keeps every value
        assert record["headers"]["Authorization"] == "Bearer sk-test-secret-upstream-key"


async def test_translation_in_text_format(api, start_proxy):
    scripted, url = api
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        with pytest.warns(DeprecationWarning):  # openai-python 3.x marks translations deprecated; it still works
            text = await client.audio.translations.create(model="tier-test", file=("a.wav", UPLOAD),
                                                          response_format="text")
    assert text == TRANSCRIPT + "\n"
    assert scripted.requests[0]["path"] == "/openai/v1/audio/translations"
    assert scripted.requests[0]["file"] == UPLOAD


async def test_groq_sdk_audio_methods(api, start_proxy):
    scripted, url = api
    scripted.behaviours["m1"] = Behaviour("close")  # the connection breaks: the next model answers
    base = await start_proxy(config_for(url))
    async with groq.AsyncGroq(base_url=base, api_key="x", max_retries=0) as client:
        transcript = await client.audio.transcriptions.create(model="tier-test", file=("a.wav", UPLOAD))
        translation = await client.audio.translations.create(model="tier-test", file=("a.wav", UPLOAD))
        async with client.audio.speech.with_streaming_response.create(
                model="tier-test", voice="autumn", input="hello", response_format="wav") as response:
            audio = await response.read()
    assert transcript.text == TRANSCRIPT and translation.text == TRANSCRIPT
    assert audio == AUDIO
    assert {r["path"] for r in scripted.requests} == {
        "/openai/v1/audio/transcriptions", "/openai/v1/audio/translations", "/openai/v1/audio/speech"}


async def test_speech_streams_bytes_before_the_upstream_finishes(api, start_proxy):
    """A dripping upstream: its first chunk goes out and the rest waits until the client has that chunk. A proxy
    that held the audio until the end would never release it (the safety timeout would fire)."""
    scripted, url = api
    scripted.behaviours["m1"] = status(500)
    scripted.speech_hold = asyncio.Event()
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        async with client.audio.speech.with_streaming_response.create(
                model="tier-test", voice="autumn", input="hello there") as response:
            assert response.headers["content-type"] == "audio/wav"
            assert response.headers["x-groq-proxy-model"] == "m2"
            chunks = response.iter_bytes()
            first = await asyncio.wait_for(chunks.__anext__(), timeout=30)
            assert not scripted.speech_hold.is_set()  # the upstream is still holding the rest back
            scripted.speech_hold.set()
            rest = b"".join([chunk async for chunk in chunks])
    assert first + rest == AUDIO
    assert scripted.models_sent() == ["m1", "m2"]


async def test_speech_cut_after_its_first_bytes_is_not_a_complete_file(api, start_proxy):
    scripted, url = api
    scripted.behaviours["m1"] = Behaviour("cut", cut_after=1)
    base = await start_proxy(config_for(url))
    async with httpx.AsyncClient() as client:
        async with client.stream("POST", base + "/v1/audio/speech",
                                 json={"model": "tier-test", "voice": "v", "input": "hi"}) as response:
            assert response.status_code == 200
            received = bytearray()
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_bytes():
                    received += chunk
    assert AUDIO.startswith(bytes(received)) and len(received) < len(AUDIO)
    assert scripted.models_sent() == ["m1"]  # past the commit point: no fall-over


async def test_over_size_upload_is_413_and_nothing_goes_upstream(api, start_proxy):
    scripted, url = api
    base = await start_proxy(config_for(url, server={"max_audio_bytes": 1000}))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.audio.transcriptions.create(model="tier-test", file=("a.wav", bytes(200_000)))
        ok = await client.audio.transcriptions.create(model="tier-test", file=("a.wav", bytes(1000)))
    assert info.value.status_code == 413
    error = info.value.body
    assert error["code"] == "request_too_large" and error["param"] == "file" and "1000" in error["message"]
    assert ok.text == TRANSCRIPT
    assert len(scripted.requests) == 1 and scripted.requests[0]["file"] == bytes(1000)


async def test_over_size_file_in_a_chunked_upload_is_413(api, start_proxy):
    """No Content-Length (chunked): the limit is checked as the body arrives, then on the file itself."""
    scripted, url = api
    base = await start_proxy(config_for(url, server={"max_audio_bytes": 1000}))
    form = aiohttp.FormData()
    form.add_field("model", "tier-test")
    form.add_field("file", b"x" * 1001, filename="a.wav", content_type="audio/wav")
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/transcriptions", data=form, chunked=True) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"
    assert scripted.requests == []


@pytest.mark.parametrize("fields, param, fragment", [
    ({"model": "tier-test"}, "file", "'file' is a required property"),
    ({}, "model", "model parameter"),
    ({"model": "tier-test", "response_format": "mp3"}, "response_format", "must be one of"),
    ({"model": "tier-test", "temperature": "hot"}, "temperature", "between 0 and 1"),
    ({"model": "m" * 100_000}, "model", "at most 256"),  # it would go into a response header and every log line
])
async def test_bad_form_gets_an_openai_shaped_400(api, start_proxy, fields, param, fragment):
    scripted, url = api
    base = await start_proxy(config_for(url))
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    if param != "file":
        form.add_field("file", UPLOAD, filename="a.wav")
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/transcriptions", data=form) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert error["param"] == param and fragment in error["message"]
    assert scripted.requests == []


@pytest.mark.parametrize("headers, data, fragment", [
    ({"Content-Type": "application/json"}, b'{"model": "tier-test"}', "multipart/form-data"),
    ({"Content-Type": "multipart/form-data"}, b"--x\r\n", "boundary"),
    ({"Content-Type": "multipart/form-data; boundary=xyz"}, b"--xyz\r\nContent-Disposition: form-data; "
     b'name="model"\r\n\r\ntier-test', "cut short"),
])
async def test_not_a_multipart_body_is_400(api, start_proxy, headers, data, fragment):
    scripted, url = api
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/translations", data=data, headers=headers) as resp:
            assert resp.status == 400
            assert fragment in (await resp.json())["error"]["message"]
    assert scripted.requests == []


@pytest.mark.parametrize("body, param", [
    ({"voice": "v", "input": "hi"}, "model"),
    ({"model": "tier-test", "voice": "v"}, "input"),
    ({"model": "tier-test", "voice": "v", "input": ""}, "input"),
    ({"model": "tier-test", "input": "hi"}, "voice"),
    ({"model": "tier-test", "input": "hi", "voice": "v", "speed": "fast"}, "speed"),
])
async def test_bad_speech_request_is_400(api, start_proxy, body, param):
    scripted, url = api
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/speech", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == param
    assert scripted.requests == []


KEY = "gp-audio-test-key"


async def test_request_limits_apply_and_token_budgets_do_not(api, start_proxy):
    """A token budget of 1 token would refuse any chat request; audio is not counted in tokens and passes. The
    request limit (2 a minute) counts audio requests like any other."""
    scripted, url = api
    base = await start_proxy(config_for(url, auth={"keys": [{"id": "app", "sha256": hash_key(KEY)}]}, policies=[
        {"use": "token_budget", "per": "key", "tokens": 1, "period": "day"},
        {"use": "rate_limit", "per": "key", "requests_per_minute": 2}]))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0) as client:
        transcript = await client.audio.transcriptions.create(model="tier-test", file=("a.wav", UPLOAD))
        speech = await client.audio.speech.create(model="tier-test", voice="v", input="a long text " * 50)
        with pytest.raises(openai.RateLimitError) as info:
            await client.audio.speech.create(model="tier-test", voice="v", input="hi")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            async with session.get(base + "/v1/usage") as resp:
                usage = await resp.json()
    assert transcript.text == TRANSCRIPT and speech.read() == AUDIO
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"
    assert usage["budgets"][0]["used"] == 0


async def test_audio_metrics_carry_bytes_and_time(api, start_proxy):
    scripted, url = api
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        await client.audio.transcriptions.create(model="tier-test", file=("a.wav", UPLOAD))
        speech = await client.audio.speech.create(model="tier-test", voice="v", input="hello")
        assert speech.read() == AUDIO
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    m = 'groq_proxy_audio_bytes_total{operation="%s",virtual_model="tier-test",model="m1",direction="%s"} %d'
    assert m % ("transcription", "in", len(UPLOAD)) in text
    assert m % ("speech", "out", len(AUDIO)) in text
    assert m % ("speech", "in", len("hello")) in text
    assert 'groq_proxy_audio_duration_seconds_count{operation="speech",virtual_model="tier-test",model="m1"} 1' in text


async def test_the_simulator_serves_audio_with_the_default_chains(start_proxy):
    """`make serve` without a key: the default config's audio tiers and alias answered by the simulator."""
    from proxy.app.config import load_config

    base = await start_proxy(load_config(None, env={}), simulate=True)
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        transcript = await client.audio.transcriptions.create(model="tier-transcribe", file=("a.wav", UPLOAD))
        old = await client.audio.transcriptions.create(model="distil-whisper-large-v3-en", file=("a.wav", UPLOAD))
    async with groq.AsyncGroq(base_url=base, api_key="x", max_retries=0) as client:
        translation = await client.audio.translations.create(model="tier-translate", file=("a.wav", UPLOAD))
        speech = await client.audio.speech.create(model="tier-speech", voice="autumn", input="hello there")
        direct = await client.audio.speech.create(model="canopylabs/orpheus-v1-english", voice="troy", input="hello")
        retired = await client.audio.speech.create(model="playai-tts", voice="autumn", input="hello")  # the alias
        arabic = await client.audio.speech.create(model="playai-tts-arabic", voice="fahad", input="marhaba")
        audio, short = await speech.read(), await direct.read()
        assert await retired.read() == short and (await arabic.read()).startswith(b"RIFF")
        with pytest.raises(groq.BadRequestError) as info:  # Groq translates with whisper-large-v3 only
            await client.audio.translations.create(model="whisper-large-v3-turbo", file=("a.wav", UPLOAD))
        with pytest.raises(groq.BadRequestError) as wrong_voice:  # a PlayAI voice is no Orpheus voice
            await client.audio.speech.create(model="tier-speech", voice="Fritz-PlayAI", input="hello")
    assert "does not support translations" in info.value.message
    assert wrong_voice.value.body["error"]["param"] == "voice" and "autumn" in wrong_voice.value.message
    assert transcript.text == old.text == translation.text and transcript.text
    assert audio.startswith(b"RIFF") and audio[8:12] == b"WAVE" and len(audio) > len(short)


@pytest.mark.parametrize("file, extra, fragment", [
    (b"", {}, "'file' is empty"),
    (None, {"url": "https://example.com/a.wav"}, "'url' is not supported"),
])
async def test_an_empty_file_or_a_url_is_400(api, start_proxy, file, extra, fragment):
    scripted, url = api
    base = await start_proxy(config_for(url))
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("model", "tier-test")
    for name, value in extra.items():
        form.add_field(name, value)
    if file is not None:
        form.add_field("file", file, filename="a.wav")
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/transcriptions", data=form) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert fragment in error["message"] and error["param"] in ("file", "url")
    assert scripted.requests == []


async def test_the_audio_limit_is_its_own_not_max_body_bytes(api, start_proxy):
    """server.max_body_bytes bounds JSON bodies; an upload larger than it but within max_audio_bytes passes."""
    scripted, url = api
    base = await start_proxy(config_for(url, server={"max_body_bytes": 1000, "max_audio_bytes": 100_000}))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        transcript = await client.audio.transcriptions.create(model="tier-test", file=("a.wav", bytes(50_000)))
    assert transcript.text == TRANSCRIPT and scripted.requests[0]["file"] == bytes(50_000)


@pytest.mark.parametrize("value", [0, -1, "25MB", 1.5, True])
def test_max_audio_bytes_is_validated_naming_the_key(value):
    from proxy.app.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"^server\.max_audio_bytes: "):
        parse_config({"server": {"max_audio_bytes": value}, "providers": {"groq": {"base_url": "http://h/v1"}},
                      "models": {"t": {"chain": ["groq:m"]}}}, env={})


def test_max_audio_bytes_defaults_to_groqs_limit_and_can_be_set():
    from proxy.app.config import load_config, parse_config

    assert load_config(None, env={}).server.max_audio_bytes == 25 * 1024 * 1024
    config = parse_config({"server": {"max_audio_bytes": 1000}, "providers": {"groq": {"base_url": "http://h/v1"}},
                           "models": {"t": {"chain": ["groq:m"]}}}, env={})
    assert config.server.max_audio_bytes == 1000


async def test_a_speech_stream_holds_its_concurrency_slot_until_the_audio_ends(api, start_proxy):
    scripted, url = api
    scripted.speech_hold = asyncio.Event()
    base = await start_proxy(config_for(url, policies=[{"use": "concurrency", "per": "global", "limit": 1}]))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        async with client.audio.speech.with_streaming_response.create(
                model="tier-test", voice="v", input="hello") as response:
            chunks = response.iter_bytes()
            first = await asyncio.wait_for(chunks.__anext__(), timeout=30)
            with pytest.raises(openai.RateLimitError) as info:  # the first is still streaming: no slot
                await client.audio.transcriptions.create(model="tier-test", file=("a.wav", UPLOAD))
            scripted.speech_hold.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert first + rest == AUDIO
        transcript = await client.audio.transcriptions.create(model="tier-test", file=("a.wav", UPLOAD))
    assert info.value.code == "concurrency_limit_exceeded"
    assert transcript.text == TRANSCRIPT


async def test_tier_params_go_out_as_openai_python_sends_the_same_values(api, start_proxy):
    """A tier's params reach the provider exactly as openai-python would send the same values itself: a boolean
    as `true`, a list as repeated `name[]`, an object as `name[key]`, a number as its literal (not Python's
    `True`, `['word', 'segment']`, `{'type': ...}`). What the client sent itself wins over a param."""
    scripted, url = api
    params = {"timestamp_granularities": ["word", "segment"], "diarize": True, "verbose": False,
              "chunking_strategy": {"type": "server_vad", "threshold": 0.5}, "temperature": 0.25}
    models = {"tier-params": {"chain": ["up:m1"], "params": params}, "tier-plain": {"chain": ["up:m1"]}}
    base = await start_proxy(config_for(url, models=models))
    upload = ("call.m4a", io.BytesIO(UPLOAD), "audio/m4a")
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        await client.audio.transcriptions.create(model="tier-params", file=upload, language="en")
        upload[1].seek(0)
        await client.audio.transcriptions.create(
            model="tier-plain", file=upload, language="en", timestamp_granularities=["word", "segment"],
            temperature=0.25, extra_body={"diarize": True, "verbose": False,
                                          "chunking_strategy": {"type": "server_vad", "threshold": 0.5}})
        upload[1].seek(0)
        await client.audio.transcriptions.create(model="tier-params", file=upload,
                                                 timestamp_granularities=["segment"], temperature=0.5)
    by_params, by_client, client_wins = ([(k, v) for k, v in r["all"] if k != "file"] for r in scripted.requests)
    assert sorted(by_params) == sorted(by_client)
    assert ("diarize", "true") in by_params and ("chunking_strategy[type]", "server_vad") in by_params
    assert [v for k, v in by_params if k == "timestamp_granularities[]"] == ["word", "segment"]
    assert [v for k, v in client_wins if k.startswith("timestamp_granularities")] == ["segment"]
    assert [v for k, v in client_wins if k == "temperature"] == ["0.5"]


async def test_speech_before_its_first_byte_falls_over_or_passes_the_refusal_back(api, start_proxy, proxy_log):
    """The opening speech shares with the SSE path: a 503, a connection that breaks and a first byte that does
    not come within first_byte_timeout_s fall over; a 400 of the request's own goes back unchanged."""
    scripted, url = api
    scripted.behaviours["m1"] = status(503)
    scripted.behaviours["m2"] = Behaviour("close")
    scripted.behaviours["m3"] = Behaviour("hang")
    scripted.behaviours["m4"] = status(400, "bad_voice", "no such voice")
    config = config_for(url, {"tier-test": ["m1", "m2", "m3"], "tier-bad": ["m4", "m1"]},
                        provider={"first_byte_timeout_s": 0.3})
    base = await start_proxy(config)
    speech = {"model": "tier-test", "voice": "v", "input": "hello"}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/audio/speech", json=speech) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
        async with session.post(base + "/v1/audio/speech", json={**speech, "model": "tier-bad"}) as resp:
            assert resp.status == 400 and resp.headers["x-groq-proxy-attempts"] == "1"
            refused = await resp.json()
    assert error["code"] == "all_models_failed" and "up:m3: no audio in 0.3s" in error["message"]
    assert refused["error"]["code"] == "bad_voice" and refused["error"]["message"] == "no such voice"
    attempts = [(a["target"], a["outcome"], a.get("reason"), a["status"]) for a in attempt_fields(proxy_log)]
    assert attempts == [("up:m1", "fell_over", "status_503", 503), ("up:m2", "fell_over", "upstream_closed", None),
                        ("up:m3", "fell_over", "first_byte_timeout", None), ("up:m4", "passed_back", None, 400)]
