"""The simulator's audio endpoints: Whisper transcription and translation of a multipart upload (a transcript
that is a function of the file's bytes) and text to speech (a WAV of silence as long as the text, sent in
paced chunks as Groq streams it)."""

from __future__ import annotations

import asyncio
import struct
import zlib

import orjson
from aiohttp import web

WHISPER = ("whisper-large-v3-turbo", "whisper-large-v3")
TRANSLATES = frozenset({"whisper-large-v3"})  # Groq translates with whisper-large-v3 only
# Groq's Orpheus models and the voices each takes (PlayAI, with voices such as Fritz-PlayAI, is retired).
TTS = {
    "canopylabs/orpheus-v1-english": ("autumn", "diana", "hannah", "austin", "daniel", "troy"),
    "canopylabs/orpheus-arabic-saudi": ("abdullah", "fahad", "sultan", "lulwa", "noura", "aisha"),
}
SAMPLE_RATE = 24000
CHUNK = 4096
MAX_FILE_BYTES = 25 * 1024 * 1024


def wav_header(data_bytes: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono PCM WAV header for `data_bytes` of samples."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", data_bytes))


def speech_wav(text: str) -> bytes:
    """A tenth of a second of silence per word (at least one): deterministic, and long enough to stream."""
    samples = SAMPLE_RATE // 10 * max(1, len(text.split()))
    return wav_header(samples * 2) + bytes(samples * 2)


def transcript(data: bytes, words: int = 8) -> str:
    from proxy.sim.simulator import _RING_SIZE, _RING_WORDS, _window

    return " ".join(_window(_RING_WORDS, zlib.crc32(data) % _RING_SIZE, words)).capitalize() + "."


def add_routes(app: web.Application, prefix: str, simulator) -> None:
    from proxy.sim import simulator as sim

    async def transcribe(request: web.Request, translate: bool) -> web.Response:
        request_id = simulator._next_request_id()
        headers = simulator._headers(request_id, 0)
        try:
            if not request.content_type.startswith("multipart/form-data"):
                raise sim._ApiError(400, "request Content-Type isn't multipart/form-data")
            form = await request.post()
            model = simulator._check_model({"model": form.get("model")})
            if model not in WHISPER:
                raise sim._ApiError(400, f"model `{model}` does not support audio transcription", param="model")
            if translate and model not in TRANSLATES:
                raise sim._ApiError(400, f"model `{model}` does not support translations", param="model")
            upload = form.get("file")
            if not isinstance(upload, web.FileField):
                raise sim._ApiError(400, "file or url must be provided", param="file")
            data = upload.file.read()
            if len(data) > MAX_FILE_BYTES:
                raise sim._ApiError(413, "Request Entity Too Large", code="request_too_large")
            simulator._draw_fault(model, 0)
        except sim._ApiError as exc:
            return sim._error_response(exc, headers)
        text = transcript(data)
        if simulator.config.ttft_s:
            await asyncio.sleep(simulator.config.ttft_s)
        fmt = form.get("response_format") or "json"
        if fmt == "text":
            return web.Response(text=text + "\n", content_type="text/plain", headers=headers)
        if fmt in ("srt", "vtt"):
            cue = "00:00:00,000 --> 00:00:01,000" if fmt == "srt" else "00:00:00.000 --> 00:00:01.000"
            body = f"1\n{cue}\n{text}\n" if fmt == "srt" else f"WEBVTT\n\n{cue}\n{text}\n"
            return web.Response(text=body, content_type="text/plain", headers=headers)
        obj = {"text": text, "x_groq": {"id": request_id}}
        if fmt == "verbose_json":
            obj.update(task="translate" if translate else "transcribe", language="english", duration=1.0,
                       segments=[{"id": 0, "seek": 0, "start": 0.0, "end": 1.0, "text": text, "tokens": [],
                                  "temperature": 0.0, "avg_logprob": -0.1, "compression_ratio": 1.0,
                                  "no_speech_prob": 0.0}])
        return web.Response(body=orjson.dumps(obj), content_type="application/json", headers=headers)

    async def transcriptions(request: web.Request) -> web.Response:
        return await transcribe(request, translate=False)

    async def translations(request: web.Request) -> web.Response:
        return await transcribe(request, translate=True)

    async def speech(request: web.Request) -> web.StreamResponse:
        request_id = simulator._next_request_id()
        headers = simulator._headers(request_id, 0)
        try:
            body = await sim._read_object(request)
            model = simulator._check_model(body)
            if model not in TTS:
                raise sim._ApiError(400, f"model `{model}` does not support text to speech", param="model")
            text = body.get("input")
            if not isinstance(text, str) or not text:
                raise sim._ApiError(400, "'input' : property 'input' is missing", param="input")
            voice = body.get("voice")
            if not isinstance(voice, str):
                raise sim._ApiError(400, "'voice' : property 'voice' is missing", param="voice")
            if voice not in TTS[model]:
                raise sim._ApiError(400, f"voice `{voice[:64]}` is not available for `{model}`: one of "
                                    f"{', '.join(TTS[model])}", param="voice")
            fmt = body.get("response_format") or "wav"
            if fmt != "wav":
                raise sim._ApiError(400, f"response_format `{fmt}` is not supported: wav only",
                                    param="response_format")
            simulator._draw_fault(model, 0)
        except sim._ApiError as exc:
            return sim._error_response(exc, headers)
        audio = speech_wav(text)
        response = web.StreamResponse(headers={**headers, "Content-Type": "audio/wav"})
        response.enable_chunked_encoding()
        if simulator.config.ttft_s:
            await asyncio.sleep(simulator.config.ttft_s)
        try:
            await response.prepare(request)
            pace = simulator.config.tokens_per_s
            for at in range(0, len(audio), CHUNK):
                await response.write(audio[at : at + CHUNK])
                if pace:
                    await asyncio.sleep(1 / pace)
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    app.router.add_post(f"{prefix}/audio/transcriptions", transcriptions)
    app.router.add_post(f"{prefix}/audio/translations", translations)
    app.router.add_post(f"{prefix}/audio/speech", speech)
