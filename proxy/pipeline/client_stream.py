"""The client's side of a streamed answer, and the one place that writes to it.

Two moments matter. Keep-alive: while no data has been sent, SSE comments (`: keep-alive`) go out every
`keepalive_s` so an idle-timeout load balancer does not cut a long wait; comments commit nothing, so the
chain may still fall over. Commit: the first data event reaches the client; from then on a failure can only
end the stream with an error event.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.app.errors import ProxyError

KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _SSEResponse(web.StreamResponse):
    """Its head leaves with the first bytes written after it (a keep-alive comment, or the commit's events),
    in one send, as a web.Response's does: every prepare here is followed by a write in the same turn, so
    sending the head alone would only cost a system call per stream."""

    _send_headers_immediately = False


class ClientGone(Exception):
    """The client closed its connection; nothing more can be written."""


class ClientStream:
    __slots__ = ("_request", "_keepalive_s", "_base_headers", "response", "committed", "_timer", "_task")

    def __init__(self, request: web.Request, keepalive_s: float, base_headers: dict[str, str]) -> None:
        self._request = request
        self._keepalive_s = keepalive_s
        self._base_headers = base_headers
        self.response: web.StreamResponse | None = None
        self.committed = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        if keepalive_s > 0:
            self._timer = asyncio.get_running_loop().call_later(keepalive_s, self._start_keepalive)

    @property
    def prepared(self) -> bool:
        return self.response is not None

    @property
    def keeping_alive(self) -> bool:
        """A keep-alive is scheduled or running: `stop_keepalive()` has something to stop."""
        return self._timer is not None or self._task is not None

    def _start_keepalive(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._keepalive())

    async def _keepalive(self) -> None:
        try:
            while not self.committed:
                if self.response is None:
                    await self._prepare({})
                await self.response.write(KEEPALIVE)
                await asyncio.sleep(self._keepalive_s)
        except (ConnectionError, ClientGone):
            pass  # the main path finds out on its next write

    async def stop_keepalive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    async def _prepare(self, headers: dict[str, str]) -> None:
        response = _SSEResponse(status=200, headers={**SSE_HEADERS, **self._base_headers, **headers})
        self.response = response
        try:
            await response.prepare(self._request)
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def commit(self, headers: dict[str, str], first: bytes, last: bool = False) -> None:
        """The commit point: the first data event goes to the client. `last` says `first` is the whole
        stream (it all came in one read): then headers, events and the end go out in one write."""
        if self._timer is not None:  # the usual case: no keep-alive went out, nothing to wait for
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await self.stop_keepalive()
        self.committed = True
        if self.response is None:
            await self._prepare(headers)
        try:
            if last:
                await self.response.write_eof(first)
            else:
                await self.response.write(first)
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def write(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def finish(self, trailer: bytes = b"") -> web.StreamResponse:
        try:
            await self.response.write_eof(trailer)  # the trailer and the end of the stream in one write
        except ConnectionError:
            pass
        return self.response

    async def fail(self, error: ProxyError, headers: dict[str, str], event: bytes | None = None) -> web.StreamResponse:
        """An error before any data: a plain error response, or an error event (`event`, else chat's) when
        keep-alives went out."""
        await self.stop_keepalive()
        if self.response is None:
            return error.to_response(headers)
        return await self.finish(error.sse_event() if event is None else event)
