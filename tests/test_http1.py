"""The upstream HTTP/1.1 client (proxy/upstream/http1.py) against real local servers: aiohttp apps on port 0 for the
ordinary cases, raw asyncio servers for what an aiohttp server will not do (garbage, 1xx, early closes)."""

from __future__ import annotations

import asyncio
import errno
import gc
import re
import socket
import ssl

import pytest
import trustme
from aiohttp import web

from proxy.upstream import http1
from proxy.upstream.http1 import BadResponse, Client, ConnectFailed, ConnectTimeout, Disconnected, Origin
from proxy.sim.testing import LateEndUpstream
from tests.conftest import closed_port_url, read_request, until


def origin_of(port: int, tls: bool = False) -> Origin:
    return Origin.of("https" if tls else "http", "127.0.0.1", port)


async def post(client: Client, port: int, path: str = "/echo", body: bytes = b"{}", headers=None, tls=False):
    return await client.request(origin_of(port, tls), "POST", path, headers or {}, body, 2.0)


async def exchange(client: Client, port: int) -> tuple[int, bytes]:
    """One whole request on `client`: the answer's status and body, the connection released."""
    response = await post(client, port)
    try:
        return response.status, await response.read()
    finally:
        response.release()


@pytest.fixture
async def client():
    c = Client()
    yield c
    await c.close()


class Counted:
    """An aiohttp app that counts the connections it has seen and answers a few fixed routes."""

    def __init__(self) -> None:
        self.peers: set = set()
        self.seen_headers: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/chunked", self.chunked)
        app.router.add_post("/close", self.close)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport.get_extra_info("peername"))
        self.seen_headers.append(dict(request.headers))
        body = await request.read()
        return web.Response(body=body, headers={"X-Length": str(len(body)), "X-Repeated": "a"})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self.peers.add(request.transport.get_extra_info("peername"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(5):
            await response.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def close(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport.get_extra_info("peername"))
        return web.Response(body=b"bye", headers={"Connection": "close"})


@pytest.fixture
async def counted(aiohttp_server):
    server_app = Counted()
    server = await aiohttp_server(server_app.app())
    return server_app, server.port


BLOB = bytes(range(256)) * (3 * http1.HIGH_WATER // 256)  # three times what a reader may leave unread


async def stream_blob(request: web.Request) -> web.StreamResponse:
    """Answers with BLOB in 16 KiB writes, without a length."""
    response = web.StreamResponse()
    await response.prepare(request)
    for i in range(0, len(BLOB), 16384):
        await response.write(BLOB[i : i + 16384])
    await response.write_eof()
    return response


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"


class Connections:
    """A raw server handler that answers each request on a connection with the next of `answers` (bytes, or a
    callable of the writer for anything odder), and records connections and the requests they carried."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.count = 0
        self.closed = 0  # connections the client closed
        self.gone = asyncio.Event()  # set when a connection is closed by the client

    async def __call__(self, reader, writer) -> None:
        self.count += 1
        try:
            while self.answers:
                try:
                    self.requests.append(await read_request(reader))
                except asyncio.IncompleteReadError:
                    break
                answer = self.answers.pop(0)
                if isinstance(answer, bytes):
                    writer.write(answer)
                else:
                    await answer(writer)
                await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        self.closed += 1
        self.gone.set()


# --- ordinary exchanges -------------------------------------------------------------------------------


async def test_body_headers_and_status_arrive(client, counted):
    server_app, port = counted
    response = await post(client, port, body=b'{"hello": "world"}', headers={"x-trace": "1"})
    assert response.status == 200
    assert await response.read() == b'{"hello": "world"}'
    assert response.headers["x-length"] == "18"  # names are lower case
    assert response.content_type == "application/octet-stream"
    assert response.complete and await response.readany() == b""
    response.release()
    sent = server_app.seen_headers[0]
    assert sent["Host"] == f"127.0.0.1:{port}"
    assert sent["Content-Length"] == "18"
    assert sent["x-trace"] == "1"


async def test_keep_alive_connection_is_reused(client, counted):
    server_app, port = counted
    for _ in range(5):
        response = await post(client, port)
        await response.read()
        response.release()
    assert len(server_app.peers) == 1


async def test_concurrent_requests_each_get_a_connection_and_all_are_pooled(client, counted):
    server_app, port = counted

    async def one(i: int) -> bytes:
        response = await post(client, port, body=b"%d" % i)
        try:
            return await response.read()
        finally:
            response.release()

    assert await asyncio.gather(*(one(i) for i in range(8))) == [b"%d" % i for i in range(8)]
    peers = set(server_app.peers)
    await asyncio.gather(*(one(i) for i in range(8)))
    assert server_app.peers == peers  # the second round found all eight in the pool


async def test_chunked_body_read_as_it_arrives(client, counted):
    server_app, port = counted
    response = await post(client, port, "/chunked")
    pieces = []
    while chunk := await response.readany():
        pieces.append(chunk)
    response.release()
    assert b"".join(pieces) == b"".join(b"data: %d\n\n" % i for i in range(5))
    assert len(pieces) >= 2  # the sleeps between writes mean the events did not come in one read
    response = await post(client, port, "/chunked")
    assert await response.read() == b"".join(b"data: %d\n\n" % i for i in range(5))
    response.release()
    assert len(server_app.peers) == 1  # a chunked exchange read to its end keeps the connection


async def test_large_request_body_is_sent_whole(client, counted):
    _, port = counted
    body = b"x" * 300_000
    response = await post(client, port, body=body)
    assert await response.read() == body
    response.release()


async def test_connection_close_is_not_reused(client, counted):
    server_app, port = counted
    for _ in range(3):
        response = await post(client, port, "/close")
        assert await response.read() == b"bye"
        response.release()
    assert len(server_app.peers) == 3


async def test_a_response_not_read_to_its_end_closes_its_connection(client, counted):
    server_app, port = counted
    response = await post(client, port, "/chunked")
    await response.readany()
    response.release()
    response = await post(client, port)
    await response.read()
    response.release()
    assert len(server_app.peers) == 2


async def test_idle_connection_closed_by_the_server_is_not_reused(client, aiohttp_server):
    server_app = Counted()
    server = await aiohttp_server(server_app.app(), keepalive_timeout=0.05)
    response = await post(client, server.port)
    await response.read()
    response.release()
    idle = client._pools[origin_of(server.port)].idle
    await until(lambda: not idle or idle[-1].closed, what="the server closing the idle connection")
    response = await post(client, server.port)
    assert await response.read() == b"{}"
    response.release()
    assert len(server_app.peers) == 2


async def test_idle_connection_older_than_the_limit_is_replaced(client, counted):
    server_app, port = counted
    client.limit_idle(origin_of(port), 0.05)
    client.limit_idle(origin_of(port), 30.0)  # the lowest limit given wins
    assert await exchange(client, port) == (200, b"{}")
    conn = client._pools[origin_of(port)].idle[-1]
    await asyncio.sleep(0.1)  # longer than the limit (the server would keep it open for minutes)
    assert await exchange(client, port) == (200, b"{}")
    assert conn.closed and len(server_app.peers) == 2


async def test_streamed_body_over_the_high_water_mark_pauses_reading_and_loses_nothing(client, aiohttp_server):
    app = web.Application()
    app.router.add_post("/big", stream_blob)
    server = await aiohttp_server(app)
    response = await post(client, server.port, "/big")
    # A reader that does not read: the client must stop reading from the socket.
    await until(lambda: response._conn.paused, what="reading paused")
    received = bytearray()
    while chunk := await response.readany():
        received += chunk
    response.release()
    assert bytes(received) == BLOB


# --- failures -----------------------------------------------------------------------------------------


async def test_refused_connection_is_connect_failed(client):
    port = int(closed_port_url().split(":")[2].split("/")[0])
    with pytest.raises(ConnectFailed, match=f"^cannot connect to 127.0.0.1:{port}: \\[Errno {errno.ECONNREFUSED}\\]"):
        await post(client, port)


async def test_a_name_is_resolved_at_connect_time_and_named_in_the_host_header(client, counted):
    server_app, port = counted
    response = await client.request(Origin.of("http", "localhost", port), "POST", "/echo", {}, b"{}", 2.0)
    assert await response.read() == b"{}"
    response.release()
    assert server_app.seen_headers[0]["Host"] == f"localhost:{port}"


async def test_every_address_of_a_name_is_tried_until_one_answers(client, counted, monkeypatch):
    # Whether `localhost` has an IPv6 address depends on the machine, so the name's addresses are given here:
    # the first refuses (nothing listens on it), the second is the server. Both connects are real.
    server_app, port = counted
    refused = int(closed_port_url().split(":")[2].split("/")[0])
    loop = asyncio.get_running_loop()
    lookups = []

    def resolving_to(*ports):
        async def getaddrinfo(host, _port, *, type):
            lookups.append(host)
            return [(socket.AF_INET, type, 6, "", ("127.0.0.1", p)) for p in ports]
        return getaddrinfo

    monkeypatch.setattr(loop, "getaddrinfo", resolving_to(refused, port))
    response = await client.request(Origin.of("http", "api.example.test", port), "POST", "/echo", {}, b"{}", 5.0)
    assert await response.read() == b"{}"
    response.release()
    assert lookups == ["api.example.test"]
    assert server_app.seen_headers[0]["Host"] == f"api.example.test:{port}"

    monkeypatch.setattr(loop, "getaddrinfo", resolving_to(refused, refused))
    with pytest.raises(ConnectFailed, match=f"cannot connect to other.example.test:{port}: "):  # all refuse
        await client.request(Origin.of("http", "other.example.test", port), "POST", "/echo", {}, b"{}", 5.0)


async def test_a_name_that_does_not_resolve_is_a_connect_failure(client, monkeypatch):
    # The resolver's answer is given (a real one depends on the machine's DNS: NXDOMAIN at once, or a timeout
    # where DNS is unreachable); what the client makes of it is the point.
    async def nxdomain(host, port, *, type):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", nxdomain)
    expected = rf"^cannot connect to no-such-host\.invalid:80: \[Errno {socket.EAI_NONAME}\] Name or service"
    with pytest.raises(ConnectFailed, match=expected):
        await client.request(Origin.of("http", "no-such-host.invalid", None), "POST", "/", {}, b"{}", 1.0)


async def test_connect_that_never_completes_is_connect_timeout(client, black_hole_url):
    port = int(black_hole_url.split(":")[2].split("/")[0])
    with pytest.raises(ConnectTimeout, match=f"^no connection to 127.0.0.1:{port} in 0.1s$"):
        await client.request(origin_of(port), "POST", "/x", {}, b"{}", 0.1)


async def test_close_before_any_answer_is_disconnected(client, raw_server):
    async def handler(reader, writer):
        await read_request(reader)
        writer.close()

    port = await raw_server(handler)
    with pytest.raises(Disconnected, match="^the upstream closed the connection$"):
        await post(client, port)


async def test_close_in_the_middle_of_the_body_is_disconnected_after_the_bytes_that_came(client, raw_server):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    port = await raw_server(handler)
    response = await post(client, port)
    assert response.status == 200
    assert await response.readany() == b"only part"
    with pytest.raises(Disconnected, match="^the upstream closed the connection$"):
        await response.readany()
    response.release()


async def test_garbage_is_bad_response(client, raw_server):
    port = await raw_server(Connections(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    with pytest.raises(BadResponse, match="not HTTP/1.1"):
        await post(client, port)


async def test_informational_responses_are_skipped(client, raw_server):
    port = await raw_server(Connections(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Real: yes\r\n\r\nok"
    ))
    response = await post(client, port)
    assert (response.status, response.headers.get("x-real"), "link" in response.headers) == (201, "yes", False)
    assert await response.read() == b"ok"
    response.release()


async def test_body_that_ends_with_the_connection(client, raw_server):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"the end")
        writer.close()

    port = await raw_server(handler)
    response = await post(client, port)
    assert await response.read() == b"until the end"
    response.release()


async def test_cancelled_request_closes_its_connection(client, counted, raw_server):
    _, port = counted
    asked, gone = asyncio.Event(), asyncio.Event()

    async def never(reader, writer):
        await read_request(reader)
        asked.set()
        await reader.read()  # returns when the client closes
        gone.set()

    slow_port = await raw_server(never)
    request = asyncio.create_task(post(client, slow_port))
    await asyncio.wait_for(asked.wait(), 5)  # cancelled while it waits for the answer, as a deadline would
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(gone.wait(), 5)
    assert not client._pools[origin_of(slow_port)].idle  # the connection whose answer never came is closed
    response = await post(client, port)
    assert await response.read() == b"{}"
    response.release()


async def test_header_with_a_line_break_is_refused(client, counted):
    _, port = counted
    with pytest.raises(ValueError, match="line break"):
        await post(client, port, headers={"x-evil": "a\r\nx-injected: 1"})


@pytest.mark.parametrize("name, value", [
    ("x-evil", "a\rx-injected: 1"),  # a bare CR: some servers end a header line there
    ("x-evil", "a\nx-injected: 1"),
    ("x-evil", "a\r\nx-injected: 1"),
    ("x-evil\r", "a"),
    ("x-evil\rx-injected", "1"),
])
async def test_a_header_with_any_line_break_is_refused_before_anything_is_sent(name, value, client, raw_server):
    server = Connections(OK)
    port = await raw_server(server)
    with pytest.raises(ValueError, match=re.escape(f"header {name!r} cannot be sent: it holds a line break")):
        await post(client, port, headers={"x-fine": "yes", name: value})
    assert server.count == 0  # refused before a connection was even taken


async def test_a_connection_paused_for_reading_is_never_pooled(client, raw_server):
    # A whole body one byte over the high-water mark: reading pauses on its last byte, and the response is
    # complete. Released unread, the connection must close: paused, it would never see the next answer.
    body = b"b" * (http1.HIGH_WATER + 1)
    server = Connections(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), SECOND)
    port = await raw_server(server)
    response = await post(client, port)
    conn = response._conn
    await until(lambda: response.complete, what="the whole body arrived")
    assert conn.paused
    response.release()
    assert conn.closed and not client._pools[origin_of(port)].idle
    assert await asyncio.wait_for(exchange(client, port), 5) == (200, b"second")
    assert server.count == 2


async def test_the_idle_pool_keeps_at_most_max_idle_connections(client, raw_server, monkeypatch):
    monkeypatch.setattr(http1, "MAX_IDLE", 2)
    server = Connections(OK, OK, OK, OK)  # one answer each for four connections
    port = await raw_server(server)
    responses = [await asyncio.wait_for(post(client, port), 5) for _ in range(4)]  # four at once: four connections
    conns = [r._conn for r in responses]
    for response in responses:
        await response.read()
        response.release()
    pool = client._pools[origin_of(port)]
    assert list(pool.idle) == conns[2:]  # the two released last are kept
    assert conns[0].closed and conns[1].closed
    await until(lambda: server.count == 4 and server.closed == 2, what="the upstream seeing two connections closed")


async def test_closed_client_refuses(counted):
    _, port = counted
    c = Client()
    await c.close()
    with pytest.raises(ConnectFailed, match="closed"):
        await post(c, port)


# --- TLS ----------------------------------------------------------------------------------------------


async def test_tls_upstream_verified_against_the_trust_store(aiohttp_server, tmp_path, monkeypatch):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server_app = Counted()
    server = await aiohttp_server(server_app.app(), ssl=server_ctx)

    untrusting = Client()
    with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await post(untrusting, server.port, tls=True)
    await untrusting.close()

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # how an operator points the proxy at a private CA
    trusting = Client()
    for _ in range(2):
        response = await post(trusting, server.port, body=b'{"over": "tls"}', tls=True)
        assert await response.read() == b'{"over": "tls"}'
        response.release()
    await trusting.close()
    assert len(server_app.peers) == 1
    assert server_app.seen_headers[0]["Host"] == f"127.0.0.1:{server.port}"


def test_origin_host_header():
    assert Origin.of("https", "api.groq.com", None).host_header == "api.groq.com"
    assert Origin.of("http", "127.0.0.1", 8080).host_header == "127.0.0.1:8080"
    assert Origin.of("http", "::1", 80).host_header == "[::1]"


# --- adversarial review -------------------------------------------------------------------------------


async def test_body_over_the_high_water_mark_is_read_whole_and_keeps_its_connection(client, aiohttp_server):
    peers = set()

    async def whole(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(body=BLOB)

    async def streamed(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))
        return await stream_blob(request)

    app = web.Application()
    app.router.add_post("/whole", whole)
    app.router.add_post("/streamed", streamed)
    server = await aiohttp_server(app)
    response = await post(client, server.port, "/whole")  # a big non-streamed answer, as _plain reads it
    assert await asyncio.wait_for(response.read(), 5) == BLOB
    response.release()
    response = await post(client, server.port, "/streamed")
    # A stream reader that fell behind, then wants the rest at once.
    await until(lambda: response._conn.paused, what="reading paused")
    first = await response.readany()
    assert first + await asyncio.wait_for(response.read(), 5) == BLOB
    response.release()
    assert len(peers) == 1  # neither left its connection paused: both went back to the pool


async def test_a_second_response_to_one_request_is_not_taken_for_the_first(client, raw_server):
    server = Connections(
        OK + b"HTTP/1.1 500 Smuggled\r\nContent-Length: 5\r\n\r\nextra",
        SECOND,
    )
    port = await raw_server(server)
    response = await post(client, port)
    assert (response.status, await response.read()) == (200, b"ok")
    response.release()
    await asyncio.wait_for(server.gone.wait(), 5)  # the connection that said too much was closed, not pooled
    assert await exchange(client, port) == (200, b"second")
    assert server.count == 2


async def test_bytes_after_a_complete_response_close_the_connection_even_in_pieces(client, raw_server):
    async def answer_then_a_fragment(writer):
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 2")  # the start of an answer to nothing: would poison the next exchange

    server = Connections(answer_then_a_fragment, SECOND)
    port = await raw_server(server)
    response = await post(client, port)
    assert await response.read() == b"ok"
    await asyncio.wait_for(server.gone.wait(), 5)  # arrived while the response was held: the connection closes
    response.release()
    assert await exchange(client, port) == (200, b"second")
    assert server.count == 2


async def test_trailers_do_not_change_the_headers_and_chunk_extensions_are_ignored(client, raw_server):
    server = Connections(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\nTrailer: x-a\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6;name=\"v\"\r\n world\r\n0\r\nx-a: 1\r\ncontent-type: text/html\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    )
    port = await raw_server(server)
    response = await post(client, port)
    assert await response.read() == b"hello world"
    assert response.headers.get("content-type") == "text/event-stream" and "x-a" not in response.headers
    response.release()
    for status in (204, 304):  # no body, no length, yet complete: the connection stays usable
        response = await post(client, port)
        assert (response.status, response.complete, await response.read()) == (status, True, b"")
        response.release()
    assert server.count == 1


async def test_switching_protocols_is_a_bad_response(client, raw_server):
    server = Connections(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    port = await raw_server(server)
    with pytest.raises(BadResponse, match="an upgrade nobody asked for"):
        await post(client, port)


async def test_release_after_the_client_closed_closes_the_connection(raw_server):
    server = Connections(OK)
    port = await raw_server(server)
    c = Client()
    response = await post(c, port)
    await c.close()  # the app shuts down while a request is in flight
    assert await response.read() == b"ok"
    response.release()
    await asyncio.wait_for(server.gone.wait(), 5)


async def test_release_twice_and_close_after_release_change_nothing(client, raw_server):
    server = Connections(OK, OK, OK)
    port = await raw_server(server)
    response = await post(client, port)
    await response.read()
    response.release()
    response.release()
    response.close()
    assert len(client._pools[origin_of(port)].idle) == 1  # pooled once, and not closed by the late close()
    for _ in range(2):
        response = await post(client, port)
        assert await response.read() == b"ok"
        response.release()
    assert server.count == 1


async def test_bytes_while_idle_in_the_pool_close_the_connection(client, raw_server):
    released = asyncio.Event()

    async def answer_then_junk_when_idle(writer):
        writer.write(OK)
        await writer.drain()
        await released.wait()
        writer.write(b"junk")

    server = Connections(answer_then_junk_when_idle, SECOND)
    port = await raw_server(server)
    response = await post(client, port)
    await response.read()
    response.release()
    released.set()
    await asyncio.wait_for(server.gone.wait(), 5)
    _, body = await exchange(client, port)
    assert body == b"second"
    assert server.count == 2


async def test_server_closing_right_after_a_keep_alive_answer_costs_no_request(client, raw_server):
    answered = asyncio.Event()

    async def answer_and_close(writer):
        writer.write(OK)
        await writer.drain()
        answered.set()
        writer.close()

    server = Connections(answer_and_close, OK)
    port = await raw_server(server)
    response = await post(client, port)
    await answered.wait()
    await response.read()
    response.release()
    # Reused at once, maybe before the close is seen: then the request dies with the connection without an
    # answer byte and goes again on a new one; or the close was seen first and a new connection answers.
    # Either way the caller gets the answer, from a second connection.
    assert await asyncio.wait_for(exchange(client, port), 5) == (200, b"ok")
    assert server.count == 2


async def test_cancelled_body_read_closes_the_connection(client, raw_server):
    async def part(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")

    server = Connections(part)
    port = await raw_server(server)
    response = await post(client, port)
    assert await response.readany() == b"some"
    for read in (response.readany, response.read):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await read()
    response.release()
    await asyncio.wait_for(server.gone.wait(), 5)
    assert not client._pools[origin_of(port)].idle


async def test_cancelled_connect_and_tls_handshake_leave_nothing_behind(client, raw_server, black_hole_url):
    hello, gone = asyncio.Event(), asyncio.Event()

    async def never_answers_the_hello(reader, writer):
        await reader.read(1)  # the ClientHello is arriving: the handshake is under way
        hello.set()
        await reader.read()  # returns when the client gives up
        gone.set()

    port = await raw_server(never_answers_the_hello)
    request = asyncio.create_task(post(client, port, tls=True))
    # Cancelled once the server has the hello, not after a fixed time: on a busy machine a short timeout can
    # end while the name lookup is still in the thread pool, and the handshake would never be tested.
    await asyncio.wait_for(hello.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(gone.wait(), 5)  # the socket was closed, not left to the garbage collector
    assert not client._pools[origin_of(port, True)].idle

    black_hole = int(black_hole_url.split(":")[2].split("/")[0])
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # in the lookup or the connect: either way nothing may stay open
            await client.request(origin_of(black_hole), "POST", "/x", {}, b"{}", 10.0)
    gc.collect()  # an unclosed socket would warn now (ResourceWarning), and warnings are errors here


async def test_non_ascii_header_values_go_out_as_the_client_sent_them(client, raw_server):
    server = Connections(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    port = await raw_server(server)
    raw = b"\xff\xfe latin-1"
    headers = {"x-name": "caf\u00e9 \u2603", "x-raw": raw.decode("utf-8", "surrogateescape")}  # as aiohttp decodes
    response = await post(client, port, headers=headers)
    response.release()
    sent = server.requests[0]
    assert "x-name: caf\u00e9 \u2603\r\n".encode() in sent and b"x-raw: " + raw + b"\r\n" in sent


async def test_tls_close_notify_ends_a_body_and_retires_an_idle_connection(tmp_path, monkeypatch):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/until-close" in head:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        else:
            writer.write(OK)
        await writer.drain()
        writer.close()  # close_notify, then the TCP close

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    c = Client()
    response = await c.request(origin_of(port, True), "POST", "/until-close", {}, b"", 2.0)
    assert await response.read() == b"until the end"
    response.release()
    response = await c.request(origin_of(port, True), "POST", "/keep-alive", {}, b"", 2.0)
    assert await response.read() == b"ok"
    response.release()
    idle = c._pools[origin_of(port, True)].idle
    await until(lambda: not idle or idle[-1].closed, what="the server's close reaching the pooled connection")
    response = await c.request(origin_of(port, True), "POST", "/keep-alive", {}, b"", 2.0)
    assert await response.read() == b"ok"
    response.release()
    await c.close()
    server.close()
    await server.wait_closed()
    assert len(connections) == 3


# --- draining a released stream -------------------------------------------------------------------------


async def stream_until_done(client: Client, port: int):
    """Reads a LateEndUpstream stream up to its [DONE], releases it for draining; returns its connection."""
    response = await post(client, port, LateEndUpstream.path)
    got = b""
    while not got.endswith(b"[DONE]\n\n"):
        got += await response.readany()
    assert not response.complete  # the chunked end is still on its way
    conn = response._conn
    response.release(drain=True)
    return conn


async def test_a_stream_released_at_its_end_keeps_its_connection_once_the_last_chunk_comes(client, aiohttp_server):
    upstream = LateEndUpstream(late_s=0.05)
    port = (await aiohttp_server(upstream.app())).port
    conn = await stream_until_done(client, port)
    pool = client._pools[origin_of(port)]
    await until(lambda: conn in pool.idle, what="the drained connection back in the pool")
    await stream_until_done(client, port)
    assert len(set(upstream.peers)) == 1


async def test_a_drain_that_takes_too_long_closes_the_connection(client, aiohttp_server, monkeypatch):
    monkeypatch.setattr(http1, "DRAIN_S", 0.05)
    upstream = LateEndUpstream(late_s=None)
    port = (await aiohttp_server(upstream.app())).port
    conn = await stream_until_done(client, port)
    await until(lambda: conn.closed, what="the connection given up")
    assert conn not in client._pools[origin_of(port)].idle
    await stream_until_done(client, port)
    assert len(set(upstream.peers)) == 2


async def test_a_drain_that_brings_too_many_bytes_closes_the_connection(client, aiohttp_server, monkeypatch):
    monkeypatch.setattr(http1, "DRAIN_MAX", 100)
    upstream = LateEndUpstream(late_s=0.01, tail=b"x" * 1000)
    port = (await aiohttp_server(upstream.app())).port
    conn = await stream_until_done(client, port)
    await until(lambda: conn.closed, what="the connection given up")
    assert conn not in client._pools[origin_of(port)].idle
