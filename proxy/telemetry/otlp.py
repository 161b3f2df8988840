"""OTLP/HTTP export of `proxy.tracing` spans: protobuf encoded by hand, sent by a task of the event loop.

Hand encoding because the generic path (SDK span objects, then the message classes) costs more per span
than the proxy spends on a whole request. Most attribute pairs repeat request after request (operation,
provider, model, outcome), so each distinct pair is encoded once and reused. The task encodes in small
slices and yields between them, so export never holds up a request; a collector that fails gets the batch
again after a backoff (see `Exporter`), and a dead one costs dropped spans and nothing else. The encoding is
checked against the official protobuf classes in the tests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from email.utils import parsedate_to_datetime
from itertools import islice

from proxy.upstream.http1 import Client, UpstreamError, split_url
from proxy.telemetry import semconv as sc
from proxy.telemetry.export_task import ExportTask
from proxy.telemetry.logs import emit
from proxy.telemetry.tracing import SEMCONV_SCHEMA, Span, Tracer

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag byte(s), length, payload."""
    n = len(payload)
    if n < 0x80 and tag < 0x80:  # the common case: one byte each
        return bytes((tag, n)) + payload
    return _varint(tag) + _varint(n) + payload


def _any_value(value) -> bytes:
    if isinstance(value, str):
        return _ld(0x0A, value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, (list, tuple)):
        return _ld(0x2A, b"".join(_ld(0x0A, _any_value(v)) for v in value))
    return _ld(0x0A, str(value).encode())


# Attributes whose values differ on (nearly) every span: caching them would only fill memory.
_VOLATILE = frozenset({
    sc.REQUEST_ID, sc.GEN_AI_RESPONSE_ID, sc.TIME_TO_FIRST_CHUNK_MS, sc.GEN_AI_USAGE_INPUT_TOKENS,
    sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.GEN_AI_INPUT_MESSAGES, sc.GEN_AI_OUTPUT_MESSAGES, sc.GEN_AI_REQUEST_MAX_TOKENS,
    sc.GEN_AI_REQUEST_TEMPERATURE,
})


# Span.flags (field 16, fixed32): sampled, and whether the parent is remote is known (and if it is).
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(0x100 | 0x01)
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(0x100 | 0x200 | 0x01)


class _PairCache:
    """Encoded KeyValue bytes for attribute pairs that repeat (operation, provider, model, outcome...); for the
    volatile ones only the encoded key is kept."""

    def __init__(self, limit: int = 4096) -> None:
        self._pairs: dict = {}
        self._keys: dict[str, bytes] = {}
        self._limit = limit

    def kv(self, key: str, value) -> bytes:
        if key in _VOLATILE or value.__class__ is float or value.__class__ is list:
            prefix = self._keys.get(key)
            if prefix is None:
                prefix = self._keys[key] = _ld(0x0A, key.encode())
            cls = value.__class__
            # The common volatile values, encoded inline (every length here fits one byte when the key does).
            if cls is str and len(value) < 0x70:
                raw = value.encode()
                body = prefix + bytes((0x12, len(raw) + 2, 0x0A, len(raw))) + raw
            elif cls is int and value >= 0:
                raw = _varint(value)
                body = prefix + bytes((0x12, len(raw) + 1, 0x18)) + raw
            elif cls is float:
                body = prefix + b"\x12\x09\x21" + _pack_d(value)
            else:
                return _ld(0x4A, prefix + _ld(0x12, _any_value(value)))  # Span.attributes = 9
            return bytes((0x4A, len(body))) + body if len(body) < 0x80 else _ld(0x4A, body)
        token = (key, value.__class__, value)
        hit = self._pairs.get(token)
        if hit is not None:
            return hit
        encoded = _ld(0x4A, _ld(0x0A, key.encode()) + _ld(0x12, _any_value(value)))
        if len(self._pairs) >= self._limit:
            self._pairs.clear()  # a bound, not an eviction policy: a client naming endless models cannot grow it
        self._pairs[token] = encoded
        return encoded


def _kv_plain(key: str, value) -> bytes:
    return _ld(0x0A, key.encode()) + _ld(0x12, _any_value(value))


class Encoder:
    def __init__(self, service_name: str, resource_attrs: dict[str, str] | None = None) -> None:
        attrs = {"service.name": service_name, "telemetry.sdk.name": "groq-proxy", "telemetry.sdk.language": "python"}
        attrs.update(resource_attrs or {})
        resource = b"".join(_ld(0x0A, _kv_plain(k, v)) for k, v in attrs.items())
        self._resource_field = _ld(0x0A, resource)  # ResourceSpans.resource = 1
        scope = _ld(0x0A, b"groq-proxy") + _ld(0x12, b"0.1.0")
        self._scope_field = _ld(0x0A, scope)  # ScopeSpans.scope = 1
        self._schema = _ld(0x1A, SEMCONV_SCHEMA.encode())
        self._pairs = _PairCache()
        self._trace_id = 0
        self._trace_field = b""
        self._blocks: dict[int, tuple[tuple, bytes]] = {}  # id(static attributes) -> (them, their encoding)
        self._names: dict[tuple[str, int], bytes] = {}  # (span name, kind) -> name and kind fields

    def _static(self, static: tuple) -> bytes:
        """The encoding of a span's static attributes: tuples the observer shares between spans alike."""
        hit = self._blocks.get(id(static))
        if hit is not None and hit[0] is static:
            return hit[1]
        kv = self._pairs.kv
        blob = b"".join(kv(k, v) for k, v in static if v is not None)
        if len(self._blocks) >= 4096:
            self._blocks.clear()
        self._blocks[id(static)] = (static, blob)  # the tuple is kept, so its id cannot be reused meanwhile
        return blob

    def span(self, s: Span) -> bytes:
        kv = self._pairs.kv
        if s.trace_id != self._trace_id:  # a request's spans share their trace: encode its id once
            self._trace_id = s.trace_id
            self._trace_field = b"\x0a\x10" + s.trace_id.to_bytes(16, "big")
        parts = [self._trace_field, b"\x12\x08", s.span_id.to_bytes(8, "big")]
        if s.parent_id:
            parts += (b"\x22\x08", s.parent_id.to_bytes(8, "big"))
        name = self._names.get((s.name, s.kind))
        if name is None:
            if len(self._names) >= 4096:
                self._names.clear()
            name = self._names[(s.name, s.kind)] = _ld(0x2A, s.name.encode()) + b"\x30" + bytes((s.kind,))
        parts += (name, b"\x39", _pack_q(s.start_ns), b"\x41", _pack_q(s.end_ns))
        if s.static:
            parts.append(self._static(s.static))
        if s.closing:
            parts.append(self._static(s.closing))
        parts += [kv(k, v) for k, v in s.attrs.items() if v is not None]
        if s.events:
            for ts, name, attrs in s.events:
                event = b"\x09" + _pack_q(ts) + _ld(0x12, name.encode())
                event += b"".join(_ld(0x1A, _kv_plain(k, v)) for k, v in attrs.items() if v is not None)
                parts.append(_ld(0x5A, event))  # Span.events = 11
        if s.status:
            status = (_ld(0x12, s.status_message.encode()) if s.status_message else b"") + b"\x18" + bytes((s.status,))
            parts.append(_ld(0x7A, status))  # Span.status = 15
        parts.append(_FLAGS_REMOTE if s.remote_parent else _FLAGS_LOCAL)
        body = b"".join(parts)
        n = len(body)
        if 0x80 <= n < 0x4000:  # most spans: a two-byte length
            return bytes((0x12, (n & 0x7F) | 0x80, n >> 7)) + body  # ScopeSpans.spans = 2
        return _ld(0x12, body)

    def request(self, encoded_spans: list[bytes]) -> bytes:
        """One ExportTraceServiceRequest holding the already encoded spans: the nested lengths are worked out
        first, so the spans (hundreds of KB per batch) are copied once, not once per level."""
        spans = sum(map(len, encoded_spans))
        scope_spans = len(self._scope_field) + spans + len(self._schema)
        scope_head = b"\x12" + _varint(scope_spans)  # ResourceSpans.scope_spans = 2
        resource_spans = len(self._resource_field) + len(scope_head) + scope_spans + len(self._schema)
        return b"".join((
            b"\x0a", _varint(resource_spans), self._resource_field, scope_head, self._scope_field,  # resource_spans = 1
            *encoded_spans, self._schema, self._schema,
        ))


class Exporter(ExportTask):
    """Drains the tracer's queue every `interval_s` (or sooner when it fills) and POSTs OTLP/HTTP protobuf.

    A batch stays at the head of the tracer's queue until the collector took it, so a retry never sends a span
    twice and spans waiting for it count against the queue's bound (more are dropped as `queue_full`). A failed
    POST is retried `retries` times after an exponential backoff with jitter, or after the collector's
    `Retry-After` on 429 and 503; each wait is capped at `max_backoff_s`. A batch still refused then, or refused
    with a status that retrying cannot fix (400, 401, 413...), is given up and counted as `export_failed`.
    """

    retries = 3
    backoff_s = 0.5  # the first wait; doubled for each further try, each wait drawn from [half of it, all of it]
    max_backoff_s = 5.0

    def __init__(self, tracer: Tracer, encoder: Encoder, url: str, headers: dict[str, str] | None = None,
                 interval_s: float = 0.1, batch: int = 512, timeout_s: float = 5.0) -> None:
        self.tracer = tracer
        self.encoder = encoder
        self.url = url
        self._origin, path, query = split_url(url)
        self._path = (path or "/") + query
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self.interval_s = interval_s
        self.batch = batch
        self.timeout_s = timeout_s
        self.exported = 0
        self.failed = 0
        self.retried = 0  # POSTs sent again after a failure
        self._client: Client | None = None  # the proxy's own HTTP/1.1 client: the export is on the proxy's CPU too
        self._failing = False

    def start(self) -> None:
        self._client = Client()
        super().start()

    async def flush(self) -> None:
        queue = self.tracer.queue
        while queue:
            # A snapshot of the head: the spans stay queued (and counted by the bound) until the batch is done.
            spans = list(islice(queue, self.batch))
            encoded = []
            encode = self.encoder.span
            for i, span in enumerate(spans, 1):
                encoded.append(encode(span))
                if i % 16 == 0:
                    await asyncio.sleep(0)  # let requests run between slices of encoding (~0.2 ms each)
            delivered = await self._deliver(self.encoder.request(encoded), len(spans))
            for _ in spans:
                queue.popleft()  # only this task takes from the head; the tracer appends at the tail
            if delivered:
                self.exported += len(spans)
            else:
                self.failed += len(spans)

    async def _deliver(self, body: bytes, count: int) -> bool:
        """Sends one batch, retrying as the class docstring says; True once the collector accepted it."""
        for attempt in range(self.retries + 1):
            ok, retryable, retry_after, detail = await self._send(body)
            if ok:
                if self._failing:
                    self._failing = False
                    emit(logging.INFO, "trace_export_recovered", url=self.url)
                return True
            if not retryable or attempt == self.retries:
                break
            backoff = self.backoff_s * (1 << attempt) * (0.5 + random.random() / 2)
            await asyncio.sleep(min(self.max_backoff_s, max(backoff, retry_after or 0.0)))
            self.retried += 1
        if not self._failing:  # say it once per outage, not once per batch
            self._failing = True
            emit(logging.WARNING, "trace_export_failed", url=self.url, error=detail, dropped=count)
        return False

    async def _send(self, body: bytes) -> tuple[bool, bool, float | None, str]:
        """One POST: (accepted, worth retrying, the collector's Retry-After in seconds, what went wrong)."""
        resp = None
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._client.request(self._origin, "POST", self._path, self.headers, body, self.timeout_s)
                await resp.read()
        except (UpstreamError, OSError, TimeoutError) as exc:
            return False, True, None, f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
        finally:
            if resp is not None:
                resp.release()
        status = resp.status
        if status < 300:
            return True, False, None, ""
        retry_after = _retry_after(resp.headers.get("retry-after")) if status in (429, 503) else None
        return False, status in _RETRYABLE, retry_after, f"status {status}"

    async def close(self) -> None:
        await self._stop()
        try:
            await asyncio.wait_for(self.flush(), timeout=self.timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            pass
        if self._client is not None:
            await self._client.close()


# What the OTLP/HTTP spec calls retryable: the collector is overloaded or briefly away.
_RETRYABLE = frozenset({429, 502, 503, 504})


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
