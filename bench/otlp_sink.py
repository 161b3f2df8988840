"""A cheap OTLP/HTTP trace receiver for the benchmark: counts what arrives, decodes nothing.

`python -m bench.run --tracing` points a second proxy's trace exporter at it. It shares the cores with wrk,
the upstream and the proxies, so, like `canned_upstream.py`, it is a raw asyncio protocol on uvloop that parses
just enough HTTP/1.1 (request line, Content-Length, keep-alive, pipelining). A body is counted as it streams
in and never kept or decoded: the protobuf is not looked at.

    POST /v1/traces   -> 200, Content-Type: application/x-protobuf, empty body (an empty
                         ExportTraceServiceResponse is zero bytes); counts the request and its body bytes
    GET  /stats       -> JSON: {"requests", "bytes", "max_body", "empty", "not_protobuf", "other", ...}
    anything else     -> 404 (counted as "other"); a chunked request body -> 400 and the connection closed

    python -m bench.otlp_sink --port 0     # prints "listening on http://127.0.0.1:PORT", and its counts on exit
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

from bench import serving

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_PROTOBUF = re.compile(rb"\r\ncontent-type:[ \t]*application/x-protobuf", re.IGNORECASE)
MAX_HEAD = 64 * 1024

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\nbad request"


class Stats:
    __slots__ = ("requests", "bytes", "max_body", "empty", "not_protobuf", "other", "bad", "connections",
                 "first", "last", "started")

    def __init__(self) -> None:
        self.requests = 0  # POST /v1/traces answered 200
        self.bytes = 0  # their body bytes
        self.max_body = 0
        self.empty = 0  # of which with an empty body
        self.not_protobuf = 0  # of which without Content-Type: application/x-protobuf
        self.other = 0  # requests to any other path or method (GET /stats excluded)
        self.bad = 0  # requests that could not be parsed
        self.connections = 0
        self.first = 0.0  # wall clock of the first and the last export request
        self.last = 0.0
        self.started = time.time()

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class SinkProtocol(asyncio.Protocol):
    __slots__ = ("stats", "transport", "head", "remaining", "body", "answer")

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()  # an incomplete request head
        self.remaining = 0  # body bytes still to come for the current request
        self.body = 0  # body bytes of the current request so far
        self.answer = b""  # what to write once the current body is in

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stats.connections += 1

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        out = []
        close = False
        while data:
            if self.remaining:  # inside a body: count it, keep nothing
                take = min(self.remaining, len(data))
                self.remaining -= take
                self.body += take
                data = data[take:] if take < len(data) else b""
                if not self.remaining:
                    out.append(self._done())
                continue
            self.head += data
            data = b""
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.stats.bad += 1
                    out.append(BAD_REQUEST)
                    close = True
                break
            head = bytes(self.head[:end])
            data = bytes(self.head[end + 4 :])
            self.head.clear()
            answer, length, close = self._start(head)
            if answer is BAD_REQUEST:
                out.append(answer)
                close = True
                break
            self.answer, self.body, self.remaining = answer, 0, length
            if not length:
                out.append(self._done())
            if close:
                break
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close and self.transport is not None:
            self.transport.close()

    def _start(self, head: bytes) -> tuple[bytes, int, bool]:
        """The answer to a request head, its body length and whether to close after it."""
        stats = self.stats
        line_end = head.find(b"\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(b" ")
        match = _CONTENT_LENGTH.search(head)
        if len(parts) != 3 or (match is None and _CHUNKED.search(head)):  # chunked bodies are not supported
            stats.bad += 1
            return BAD_REQUEST, 0, True
        length = int(match.group(1)) if match else 0
        close = _CLOSE.search(head) is not None
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method == b"POST" and target == b"/v1/traces":
            if _PROTOBUF.search(head) is None:
                stats.not_protobuf += 1
            return OK, length, close
        if method == b"GET" and target == b"/stats":
            return b"", length, close  # built in _done, with the counts of that moment
        stats.other += 1
        return NOT_FOUND, length, close

    def _done(self) -> bytes:
        answer, stats = self.answer, self.stats
        if answer is OK:
            stats.requests += 1
            stats.bytes += self.body
            stats.max_body = max(stats.max_body, self.body)
            if not self.body:
                stats.empty += 1
            stats.last = time.time()
            if not stats.first:
                stats.first = stats.last
        elif not answer:
            body = json.dumps(stats.as_dict()).encode()
            answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.answer, self.body = b"", 0
        return answer


def main(argv: list[str] | None = None) -> int:
    args = serving.parser("python -m bench.otlp_sink", __doc__).parse_args(argv)
    stats = Stats()
    return serving.serve_forever(lambda: SinkProtocol(stats), args.host, args.port,
                                 on_exit=lambda: print("stats " + json.dumps(stats.as_dict()), flush=True))


if __name__ == "__main__":
    sys.exit(main())
