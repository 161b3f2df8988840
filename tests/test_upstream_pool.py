"""Pooled connections that the upstream closed while they were idle (proxy/upstream/http1.py): a request that got
no byte of an answer on a reused connection goes once more on a new one and is never charged to the model; a
request on a new connection is not resent; `Keep-Alive: timeout=` and the pool's idle limit keep connections
from being reused when the upstream is about to close them.

Raw asyncio upstreams, because the failure is a race an aiohttp server does not lose on purpose: the upstream's
FIN (or RST) crossing our next request on the wire.
"""

from __future__ import annotations

import asyncio
import collections
import random

import aiohttp
import orjson
import pytest

from proxy.app.config import ConfigError
from proxy.upstream.http1 import IDLE_S, Client, Disconnected, Origin, keep_alive_limit
from tests.conftest import config_for, read_request
from tests.test_fallback import attempt_lines, call, chat
from tests.test_upstream_wire import http_answer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def origin_of(port: int) -> Origin:
    return Origin.of("http", "127.0.0.1", port)


@pytest.fixture
async def client():
    c = Client(environ={})
    yield c
    await c.close()


async def exchange(client: Client, port: int) -> tuple[int, bytes]:
    # The deadline is only a safety net: a connection reused when it should not be would wait forever.
    response = await asyncio.wait_for(client.request(origin_of(port), "POST", "/x", {}, b"{}", 2.0), 10)
    try:
        return response.status, await response.read()
    finally:
        response.release()


class Script:
    """A raw upstream: connection n (from 0) runs `plans[n]`, a list of what to do with each request it reads:
    bytes to answer with, "close" (close without a byte: a FIN), "reset" (an RST), or "partial" (half a status
    line, then close). Records how many connections came and the requests each carried."""

    def __init__(self, *plans: list) -> None:
        self.plans = list(plans)
        self.requests: list[list[bytes]] = []

    @property
    def connections(self) -> int:
        return len(self.requests)

    async def __call__(self, reader, writer) -> None:
        seen: list[bytes] = []
        plan = self.plans[len(self.requests)] if len(self.requests) < len(self.plans) else []
        self.requests.append(seen)
        for step in plan:
            try:
                seen.append(await read_request(reader))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if step == "close":
                return  # the fixture closes the writer: a FIN, no answer
            if step == "reset":
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-" if step == "partial" else step)
            await writer.drain()
            if step == "partial":
                return
        await reader.read()


# --- the client ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_reused_connection_closed_without_an_answer_is_resent_on_a_new_one(how, client, raw_server):
    script = Script([OK, how], [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"])
    port = await raw_server(script)
    assert await exchange(client, port) == (200, b"ok")
    # The upstream closes the idle connection as our request arrives: its FIN (or RST) crosses the request.
    assert await exchange(client, port) == (200, b"second")
    assert script.connections == 2
    assert len(script.requests[0]) == 2 and script.requests[0][1] == script.requests[1][0]  # the same request


async def test_a_new_connection_closed_without_an_answer_is_not_resent(client, raw_server):
    script = Script(["close"], [OK])
    port = await raw_server(script)
    with pytest.raises(Disconnected, match="closed the connection"):
        await exchange(client, port)
    assert script.connections == 1  # the upstream took the request and dropped it: that is the model's failure


async def test_a_reused_connection_that_began_to_answer_is_not_resent(client, raw_server):
    script = Script([OK, "partial"], [OK])
    port = await raw_server(script)
    await exchange(client, port)
    with pytest.raises(Disconnected):
        await exchange(client, port)
    assert script.connections == 1


async def test_a_request_is_resent_once_only(client, raw_server):
    script = Script([OK, "close"], ["close"], [OK])
    port = await raw_server(script)
    await exchange(client, port)
    with pytest.raises(Disconnected):
        await exchange(client, port)
    assert script.connections == 2


def test_keep_alive_timeout_is_read_with_a_margin():
    assert keep_alive_limit("timeout=5, max=100", 15.0) == 4.0
    assert keep_alive_limit("max=100,Timeout = 1", 15.0) == 0.5
    assert keep_alive_limit("timeout=600", 15.0) == 15.0  # the pool's own limit is lower
    assert keep_alive_limit("timeout=0", 15.0) == 0.0
    assert keep_alive_limit("timeout=soon", 15.0) == 15.0
    assert keep_alive_limit("max=3", 15.0) == 15.0


async def test_a_connection_is_not_reused_near_the_upstream_keep_alive_timeout(client, raw_server):
    answer = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok"
    script = Script([answer, answer], [answer])
    port = await raw_server(script)
    await exchange(client, port)
    conn = client._pools[origin_of(port)].idle[-1]
    assert conn.idle_s == 0.5
    await asyncio.sleep(0.6)  # past half the upstream's second: the upstream has not closed, yet it would soon
    await exchange(client, port)
    assert conn.closed and script.connections == 2
    assert len(script.requests[0]) == 1  # the first connection carried one request


async def test_keep_alive_timeout_zero_is_not_pooled_and_a_long_one_is_capped(client, raw_server):
    never = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=0\r\nContent-Length: 2\r\n\r\nok"
    script = Script([never], [never])
    port = await raw_server(script)
    await exchange(client, port)
    await exchange(client, port)
    assert script.connections == 2 and not client._pools[origin_of(port)].idle

    long = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=3600\r\nContent-Length: 2\r\n\r\nok"
    other = Script([long, long])
    port = await raw_server(other)
    await exchange(client, port)
    assert client._pools[origin_of(port)].idle[-1].idle_s == IDLE_S
    await exchange(client, port)
    assert other.connections == 1


# --- through the proxy: never a model failure ---------------------------------------------------------------


class ClosingUpstream:
    """A raw chat upstream that closes connections the way real ones do, a moment after a keep-alive answer
    (`after_each`), or when one has been idle for a random 0-2 ms (its idle timeout, racing our next request)."""

    def __init__(self, after_each: bool) -> None:
        self.after_each = after_each
        self.connections = 0

    async def __call__(self, reader, writer) -> None:
        self.connections += 1
        idle = None  # a new connection gets its request at once
        while True:
            try:
                raw = await asyncio.wait_for(read_request(reader), idle)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(http_answer(orjson.loads(raw.partition(b"\r\n\r\n")[2])))  # no Connection: close
            await writer.drain()
            if self.after_each:
                await asyncio.sleep(random.uniform(0, 0.001))  # the FIN follows the answer, maybe our request
                return
            idle = random.uniform(0, 0.002)


@pytest.mark.parametrize("after_each", [False, True], ids=["idle_close", "close_after_each"])
async def test_an_upstream_closing_kept_alive_connections_never_fails_a_request(after_each, raw_server,
                                                                                start_proxy, proxy_log):
    upstream = ClosingUpstream(after_each)
    port = await raw_server(upstream)
    base = await start_proxy(config_for(f"http://127.0.0.1:{port}/v1", {"tier-test": ["m1"]}))
    statuses = collections.Counter()
    body = orjson.dumps(chat())

    async with aiohttp.ClientSession() as session:
        async def requests(n: int) -> None:
            for _ in range(n):
                async with session.post(f"{base}/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    statuses[r.status] += 1

        await asyncio.gather(*(requests(250) for _ in range(4)))

    assert statuses == {200: 1000}
    assert {line["outcome"] for line in attempt_lines(proxy_log)} == {"answered"}
    assert upstream.connections > 4  # the upstream did close connections under the proxy's feet


class KeepingUpstream:
    """A raw chat upstream that keeps every connection open and counts them."""

    def __init__(self) -> None:
        self.connections = 0

    async def __call__(self, reader, writer) -> None:
        self.connections += 1
        while True:
            try:
                raw = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(http_answer(orjson.loads(raw.partition(b"\r\n\r\n")[2])))
            await writer.drain()


@pytest.mark.parametrize("pool_idle_s, connections", [(None, 1), (0.05, 2)])
async def test_pool_idle_s_is_the_providers_idle_limit(pool_idle_s, connections, raw_server, start_proxy):
    upstream = KeepingUpstream()
    port = await raw_server(upstream)
    provider = {} if pool_idle_s is None else {"pool_idle_s": pool_idle_s}
    base = await start_proxy(config_for(f"http://127.0.0.1:{port}/v1", provider=provider))

    for _ in range(2):
        r = await call(base, chat())
        assert r.status == 200, r.body
        await asyncio.sleep(0.1)  # longer than 0.05 s, far shorter than the default 15 s

    assert upstream.connections == connections


def test_pool_idle_s_is_validated_with_its_key():
    assert config_for("http://127.0.0.1:1/v1").providers["up"].pool_idle_s == 15.0
    with pytest.raises(ConfigError, match=r"^providers\.up\.pool_idle_s: must be at least 0"):
        config_for("http://127.0.0.1:1/v1", provider={"pool_idle_s": -1})
    with pytest.raises(ConfigError, match=r"^providers\.up\.pool_idle_s: must be a number"):
        config_for("http://127.0.0.1:1/v1", provider={"pool_idle_s": "15s"})
