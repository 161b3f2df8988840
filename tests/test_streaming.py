"""Streams through the proxy: byte-identical pass-through, keep-alive comments that commit nothing, and the
commit point after which a failure ends the stream with exactly one error event instead of falling over.

Checked twice where a client library matters: with raw bytes from aiohttp, and with the real openai SDK.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from policies import Policy, PolicyChain
from proxy.app.server import STATE, build_app
from proxy.sim.testing import USAGE, Behaviour, ChatUpstream, LateEndUpstream, chat_chunk, sse, stream_events
from tests.conftest import config_for, until
from tests.test_fallback import (
    MESSAGES,
    attempt_lines,
    call,
    chat,
    config_with,
    sse_blocks,
)

KA = b": keep-alive\n\n"
E = stream_events("m1")  # role chunk, "Hello", " there", "!", finish chunk with usage, [DONE]


class Recorder(Policy):
    """A policy that keeps each finished request's context, to see what the proxy parsed from a stream."""

    name = "recorder"

    def __init__(self) -> None:
        self.contexts = []

    async def after(self, ctx) -> None:
        self.contexts.append(ctx)


async def start_recorded(aiohttp_server, config) -> tuple[str, Recorder]:
    app = build_app(config)
    server = await aiohttp_server(app)
    recorder = Recorder()
    app[STATE].pipeline.policies = PolicyChain([recorder])
    return f"http://127.0.0.1:{server.port}", recorder


def split_every(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given byte offsets: the chunks the upstream writes one by one."""
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


async def openai_stream_text(base: str, model: str = "tier-test") -> str:
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        text = ""
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        return text


async def openai_stream_error(base: str) -> tuple[openai.APIError, str]:
    """Iterates a stream that must fail; returns the error and the text received before it."""
    text = ""
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
    return info.value, text


# --- pass-through ---------------------------------------------------------------------------------------------

UNICODE = "héllo wörld 世界 🚀"


def odd_stream(frame: bytes) -> bytes:
    """A Groq-like stream with odd spacing, a comment, multi-byte text and include_usage, framed by `frame`."""
    usage_chunk = {"id": "chatcmpl-odd", "object": "chat.completion.chunk", "model": "m1", "choices": [],
                   "usage": USAGE, "x_groq": {"id": "req_odd", "usage": USAGE}}
    finish = chat_chunk("m1", None, "stop", usage=USAGE, x_groq={"id": "req_odd", "usage": USAGE})
    finish["id"] = "chatcmpl-odd"
    events = [
        b'data: {"id":"chatcmpl-odd","object":"chat.completion.chunk","model":"m1","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":""},"finish_reason":null}],"x_groq":{"id":"req_odd"}}',
        b": a comment the upstream sends",
        b'data:{"id":"chatcmpl-odd","choices":[{"index":0,"delta":{"content":"' + "héllo ".encode() + b'"}}]}',
        b'data:    {"id": "chatcmpl-odd",  "choices": [ {"index": 0, "delta": {"content": "'
        + "wörld 世界 🚀".encode() + b'"}} ] }',
        b"data: " + orjson.dumps(finish),
        b"data: " + orjson.dumps(usage_chunk),
        b"data: [DONE]",
    ]
    return b"".join(e + frame for e in events)


@pytest.mark.parametrize("frame", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
async def test_stream_bytes_pass_through_unchanged(frame, upstream, aiohttp_server):
    scripted, url = upstream
    whole = odd_stream(frame)
    # Cut inside events, inside multi-byte characters and inside the blank-line framing.
    in_char = whole.index("世".encode()) + 1
    in_emoji = whole.index("🚀".encode()) + 2
    in_frame = whole.index(frame) + 1
    cuts = sorted({3, in_frame, in_char, in_emoji, whole.index(b"[DONE]") + 2, len(whole) - 1})
    chunks = split_every(whole, cuts)
    assert b"".join(chunks) == whole and len(chunks) == len(cuts) + 1
    scripted.behaviours["m1"] = Behaviour("ok", events=chunks)
    base, recorder = await start_recorded(aiohttp_server, config_for(url))

    r = await call(base, chat(stream=True))

    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["x-groq-proxy-model"] == "m1"
    assert r.body == whole
    (ctx,) = recorder.contexts
    attempt = ctx.answered
    assert attempt is ctx.attempts[0] and attempt.outcome == "answered"
    assert attempt.usage == USAGE  # once, although three events carry it
    assert attempt.finish_reasons == ["stop"]
    assert attempt.response_id == "chatcmpl-odd"
    assert attempt.response_model == "m1"


@pytest.mark.parametrize("frame", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
async def test_openai_client_reads_the_odd_stream(frame, upstream, start_proxy):
    scripted, url = upstream
    whole = odd_stream(frame)
    scripted.behaviours["m1"] = Behaviour("ok", events=split_every(whole, [whole.index("世".encode()) + 1]))
    base = await start_proxy(config_for(url))
    assert await openai_stream_text(base) == UNICODE


async def test_plain_stream_parses_usage_and_finish_reason(upstream, aiohttp_server):
    scripted, url = upstream
    base, recorder = await start_recorded(aiohttp_server, config_for(url))
    r = await call(base, chat(stream=True))
    assert r.body == b"".join(E)
    (ctx,) = recorder.contexts
    assert ctx.answered.usage == USAGE and ctx.answered.finish_reasons == ["stop"]
    assert r.headers["x-ratelimit-remaining-requests"] == "99"  # Groq's rate-limit view is passed on


class GatedUpstream(ChatUpstream):
    """Sends the first event, then waits for the test to let the rest go: a buffering proxy would deadlock."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.gate = asyncio.Event()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(self.events[0])
        await self.gate.wait()
        for event in self.events[1:]:
            await resp.write(event)
        await resp.write_eof()
        return resp


async def test_events_reach_the_client_as_they_arrive(aiohttp_server, start_proxy):
    gated = GatedUpstream(E)
    server = await aiohttp_server(gated.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1"))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status == 200
            # The guard only turns a deadlock (the proxy holding event one back) into a failure.
            async with asyncio.timeout(5):
                first = await resp.content.readuntil(b"\n\n")
            assert first == E[0]
            assert not gated.gate.is_set()  # the upstream is still holding the rest
            gated.gate.set()
            rest = await resp.read()
    assert first + rest == b"".join(E)


# --- keep-alive -----------------------------------------------------------------------------------------------


def keepalives_then(body: bytes, data: bytes) -> int:
    """Asserts `body` is keep-alive comments followed by exactly `data`; returns how many comments."""
    assert body.endswith(data), body[-200:]
    head = body[: len(body) - len(data)]
    count = head.count(KA)
    assert head == KA * count, head
    return count


async def test_keepalive_comments_go_out_while_the_upstream_is_slow(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("slow_first", delay_s=0.3)
    config = config_for(url, server={"keepalive_s": 0.05}, provider={"first_byte_timeout_s": 2, "timeout_s": 3})
    base = await start_proxy(config)
    r = await call(base, chat(stream=True))
    assert r.status == 200
    assert r.headers["x-request-id"].startswith("req_")
    assert keepalives_then(r.body, b"".join(E)) >= 1
    assert scripted.models_sent() == ["m1"]


async def test_keepalive_comments_do_not_commit(upstream, start_proxy, proxy_log):
    # m1 takes past its first-byte deadline after comments already went out: the chain still falls over.
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=5)
    config = config_for(url, server={"keepalive_s": 0.03}, provider={"first_byte_timeout_s": 0.2, "timeout_s": 0.5})
    base = await start_proxy(config)
    r = await call(base, chat(stream=True))
    assert r.status == 200
    assert keepalives_then(r.body, b"".join(stream_events("m2"))) >= 1
    assert scripted.models_sent() == ["m1", "m2"]
    lines = attempt_lines(proxy_log)
    assert [(f["target"], f["outcome"], f.get("reason")) for f in lines] == [
        ("up:m1", "fell_over", "first_byte_timeout"),
        ("up:m2", "answered", None),
    ]


async def test_keepalive_then_fallover_with_openai_client(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=5)
    config = config_for(url, server={"keepalive_s": 0.03}, provider={"first_byte_timeout_s": 0.2, "timeout_s": 0.5})
    base = await start_proxy(config)
    assert await openai_stream_text(base) == "Hello there!"
    assert scripted.models_sent() == ["m1", "m2"]


async def test_no_keepalive_when_the_answer_comes_first(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, server={"keepalive_s": 5}))
    r = await call(base, chat(stream=True))
    assert r.body == b"".join(E)
    assert r.headers["x-groq-proxy-model"] == "m1"


def pretty_error(message: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": "bad_tool"}},
        option=orjson.OPT_INDENT_2,
    ) + b"\n"


class LateAnswerUpstream(ChatUpstream):
    """Answers with a fixed status and body after `delay_s`: late enough for keep-alives to go out first."""

    def __init__(self, delay_s: float, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.delay_s, self.status, self.body, self.content_type = delay_s, status, body, content_type
        self.requests = 0

    async def _chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status, body=self.body, headers={"Content-Type": self.content_type})


async def behind_keepalives(late, aiohttp_server, start_proxy):
    """Starts `late` and a proxy that sends keep-alives every 20 ms while it waits; returns (late, base URL)."""
    server = await aiohttp_server(late.app())
    config = config_for(f"http://127.0.0.1:{server.port}/openai/v1", server={"keepalive_s": 0.02},
                        provider={"first_byte_timeout_s": 1, "timeout_s": 2})
    return late, await start_proxy(config)


def error_events(body: bytes) -> list[dict]:
    """The error objects of the SSE body's data events; each event's data lines are joined as SSE says."""
    found = []
    for block in sse_blocks(body):
        if block.startswith(b":"):
            continue
        lines = block.split(b"\n")
        assert all(line.startswith(b"data:") for line in lines), block
        data = b"\n".join(line[5:].removeprefix(b" ") for line in lines)
        if data != b"[DONE]":
            obj = orjson.loads(data)
            if "error" in obj:
                found.append(obj["error"])
    return found


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"error": {"message": "bad tool schema", "type": "invalid_request_error", "code": "bad_tool"}}),
        pretty_error("bad tool schema"),
    ],
    ids=["compact", "pretty"],
)
async def test_client_error_after_keepalives_is_one_error_event(body, aiohttp_server, start_proxy):
    # The 200 went out with the first comment: the upstream's 422 can only be told as one error event.
    late, base = await behind_keepalives(LateAnswerUpstream(0.2, 422, body), aiohttp_server, start_proxy)

    r = await call(base, chat(stream=True))

    assert r.status == 200
    assert r.body.startswith(KA)
    assert b"[DONE]" not in r.body
    (error,) = error_events(r.body)
    assert error["message"] == "bad tool schema" and error["code"] == "bad_tool"
    assert late.requests == 1  # passed back, not fallen over

    error, text = await openai_stream_error(base)
    assert error.message == "bad tool schema" and text == ""


async def test_client_error_without_json_after_keepalives_is_one_error_event(aiohttp_server, start_proxy):
    upstream = LateAnswerUpstream(0.2, 422, b"Unprocessable Entity\n\nsee the docs", content_type="text/plain")
    _, base = await behind_keepalives(upstream, aiohttp_server, start_proxy)
    r = await call(base, chat(stream=True))
    assert r.status == 200
    (error,) = error_events(r.body)
    assert "Unprocessable Entity" in error["message"]
    error, _ = await openai_stream_error(base)
    assert "Unprocessable Entity" in error.message


# --- the commit point -----------------------------------------------------------------------------------------


class CommitThenFail(ChatUpstream):
    """Sends the first events, waits until the test has seen them reach its client (so the proxy has surely
    committed), then sends `after` and ends as `end` says: "eof" (a clean end), "close" (the connection is
    cut) or "stall" (nothing more comes)."""

    def __init__(self, after: bytes, end: str, before: bytes = E[0] + E[1]) -> None:
        self.before, self.after, self.end = before, after, end
        self.gate = asyncio.Event()
        self.requests = 0

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(self.before)
        await self.gate.wait()
        if self.after:
            await resp.write(self.after)
        if self.end == "eof":
            await resp.write_eof()
        elif self.end == "close":
            request.transport.close()
        else:
            await asyncio.sleep(30)  # cancelled when the proxy gives up and hangs up
        return resp


def x_groq_error_chunk() -> bytes:
    return sse(chat_chunk("m1", None, x_groq={"id": "req_test", "error": "Service unavailable mid-generation"}))


HALF = E[2][: E[2].index(b'" there"') + 4]  # a chunk that ends inside an event (inside " there")
UPSTREAM_ERROR = sse({"error": {"message": "overloaded mid-stream", "type": "server_error"}})

AFTER_COMMIT = {
    # name -> (what the upstream sends after the first events, how it ends, the reason logged,
    #          what the client gets before the closing error event)
    "cut": (HALF, "close", "upstream_closed", E[0] + E[1]),
    "ends_early_mid_event": (HALF, "eof", "upstream_closed", E[0] + E[1]),
    "ends_without_done": (E[2], "eof", "upstream_closed", E[0] + E[1] + E[2]),
    "malformed_event": (b"data: this is not json\n\n", "eof", "malformed", E[0] + E[1]),
    "upstream_error_event": (UPSTREAM_ERROR, "eof", "upstream_error_event", E[0] + E[1]),
    "x_groq_error": (x_groq_error_chunk(), "eof", "upstream_error_event", E[0] + E[1] + x_groq_error_chunk()),
    "total_timeout": (HALF, "stall", "timeout", E[0] + E[1]),
}
COMMIT_TIMEOUTS = {"first_byte_timeout_s": 0.2, "timeout_s": 0.4}


async def start_commit_case(aiohttp_server, start_proxy, case: str) -> tuple[str, CommitThenFail]:
    after, end, _, _ = AFTER_COMMIT[case]
    upstream = CommitThenFail(after, end)
    server = await aiohttp_server(upstream.app())
    config = config_for(f"http://127.0.0.1:{server.port}/openai/v1", provider=COMMIT_TIMEOUTS)
    return await start_proxy(config), upstream


@pytest.mark.parametrize("case", list(AFTER_COMMIT))
async def test_failure_after_first_event_ends_stream_with_one_error_event(case, aiohttp_server, start_proxy, proxy_log):
    base, upstream = await start_commit_case(aiohttp_server, start_proxy, case)

    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status == 200
            assert resp.headers["x-groq-proxy-model"] == "m1"
            async with asyncio.timeout(5):  # a deadlock guard, not a speed limit
                first = await resp.content.readuntil(b"\n\n")
            upstream.gate.set()
            body = first + await resp.read()

    _, _, reason, delivered = AFTER_COMMIT[case]
    assert upstream.requests == 1  # no falling over after the commit point
    assert body.startswith(delivered)
    last = body[len(delivered):]  # exactly one more event: the error; no half event precedes it
    assert last.startswith(b'data: {"error"') and last.endswith(b"}\n\n") and last.count(b"\n\n") == 1, last
    assert len(error_events(body)) == 1
    assert b"[DONE]" not in body
    (line,) = attempt_lines(proxy_log)
    assert (line["target"], line["outcome"], line["reason"]) == ("up:m1", "failed_after_commit", reason)


@pytest.mark.parametrize("case", list(AFTER_COMMIT))
async def test_failure_after_first_event_raises_in_openai_client(case, aiohttp_server, start_proxy):
    base, upstream = await start_commit_case(aiohttp_server, start_proxy, case)
    text = ""
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                upstream.gate.set()
                for choice in chunk.choices:
                    text += choice.delta.content or ""
    assert text == ("Hello there" if case == "ends_without_done" else "Hello")  # what came first was delivered
    if case == "upstream_error_event":  # the upstream's own error event, passed through as it came
        assert info.value.message == "overloaded mid-stream"
    else:  # the proxy's: which model broke, and the request to look up
        assert info.value.message.startswith("up:m1 failed mid-stream: "), info.value.message
        assert re.search(r"\(request req_[0-9a-f]+\)$", info.value.message), info.value.message
    assert upstream.requests == 1


async def test_failure_arriving_with_the_first_event_still_falls_over(upstream, start_proxy):
    # The first event and the error come in one read: nothing reached the client yet, so the chain moves on.
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", events=[E[0] + E[1] + UPSTREAM_ERROR])
    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=True))
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.body == b"".join(stream_events("m2"))
    assert scripted.models_sent() == ["m1", "m2"]


async def test_our_error_event_after_commit_is_openai_shaped(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("cut", events=[E[0], E[1], HALF], cut_after=3)
    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=True))
    (error,) = error_events(r.body)
    assert error["type"] == "server_error" and error["code"] == "upstream_closed"
    assert "up:m1" in error["message"] and r.headers["x-request-id"] in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_failure_after_commit_counts_towards_cooldown(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("cut", cut_after=2)
    config = config_for(url, routing={"cooldown_after_failures": 1, "cooldown_s": 30})
    base = await start_proxy(config)
    first = await call(base, chat(stream=True))
    assert len(error_events(first.body)) == 1
    second = await call(base, chat(stream=True))
    assert second.body == b"".join(stream_events("m2"))
    assert second.headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m1", "m2"]  # m1 was skipped the second time


async def test_error_event_after_commit_counts_towards_cooldown(upstream, aiohttp_server, start_proxy, proxy_log):
    # An upstream error event after the first event reached the client is the model failing, like a cut: it
    # counts towards the model's cool-down.
    scripted, url = upstream
    gated = CommitThenFail(UPSTREAM_ERROR, "eof")
    gated_server = await aiohttp_server(gated.app())
    config = config_with({"gated": f"http://127.0.0.1:{gated_server.port}/openai/v1", "up": url},
                         {"tier-test": ["gated:m1", "up:m2"]}, routing={"cooldown_after_failures": 1, "cooldown_s": 30})
    base = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as resp:
            async with asyncio.timeout(5):  # a deadlock guard, not a speed limit
                first = await resp.content.readuntil(b"\n\n")
            gated.gate.set()
            body = first + await resp.read()
    assert body.startswith(E[0] + E[1]) and len(error_events(body)) == 1
    second = await call(base, chat(stream=True))
    assert second.body == b"".join(stream_events("m2"))
    assert gated.requests == 1 and scripted.models_sent() == ["m2"]  # m1 was skipped the second time
    assert [(x["target"], x["outcome"], x.get("reason")) for x in attempt_lines(proxy_log)] == [
        ("gated:m1", "failed_after_commit", "upstream_error_event"), ("gated:m1", "skipped", "cooldown"),
        ("up:m2", "answered", None)]


async def test_good_events_before_a_malformed_one_in_the_same_chunk_still_reach_the_client(aiohttp_server, start_proxy):
    """After the commit point, one upstream chunk holding good events and then a malformed one: the client
    gets the good events, then exactly one error event."""
    events = stream_events("m1", words=("one", " two", " three"))
    first, good = events[0] + events[1], b"".join(events[:4])
    upstream = CommitThenFail(events[2] + events[3] + b"data: not json\n\n", "eof", before=first)
    server = await aiohttp_server(upstream.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1", {"tier-test": ["m1"]}))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as resp:
            body = await resp.content.readexactly(len(first))
            upstream.gate.set()  # the proxy has passed the first events on: the commit point is behind us
            body += await resp.read()
    assert body.startswith(good), body
    tail = body[len(good):]
    assert tail.count(b"data: ") == 1 and b'"error"' in tail and b"[DONE]" not in tail


async def test_stream_whose_end_lags_its_done_keeps_the_upstream_connection(aiohttp_server):
    upstream = LateEndUpstream(late_s=0.05)
    server = await aiohttp_server(upstream.app())
    app = build_app(config_for(f"http://127.0.0.1:{server.port}/openai/v1"))
    base = f"http://127.0.0.1:{(await aiohttp_server(app)).port}"
    pools = app[STATE].upstreams.client._pools
    for _ in range(3):
        r = await call(base, chat(stream=True))
        assert r.status == 200 and r.body == b"".join(E)
        await until(lambda: any(pool.idle for pool in pools.values()), what="the drained connection pooled")
    assert len(upstream.peers) == 3 and len(set(upstream.peers)) == 1  # no new connection (or TLS handshake) each


# --- a clean end after the finish chunk -------------------------------------------------------------------------


async def test_stream_ending_cleanly_after_its_finish_chunk_without_done_is_an_answer(upstream, start_proxy, proxy_log):
    # Some servers end the stream after the chunk with finish_reason and never send [DONE]. The answer is all
    # there: the client gets it and then the end marker every OpenAI stream ends with; the model is not blamed.
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", events=E[:-1])
    base = await start_proxy(config_for(url, routing={"cooldown_after_failures": 1, "cooldown_s": 30}))

    r = await call(base, chat(stream=True))
    assert r.status == 200
    assert r.body == b"".join(E[:-1]) + b"data: [DONE]\n\n"
    assert await openai_stream_text(base) == "Hello there!"  # no APIError: a complete answer
    assert scripted.models_sent() == ["m1", "m1"]  # not cooling down after two such streams
    lines = attempt_lines(proxy_log)
    assert [(x["outcome"], x.get("reason")) for x in lines] == [("answered", None), ("answered", None)]


async def test_stream_ending_after_its_finish_chunk_inside_an_event_is_still_broken(aiohttp_server, start_proxy, proxy_log):
    # The finish chunk came, then half an event and the end: not a clean end.
    base, upstream = await start_commit_case_with(aiohttp_server, start_proxy, E[2] + E[3] + E[4] + HALF, "eof")
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as resp:
            first = await resp.content.readuntil(b"\n\n")
            upstream.gate.set()
            body = first + await resp.read()
    assert len(error_events(body)) == 1 and b"[DONE]" not in body
    (line,) = attempt_lines(proxy_log)
    assert (line["outcome"], line["reason"]) == ("failed_after_commit", "upstream_closed")


async def start_commit_case_with(aiohttp_server, start_proxy, after: bytes, end: str) -> tuple[str, CommitThenFail]:
    upstream = CommitThenFail(after, end)
    server = await aiohttp_server(upstream.app())
    config = config_for(f"http://127.0.0.1:{server.port}/openai/v1", provider=COMMIT_TIMEOUTS)
    return await start_proxy(config), upstream
