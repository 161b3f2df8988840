"""What the pipeline tells the outside world: spans, metrics, latency categories, the request's log line and
the status page's counts of the last minutes.

The pipeline calls four hooks (request started / ended, attempt started / ended) and `decision` for policy
decisions. With tracing off and metrics off, a request costs only the counts (an increment each) and its log
line; the other hooks return at once.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson

from proxy.app.config import Config
from proxy.pipeline.context import Attempt, RequestContext
from proxy.routing.latency import RollingP95, default_thresholds
from proxy.routing.router import OTHER
from proxy.telemetry.logs import redact
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.recent import RecentCounts
from proxy.telemetry.request_log import log_request
from proxy.telemetry.semconv import (
    ANSWERED_BY, ATTEMPTS, ATTEMPT_HEDGE, ATTEMPT_INDEX, ATTEMPT_KEY, ATTEMPT_OUTCOME, ATTEMPT_REASON, ERROR_TYPE, GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME, GEN_AI_OUTPUT_MESSAGES, GEN_AI_PROVIDER_NAME, GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL, GEN_AI_REQUEST_TEMPERATURE, GEN_AI_RESPONSE_FINISH_REASONS, GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL, GEN_AI_USAGE_INPUT_TOKENS, GEN_AI_USAGE_OUTPUT_TOKENS, HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE, HTTP_ROUTE, LATENCY_CATEGORY, POLICY_DECISION, REQUEST_ID, SERVER_ADDRESS,
    SERVER_PORT, STREAM, TIME_TO_FIRST_CHUNK_MS, URL_PATH, VIRTUAL_MODEL,
    AUDIO_REQUEST_BYTES, AUDIO_RESPONSE_BYTES,
)
from proxy.telemetry.tracing import KIND_CLIENT, STATUS_ERROR, Span, Tracer

_FAILED = frozenset({"fell_over", "failed_after_commit", "cancelled", "hedge_lost"})
REQUEST_COUNTS = ("requests", "client_errors", "errors")  # answered (< 400), 4xx, 5xx
ATTEMPT_COUNTS = ("answered", "failed", "skipped")
CACHE_COUNTS = ("hit", "miss", "bypass", "coalesced")
# What counts for or against a model (a lost hedge, a request error passed back or a client gone do not).
_RECENT_ATTEMPT = {"answered": "answered", "fell_over": "failed", "failed_after_commit": "failed",
                   "skipped": "skipped"}
_REQUEST_CLOSING = (
    HTTP_RESPONSE_STATUS_CODE, GEN_AI_REQUEST_MODEL, VIRTUAL_MODEL, ATTEMPTS,
    STREAM, GEN_AI_RESPONSE_MODEL, ANSWERED_BY, LATENCY_CATEGORY,
)
_ATTEMPT_CLOSING = (
    ATTEMPT_OUTCOME, HTTP_RESPONSE_STATUS_CODE, GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS, ATTEMPT_REASON,
)


class Observer:
    def __init__(self, config: Config, tracer: Tracer | None, metrics: ProxyMetrics | None,
                 previous: "Observer | None" = None) -> None:
        """`previous`: the observer of the config a reload replaces, whose running figures carry over."""
        self.tracer = tracer
        self.metrics = metrics
        self.record_content = config.telemetry.record_content
        self.rolling = previous.rolling if previous is not None else RollingP95()
        self._static: dict[tuple, tuple] = {}  # the shared static attributes of spans alike
        self._thresholds = {name: vm.latency for name, vm in config.models.items()}
        self._default = default_thresholds("standard")
        # Metric labels name only real models the config names; any other (a client's 'provider:model') is
        # `other`, so the number of series stays what the config makes it.
        models = {t.model for t in config.real_targets()}
        models.update(to.split(":", 1)[1] for to in config.aliases.values() if ":" in to)
        self._models = frozenset(models)
        # The status page's last minutes: rows only for names the config gives (others count as `other`); a
        # reload keeps the rows of the names still configured.
        self.recent_requests = RecentCounts((*config.models, "invalid"), REQUEST_COUNTS,
                                            previous=previous and previous.recent_requests)
        self.recent_attempts = RecentCounts((t.key for t in config.real_targets()), ATTEMPT_COUNTS,
                                            previous=previous and previous.recent_attempts)
        self.recent_cache = RecentCounts(config.models, CACHE_COUNTS, previous=previous and previous.recent_cache)

    def model_label(self, model: str) -> str:
        return model if model in self._models else OTHER

    # --- the request ------------------------------------------------------------------------------------

    def request_started(self, request, operation: str) -> Span | None:
        if self.tracer is None:
            return None
        route = request.path
        key = (request.method, route, operation)
        static = self._static.get(key)
        if static is None:  # routes are the proxy's own few paths: this stays small
            static = self._static[key] = ((HTTP_REQUEST_METHOD, request.method), (URL_PATH, route),
                                          (HTTP_ROUTE, route), (GEN_AI_OPERATION_NAME, operation))
        return self.tracer.start_request(request.headers.get("traceparent"), f"{request.method} {route}", {}, static)

    def request_ended(self, span: Span | None, ctx: RequestContext | None, status: int, started: float,
                      request_id: str = "", operation: str = "", cache: str | None = None) -> None:
        """`cache`: the response cache's verdict (its x-groq-proxy-cache header), None when none looked."""
        total = time.perf_counter() - started
        virtual, model, category = "invalid", "none", None
        if ctx is not None:
            virtual = ctx.route.label
            answered = ctx.answered
            if answered is not None:
                model = self.model_label(answered.target.model)
                thresholds = self._thresholds.get(virtual, self._default)
                # A stream is judged by its first token (what a user waits for), a plain answer by its whole time.
                latency = (answered.first_byte - started) if ctx.stream and answered.first_byte else total
                category = thresholds.category(latency * 1000.0)
                self.rolling.add(virtual, model, latency * 1000.0, thresholds)
            elif ctx.attempts and status == 200:  # a stream that failed after its 200 went out
                last = next((a for a in reversed(ctx.attempts) if a.outcome != "hedge_lost"), ctx.attempts[-1])
                if last.reason == "client_disconnected":
                    status = 499
                elif last.reason == "deadline_exceeded":
                    status = 504
                else:
                    status = 502
        recent = "invalid" if ctx is None else (ctx.route.virtual or OTHER)
        self.recent_requests.add(recent, "requests" if status < 400 else "client_errors" if status < 500 else "errors")
        if cache is not None:
            self.recent_cache.add(recent, cache.lower())
        log_request(ctx, request_id=request_id, operation=operation, status=status, ms=total * 1000.0,
                    category=category, cache=cache, record_content=self.record_content, input_messages=input_messages)
        if self.metrics is not None:
            m = self.metrics
            key = (virtual, model, str(status))
            m.requests.inc(key)
            m.duration.observe(key, total)
            if ctx is not None:
                upstream = sum(((a.ended or a.started) - a.started) for a in ctx.attempts) if ctx.attempts else 0.0
                m.overhead.observe((), max(0.0, total - upstream))
                if category is not None:
                    m.category.inc((virtual, category))
                answered = ctx.answered
                if answered is not None:
                    if ctx.stream and answered.first_byte:
                        m.ttft.observe((virtual, model), answered.first_byte - started)
                    usage = answered.usage
                    if isinstance(usage, dict):
                        for kind, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                            count = usage.get(field)
                            if isinstance(count, int):
                                m.tokens.inc((virtual, model, kind), count)
                                m.usage_hist.observe((ctx.operation, virtual, kind), count)
        if ctx is not None and ctx.op is not None and ctx.op.audio:
            self._audio(ctx, span, virtual, model, total)
        if span is not None:
            attrs = span.attrs
            if ctx is None:
                attrs[HTTP_RESPONSE_STATUS_CODE] = status
            else:
                answered = ctx.answered
                span.closing = self._shared(_REQUEST_CLOSING, (
                    status, ctx.route.requested, ctx.route.virtual, ctx.sent_attempts, ctx.stream,
                    (answered.response_model or answered.target.model) if answered else None,
                    answered.target.key if answered else None, category,
                ))
                attrs[REQUEST_ID] = ctx.request_id
                if self.record_content:
                    attrs[GEN_AI_INPUT_MESSAGES] = input_messages(ctx.body)
            # A 4xx the client caused (bad input, a request error passed back) leaves the span unset.
            failed = ctx is not None and ctx.answered is None and ctx.attempts and ctx.attempts[-1].outcome != "passed_back"
            if status >= 500 or failed:
                span.status = STATUS_ERROR
                attrs.setdefault(ERROR_TYPE, str(status))
            self.tracer.end(span)

    def _audio(self, ctx: RequestContext, span: Span | None, virtual: str, model: str, total: float) -> None:
        """Audio's measure in place of tokens: its bytes in and out, and the time the request took."""
        op = ctx.op
        if self.metrics is not None:
            m = self.metrics
            m.audio_bytes.inc((ctx.operation, virtual, model, "in"), op.bytes_in)
            m.audio_bytes.inc((ctx.operation, virtual, model, "out"), op.bytes_out)
            m.audio_duration.observe((ctx.operation, virtual, model), total)
        if span is not None:
            span.attrs[AUDIO_REQUEST_BYTES] = op.bytes_in
            span.attrs[AUDIO_RESPONSE_BYTES] = op.bytes_out

    def decision(self, ctx: RequestContext, policy: str, decision: str, **attrs) -> None:
        """A policy decision becomes an event on the request's span."""
        if ctx.span is not None:
            ctx.span.add_event(POLICY_DECISION, {"policy": policy, "decision": decision, **attrs})

    # --- one attempt ------------------------------------------------------------------------------------

    def attempt_started(self, ctx: RequestContext, attempt: Attempt, provider, headers: dict) -> None:
        parent = ctx.span
        if parent is None:
            return
        body = ctx.body
        target = attempt.target
        origin = provider.origin
        key = (ctx.operation, target, origin.host, origin.port, ctx.route.virtual, attempt.index)
        static = self._static.get(key)
        if static is None:
            if len(self._static) >= 4096:  # explicit provider:model names are the client's: keep this bounded
                self._static.clear()
            static = self._static[key] = (
                (GEN_AI_OPERATION_NAME, ctx.operation), (GEN_AI_PROVIDER_NAME, target.provider),
                (GEN_AI_REQUEST_MODEL, target.model), (SERVER_ADDRESS, origin.host),
                (SERVER_PORT, origin.port), (VIRTUAL_MODEL, ctx.route.virtual),
                (ATTEMPT_INDEX, attempt.index),
            )
        attrs = {}
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
        if max_tokens is not None:
            attrs[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        if body.get("temperature") is not None:
            attrs[GEN_AI_REQUEST_TEMPERATURE] = float(body["temperature"])
        if attempt.key_name:
            attrs[ATTEMPT_KEY] = attempt.key_name
        if attempt.hedge:
            attrs[ATTEMPT_HEDGE] = True
        attempt.span = span = self.tracer.start_child(parent, f"{ctx.operation} {target.model}", KIND_CLIENT, attrs,
                                                      static)
        headers["traceparent"] = span.traceparent

    def attempt_ended(self, ctx: RequestContext, attempt: Attempt) -> None:
        counted = _RECENT_ATTEMPT.get(attempt.outcome)
        if counted is not None:
            self.recent_attempts.add(attempt.target.key, counted)
        m = self.metrics
        if m is not None:
            model = self.model_label(attempt.target.model)
            m.attempts.inc((model, attempt.outcome))
            if attempt.key_name:
                m.key_attempts.inc((attempt.target.provider, attempt.key_name, attempt.outcome))
            if attempt.outcome == "fell_over":
                m.fallbacks.inc((ctx.route.label, model, attempt.reason))
            if attempt.sent:
                m.upstream.observe((model,), (attempt.ended or attempt.started) - attempt.started)
        if ctx.span is None:
            return
        span = attempt.span
        if span is None:  # skipped by cool-down: never started, recorded as a zero-length span
            self.attempt_started(ctx, attempt, _NoProvider, {})
            span = attempt.span
        attrs = span.attrs
        outcome = attempt.outcome
        failed = outcome in _FAILED or outcome == "skipped"
        reasons = tuple(r for r in attempt.finish_reasons if r) if attempt.finish_reasons else None
        span.closing = self._shared(_ATTEMPT_CLOSING, (
            outcome, attempt.status, attempt.response_model or None, reasons or None,
            attempt.reason if failed else None,
        ))
        if attempt.first_byte is not None:
            attrs[TIME_TO_FIRST_CHUNK_MS] = round((attempt.first_byte - attempt.started) * 1000.0, 3)
        if attempt.response_id:
            attrs[GEN_AI_RESPONSE_ID] = attempt.response_id
        usage = attempt.usage
        if isinstance(usage, dict):
            attrs[GEN_AI_USAGE_INPUT_TOKENS] = usage.get("prompt_tokens")
            attrs[GEN_AI_USAGE_OUTPUT_TOKENS] = usage.get("completion_tokens")
        if attempt.content is not None:
            attrs[GEN_AI_OUTPUT_MESSAGES] = attempt.content
        if ctx.op is not None and ctx.op.audio and outcome == "answered":
            attrs[AUDIO_REQUEST_BYTES] = ctx.op.bytes_in
            attrs[AUDIO_RESPONSE_BYTES] = ctx.op.bytes_out
        if failed and outcome != "skipped":
            span.set_error(attempt.reason or "error", redact(attempt.detail) if attempt.detail else "")
        self.tracer.end(span)

    def _shared(self, names: tuple[str, ...], values: tuple) -> tuple:
        """One shared tuple of (name, value) pairs per distinct set of values, so the encoder encodes each set
        once. Keyed by the flat values: building the pairs happens only on a miss."""
        key = (names, values)
        hit = self._static.get(key)
        if hit is None:
            if len(self._static) >= 4096:  # model names can come from clients: keep this bounded
                self._static.clear()
            hit = self._static[key] = tuple(zip(names, values))
        return hit


class _NoProvider:
    """The provider of a skipped attempt, as its span sees it: it went nowhere, so no server.address or
    server.port (None values are not exported)."""

    origin = SimpleNamespace(host=None, port=None)


# --- content, recorded only when the operator turns it on (GenAI message format) -----------------------------


def _parts(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts = []
    for part in content or ():
        if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            parts.append({"type": "text", "content": part.get("text", "")})
        elif isinstance(part, dict):
            parts.append({"type": part.get("type", "unknown")})  # images and the like: the kind, not the data
    return parts


def input_messages(body: dict) -> str:
    if "messages" in body:
        messages = [{"role": m.get("role"), "parts": _parts(m.get("content"))} for m in body["messages"]]
    else:
        inputs = body.get("input")
        messages = []
        if isinstance(body.get("instructions"), str):  # the Responses API's system message
            messages.append({"role": "system", "parts": _parts(body["instructions"])})
        for i in inputs if isinstance(inputs, list) else [inputs]:
            if isinstance(i, dict) and "content" in i:  # a Responses input item
                messages.append({"role": i.get("role", "user"), "parts": _parts(i["content"])})
            else:
                messages.append({"role": "user", "parts": _parts(i if isinstance(i, str) else str(i))})
    return orjson.dumps(messages).decode()


def output_from_choices(choices: list) -> str:
    out = []
    for choice in choices:
        if isinstance(choice, dict):
            message = choice.get("message") or {}
            out.append({"role": message.get("role", "assistant"), "parts": _parts(message.get("content") or ""),
                        "finish_reason": choice.get("finish_reason")})
    return orjson.dumps(out).decode()


def output_from_stream(raw: bytes) -> str:
    """The completion text of a recorded stream, assembled from its deltas."""
    text: list[str] = []
    finish = None
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not event.startswith(b"data:"):
            continue
        data = event[5:].strip()
        if not data.startswith(b"{"):
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
            finish = choice.get("finish_reason") or finish
    return orjson.dumps([{"role": "assistant", "parts": _parts("".join(text)), "finish_reason": finish}]).decode()
