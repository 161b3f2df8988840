"""Graceful drain: what a SIGTERM (or SIGINT) does to a serving process, so a restart or a scale-down loses no
request and no settlement.

The steps, each logged as one JSON line (`drain_started`, `drain_listener_closed`, `drain_cut`, `drain_done`):
1. At once, `/readyz` answers 503: the load balancer (or Kubernetes) stops sending new requests here.
2. For `server.drain_s` the process still serves as before, new connections included: the load balancer needs
   that long to notice. Then the listener closes (new connections are refused) and idle keep-alive connections
   are closed; a connection with a request in flight closes after its response.
3. Requests and streams in flight run to their end, until `server.drain_timeout_s` after the signal.
4. What is still in flight then is cut: its handler is cancelled and marked cut, the pipeline's `finally`
   settles its policies (budgets, limits, concurrency) as for any ending, and the client gets one SSE error
   event (`code: shutting_down`) on a stream already begun, else a 503. A request already settling is not cut:
   cancelling it would lose its settlement.
5. The app's cleanup runs (the policy store closes, the span exporter flushes and closes), and the process exits 0.

A second signal during the drain skips the waiting: what is in flight is cut at once (a developer's second
Ctrl-C). The pipeline's requests and the files and batches calls are tracked from their start, before their
body is read, so an upload under way at the signal is waited for as long as a stream (one dict entry per request,
no task); the rest (a `/v1/usage`, `/metrics`) are waited for by aiohttp's own shutdown for a few seconds more,
then cancelled.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.app.errors import ProxyError
from proxy.telemetry.logs import emit

CUT_GRACE_S = 5.0  # after the cut: time for the cut handlers to write their error event and settle


class Drain:
    """The serving process's drain state: whether it is draining, and the pipeline requests in flight."""

    def __init__(self, grace_s: float, timeout_s: float) -> None:
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.draining = False
        self._in_flight: dict[asyncio.Task, web.BaseRequest] = {}  # handler task -> its request
        self._contexts: dict[asyncio.Task, object] = {}  # handler task -> its RequestContext, once it has one
        self._cut: set[asyncio.Task] = set()
        self._closed = False  # the listener is closed: a connection closes after its response
        self._idle: asyncio.Event | None = None  # set when draining and nothing is in flight
        self._hurry: asyncio.Event | None = None  # a second signal: cut now
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the app serves on, known at its first request

    # --- per request (the hot path: a dict entry or two) -----------------------------------------------

    def enter(self, request: web.BaseRequest) -> asyncio.Task:
        """A request begins, before its body is read."""
        loop = self._loop
        if loop is None:  # an app serves on one loop; naming it spares current_task() a getpid system call (3.11)
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        self._in_flight[task] = request
        return task

    def attach(self, task: asyncio.Task, ctx) -> None:
        """The request's context, once it has one: a cut leaves it alone while its policies settle."""
        self._contexts[task] = ctx

    def leave(self, task: asyncio.Task) -> None:
        request = self._in_flight.pop(task, None)
        self._contexts.pop(task, None)
        if self._closed and request is not None:
            request.protocol.close()  # no new request on this connection once the listener is closed
        if self._idle is not None and not self._in_flight:
            self._idle.set()

    def was_cut(self, task: asyncio.Task) -> bool:
        """After a CancelledError: True when the drain's cut alone cancelled this request (then it is answered);
        False when the client went away too, or something else cancels the task (then it must propagate)."""
        return task in self._cut and task.uncancel() == 0

    async def cut_response(self, ctx, request_id: str) -> web.StreamResponse:
        """The answer of a request cut by the drain: an error event on a stream already begun, else a 503."""
        error = ProxyError(
            503, f"The proxy is shutting down and the request did not finish within server.drain_timeout_s "
            f"({self.timeout_s:g} s) (request {request_id}).", type="server_error", code="shutting_down",
        )
        client = ctx.client if ctx is not None else None
        if client is not None and client.prepared:
            return await client.finish(error.sse_event())
        return error.to_response(ctx.base_headers if ctx is not None and ctx.base_headers else
                                 {"x-request-id": request_id})

    # --- the drain ----------------------------------------------------------------------------------------

    def signal(self) -> bool:
        """A SIGTERM or SIGINT: True for the first (start draining), False for a later one (hurry)."""
        if not self.draining:
            self.draining = True
            self._idle = asyncio.Event()
            self._hurry = asyncio.Event()
            if not self._in_flight:
                self._idle.set()
            return True
        self._hurry.set()
        return False

    async def run(self, runner: web.BaseRunner) -> None:
        """Steps 2 to 4 (the caller has called `signal()`, which is step 1, and runs the cleanup after)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        emit(logging.INFO, "drain_started", in_flight=len(self._in_flight), drain_s=self.grace_s,
             drain_timeout_s=self.timeout_s)
        await self._until(self._hurry, loop.time() + self.grace_s)
        for site in list(runner.sites):
            await site.stop()  # new connections are refused from here on
        self._closed = True
        if runner.server is not None:  # idle keep-alive connections close; busy ones after their response (leave)
            # Not aiohttp's pre_shutdown(): a closed connection drops what it receives, an upload's rest too.
            busy = {request.protocol for request in self._in_flight.values()}
            for connection in runner.server.connections:
                if connection not in busy:
                    connection.close()
        emit(logging.INFO, "drain_listener_closed", in_flight=len(self._in_flight))
        if not self._hurry.is_set():
            await self._until(self._idle, deadline, self._hurry)
        contexts = self._contexts
        cut = [task for task in self._in_flight if task not in contexts or not contexts[task].settling]
        self._cut.update(cut)
        for task in cut:
            ctx = contexts.get(task)
            if ctx is not None:
                ctx.drained = True  # its attempt is logged as cut by the shutdown, not by the client
            task.cancel()
        if cut:
            emit(logging.WARNING, "drain_cut", requests=len(cut),
                 message=f"{len(cut)} request(s) still in flight after server.drain_timeout_s "
                         f"({self.timeout_s:g} s) end with the error `shutting_down`")
        if runner.server is not None:  # every handler, cut ones included, ends here; what does not is cancelled
            await runner.server.shutdown(CUT_GRACE_S)
        emit(logging.INFO, "drain_done", cut=len(cut))

    @staticmethod
    async def _until(event: asyncio.Event, when: float, other: asyncio.Event | None = None) -> None:
        """Waits until `event` (or `other`) is set, or the loop's clock reaches `when`."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (event, other) if e is not None]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, when - asyncio.get_running_loop().time()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


DRAIN = web.AppKey("drain", Drain)
