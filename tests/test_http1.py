"""The upstream HTTP/1.1 client (proxy/http1.py) against real local servers: aiohttp apps on port 0 for the
ordinary cases, raw asyncio servers for what an aiohttp server will not do (garbage, 1xx, early closes)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme
from aiohttp import web

from proxy import http1
from proxy.http1 import BadResponse, Client, ConnectFailed, ConnectTimeout, Disconnected, Origin
from tests.conftest import closed_port_url


def origin_of(port: int, tls: bool = False) -> Origin:
    return Origin.of("https" if tls else "http", "127.0.0.1", port)


async def post(client: Client, port: int, path: str = "/echo", body: bytes = b"{}", headers=None, tls=False):
    return await client.request(origin_of(port, tls), "POST", path, headers or {}, body, 2.0)


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


@pytest.fixture
async def raw_server():
    """`await raw_server(handler)` starts a TCP server whose `handler(reader, writer)` writes whatever bytes
    the test wants; returns its port. Every connection and the server are closed at the end of the test."""
    servers, tasks = [], []

    async def start(handler) -> int:
        async def serve(reader, writer):
            tasks.append(asyncio.current_task())
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


# --- ordinary exchanges -------------------------------------------------------------------------------


async def test_body_headers_and_status_arrive(client, counted):
    server_app, port = counted
    response = await post(client, port, body=b'{"hello": "world"}', headers={"x-trace": "1"})
    assert response.status == 200
    assert await response.read() == b'{"hello": "world"}'
    assert response.headers["x-length"] == "18"  # names are lower case
    assert response.content_type == "application/octet-stream"
    assert response.at_eof
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
    await asyncio.sleep(0.3)  # the server has closed the idle connection by now
    response = await post(client, server.port)
    assert await response.read() == b"{}"
    response.release()
    assert len(server_app.peers) == 2


async def test_idle_connection_older_than_the_limit_is_replaced(client, counted, monkeypatch):
    server_app, port = counted
    response = await post(client, port)
    await response.read()
    response.release()
    monkeypatch.setattr(http1, "IDLE_S", 0.0)
    response = await post(client, port)
    await response.read()
    response.release()
    assert len(server_app.peers) == 2


async def test_streamed_body_over_the_high_water_mark_pauses_reading_and_loses_nothing(client, aiohttp_server):
    size = 3 * http1.HIGH_WATER
    blob = bytes(range(256)) * (size // 256)

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(0, len(blob), 16384):
            await response.write(blob[i : i + 16384])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/big", big)
    server = await aiohttp_server(app)
    response = await post(client, server.port, "/big")
    for _ in range(200):  # a reader that does not read: the client must stop reading from the socket
        if response._conn.paused:
            break
        await asyncio.sleep(0.01)
    assert response._conn.paused
    received = bytearray()
    while chunk := await response.readany():
        received += chunk
    response.release()
    assert bytes(received) == blob


# --- failures -----------------------------------------------------------------------------------------


async def test_refused_connection_is_connect_failed(client):
    port = int(closed_port_url().split(":")[2].split("/")[0])
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await post(client, port)


async def test_connect_that_never_completes_is_connect_timeout(client, black_hole_url):
    port = int(black_hole_url.split(":")[2].split("/")[0])
    with pytest.raises(ConnectTimeout):
        await client.request(origin_of(port), "POST", "/x", {}, b"{}", 0.1)


async def test_close_before_any_answer_is_disconnected(client, raw_server):
    async def handler(reader, writer):
        await read_request(reader)
        writer.close()

    port = await raw_server(handler)
    with pytest.raises(Disconnected):
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
    with pytest.raises(Disconnected):
        await response.readany()
    response.release()


async def test_garbage_is_bad_response(client, raw_server):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    port = await raw_server(handler)
    with pytest.raises(BadResponse, match="not HTTP/1.1"):
        await post(client, port)


async def test_informational_responses_are_skipped(client, raw_server):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Real: yes\r\n\r\nok")
        await writer.drain()
        await reader.read()

    port = await raw_server(handler)
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

    async def never(reader, writer):
        await read_request(reader)
        await asyncio.sleep(10)

    slow_port = await raw_server(never)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await post(client, slow_port)
    pool = client._pools[origin_of(slow_port)]
    assert not pool.idle  # the connection whose answer never came is not offered again
    response = await post(client, port)
    assert await response.read() == b"{}"
    response.release()


async def test_header_with_a_line_break_is_refused(client, counted):
    _, port = counted
    with pytest.raises(ValueError, match="line break"):
        await post(client, port, headers={"x-evil": "a\r\nx-injected: 1"})


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
