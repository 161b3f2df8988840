"""The one log line each request ends with (`"event": "request"`), beside the line of each upstream attempt.

The attempt lines say what happened on the way; this line is what a log query counts and bills by: who asked
(key id, user, module, request type), for what (virtual model, the real model that answered), how it went
(status, attempts sent, cache result, tokens, latency and its category). It holds no prompt, no completion
and no secret: those appear only with `telemetry.record_content = true`, as `input_messages` and
`output_messages` in the GenAI message format (the same as on spans). Every line goes through the log's
redaction of provider keys like any other.

Fields a client sets are cut short (`user` to 64 characters, as `x-module` and `x-request-type` are, and the
model name asked for to 256), so a line stays one short line whatever the request carries.
"""

from __future__ import annotations

import logging
import time

import orjson

from proxy.pipeline.context import RequestContext
from proxy.pipeline.whole_answer import CACHE_HEADER  # the cache's verdict on every answer it saw (HIT, MISS, ...)
from proxy.telemetry.logs import direct_writer, emit, emit_line, log, redact

_CACHE_RESULTS = frozenset({"HIT", "MISS", "BYPASS", "COALESCED"})
_LEVELS = {logging.INFO: "info", logging.WARNING: "warning"}
_MAX_TEXT = 64
_MAX_MODEL = 256  # an explicit 'provider:model' is the client's text, of any length


def cache_result(headers) -> str | None:
    """The cache's verdict from an answer's headers; None when no cache policy looked at the request. (An answer
    written whole keeps a plain dict: `whole_answer` adds the lower-case name when a policy spelled it otherwise.)"""
    value = headers.get(CACHE_HEADER)
    return value if value in _CACHE_RESULTS else None


def log_request(ctx: RequestContext | None, *, request_id: str, operation: str, status: int, ms: float,
                category: str | None, cache: str | None, record_content: bool, input_messages=None) -> None:
    """`request_id` and `operation` are the handler's, used when there is no context yet; with one, its own."""
    level = logging.WARNING if status >= 500 else logging.INFO
    if not log.isEnabledFor(level):
        return
    if ctx is None:  # refused before it had a model (bad body, unknown model, a missing proxy key)
        emit(level, "request", request_id=request_id, operation=operation, status=status, ms=round(ms, 2),
             cache=cache)
        return
    identity = ctx.identity
    if identity is not None:  # without [auth], the identity's user is the body's (policies.identity)
        key_id, user = identity.key, identity.user
    else:  # no policies and no [auth]: the request's own `user` field
        key_id, user = None, ctx.body.get("user")
    user = user[:_MAX_TEXT] if isinstance(user, str) and user else None
    answered = ctx.answered
    usage = answered.usage if answered is not None else None
    if not isinstance(usage, dict):
        usage = _NO_USAGE
    route = ctx.route
    writer = direct_writer(level)
    if writer is not None and not record_content:
        writer.add_line(redact(_text(
            level, ctx.request_id, ctx.operation, status, ms, cache, key_id, user, ctx.module, ctx.request_type,
            route.requested[:_MAX_MODEL], route.virtual, answered.target.key if answered is not None else None,
            ctx.stream, ctx.sent_attempts, usage.get("prompt_tokens"), usage.get("completion_tokens"), category,
            identity.team if identity is not None else None,
            (ctx.attempts[-1].reason,) if answered is None and ctx.attempts else None,
            (answered.first_byte - ctx.started) * 1000.0 if answered is not None and ctx.stream and answered.first_byte
            else None)), level)
        return
    fields = {
        "ts": round(time.time(), 3), "level": _LEVELS[level], "event": "request", "request_id": ctx.request_id, "operation": ctx.operation, "status": status, "ms": round(ms, 2), "cache": cache,
        "key_id": key_id, "user": user, "module": ctx.module, "request_type": ctx.request_type,
        "requested": route.requested[:_MAX_MODEL], "virtual_model": route.virtual,
        "model": answered.target.key if answered is not None else None, "stream": ctx.stream,
        "attempts": ctx.sent_attempts, "input_tokens": usage.get("prompt_tokens"),
        "output_tokens": usage.get("completion_tokens"), "latency_category": category,
    }
    if identity is not None and identity.team:
        fields["team"] = identity.team
    if answered is None:
        if ctx.attempts:
            fields["reason"] = ctx.attempts[-1].reason
    elif ctx.stream and answered.first_byte:
        fields["ttft_ms"] = round((answered.first_byte - ctx.started) * 1000.0, 2)
    if record_content:  # the operator asked for content (telemetry.record_content): prompts and completions
        fields["input_messages"] = input_messages(ctx.body) if input_messages is not None else None
        fields["output_messages"] = answered.content if answered is not None else None
    emit_line(level, fields)


_NO_USAGE: dict = {}


# --- the same line as text, without building its dict (written by the log's own batching writer) -------------
# The fields that stay alike from one request to the next (the result, who, which model, how many attempts) are
# serialised once and kept, keyed by their values; a request formats only its time, id, latency and tokens.
# Keyed by client text too (user, module, request type, model name: each cut short), so the table is bounded.
_SEGMENTS: dict[tuple, tuple[str, str, str, str]] = {}
_MAX_SEGMENTS = 1024


def _text(level: int, request_id: str, operation: str, status: int, ms: float, cache, key_id, user, module,
          request_type, requested, virtual, model, stream, attempts, input_tokens, output_tokens, category, team,
          reason, ttft_ms) -> str:
    """What `emit_line` writes for these fields (orjson's JSON, in the same order), made from kept segments."""
    key = (level, operation, status, cache, key_id, user, module, request_type, requested, virtual, model, stream,
           attempts, category, team, reason)
    segments = _SEGMENTS.get(key)
    if segments is None:
        if len(_SEGMENTS) >= _MAX_SEGMENTS:
            _SEGMENTS.clear()
        segments = _SEGMENTS[key] = _segments(*key)
    level_id, operation_status, middle, tail = segments
    ttft = "" if ttft_ms is None else ',"ttft_ms":' + _decimal(ttft_ms, "%.2f", 2)
    return (f'{{"ts":{_decimal(time.time(), "%.3f", 3)}{level_id}{request_id}{operation_status}'
            f'{_decimal(ms, "%.2f", 2)}{middle}{_value(input_tokens)},"output_tokens":{_value(output_tokens)}'
            f'{tail}{ttft}}}')


def _segments(level, operation, status, cache, key_id, user, module, request_type, requested, virtual, model, stream,
              attempts, category, team, reason) -> tuple[str, str, str, str]:
    def members(obj: dict) -> str:  # an object's members as orjson writes them, without the braces
        return orjson.dumps(obj, default=str).decode()[1:-1]

    tail = {"latency_category": category}
    if team:
        tail["team"] = team
    if reason is not None:  # (the last attempt's reason,): a request that no attempt answered
        tail["reason"] = reason[0]
    return (
        "," + members({"level": _LEVELS[level], "event": "request"}) + ',"request_id":"',
        '",' + members({"operation": operation, "status": status}) + ',"ms":',
        "," + members({"cache": cache, "key_id": key_id, "user": user, "module": module, "request_type": request_type,
                       "requested": requested, "virtual_model": virtual, "model": model, "stream": stream,
                       "attempts": attempts}) + ',"input_tokens":',
        "," + members(tail),
    )


def _decimal(value: float, form: str, digits: int) -> str:
    """orjson's text of round(value, digits): the same shortest decimal, without the cost of round()."""
    if not -1e12 < value < 1e12:  # else it could have more digits than a float holds exactly, or an exponent
        return orjson.dumps(round(value, digits)).decode()
    text = (form % value).rstrip("0")
    return text + "0" if text.endswith(".") else text


def _value(value) -> str:
    if value is None:
        return "null"
    return str(value) if type(value) is int else orjson.dumps(value, default=str).decode()
