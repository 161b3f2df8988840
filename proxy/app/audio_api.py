"""Audio through the gateway: Whisper transcription and translation (multipart uploads) and text to speech.

`/v1/audio/transcriptions` and `/v1/audio/translations` hold the upload (at most `server.max_audio_bytes`,
Groq's own free-tier limit by default; more is a 413 before anything is sent) so that a fall-over sends it
again to the next model of the chain, with that model in its `model` field. `/v1/audio/speech` takes JSON and
answers audio bytes, passed to the client as they arrive (proxy/pipeline/byte_stream.py).

Chains, cool-downs, key pools, request limits and concurrency apply as for chat. Token budgets and token
limits do not (`tokens = False`): audio is not counted in tokens. Spans and metrics carry the audio's size
in bytes and the time taken instead.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.app.config import Config
from proxy.app.errors import ProxyError, bad_request
from proxy.app.validation import _kind, _model, read_body, read_json
from proxy.pipeline.operation import Operation
from proxy.upstream import multipart
from proxy.upstream.providers import AttemptFailed

FORM_OVERHEAD = 64 * 1024  # the text fields and part headers an upload carries beside its file
_FORMATS = frozenset({"json", "text", "srt", "verbose_json", "vtt"})


class AudioOperation(Operation):
    """The byte counts of one audio request, for its span and metrics."""

    tokens = False
    audio = True

    def __init__(self) -> None:
        self.bytes_in = 0  # the upload (transcription, translation) or the text (speech)
        self.bytes_out = 0  # the audio sent back (speech) or the transcript


class FormOperation(AudioOperation):
    """A transcription or translation: the held upload, encoded anew for each attempt."""

    def __init__(self, endpoint: str, form: multipart.Form) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.form = form
        self.content_type = form.content_type
        self.bytes_in = len(form.file.data)

    def encode(self, body: dict) -> bytes:
        return self.form.encode(body)

    def answer(self, attempt, body: bytes, content_type: str, record: bool = False) -> str:
        """A JSON transcript must be an object with its `text`; text, srt and vtt answers are passed as they are."""
        self.bytes_out = len(body)
        if content_type.startswith("application/json"):
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise AttemptFailed("malformed", "200 with a body that is not JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise AttemptFailed("malformed", "200 that is not a transcript (no text)")
            x_groq = obj.get("x_groq")
            attempt.response_id = x_groq.get("id") if isinstance(x_groq, dict) else None
            return content_type
        return content_type or "text/plain"


async def read_upload(request: web.Request, audio_limit: int) -> bytes:
    """The whole multipart body, at most `audio_limit` bytes and the form's overhead (413 past it, before the
    rest is read); a stall or a client that leaves is answered as for any body (proxy/app/validation.py)."""
    length = request.content_length
    if length is not None and length > audio_limit + FORM_OVERHEAD:
        raise _too_large(audio_limit)
    return await read_body(request, audio_limit + FORM_OVERHEAD, _too_large(audio_limit))


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The audio upload is larger than the limit of {limit} bytes (server.max_audio_bytes).",
                      param="file", code="request_too_large")


def _reader(endpoint: str):
    async def read(request: web.Request, config: Config) -> tuple[dict, Operation]:
        limit = config.server.max_audio_bytes
        raw = await read_upload(request, limit)
        fields, files = multipart.parse(raw, request.headers.get("Content-Type", ""))
        file = next((f for f in files if f.name == "file"), None)
        if file is None:
            if "url" in fields:
                raise bad_request("'url' is not supported by the proxy: send the audio as 'file'.", param="url")
            raise bad_request("'file' is a required property: send the audio as a multipart file part.",
                              param="file")
        if len(file.data) > limit:
            raise _too_large(limit)
        if not len(file.data):
            raise bad_request("'file' is empty.", param="file")
        return fields, FormOperation(endpoint, multipart.Form(raw, fields, file))

    return read


read_transcription = _reader("audio/transcriptions")
read_translation = _reader("audio/translations")


def validate_form(fields: dict) -> str:
    """The text fields of a transcription or translation; returns the model."""
    model = fields.get("model")
    if model is not None and not isinstance(model, str):  # sent twice: a list of values
        raise bad_request("'model' must be one non-empty string.", param="model")
    model = _model(fields)  # the same checks as a JSON body's, its length too
    response_format = fields.get("response_format")
    if response_format is not None and response_format not in _FORMATS:
        raise bad_request(f"'response_format' must be one of {', '.join(sorted(_FORMATS))}.",
                          param="response_format")
    temperature = fields.get("temperature")
    if temperature is not None:
        try:
            value = float(temperature)
        except (TypeError, ValueError):
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise bad_request("'temperature' must be a number between 0 and 1.", param="temperature")
    for name in ("language", "prompt"):
        if name in fields and not isinstance(fields[name], str):
            raise bad_request(f"'{name}' must be sent once.", param=name)
    return model


# --- text to speech ----------------------------------------------------------------------------------------------


async def read_speech(request: web.Request, config: Config) -> tuple[dict, Operation]:
    from proxy.pipeline.byte_stream import SpeechOperation

    body = await read_json(request, config.server.max_body_bytes)
    return body, SpeechOperation(request)


def validate_speech(body: dict) -> str:
    model = _model(body)
    text = body.get("input")
    if text is None:
        raise bad_request("'input' is a required property.", param="input")
    if not isinstance(text, str) or not text:
        raise bad_request(f"'input' must be a non-empty string, not {_kind(text)}.", param="input")
    voice = body.get("voice")
    if voice is None:
        raise bad_request("'voice' is a required property.", param="voice")
    if not isinstance(voice, str) or not voice:
        raise bad_request(f"'voice' must be a non-empty string, not {_kind(voice)}.", param="voice")
    for name in ("response_format", "sample_rate"):
        value = body.get(name)
        if value is not None and not isinstance(value, (str, int)) or isinstance(value, bool):
            raise bad_request(f"'{name}' has the wrong type: {_kind(value)}.", param=name)
    speed = body.get("speed")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, (int, float))):
        raise bad_request(f"'speed' must be a number, not {_kind(speed)}.", param="speed")
    return model
