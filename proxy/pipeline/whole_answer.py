"""An answer whose every byte is known before the first goes out (a cache hit, a plain upstream answer, an error):
written in one block.

aiohttp's `web.Response` works out its headers, fires the prepare signal and writes through its StreamWriter;
on a cache hit that was about a sixth of the proxy's whole cost. A hit's status, headers and body are all
known at once, so `WholeAnswer` joins them and makes one `transport.write`, which the proxy's handler makes
(`send`) before it logs and counts the request: the client has its answer that much sooner. It offers what
aiohttp's request handler calls on a handler's answer (`prepare`, `write_eof`, `keep_alive`) and what the proxy
reads (`status`, `headers`, `body`); the proxy's app has neither middlewares nor `on_response_prepare` handlers,
which is all it skips.

The head is what aiohttp would write: `Content-Length`, `Date` and `Server`, `Connection: close` when the
client asked to close (HTTP/1.1) and `Connection: keep-alive` when an HTTP/1.0 client asked to keep it. A
header value with a line break cannot be written: `whole_answer` returns None and the caller uses `web.Response`,
which refuses it as it always has; so does a policy's answer that sets a header of the framing itself
(`Content-Length`, `Date`, `Server`, `Connection`, `Transfer-Encoding`).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES = {status: f"HTTP/1.1 {status} {reason}\r\n" for status, reason in _REASONS.items()}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"
_WRITE_LIMIT = 2**16  # above this much unsent, wait for the client to read (aiohttp's StreamWriter's own limit)
_OWN = ("\ncontent-length:", "\ndate:", "\nserver:", "\nconnection:", "\ntransfer-encoding:")  # the head's own lines
_date = [0, ""]  # (second, its Date line), as aiohttp caches its own


def _date_line() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, f"Date: {formatdate(now, usegmt=True)}\r\n"
    return _date[1]


class WholeAnswer:
    __slots__ = ("status", "headers", "_head", "body", "keep_alive", "_sent", "_writer")

    def __init__(self, status: int, headers: dict[str, str], head: str, body: bytes) -> None:
        self.status = status
        self.headers = headers  # what the proxy's own code reads back (the cache's verdict)
        self._head = head
        self.body = body  # read by the cache's capture, as web.Response's
        self.keep_alive: bool | None = None
        self._sent = False
        self._writer = None  # set when the client has not taken the whole answer yet

    def send(self, request: web.BaseRequest) -> None:
        """Writes the answer now, once (the proxy's handler calls it before its own bookkeeping, so the client
        does not wait for the request's log line and metrics). Never suspends: waiting for a slow reader to
        take a large answer is left to `write_eof`."""
        if self._sent:
            return
        self._sent = True
        self.keep_alive = False  # unless the write below happens
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away before its answer")
        keep_alive = request.keep_alive
        version = request.version
        head = self._head
        if version.minor == 1 and version.major == 1:
            status_line = _STATUS_LINES.get(self.status) or f"HTTP/1.1 {self.status} Unknown\r\n"
            if not keep_alive:
                head += "Connection: close\r\n"
        else:
            reason = _REASONS.get(self.status, "Unknown")
            status_line = f"HTTP/{version.major}.{version.minor} {self.status} {reason}\r\n"
            if keep_alive:
                head += "Connection: keep-alive\r\n"
        transport.write(b"".join(((status_line + head + _date_line() + _SERVER + "\r\n").encode(), self.body)))
        self.keep_alive = keep_alive
        if transport.get_write_buffer_size() > _WRITE_LIMIT:
            self._writer = request.writer

    async def prepare(self, request: web.BaseRequest) -> None:
        self.send(request)  # aiohttp's call: a no-op when the handler has sent it already

    async def write_eof(self, data: bytes = b"") -> None:
        if self._writer is not None:  # more than 64 KiB still unsent: wait for the client to read it
            writer, self._writer = self._writer, None
            await writer.drain()


def whole_answer(status: int, headers: dict[str, str], body: bytes) -> WholeAnswer | None:
    """The answer as one block, or None when a header cannot be written as it is (see the module's note)."""
    head = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    lines = len(headers)
    if head.count("\n") != lines or head.count("\r") != lines:  # a line break inside a name or a value
        return None
    low = "\n" + head.lower()
    if any([name in low for name in _OWN]):  # the policy wrote a header of the framing's: aiohttp's way
        return None
    return WholeAnswer(status, headers, f"{head}Content-Length: {len(body)}\r\n", body)
