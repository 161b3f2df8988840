"""Upstream output has bounds: an SSE event longer than `sse.MAX_EVENT` and a non-streamed body longer than
`http1.MAX_BODY` fail the attempt as `malformed` (before the commit point the next model answers; after it the
stream ends with an error event), the connection is dropped, and the proxy stays responsive meanwhile.

Raw asyncio upstreams, because the point is an upstream that never sends the byte that would end the thing.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from proxy.upstream import http1
from proxy.upstream import sse as scanner
from proxy.upstream.http1 import BadResponse, Client, Origin
from proxy.sim.testing import stream_events
from tests.conftest import read_request
from tests.test_fallback import attempt_lines, call, chat, config_with, data_events
from tests.test_upstream_wire import assert_m2_answered

SAFETY = 64 * 1024 * 1024  # the raw upstreams stop here, so a proxy without bounds ends the test, not hangs it
PIECE = b"x" * 65536


class EndlessLine:
    """A raw upstream that streams `first` (whole events, possibly none), then one event that never ends: 64 KiB
    writes of `x` with no line break. After `pause_at` bytes of it, it waits for `resume` (so the test can look
    at the proxy mid-stream). Records whether the proxy hung up before the safety limit."""

    def __init__(self, first: bytes = b"", pause_at: int | None = None) -> None:
        self.first = first
        self.pause_at = pause_at
        self.midway, self.resume = asyncio.Event(), asyncio.Event()
        self.sent = 0
        self.hung_up = False

    async def __call__(self, reader, writer) -> None:
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + (b"%x\r\n%s\r\n" % (len(self.first), self.first) if self.first else b""))
        writer.write(b"6\r\ndata: \r\n")
        try:
            while self.sent < SAFETY:
                if self.pause_at is not None and self.sent >= self.pause_at and not self.resume.is_set():
                    self.midway.set()
                    await self.resume.wait()
                writer.write(b"%x\r\n%s\r\n" % (len(PIECE), PIECE))
                self.sent += len(PIECE)
                await writer.drain()
        except ConnectionError:
            self.hung_up = True
            return
        writer.write(b"0\r\n\r\n")  # the proxy read it all: the stream just ends
        await writer.drain()


async def test_an_endless_event_before_the_first_one_falls_over(raw_server, upstream, start_proxy, proxy_log):
    endless = EndlessLine()
    port = await raw_server(endless)
    _, url = upstream
    base = await start_proxy(config_with({"raw": f"http://127.0.0.1:{port}/v1", "up": url},
                                         {"tier-test": ["raw:m1", "up:m2"]}))

    r = await call(base, chat(stream=True))

    assert_m2_answered(r, True)
    first = attempt_lines(proxy_log)[0]
    assert (first["outcome"], first["reason"]) == ("fell_over", "malformed")
    assert f"longer than {scanner.MAX_EVENT} bytes" in first["detail"]
    await asyncio.wait_for(_hung_up(endless), 10)


async def test_an_endless_event_after_the_commit_point_ends_the_stream_and_the_proxy_stays_up(
        raw_server, start_proxy, proxy_log):
    events = stream_events("m1")
    endless = EndlessLine(first=events[0], pause_at=scanner.MAX_EVENT // 2)
    port = await raw_server(endless)
    base = await start_proxy(config_with({"raw": f"http://127.0.0.1:{port}/v1"}, {"tier-test": ["raw:m1"]}))

    streaming = asyncio.create_task(call(base, chat(stream=True)))
    await asyncio.wait_for(endless.midway.wait(), 10)  # half a megabyte of one event held by the proxy
    health = await asyncio.wait_for(get(f"{base}/healthz"), 10)  # answered while the stream is held mid-event
    endless.resume.set()
    r = await asyncio.wait_for(streaming, 30)

    assert health == 200
    assert r.status == 200
    data = data_events(r.body)
    assert data[0] == events[0][len(b"data: "):-2]  # the event before the long one reached the client whole
    assert orjson.loads(data[-1])["error"]["code"] == "malformed"
    assert b"xxxx" not in r.body  # no part of the long event was forwarded
    line = attempt_lines(proxy_log)[0]
    assert (line["outcome"], line["reason"]) == ("failed_after_commit", "malformed")
    await asyncio.wait_for(_hung_up(endless), 10)
    assert endless.sent < SAFETY


async def get(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as r:
            await r.read()
            return r.status


async def _hung_up(endless: EndlessLine) -> None:
    while not endless.hung_up:
        await asyncio.sleep(0.01)


# --- a non-streamed body without end ---------------------------------------------------------------------------------


async def endless_body(reader, writer) -> None:
    """A non-streamed answer that says it is 100 GB long, and keeps sending."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n{")
    sent = 0
    try:
        while sent < SAFETY:
            writer.write(PIECE)
            sent += len(PIECE)
            await writer.drain()
    except ConnectionError:
        return


async def test_read_refuses_a_body_past_max_body_and_drops_the_connection(raw_server, monkeypatch):
    monkeypatch.setattr(http1, "MAX_BODY", 1024 * 1024)
    gone = asyncio.Event()

    async def handler(reader, writer):
        await endless_body(reader, writer)
        gone.set()

    port = await raw_server(handler)
    client = Client(environ={})
    response = await client.request(Origin.of("http", "127.0.0.1", port), "POST", "/", {}, b"{}", 5.0)
    with pytest.raises(BadResponse, match="larger than 1048576 bytes"):
        await asyncio.wait_for(response.read(), 30)
    response.release()
    await asyncio.wait_for(gone.wait(), 10)  # the upstream saw the close before its 64 MiB
    assert not client._pools[Origin.of("http", "127.0.0.1", port)].idle
    await client.close()


async def test_a_body_past_max_body_falls_over_to_the_next_model(raw_server, upstream, start_proxy, proxy_log,
                                                                  monkeypatch):
    monkeypatch.setattr(http1, "MAX_BODY", 1024 * 1024)
    port = await raw_server(endless_body)
    _, url = upstream
    base = await start_proxy(config_with({"raw": f"http://127.0.0.1:{port}/v1", "up": url},
                                         {"tier-test": ["raw:m1", "up:m2"]}))

    r = await call(base, chat())

    assert_m2_answered(r, False)
    first = attempt_lines(proxy_log)[0]
    assert (first["outcome"], first["reason"]) == ("fell_over", "malformed")
