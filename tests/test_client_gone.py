"""A client that hangs up: the attempt in flight is cancelled (the upstream sees its connection closed), no further
model is tried, and the request is logged and counted as 499.

The upstream is a raw TCP server that records the moment the proxy closes its connection; the client is a raw
socket that closes its own, before the first byte or mid-way, for a stream and a plain request.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest

from policies import Policy, PolicyChain
from proxy.app.server import STATE, build_app
from proxy.sim.testing import stream_events
from proxy.telemetry.tracing import KIND_CLIENT, KIND_SERVER
from tests.conftest import read_request, until
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)
from tests.test_cli import Proc, clean_env, free_port, wait_ready
from tests.test_fallback import MESSAGES, attempt_lines, config_with

SAFETY_S = 10  # a hang guard only: every wait below ends on an event


class HangUpRecorder:
    """An upstream that reads the request, writes `send` (nothing, or a head and the start of a body), then
    waits; `closed` is set when the proxy closes the connection."""

    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = asyncio.Event()
        self.closed = asyncio.Event()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if self.send:
            writer.write(self.send)
            await writer.drain()
        self.received.set()
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed.set()


class After(Policy):
    """Records that `after` ran, and the context it saw."""

    name = "after-recorder"

    def __init__(self) -> None:
        self.contexts = []
        self.ran = asyncio.Event()

    async def after(self, ctx) -> None:
        self.contexts.append(ctx)
        self.ran.set()


FIRST = stream_events("m1")[0]
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
PLAIN_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"

CASES = {
    # name -> (stream, what the upstream sends before it waits, what the client waits to read before leaving)
    "stream_before_first_byte": (True, b"", b""),
    "stream_mid_way": (True, STREAM_HEAD + b"%x\r\n" % len(FIRST) + FIRST + b"\r\n", b"\n\n"),
    "plain_before_first_byte": (False, b"", b""),
    "plain_mid_way": (False, PLAIN_HEAD + b'{"id": "chatcmpl-half", "choices": [', b""),
}


async def leave(port: int, body: dict, upstream: HangUpRecorder, read_until: bytes) -> bytes:
    """Sends one request on a raw socket, waits until the upstream has it (and, when asked, until the client
    has read `read_until`), then closes the socket. Returns what the client had read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = orjson.dumps(body)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    async with asyncio.timeout(SAFETY_S):
        await upstream.received.wait()
        got = await reader.readuntil(read_until) if read_until else b""
    writer.close()
    await writer.wait_closed()
    return got


@pytest.mark.parametrize("case", list(CASES))
async def test_client_leaving_cancels_the_attempt_and_stops_the_chain(case, raw_server, upstream, aiohttp_server,
                                                                      proxy_log):
    stream, send, read_until = CASES[case]
    recorder = HangUpRecorder(send)
    port = await raw_server(recorder.handler)
    scripted, url = upstream
    config = config_with({"hang": f"http://127.0.0.1:{port}/openai/v1", "up": url}, {"tier-test": ["hang:m1", "up:m2"]})
    app = build_app(config)
    server = await aiohttp_server(app)
    after = After()
    app[STATE].pipeline.policies = PolicyChain([after])

    got = await leave(server.port, {"model": "tier-test", "messages": MESSAGES, "stream": stream}, recorder,
                      read_until)
    if read_until:
        assert FIRST in got  # the stream was committed: the client left mid-way

    async with asyncio.timeout(SAFETY_S):
        await recorder.closed.wait()  # the upstream saw the proxy hang up: the attempt was cancelled
        await after.ran.wait()  # policies settle whatever happened
    assert scripted.requests == []  # the chain stopped: no next model for a client long gone
    (ctx,) = after.contexts
    assert [(a.target.key, a.outcome, a.reason) for a in ctx.attempts] == [
        ("hang:m1", "cancelled", "client_disconnected")]
    (line,) = attempt_lines(proxy_log)
    assert (line["target"], line["outcome"], line["reason"]) == ("hang:m1", "cancelled", "client_disconnected")
    metrics = app[STATE].observer.metrics
    await until(lambda: metrics.requests.values, what="the request counted")
    assert metrics.requests.values == {("tier-test", "none", "499"): 1}
    assert metrics.attempts.values == {("m1", "cancelled"): 1}


async def test_client_leaving_is_a_499_span_with_a_cancelled_attempt(raw_server, aiohttp_server, otlp):
    recorder = HangUpRecorder(b"")
    port = await raw_server(recorder.handler)
    config = config_with({"hang": f"http://127.0.0.1:{port}/openai/v1"}, {"tier-test": ["hang:m1", "hang:m2"]},
                         telemetry={"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05})
    server = await aiohttp_server(build_app(config))

    await leave(server.port, {"model": "tier-test", "messages": MESSAGES}, recorder, b"")

    def spans(r):
        server_spans = [s for s in r.spans if s.kind == KIND_SERVER]
        return server_spans if server_spans else None

    (request_span,) = await otlp.wait_for(spans, SAFETY_S)
    assert request_span.attributes["http.response.status_code"] == 499
    attempts = await otlp.wait_for(lambda r: [s for s in r.spans if s.kind == KIND_CLIENT] or None, SAFETY_S)
    assert [(s.attributes["gen_ai.request.model"], s.attributes["groq_proxy.attempt.outcome"],
             s.attributes["groq_proxy.attempt.reason"]) for s in attempts] == [
        ("m1", "cancelled", "client_disconnected")]
    async with asyncio.timeout(SAFETY_S):
        await recorder.closed.wait()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_under_the_real_command_a_client_leaving_cancels_the_upstream_call(stream, tmp_path, raw_server, upstream):
    # `groq-proxy serve` runs web.run_app, whose handlers aiohttp does not cancel on a hang-up by default
    # (the test server's do): the app itself must ask for it.
    recorder = HangUpRecorder(b"")
    port = await raw_server(recorder.handler)
    scripted, url = upstream
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
keepalive_s = 0
[providers.hang]
base_url = "http://127.0.0.1:{port}/openai/v1"
[providers.up]
base_url = "{url}"
[models.tier-test]
chain = ["hang:m1", "up:m2"]
""")
    proxy_port = free_port()
    base = f"http://127.0.0.1:{proxy_port}"
    proc = await Proc(tmp_path, "serve").start("serve", "--config", str(config), "--port", str(proxy_port),
                                               "--no-check", env=clean_env())
    try:
        await wait_ready(proc, base)
        await leave(proxy_port, {"model": "tier-test", "messages": MESSAGES, "stream": stream}, recorder, b"")
        async with asyncio.timeout(SAFETY_S):
            await recorder.closed.wait()
        line = '{virtual_model="tier-test",model="none",status="499"} 1'
        async with aiohttp.ClientSession() as session:
            async def scrape() -> str:
                async with session.get(base + "/metrics") as resp:
                    return await resp.text()
            async with asyncio.timeout(SAFETY_S):
                while line not in (text := await scrape()):
                    await asyncio.sleep(0.02)
        assert 'groq_proxy_attempts_total{model="m1",outcome="cancelled"} 1' in text
        assert scripted.requests == []
    finally:
        await proc.stop()
    attempts = [x for x in proc.log_lines() if x.get("event") == "attempt"]
    assert [(x["target"], x["outcome"], x["reason"]) for x in attempts] == [
        ("hang:m1", "cancelled", "client_disconnected")]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_openai_client_call_given_up_cancels_the_upstream_call(stream, raw_server, upstream, aiohttp_server):
    # What an application does when its own deadline passes: it cancels the SDK call, and httpx drops the
    # connection. The provider must stop generating, and no other model may be asked.
    recorder = HangUpRecorder(b"")
    port = await raw_server(recorder.handler)
    scripted, url = upstream
    app = build_app(config_with({"hang": f"http://127.0.0.1:{port}/openai/v1", "up": url},
                                {"tier-test": ["hang:m1", "up:m2"]}))
    server = await aiohttp_server(app)
    after = After()
    app[STATE].pipeline.policies = PolicyChain([after])

    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0) as client:
        call = asyncio.create_task(client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=stream))
        async with asyncio.timeout(SAFETY_S):
            await recorder.received.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(SAFETY_S):
            await recorder.closed.wait()
            await after.ran.wait()
    assert scripted.requests == []
    assert [(a.outcome, a.reason) for a in after.contexts[0].attempts] == [("cancelled", "client_disconnected")]
