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

from proxy.pipeline.context import RequestContext
from proxy.telemetry.logs import emit, emit_line, log

CACHE_HEADER = "x-groq-proxy-cache"  # the response cache's verdict on every answer it saw (HIT, MISS, ...)
_CACHE_RESULTS = frozenset({"HIT", "MISS", "BYPASS", "COALESCED"})
_LEVELS = {logging.INFO: "info", logging.WARNING: "warning"}
_MAX_TEXT = 64
_MAX_MODEL = 256  # an explicit 'provider:model' is the client's text, of any length


def cache_result(headers) -> str | None:
    """The cache's verdict from an answer's headers; None when no cache policy looked at the request."""
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
