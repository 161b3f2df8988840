"""The one log line each request ends with (`"event": "request"`), beside the line of each upstream attempt.

The attempt lines say what happened on the way; this line is what a log query counts and bills by: who asked
(key id, user, module, request type), for what (virtual model, the real model that answered), how it went
(status, attempts sent, cache result, tokens, latency and its category). It holds no prompt, no completion
and no secret: those appear only with `telemetry.record_content = true`, as `input_messages` and
`output_messages` in the GenAI message format (the same as on spans). Every line goes through the log's
redaction of provider keys like any other.

Fields a client sets are cut short (`user` to 64 characters, as `x-module` and `x-request-type` are), so a
line stays one short line whatever the request carries.
"""

from __future__ import annotations

import logging

from proxy.pipeline.context import RequestContext
from proxy.telemetry.logs import emit, log

CACHE_HEADER = "x-groq-proxy-cache"  # the response cache's verdict on every answer it saw (HIT, MISS, ...)
_CACHE_RESULTS = frozenset({"HIT", "MISS", "BYPASS", "COALESCED"})
_MAX_TEXT = 64


def cache_result(headers) -> str | None:
    """The cache's verdict from an answer's headers; None when no cache policy looked at the request."""
    value = headers.get(CACHE_HEADER)
    return value if value in _CACHE_RESULTS else None


def log_request(ctx: RequestContext | None, *, request_id: str, operation: str, status: int, ms: float,
                category: str | None, cache: str | None, record_content: bool, input_messages=None) -> None:
    level = logging.WARNING if status >= 500 else logging.INFO
    if not log.isEnabledFor(level):
        return
    fields = {"request_id": request_id, "operation": operation, "status": status, "ms": round(ms, 2),
              "cache": cache}
    if ctx is None:  # refused before it had a model (bad body, unknown model, a missing proxy key)
        emit(level, "request", **fields)
        return
    identity = ctx.identity
    if identity is not None:
        fields["key_id"], fields["user"] = identity.key, identity.user
        if identity.team:
            fields["team"] = identity.team
    else:
        user = ctx.body.get("user")
        fields["key_id"], fields["user"] = None, user[:_MAX_TEXT] if isinstance(user, str) and user else None
    fields["module"], fields["request_type"] = ctx.module, ctx.request_type
    route = ctx.route
    answered = ctx.answered
    fields["requested"], fields["virtual_model"] = route.requested, route.virtual
    fields["model"] = answered.target.key if answered is not None else None
    fields["stream"] = ctx.stream
    fields["attempts"] = ctx.sent_attempts
    if answered is None and ctx.attempts:
        fields["reason"] = ctx.attempts[-1].reason
    usage = answered.usage if answered is not None else None
    if isinstance(usage, dict):
        fields["input_tokens"], fields["output_tokens"] = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        fields["input_tokens"] = fields["output_tokens"] = None
    if ctx.stream and answered is not None and answered.first_byte:
        fields["ttft_ms"] = round((answered.first_byte - ctx.started) * 1000.0, 2)
    fields["latency_category"] = category
    if record_content:  # the operator asked for content (telemetry.record_content): prompts and completions
        fields["input_messages"] = input_messages(ctx.body) if input_messages is not None else None
        fields["output_messages"] = answered.content if answered is not None else None
    emit(level, "request", **fields)
