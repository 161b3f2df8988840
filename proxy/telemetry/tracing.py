"""Spans for every request and every upstream attempt, cheap enough for the hot path.

The OpenTelemetry SDK costs about 180 us per request for two spans here (and ~110 us per span to encode),
more than the whole proxy spends on a request. So spans are recorded as small slot objects and encoded to
OTLP by `proxy.telemetry.otlp` off the request path (or handed to the SDK by `proxy.telemetry.sdk`); names
and attributes follow the OpenTelemetry semantic conventions (`proxy.telemetry.semconv`, pinned in
`SEMCONV_SCHEMA`).
"""

from __future__ import annotations

import random
import re
import time
from collections import deque

from proxy.telemetry.semconv import ERROR_TYPE, SCHEMA_URL as SEMCONV_SCHEMA

KIND_SERVER, KIND_CLIENT = 2, 3
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_getrandbits = random.getrandbits  # ids need to be unique, not secret: the fast generator will do


class Span:
    __slots__ = (
        "trace_id", "span_id", "parent_id", "name", "kind", "start_ns", "end_ns", "attrs", "static", "closing", "status",
        "status_message", "events", "remote_parent",
    )

    def __init__(self, trace_id: int, parent_id: int, name: str, kind: int, attrs: dict, static: tuple = ()) -> None:
        self.trace_id = trace_id
        self.span_id = _getrandbits(64) or 1
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.attrs = attrs
        # Attributes shared by many spans, as one tuple object the encoder encodes once; `attrs` holds the rest.
        self.static = static
        self.closing: tuple = ()  # the same, for attributes known when the span ends
        self.status = STATUS_UNSET
        self.status_message = ""
        self.events: list | None = None
        self.remote_parent = False

    def add_event(self, name: str, attrs: dict | None = None) -> None:
        """A point in time on the span: how policy decisions are recorded."""
        if self.events is None:
            self.events = []
        self.events.append((time.time_ns(), name, attrs or {}))

    def set_error(self, error_type: str, message: str = "") -> None:
        self.status = STATUS_ERROR
        self.status_message = message
        self.attrs[ERROR_TYPE] = error_type

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-01"


class Tracer:
    """Starts spans, decides sampling (parent-based, then by trace-id ratio), queues finished spans."""

    def __init__(self, sample_ratio: float = 1.0, max_queue: int = 20000, parent_based: bool = True) -> None:
        self._bound = int(sample_ratio * (1 << 64))
        self._parent_based = parent_based
        self.queue: deque[Span] = deque()
        self.max_queue = max_queue
        self.dropped = 0

    def start_request(self, traceparent: str | None, name: str, attrs: dict, static: tuple = ()) -> Span | None:
        """The SERVER span of a request; a child of the caller's span when it sent a valid `traceparent`.
        None when the request is not sampled."""
        parent_id = 0
        if traceparent:
            match = _TRACEPARENT.match(traceparent.strip().lower())
            if match and int(match.group(1), 16) and int(match.group(2), 16):
                sampled = int(match.group(3), 16) & 1
                if not self._parent_based:
                    sampled = (int(match.group(1), 16) & 0xFFFFFFFFFFFFFFFF) < self._bound
                if not sampled:
                    return None  # the caller (or a sampler that ignores it) decided not to sample this trace
                span = Span(int(match.group(1), 16), int(match.group(2), 16), name, KIND_SERVER, attrs, static)
                span.remote_parent = True
                return span
        trace_id = _getrandbits(128) or 1
        if (trace_id & 0xFFFFFFFFFFFFFFFF) >= self._bound:
            return None
        return Span(trace_id, parent_id, name, KIND_SERVER, attrs, static)

    def start_child(self, parent: Span, name: str, kind: int, attrs: dict, static: tuple = ()) -> Span:
        return Span(parent.trace_id, parent.span_id, name, kind, attrs, static)

    def end(self, span: Span, end_ns: int | None = None) -> None:
        span.end_ns = end_ns or time.time_ns()
        if len(self.queue) < self.max_queue:
            self.queue.append(span)
        else:
            self.dropped += 1
