"""The upstream HTTP/1.1 client: pooled keep-alive connections, responses parsed by llhttp (httptools).

Why not aiohttp's ClientSession, which the proxy used first: measured on the bench box, a pass-through with
ClientSession spends about 95 us of its 147 us per request in the client (request and response objects,
payload registry, timers, connector bookkeeping); the same pass-through with this client serves 3x the
requests. The proxy needs little of what ClientSession offers (one method, bytes in, bytes or a stream out,
no cookies, redirects or compression), so this module does just that, on the parser aiohttp itself
uses. aiohttp still serves the clients, and still carries the off-path calls (catalogue check, model bench);
the OTLP exporter uses this client too.

One `Client` holds a pool per origin. `request()` writes the request head and body (in one write unless the
body is 64 KiB or more) and returns when the response head has arrived; the body is read whole (`read`, at
most `MAX_BODY` bytes) or as it comes (`readany`, with reading paused while more than `HIGH_WATER` bytes wait
unread). `request_stream()` sends a body that comes in pieces (a file upload), chunked, at the upstream's
pace. `release()` gives a fully read keep-alive connection back to the pool (`drain=True`: once the rest
has arrived); anything else closes it. Cancelling a request (a deadline) closes its connection.

A pooled connection can die while idle: the upstream (or a load balancer before it) closes it after its own
idle timeout, and its FIN may cross our next request on the wire. Browsers resend such a request whatever
its method (Go's net/http and aiohttp only when it is idempotent), and so does this one: a request that got
no byte of an answer on a reused connection goes once more on a new one, so a healthy model is never charged
for it. A POST is safe to resend here: the alternative, falling over, asks the next model to generate it
again anyway. A connection is not reused after its pool's idle limit (`pool_idle_s`, 15 s by default, as
aiohttp's keep-alive timeout: below the 60 s of common load balancers) nor, when the upstream says
`Keep-Alive: timeout=N`, near N.

The forward proxy of `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`, unless `NO_PROXY` names the host, is chosen
once per origin when its pool is made (proxy/upstream/proxy_env.py); a pool is one origin through one route.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import string
import time
from dataclasses import dataclass
from typing import AsyncIterator, Mapping
from urllib.parse import quote, urlsplit

import aiohappyeyeballs
import httptools

from proxy.upstream.proxy_env import ForwardProxy, ProxyEnv, open_tunnel

HIGH_WATER = 256 * 1024  # unread streamed bytes before reading from the upstream pauses
IDLE_S = 15.0  # a pooled connection idle longer than this is closed rather than reused (per origin: `limit_idle`)
MAX_IDLE = 256  # idle connections kept per origin
MAX_BODY = 64 * 1024 * 1024  # the largest body `read()` collects: past it, BadResponse instead of ever more memory
MAX_HEAD = 256 * 1024  # the most bytes before a final response head is whole (1xx heads included; Groq's: ~2 KiB)
DRAIN_S = 2.0  # how long a released connection may take to finish a message whose content the caller has
DRAIN_MAX = 64 * 1024  # and how many bytes it may still send meanwhile


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange; nothing here is about the request itself."""


class ConnectFailed(UpstreamError):
    """No connection was made (refused, unresolvable, TLS handshake failed)."""


class ConnectTimeout(UpstreamError):
    """No connection within the connect timeout."""


class Disconnected(UpstreamError):
    """A connection was made, then closed or broke before the response was complete."""


class BadResponse(UpstreamError):
    """The upstream's bytes are not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, and the Host header that names them."""

    host: str
    port: int
    tls: bool
    host_header: str

    @classmethod
    def of(cls, scheme: str, host: str, port: int | None) -> "Origin":
        tls = scheme == "https"
        default = 443 if tls else 80
        port = port or default
        shown = f"[{host}]" if ":" in host else host
        return cls(host, port, tls, shown if port == default else f"{shown}:{port}")


def split_url(url: str) -> tuple[Origin, str, str]:
    """The origin of an http(s) URL, its path without a trailing slash, and its query (with its `?`, or "").
    Only what cannot stand in a request line (spaces, controls, non-ASCII) is escaped, as yarl does."""
    parts = urlsplit(url)
    path = quote(parts.path.rstrip("/"), safe=string.punctuation)
    query = f"?{quote(parts.query, safe=string.punctuation)}" if parts.query else ""
    return Origin.of(parts.scheme, parts.hostname or "", parts.port), path, query


class Response:
    """One response: status and headers at once, the body as it arrives."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_size", "_limit", "_whole", "_complete", "_error",
                 "_waiter", "_head")

    def __init__(self, conn: "_Connection") -> None:
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case names; a repeated header keeps its last value
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = HIGH_WATER  # unread bytes before the connection pauses (or, reading whole, fails)
        self._whole = False  # `read()` wants it all
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None
        self._head: asyncio.Future | None = None

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    @property
    def complete(self) -> bool:
        """Every byte of the body has arrived (not necessarily been read)."""
        return self._complete

    async def read(self) -> bytes:
        """The whole body (what `readany` has not taken yet); BadResponse past MAX_BODY bytes."""
        if not self._complete:
            # Everything is wanted at once: pausing would wait for a read that never comes, so the limit is
            # the most this may hold.
            self._whole = True
            self._limit = MAX_BODY
            if self._conn is not None:
                self._conn.resume()
            while not self._complete:
                await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    async def readany(self) -> bytes:
        """The bytes that have arrived since the last call, waiting for some if none has; b"" at the end."""
        while not self._chunks:
            if self._complete:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.resume()
        self._size = 0
        return data

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._chunks:
            raise self._error

    def release(self, drain: bool = False) -> None:
        """Done with this response: a complete keep-alive exchange returns its connection to the pool. With
        `drain`, the caller has all it wants of an incomplete one (a stream past its `[DONE]` whose last empty
        chunk is still on its way): the connection reads the rest in the background for up to `DRAIN_S`, then
        goes back to the pool, instead of costing the next request a new connection (and TLS handshake)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self._complete and drain and self._error is None:
            conn.drain()
        else:
            conn.finished(reusable=self._complete)

    def close(self) -> None:
        """Done with this response, whatever is left of it: its connection is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(reusable=False)

    # --- fed by the connection ------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._complete or self._error is not None:  # the first failure says why; the close that follows does not
            return
        self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()


class _Connection(asyncio.Protocol):
    """One upstream connection and the response being read from it (one at a time: no pipelining)."""

    __slots__ = ("pool", "transport", "parser", "response", "closed", "paused", "keep_alive", "reused", "answered",
                 "idle_s", "expires", "_headers", "_informational", "_until_close", "_drain", "_drained", "head_size",
                 "_writable", "sent_whole")

    def __init__(self, pool: "_Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.paused = False
        self.keep_alive = False
        self.reused = False  # has been in the pool: the upstream may have closed it meanwhile
        self.answered = False  # a byte of the answer to the current request has arrived
        self.idle_s = pool.idle_s  # lowered by the upstream's `Keep-Alive: timeout=`
        self.expires = 0.0  # while pooled: not reused after this (time.monotonic())
        self._headers: dict[str, str] = {}
        self._informational = False
        self._until_close = False  # the body has no length and no chunks: it ends when the connection does
        self._drain: asyncio.TimerHandle | None = None  # set while a released response is read to its end
        self._drained = 0
        self.head_size = 0  # bytes received for the current request while its final head is not whole
        self._writable: asyncio.Future | None = None  # set while the transport's write buffer is over its limit
        self.sent_whole = True  # False when a streamed body stopped early: the connection is then not reused

    # --- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        response = self.response
        if response is None:
            return
        if self._until_close and exc is None and response.status:
            response._complete = True
            response._wake()
            return
        detail = f"{type(exc).__name__}: {exc}" if exc else "the upstream closed the connection"
        response._fail(Disconnected(detail))

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection cannot be trusted again
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            refused = exc.__context__  # what a callback raised, if one did
            self._broken(refused if isinstance(refused, BadResponse) else BadResponse(f"not HTTP/1.1: {exc}"[:200]))
        except httptools.HttpParserUpgrade:  # 101 Switching Protocols, though the request asked for no upgrade
            self._broken(BadResponse("not HTTP/1.1: an upgrade nobody asked for"))
        else:
            if not response.status:  # no final head yet: httptools would buffer a header value without limit
                self.head_size += len(data)
                if self.head_size > MAX_HEAD:
                    self._broken(BadResponse(f"the response head is larger than {MAX_HEAD} bytes"))

    def _broken(self, error: UpstreamError) -> None:
        response = self.response  # None when a drained response completed earlier in the same read
        if response is not None:
            response._fail(error)
        self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost says what that means for the response

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def writable(self, answered: asyncio.Future) -> None:
        """Returns once the transport's write buffer is below its limit, or the upstream has answered (and may
        read no more): a streamed body waits here, so it goes at the upstream's pace and never piles up."""
        waiting = self._writable
        if waiting is not None and not answered.done():
            await asyncio.wait((waiting, answered), return_when=asyncio.FIRST_COMPLETED)

    # --- httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response._complete:  # a second answer to one request: raising stops the parser
            raise BadResponse("bytes after the end of the response")
        self.answered = True
        self._headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self._informational = 100 <= status < 200  # 1xx (e.g. 103 Early Hints): the real answer follows
        if self._informational:
            return
        headers = self._headers
        self._until_close = (
            "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        response = self.response
        response.status = status
        response.headers = headers
        self._headers = {}  # a chunked body's trailers land here, unread: they must not change the headers
        head = response._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._drain is not None:  # nobody reads these bytes any more: count them, keep none
            self._drained += len(body)
            if self._drained > DRAIN_MAX:
                self.abort()
            return
        response = self.response
        response._chunks.append(body)
        response._size += len(body)
        if response._size > response._limit and not self.paused:
            if response._whole:  # raising stops the parser; data_received closes the connection
                response._chunks.clear()
                raise BadResponse(f"the body is larger than {MAX_BODY} bytes")
            self.paused = True
            self.transport.pause_reading()
        waiter = response._waiter  # response._wake() inlined: this runs for every piece of a chunked body
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        response = self.response
        hint = response.headers.get("keep-alive")
        if hint is not None:
            self.idle_s = keep_alive_limit(hint, self.idle_s)
        response._complete = True
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
            self.finished(reusable=True)
            return
        response._wake()

    # --- used by the pool and the response ------------------------------------------------------------

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def drain(self) -> None:
        """Reads the rest of the released response in the background; `on_message_complete` then pools the
        connection. Closed if that takes longer than DRAIN_S or more than DRAIN_MAX bytes."""
        self._drained = 0
        self._drain = asyncio.get_running_loop().call_later(DRAIN_S, self.abort)
        self.resume()

    def finished(self, reusable: bool) -> None:
        """The response is done with; back to the pool if the exchange ended cleanly, else closed."""
        self.response = None
        if (reusable and self.keep_alive and self.sent_whole and not self.closed and not self.paused
                and not self.pool.client.closed):
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        if self.transport is not None:
            self.transport.abort()  # no lingering close: nothing more will be read or written


class _Pool:
    """The keep-alive connections to one origin through one route (direct, or a forward proxy): the most
    recently used is reused first. A request through a proxy to an http origin names the whole URL
    (absolute form) and carries the proxy's credentials; to an https origin it goes through a CONNECT tunnel,
    so it looks as it would on a direct connection."""

    __slots__ = ("origin", "client", "idle", "idle_s", "proxy", "target", "proxy_lines")

    def __init__(self, origin: Origin, client: "Client", proxy: ForwardProxy | None) -> None:
        self.origin = origin
        self.client = client
        self.idle: collections.deque[_Connection] = collections.deque()
        self.idle_s = IDLE_S
        self.proxy = proxy
        absolute = proxy is not None and not origin.tls
        self.target = f"http://{origin.host_header}" if absolute else ""  # put before each request's path
        self.proxy_lines = proxy.header_lines if absolute else ""  # and these before its headers

    def put(self, conn: _Connection) -> None:
        if conn.idle_s <= 0:  # the upstream keeps no idle connection open long enough to be worth keeping
            conn.abort()
            return
        conn.reused = True
        conn.expires = time.monotonic() + conn.idle_s
        self.idle.append(conn)
        if len(self.idle) > MAX_IDLE:
            self.idle.popleft().abort()

    async def connection(self, connect_timeout_s: float) -> _Connection:
        idle = self.idle
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.expires > now and not conn.transport.is_closing():
                    return conn
                conn.abort()
        return await self.connect(connect_timeout_s)

    async def connect(self, connect_timeout_s: float) -> _Connection:
        """A new connection: to the origin, or through the proxy (a CONNECT tunnel for https)."""
        origin, proxy = self.origin, self.proxy
        loop = asyncio.get_running_loop()
        tls = self.client.tls_context() if origin.tls else None
        host, port = (origin.host, origin.port) if proxy is None else (proxy.host, proxy.port)
        sock = None
        try:
            async with asyncio.timeout(connect_timeout_s):
                if proxy is not None and proxy.problem:
                    raise OSError(proxy.problem)
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                # Happy eyeballs (RFC 8305), as aiohttp does: a host with a broken IPv6 route still connects
                # over IPv4 250 ms later instead of spending the whole connect timeout on the first address.
                sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=0.25, interleave=1)
                if proxy is not None and tls is not None:
                    await open_tunnel(loop, sock, proxy, origin.host, origin.port)
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), sock=sock, ssl=tls, server_hostname=origin.host if tls else None,
                )
        except BaseException as exc:
            if sock is not None:  # the loop never took it (as aiohttp does: uvloop would leak it otherwise)
                sock.close()
            where = f"{origin.host}:{origin.port}"
            if proxy is not None:  # the proxy's host and port only: its credentials are never shown
                where = f"{where} through proxy {proxy.shown}"
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no connection to {where} in {connect_timeout_s:g}s") from None
            if isinstance(exc, (OSError, UnicodeError)):  # OSError covers ssl.SSLError; UnicodeError: a bad IDNA name
                raise ConnectFailed(f"cannot connect to {where}: {exc}"[:300]) from None
            raise
        return conn

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()


class Client:
    """Every upstream origin's connection pool; opened with the app, closed with it. The proxy variables are
    read from `environ` (the process's environment by default) once, here."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._pools: dict[Origin, _Pool] = {}
        self._tls: ssl.SSLContext | None = None
        self._proxies = ProxyEnv(os.environ if environ is None else environ)
        self.closed = False

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # the system's trust store, as aiohttp and curl use; SSL_CERT_FILE is honoured
            self._tls = ssl.create_default_context()
        return self._tls

    def _pool(self, origin: Origin) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:  # the one place the proxy variables are consulted: once per origin
            pool = self._pools[origin] = _Pool(origin, self, self._proxies.proxy_for(origin.host, origin.port,
                                                                                     origin.tls))
        return pool

    def limit_idle(self, origin: Origin, idle_s: float) -> None:
        """Connections to `origin` idle longer than `idle_s` are not reused (the lowest limit given wins)."""
        pool = self._pool(origin)
        pool.idle_s = min(pool.idle_s, idle_s)

    async def request(self, origin: Origin, method: str, path: str, headers: dict[str, str], body: bytes,
                      connect_timeout_s: float) -> Response:
        """Sends one request and returns once the response head has arrived (the body follows)."""
        if self.closed:
            raise ConnectFailed("the upstream client is closed")
        pool = self._pools.get(origin) or self._pool(origin)
        head = _request_head(method, pool.target, path, origin.host_header, pool.proxy_lines, headers, len(body))
        conn = await pool.connection(connect_timeout_s)
        while True:
            if conn.closed:  # lost between its connect and now: nothing was sent, nothing would ever answer
                raise Disconnected("the connection closed before the request went out")
            conn.answered = False
            conn.head_size = 0
            response = conn.response = Response(conn)
            response._head = asyncio.get_running_loop().create_future()
            try:
                conn.transport.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.transport.write(body)
                await response._head
                return response
            except Disconnected:
                response.close()
                if not conn.reused or conn.answered:
                    raise
            except BaseException:  # a deadline or a broken connection: its state is unknown, so it is closed
                response.close()
                raise
            finally:
                response._head = None
            # The upstream closed the pooled connection while it was idle (our request crossed its FIN): no byte
            # of an answer came, so the request goes once more, on a new connection (never reused: so only once).
            conn = await pool.connect(connect_timeout_s)

    async def request_stream(self, origin: Origin, method: str, path: str, headers: dict[str, str],
                             body: AsyncIterator[bytes], connect_timeout_s: float) -> Response:
        """Sends one request whose body comes in pieces (`Transfer-Encoding: chunked`), each written once the
        connection can take it, so a large upload is never held whole; returns once the response head has
        arrived. Always on a new connection: a body read once cannot be sent again, so the pooled connection's
        one resend (a FIN crossing the request) is not available to it. An upstream that answers before the
        body is whole (a 413, a 401) stops the sending; that connection is then closed, not pooled. When `body`
        raises (the client's upload broke or broke a rule) the connection is closed and the error goes on."""
        if self.closed:
            raise ConnectFailed("the upstream client is closed")
        pool = self._pools.get(origin) or self._pool(origin)
        head = _request_head(method, pool.target, path, origin.host_header, pool.proxy_lines, headers, None)
        conn = await pool.connect(connect_timeout_s)
        conn.answered = False
        conn.head_size = 0
        response = conn.response = Response(conn)
        response._head = head_arrived = asyncio.get_running_loop().create_future()
        transport = conn.transport
        try:
            transport.write(head)
            whole = False
            async for piece in body:
                if head_arrived.done() or conn.closed:
                    break
                if piece:
                    transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    await conn.writable(head_arrived)
            else:
                whole = not conn.closed
                if whole:
                    transport.write(b"0\r\n\r\n")
            conn.sent_whole = whole
            await head_arrived
            return response
        except BaseException:  # the client's body failed, a deadline, a broken connection: the connection goes
            response.close()
            raise
        finally:
            response._head = None

    async def close(self) -> None:
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def keep_alive_limit(value: str, idle_s: float) -> float:
    """How long a connection may idle before reuse, given the upstream's `Keep-Alive: timeout=N, max=M`: a
    second short of N (half of N below 2 s), so a request does not race the upstream's own close."""
    for part in value.split(","):
        name, _, number = part.partition("=")
        if name.strip().lower() == "timeout":
            try:
                timeout = float(number.strip())
            except ValueError:
                return idle_s
            return min(idle_s, timeout - 1.0 if timeout >= 2.0 else timeout / 2)
    return idle_s


def _request_head(method: str, target: str, path: str, host: str, proxy_lines: str, headers: dict[str, str],
                  length: int | None) -> bytes:
    """The request line and headers; `length` None: a chunked body."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):  # one line break per header
        _check_headers(headers)
    return (f"{method} {target}{path} HTTP/1.1\r\nHost: {host}\r\n{proxy_lines}{lines}"
            + ("Transfer-Encoding: chunked\r\n\r\n" if length is None else f"Content-Length: {length}\r\n\r\n")
            ).encode("utf-8", "surrogateescape")


def _check_headers(headers: dict[str, str]) -> None:
    """Refuses a header that would split the request: CR or LF in its name or value."""
    for name, value in headers.items():
        if any(c in name for c in "\r\n") or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} cannot be sent: it holds a line break")
