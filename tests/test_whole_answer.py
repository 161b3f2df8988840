"""A policy's answer known whole (a cache hit) leaves in one write, with the head aiohttp would have written:
HTTP/1.0 and HTTP/1.1 keep-alive rules, Content-Length, Date and Server, pipelined requests answered in order,
and a policy's own framing headers or a header with a line break handed to aiohttp's response as before."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
from yarl import URL

from proxy.sim.testing import Behaviour, completion
from tests.conftest import config_for, post_chat
from tests.test_auth import KEY, auth_table
from tests.test_cache import ASK, cache_config

BODY = orjson.dumps(ASK)


def raw_request(version: str = "1.1", extra: str = "", body: bytes = BODY) -> bytes:
    return (f"POST /v1/chat/completions HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, list[str]], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    status_line, *lines = head[:-4].split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.lower(), []).append(value.strip())
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"][0])), 10)
    return status_line, headers, body


async def primed(upstream, start_proxy) -> tuple[str, int, bytes]:
    """A proxy with the cache, its answer to ASK stored; returns (base, port, the stored answer's body)."""
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    status, headers, body = await post_chat(base, ASK)
    assert status == 200 and headers["x-groq-proxy-cache"] == "MISS"
    return base, URL(base).port, body


async def test_a_hit_has_the_head_aiohttp_writes_and_the_stored_body(upstream, start_proxy):
    base, port, stored = await primed(upstream, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request())
    status_line, headers, body = await read_answer(reader)
    writer.close()
    assert status_line == "HTTP/1.1 200 OK"
    assert headers["x-groq-proxy-cache"] == ["HIT"] and headers["content-type"] == ["application/json"]
    assert headers["content-length"] == [str(len(stored))] and body == stored
    assert len(headers["date"]) == 1 and headers["date"][0].endswith(" GMT")
    assert headers["server"][0].startswith("Python/") and "connection" not in headers
    assert headers["x-request-id"][0].startswith("req_")


async def test_pipelined_hits_on_one_connection_are_answered_in_order(upstream, start_proxy):
    scripted, _ = upstream
    base, port, stored = await primed(upstream, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request() * 3)  # three requests in one send: each answer whole, one after the other
    ids = set()
    for _ in range(3):
        status_line, headers, body = await read_answer(reader)
        assert status_line == "HTTP/1.1 200 OK" and headers["x-groq-proxy-cache"] == ["HIT"] and body == stored
        ids.add(headers["x-request-id"][0])
    writer.close()
    assert len(ids) == 3 and len(scripted.requests) == 1


async def test_a_client_that_asks_to_close_gets_connection_close_and_the_connection_ends(upstream, start_proxy):
    base, port, stored = await primed(upstream, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request(extra="Connection: close\r\n"))
    status_line, headers, body = await read_answer(reader)
    assert headers["connection"] == ["close"] and body == stored
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the proxy closed it
    writer.close()


@pytest.mark.parametrize("keep", [True, False])
async def test_http_1_0_keeps_the_connection_only_when_asked(upstream, start_proxy, keep):
    base, port, stored = await primed(upstream, start_proxy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request("1.0", "Connection: keep-alive\r\n" if keep else ""))
    status_line, headers, body = await read_answer(reader)
    assert status_line == "HTTP/1.0 200 OK" and body == stored
    if keep:
        assert headers["connection"] == ["keep-alive"]
        writer.write(raw_request("1.0", "Connection: keep-alive\r\n"))  # and the connection serves another
        assert (await read_answer(reader))[2] == stored
    else:
        assert "connection" not in headers
        assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_streamed_hit_is_one_whole_answer_with_the_event_stream_headers(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    first = await post_chat(base, {**ASK, "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(base).port)
    writer.write(raw_request(body=orjson.dumps({**ASK, "stream": True})))
    status_line, headers, body = await read_answer(reader)
    writer.close()
    assert headers["x-groq-proxy-cache"] == ["HIT"] and headers["content-type"] == ["text/event-stream"]
    assert headers["cache-control"] == ["no-cache"] and headers["x-accel-buffering"] == ["no"]
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == first[2].count(b"data: ")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_policys_own_date_header_is_the_only_date_line(upstream, start_proxy, stream):
    _, url = upstream
    policy = {"use": "tests.policy_examples:HeadedAnswer", "stream": stream,
              "headers": {"Date": "Tue, 01 Dec 2026 00:00:00 GMT", "x-mine": "yes"}}
    base = await start_proxy(config_for(url, policies=[policy]))
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(base).port)
    writer.write(raw_request())
    status_line, headers, body = await read_answer(reader)
    writer.close()
    assert status_line == "HTTP/1.1 200 OK" and headers["x-mine"] == ["yes"]
    assert headers["date"] == ["Tue, 01 Dec 2026 00:00:00 GMT"]  # aiohttp's response kept it, and wrote no other
    assert headers["content-length"] == [str(len(body))]


async def test_a_header_value_with_a_line_break_never_reaches_the_wire(upstream, start_proxy):
    _, url = upstream
    policy = {"use": "tests.policy_examples:HeadedAnswer", "headers": {"x-mine": "a\r\nx-injected: 1"}}
    base = await start_proxy(config_for(url, policies=[policy]))
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(base).port)
    writer.write(raw_request())
    head = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert b"x-injected" not in head.lower()
    assert not head.startswith(b"HTTP/1.1 200")  # aiohttp's response refuses the value, as before


async def test_a_large_hit_to_a_slow_reader_arrives_whole_and_the_connection_goes_on(upstream, start_proxy):
    """An answer larger than the 64 KiB the proxy leaves unsent before it waits for the client: sent before the
    request's bookkeeping, waited for in write_eof, and the next request on the connection answered after it."""
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", body=completion("m1", "x" * 3_000_000))
    base = await start_proxy(cache_config(url, max_bytes=100_000_000, max_entry_bytes=20_000_000))
    status, headers, stored = await post_chat(base, ASK)
    assert status == 200 and len(stored) > 3_000_000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer backs up in the proxy
    sock.connect(("127.0.0.1", URL(base).port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**23)
    writer.write(raw_request() * 2)
    await asyncio.sleep(0.3)  # the client reads nothing for a while: the proxy's buffer holds what it could not send
    for _ in range(2):
        status_line, headers, body = await read_answer(reader)
        assert headers["x-groq-proxy-cache"] == ["HIT"] and body == stored
    writer.close()
    assert len(scripted.requests) == 1


async def test_a_refusal_and_an_answer_pipelined_on_one_connection_each_arrive_framed(upstream, start_proxy):
    """Errors on the request path (here a missing proxy key, 401) leave as one write too: an OpenAI-shaped body
    with its Content-Length, and the connection serves the next request."""
    scripted, url = upstream
    base = await start_proxy(config_for(url, auth=auth_table()))
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(base).port)
    writer.write(raw_request() + raw_request(extra=f"Authorization: Bearer {KEY}\r\n"))
    status_line, headers, body = await read_answer(reader)
    assert status_line == "HTTP/1.1 401 Unauthorized" and headers["content-type"] == ["application/json"]
    error = orjson.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
    status_line, headers, body = await read_answer(reader)
    writer.close()
    assert status_line == "HTTP/1.1 200 OK" and orjson.loads(body)["object"] == "chat.completion"
