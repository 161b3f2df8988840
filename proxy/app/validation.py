"""Reading and checking a request body before anything is sent upstream: bad input is the client's 4xx, never
our 500, and a client that stalls or leaves mid-upload is told apart from one that sent a bad body."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.app.errors import ProxyError, bad_request
from proxy.telemetry.logs import emit

_NUMBER_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "seed")


# The body object is level 1. orjson reads 1,024 levels but writes only this many: a deeper body parsed, then
# failed when it was sent upstream (a 500). No real request comes near it.
MAX_JSON_DEPTH = 254
READ_TIMEOUT = web.AppKey("read_timeout_s", float)  # server.request_read_timeout_s, set by build_app


async def read_json(request: web.Request, limit: int) -> dict:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    raw = await _read_body(request, limit)
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, not {_kind(body)}.")
    try:
        # The one way a parsed body fails to encode is depth, and trying costs less than any depth check
        # (measured: 0.2 us for a 200-byte body, 4.4 us for 23 kB; counting the raw body's brackets took
        # 0.4 and 19 us, walking the parsed body 0.8 and 31 us).
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise bad_request(f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep.",
                          code="json_too_deep") from None
    return body


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body. One that arrived with the head is read at once; one still arriving is read as `read_body`
    says."""
    content = request.content
    if content.is_eof():  # all of it is here: taken in one call, without request.read()'s loop of reads
        raw = content.read_nowait()
        if len(raw) > limit:  # a chunked body has no Content-Length to check first
            raise _too_large(limit)
        return raw
    return await read_body(request, limit, _too_large(limit))


async def read_body(request: web.Request, limit: int, too_large: ProxyError) -> bytes:
    """The body as it arrives: past `limit` bytes, `too_large`; a stall longer than
    server.request_read_timeout_s between two reads is a 408, and a client that leaves during the upload is a
    499, not an error of the proxy."""
    content = request.content
    timeout = request.app[READ_TIMEOUT]
    try:
        loop = asyncio.get_running_loop()
        chunks, size = [], 0
        async with asyncio.timeout(timeout) as deadline:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
                deadline.reschedule(loop.time() + timeout)
        return b"".join(chunks)
    except TimeoutError:
        emit(logging.INFO, "request_timeout", status=408, path=request.path, timeout_s=timeout)
        _stop_reading(request)
        raise ProxyError(408, f"The request body stalled: nothing arrived for {timeout:g} s.",
                         code="request_timeout", headers={"Connection": "close"}) from None
    except asyncio.CancelledError:  # handler cancellation: the client hung up while the body was arriving
        if _client_gone(request):
            emit(logging.INFO, "client_closed", status=499, during="upload", path=request.path)
        raise
    except (ConnectionError, RequestPayloadError):
        if _client_gone(request):
            emit(logging.INFO, "client_closed", status=499, during="upload", path=request.path)
            raise ProxyError(499, "The client closed the connection during the upload.",
                             code="client_closed_request") from None
        _stop_reading(request)
        raise bad_request("The request body could not be read (a broken chunked or compressed encoding).") from None


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _stop_reading(request: web.Request) -> None:
    """No keep-alive after this answer and no more of this body read: aiohttp would otherwise go on reading
    (and discarding) it for up to 10 s after the answer, and log a broken body's error as unhandled."""
    request.protocol.close()
    request.content.feed_eof()


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The request body is larger than the limit of {limit} bytes.", code="request_too_large")


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


MAX_MODEL_CHARS = 256


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"'model' must be a non-empty string, not {_kind(model)}.", param="model")
    if len(model) > MAX_MODEL_CHARS:  # it is echoed in a header and logged: no model's name is this long
        raise bad_request(f"'model' is {len(model)} characters long; at most {MAX_MODEL_CHARS} are accepted.",
                          param="model")
    return model


def validate_chat(body: dict) -> str:
    """Returns the requested model name; raises a 400 naming the first wrong field."""
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is a required property.", param="messages")
    if not isinstance(messages, list):
        raise bad_request(f"'messages' must be an array, not {_kind(messages)}.", param="messages")
    if not messages:
        raise bad_request("'messages' must contain at least one message.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"'messages[{i}]' must be an object, not {_kind(message)}.", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"'messages[{i}].role' must be a non-empty string.", param=f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(
                f"'messages[{i}].content' must be a string or an array of parts, not {_kind(content)}.",
                param=f"messages[{i}].content",
            )
    for name, value in body.items():  # the body's few fields, not every optional one: a lookup each
        kind = _KINDS.get(name)
        if kind is None or value is None:
            continue
        t = type(value)  # orjson makes exact types; anything else is judged by _optional_fields below
        if (t is bool if kind == _BOOL else (t is int or t is float) if kind == _NUMBER else
                t is int and (value >= 1 or kind == _INT) if kind <= _POSITIVE else
                t is dict if kind == _OBJECT else t is list if kind == _ARRAY else t is str or t is list):
            continue
        _optional_fields(body)  # names the first wrong field, in the order below
    return model


def _optional_fields(body: dict) -> None:
    """Raises the 400 of the first wrong optional field of a chat request (validate_chat found one)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"'stream' must be a boolean, not {_kind(stream)}.", param="stream")
    for name in _NUMBER_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad_request(f"'{name}' must be a number, not {_kind(value)}.", param=name)
    for name in _INT_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad_request(f"'{name}' must be an integer, not {_kind(value)}.", param=name)
        if name.startswith("max") and value is not None and value < 1:
            raise bad_request(f"'{name}' must be at least 1.", param=name)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request(f"'tools' must be an array, not {_kind(tools)}.", param="tools")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise bad_request(f"'stop' must be a string or an array of strings, not {_kind(stop)}.", param="stop")


_BOOL, _NUMBER, _INT, _POSITIVE, _OBJECT, _ARRAY, _TEXT = range(7)
_KINDS = {"stream": _BOOL, **dict.fromkeys(_NUMBER_FIELDS, _NUMBER), "n": _INT, "seed": _INT,
          "max_tokens": _POSITIVE, "max_completion_tokens": _POSITIVE, "stream_options": _OBJECT, "tools": _ARRAY,
          "stop": _TEXT}


def validate_embeddings(body: dict) -> str:
    model = _model(body)
    value = body.get("input")
    if value is None:
        raise bad_request("'input' is a required property.", param="input")
    ok = isinstance(value, str) and value or (
        isinstance(value, list)
        and value
        and (
            all(isinstance(v, str) for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(
                isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                for v in value
            )
        )
    )
    if not ok:
        raise bad_request(
            "'input' must be a non-empty string, an array of strings, or an array of token arrays.", param="input"
        )
    return model
