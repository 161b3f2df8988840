"""A file upload goes upstream as it arrives (chunked), never held whole: through the proxy, and in the upstream
client itself (an upstream that answers before the body is whole stops the sending)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from proxy.upstream.http1 import Client, Origin
from tests.conftest import config_for

HALF = 1024 * 1024


async def read_chunked(reader: asyncio.StreamReader, on_bytes) -> bytes:
    """A chunked request body, as it comes; `on_bytes(total)` after each chunk."""
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        on_bytes(len(body))


async def test_an_upload_reaches_the_provider_before_the_client_has_sent_it_all(raw_server, start_proxy):
    half_seen = asyncio.Event()
    received: dict = {}

    async def provider(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        received["head"] = head
        received["body"] = await read_chunked(reader, lambda n: n >= HALF // 2 and half_seen.set())
        answer = orjson.dumps({"id": "file_streamed", "object": "file", "bytes": 2 * HALF, "purpose": "batch"})
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                     % (len(answer), answer))
        await writer.drain()

    port = await raw_server(provider)
    base = await start_proxy(config_for(f"http://127.0.0.1:{port}/openai/v1"))

    async def upload():
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(16):
            yield b"a" * (HALF // 16)
        # The second half is sent only once the provider has most of the first (the multipart reader keeps one
        # chunk back to look for the boundary): a proxy that held the upload whole
        # would wait for the end that never comes, and this would time out.
        await asyncio.wait_for(half_seen.wait(), 30)
        for _ in range(16):
            yield b"b" * (HALF // 16)
        yield b"\r\n--B--\r\n"

    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/files", data=upload(),
                                headers={"Content-Type": "multipart/form-data; boundary=B"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["id"] == "file_streamed"
    head = received["head"].decode()
    assert "Transfer-Encoding: chunked" in head and "Content-Length" not in head
    assert "Authorization: Bearer sk-test-secret-upstream-key" in head
    boundary = head.split("boundary=")[1].split("\r\n")[0]
    body = received["body"]
    assert body.startswith(f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode())
    assert b"a" * HALF + b"b" * HALF + f"\r\n--{boundary}--\r\n".encode() in body
    assert body.endswith(f"--{boundary}--\r\n".encode())


async def test_an_upstream_that_answers_early_stops_the_sending(raw_server):
    async def refuses(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error": {"message": "too big", "type": "invalid_request_error", "code": null}}'
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        await asyncio.sleep(30)  # reads nothing more: the proxy must not wait on a write that never drains

    port = await raw_server(refuses)
    sent = 0

    async def endless():
        nonlocal sent
        while True:
            sent += 1
            yield b"x" * 65536

    client = Client(environ={})
    try:
        response = await asyncio.wait_for(client.request_stream(Origin.of("http", "127.0.0.1", port), "POST", "/f",
                                                                {}, endless(), 5.0), 30)
        assert response.status == 413
        assert b"too big" in await response.read()
        response.release()
        assert sent < 2000  # far from endless: it stopped once the answer came
        assert not client._pools[Origin.of("http", "127.0.0.1", port)].idle  # not pooled: its request is unfinished
    finally:
        await client.close()


async def test_a_body_that_fails_closes_the_connection_and_raises(raw_server):
    closed = asyncio.Event()

    async def provider(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        while await reader.read(65536):
            pass
        closed.set()

    port = await raw_server(provider)

    async def broken():
        yield b"first"
        raise ValueError("the client's upload broke")

    client = Client(environ={})
    try:
        with pytest.raises(ValueError, match="upload broke"):
            await client.request_stream(Origin.of("http", "127.0.0.1", port), "POST", "/f", {}, broken(), 5.0)
        await asyncio.wait_for(closed.wait(), 10)  # the provider saw the connection end, never a whole request
    finally:
        await client.close()


async def test_a_download_cut_short_never_looks_whole(raw_server, start_proxy):
    async def cuts(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 50000)
        await writer.drain()
        writer.transport.abort()

    port = await raw_server(cuts)
    base = await start_proxy(config_for(f"http://127.0.0.1:{port}/openai/v1"))
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/files/file_abc/content") as resp:
            assert resp.status == 200 and resp.content_length == 100000
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_a_client_that_leaves_mid_upload_leaves_the_provider_no_whole_request(raw_server, start_proxy):
    upstream_closed, head_seen = asyncio.Event(), asyncio.Event()
    got: dict = {}

    async def provider(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        head_seen.set()
        try:
            got["body"] = await read_chunked(reader, lambda n: None)
        except asyncio.IncompleteReadError:
            upstream_closed.set()

    port = await raw_server(provider)
    base = await start_proxy(config_for(f"http://127.0.0.1:{port}/openai/v1"))
    host, port_ = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port_))
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + b"q" * 300000)
    writer.write(head + b"%x\r\n%b\r\n" % (len(part), part))
    await writer.drain()
    await asyncio.wait_for(head_seen.wait(), 30)  # the upload has begun upstream; now the client goes
    writer.transport.abort()
    await asyncio.wait_for(upstream_closed.wait(), 30)
    assert "body" not in got
