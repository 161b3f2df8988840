"""A real OTLP/HTTP trace receiver for the tests: what Jaeger or a collector would see, decoded.

It answers `POST /v1/traces` the way a collector does (an empty `ExportTraceServiceResponse` protobuf),
decodes each body with the official `opentelemetry-proto` classes and keeps every span as a plain
`ReceivedSpan`. Attribute values come back as Python values (str, bool, int, float, list, dict, bytes), ids
as lower-case hex. A test can make it answer with an error status (always, or the next N times, with a
Retry-After), or hold each export until it says so.
"""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass, field
from typing import Callable

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KIND_SERVER, KIND_CLIENT = 2, 3
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict
    status_code: int
    status_message: str
    events: list[ReceivedEvent]
    flags: int
    resource: dict
    scope_name: str
    scope_version: str
    schema_url: str

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def any_value(value: AnyValue):
    """The Python value of an OTLP AnyValue (arrays as lists, key-value lists as dicts)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(key_values) -> dict:
    out = {}
    for kv in key_values:
        assert kv.key not in out, f"attribute {kv.key!r} sent twice"
        out[kv.key] = any_value(kv.value)
    return out


def decode(body: bytes) -> list[ReceivedSpan]:
    """Every span of one ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        kind=s.kind,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=attributes(s.attributes),
                        status_code=s.status.code,
                        status_message=s.status.message,
                        events=[ReceivedEvent(e.name, e.time_unix_nano, attributes(e.attributes)) for e in s.events],
                        flags=s.flags,
                        resource=resource,
                        scope_name=ss.scope.name,
                        scope_version=ss.scope.version,
                        schema_url=ss.schema_url or rs.schema_url,
                    )
                )
    return spans


@dataclass
class Export:
    """One POST as received: its headers, raw body and decoded spans."""

    headers: dict
    body: bytes
    spans: list[ReceivedSpan]


@dataclass
class OtlpReceiver:
    url: str = ""  # the base URL (add /v1/traces for the traces endpoint); set by the fixture
    exports: list[Export] = field(default_factory=list)
    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0  # every POST, including those answered with an error or still held
    fail_status: int | None = None  # answer every export with this status; its spans go to `rejected`
    fail_next: int = 0  # answer this many more exports with `fail_next_status` (spans to `rejected`), then accept
    fail_next_status: int = 503
    retry_after: str | None = None  # sent as Retry-After with every failure
    post_times: list[float] = field(default_factory=list)  # loop time of every POST
    rejected: list[ReceivedSpan] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set to an unset Event: each export waits for it
    held: int = 0  # exports waiting on `hold` right now
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def traces_url(self) -> str:
        return self.url + "/v1/traces"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        return app

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self._changed:
            self.posts += 1
            self.post_times.append(asyncio.get_running_loop().time())
            self._changed.notify_all()
        if self.hold is not None:
            self.held += 1
            try:
                await self.hold.wait()
            finally:
                self.held -= 1
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text=f"unsupported content type {request.content_type}")
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            spans = decode(body)
        except Exception as exc:  # a real collector answers 400 to a body it cannot parse
            return web.Response(status=400, text=f"cannot decode: {exc}")
        fail = self.fail_status
        if fail is None and self.fail_next > 0:
            self.fail_next -= 1
            fail = self.fail_next_status
        async with self._changed:
            if fail is not None:
                self.rejected.extend(spans)
            else:
                self.exports.append(Export(dict(request.headers), body, spans))
                self.spans.extend(spans)
            self._changed.notify_all()
        if fail is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
            return web.Response(status=fail, text="collector unavailable", headers=headers)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    async def wait_for(self, predicate: Callable[["OtlpReceiver"], object], timeout: float = 5.0):
        """Waits until `predicate(receiver)` is truthy and returns its value; fails the test on timeout."""
        async def until():
            async with self._changed:
                while not (result := predicate(self)):
                    await self._changed.wait()
                return result

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"OTLP receiver: condition not met in {timeout}s; {self.posts} POSTs, spans: "
                + ", ".join(f"{s.name}[{s.trace_id[:8]}]" for s in self.spans)
            ) from None

    async def wait_for_trace(self, trace_id: str, count: int, timeout: float = 5.0) -> list[ReceivedSpan]:
        """The spans of one trace, once `count` of them arrived (in arrival order)."""
        def enough(r: OtlpReceiver):
            found = r.trace(trace_id)
            return found if len(found) >= count else None

        return await self.wait_for(enough, timeout)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def request_span(self, request_id: str) -> ReceivedSpan | None:
        """The SERVER span of the request the proxy answered with `x-request-id: request_id`."""
        for s in self.spans:
            if s.kind == KIND_SERVER and s.attributes.get("groq_proxy.request_id") == request_id:
                return s
        return None

    async def wait_for_request(self, request_id: str, attempts: int, timeout: float = 5.0):
        """(server span, attempt spans ordered by attempt index) of one request, once all have arrived."""
        def complete(r: OtlpReceiver):
            server = r.request_span(request_id)
            if server is None:
                return None
            children = [s for s in r.trace(server.trace_id) if s.parent_span_id == server.span_id]
            if len(children) < attempts:
                return None
            return server, sorted(children, key=lambda s: s.attributes["groq_proxy.attempt.index"])

        return await self.wait_for(complete, timeout)


@pytest.fixture
async def otlp(aiohttp_server):
    """A running OtlpReceiver; point the proxy's `telemetry.endpoint` at `otlp.url`."""
    receiver = OtlpReceiver()
    server = await aiohttp_server(receiver.app())
    receiver.url = f"http://127.0.0.1:{server.port}"
    yield receiver
    if receiver.hold is not None:
        receiver.hold.set()  # let held exports finish so the servers close cleanly
