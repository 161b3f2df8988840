"""Per-request state: what was asked, which attempts were made, what answered."""

from __future__ import annotations

import time
from typing import Any

from proxy.app.config import Target
from proxy.routing.ratelimits import estimate_tokens
from proxy.routing.router import Route


class Attempt:
    """One try of one real model with one key. `outcome` is answered, fell_over, skipped, passed_back,
    failed_after_commit, cancelled or hedge_lost; `reason` says why when it is not answered. Each attempt has
    its own usage, so what several attempts in flight (a hedge) produced is settled per attempt."""

    __slots__ = (
        "index", "target", "started", "first_byte", "ended", "outcome", "reason", "detail", "status",
        "retry_after", "usage", "finish_reasons", "response_id", "response_model", "span", "content", "events",
        "stream", "key", "key_name", "hedge",
    )

    def __init__(self, index: int, target: Target, key: int = 0, key_name: str = "") -> None:
        self.index = index
        self.target = target
        self.key = key  # which key of the provider's pool (its index); key_name: its variable's name
        self.key_name = key_name
        self.hedge = False  # started in parallel with an attempt in flight
        self.started = time.perf_counter()
        self.first_byte: float | None = None
        self.ended: float | None = None
        self.outcome = "pending"
        self.reason: str | None = None
        self.detail: str | None = None
        self.status: int | None = None
        self.retry_after: float | None = None
        self.usage: dict | None = None
        self.finish_reasons: list[str] | None = None
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.span: Any = None  # the telemetry span of this attempt, when tracing is on
        self.content: str | None = None  # the completion, only when the operator turned content recording on
        self.events = 0  # SSE data events that reached the client: a cut stream's token estimate
        self.stream: Any = None  # the scanner's state of its stream once forwarded to the client

    @property
    def elapsed_ms(self) -> float:
        return ((self.ended or time.perf_counter()) - self.started) * 1000.0

    @property
    def sent(self) -> bool:
        return self.outcome != "skipped"


class RequestContext:
    """One request: what was asked, and what every attempt of it shares (the headers that go upstream with each,
    the headers every answer carries, the client's stream), so that an attempt starts with one call."""

    __slots__ = (
        "request_id", "operation", "route", "body", "stream", "started", "attempts", "answered", "span",
        "forwarded", "base_headers", "client", "chain", "hints", "client_fields", "deadline", "_tokens", "auto",
        "headers", "identity", "request_type", "module", "policy", "op", "settling", "drained", "tap",
    )

    def __init__(
        self, request_id: str, operation: str, route: Route, body: dict, stream: bool, started: float | None = None
    ) -> None:
        self.request_id = request_id
        self.operation = operation  # "chat" or "embeddings" (the GenAI operation name)
        self.route = route
        self.body = body
        self.stream = stream
        self.started = started or time.perf_counter()
        self.attempts: list[Attempt] = []
        self.answered: Attempt | None = None
        self.span: Any = None
        self.forwarded: dict[str, str] = {}  # the client's end-to-end headers, sent upstream with every attempt
        self.base_headers: dict[str, str] = {}  # on every response to this request, errors included
        self.client: Any = None  # the ClientStream of a streamed request, None otherwise
        # Set by the policy chain (policies.chain.PolicyChain.begin) when policies or [auth] are configured.
        self.headers: Any = None  # the client's request headers
        self.identity: Any = None  # policies.Identity
        self.request_type = "default"  # x-request-type
        self.module: str | None = None  # x-module
        self.policy: Any = None  # policies.chain.PolicyState: the request's claims, settlements, added headers
        self.chain = route.chain  # the route's chain in the order this request tries it (a latency target reorders)
        self.hints: Any = None  # the routing hints of its headers (proxy.routing.hints.Hints)
        self.client_fields: frozenset | None = None  # the fields the client set, when a chain entry has params
        self.deadline: float | None = None  # loop time past which the request is answered 504
        self._tokens: int | None = None
        self.auto = False  # asked for the auto model: `route` is the tier the proxy chose
        self.op: Any = None  # proxy.pipeline.operation.Operation of an endpoint other than chat and embeddings
        self.settling = False  # its policies are settling: a drain must not cut it now (proxy/app/drain.py)
        self.drained = False  # cut by a drain past server.drain_timeout_s
        # What the answer is told to as it passes (proxy.pipeline.tap.Tap: the cache's capture), set by a policy.
        self.tap: Any = None

    @property
    def virtual_model(self) -> str | None:
        return self.route.virtual

    @property
    def usage(self) -> dict | None:
        """The usage the upstream reported for the answer, once known."""
        return self.answered.usage if self.answered is not None else None

    @property
    def tokens_if_estimated(self) -> int | None:
        """The estimate when something already needed it; None otherwise (it is not made just for this)."""
        return self._tokens

    def estimated_tokens(self) -> int:
        """The request's estimated tokens (prompt and completion limit), computed once, when first asked."""
        if self._tokens is None:
            self._tokens = estimate_tokens(self.body)
        return self._tokens

    @property
    def sent_attempts(self) -> int:
        return sum(1 for a in self.attempts if a.sent)
