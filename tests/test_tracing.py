"""Traces as a collector receives them: one SERVER span per request, one CLIENT span per upstream attempt.

Everything runs against real local servers: the proxy app, `ScriptedUpstream` (or a small upstream here),
and `tests.otlp_receiver`, which decodes the exported OTLP/HTTP protobuf with the official classes.
The last part checks the hand-written encoder of `proxy.otlp` against those classes directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.app.config import Config, parse_config
from proxy.routing.latency import CATEGORIES
from proxy.telemetry.otlp import Encoder, Exporter
from proxy.app.server import STATE, build_app
from proxy.sim.testing import USAGE, Behaviour, ChatUpstream, status, stream_events
from proxy.telemetry.tracing import KIND_CLIENT, KIND_SERVER, SEMCONV_SCHEMA, STATUS_ERROR, STATUS_UNSET, Span, Tracer
from tests.conftest import until
from tests.otlp_receiver import decode, otlp  # noqa: F401  (otlp is a fixture)

KEY = "sk-test-secret-upstream-key"
MESSAGES = [{"role": "user", "content": "hi"}]
FAST_EXPORT = 0.05  # seconds between export rounds: how soon spans reach the receiver


# --- helpers --------------------------------------------------------------------------------------------------


def traced_config(upstream_url: str, receiver_url: str | None, chains: dict[str, list[str]] | None = None, *,
                  telemetry: dict | None = None, latency: dict[str, dict] | None = None,
                  env: dict[str, str] | None = None, **tables) -> Config:
    """A config with provider `up` at `upstream_url` and tracing to `receiver_url`.
    `latency` maps virtual model -> its `latency_ms` table."""
    chains = chains or {"tier-test": ["m1", "m2", "m3"]}
    models = {}
    for name, chain in chains.items():
        models[name] = {"chain": [f"up:{m}" for m in chain]}
        if latency and name in latency:
            models[name]["latency_ms"] = latency[name]
    tele = {"export_interval_s": FAST_EXPORT, **(telemetry or {})}
    if receiver_url is not None:
        tele = {"enabled": True, "endpoint": receiver_url, **tele}
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"up": {"base_url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY", **tables.pop("provider", {})}},
        "models": models,
        "telemetry": tele,
        **tables,
    }
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": KEY, **(env or {})})


def chat(model: str = "tier-test", *, stream: bool = False, **extra) -> dict:
    body = {"model": model, "messages": MESSAGES, **extra}
    if stream:
        body["stream"] = True
    return body


async def call(base: str, body: dict, headers: dict | None = None) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upstream_traceparents(scripted) -> list[str]:
    """The `traceparent` each upstream request carried (header names compared without case)."""
    out = []
    for r in scripted.requests:
        values = [v for k, v in r["headers"].items() if k.lower() == "traceparent"]
        assert len(values) == 1, r["headers"]
        out.append(values[0])
    return out


def records(caplog, event: str, level: int | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "groq_proxy" and r.getMessage() == event and (level is None or r.levelno == level)]


class SlowStream(ChatUpstream):
    """An upstream whose stream waits `gap_s` between events; records when it sent headers and each event
    (wall-clock ns, the clock spans use)."""

    def __init__(self, gap_s: float = 0.1, words: tuple[str, ...] = ("Hello", " there", "!"), repeat: int = 1) -> None:
        self.gap_s = gap_s
        self.words = words * repeat
        self.headers_sent_ns = 0
        self.sent_ns: list[int] = []
        self.finished = asyncio.Event()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = body["model"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.headers_sent_ns = time.time_ns()
        events = stream_events(model, self.words)
        try:
            for i, event in enumerate(events):
                if i:
                    await asyncio.sleep(self.gap_s)
                await resp.write(event)
                self.sent_ns.append(time.time_ns())
            await resp.write_eof()
        except ConnectionError:
            pass  # the proxy hung up (the client went away)
        finally:
            self.finished.set()
        return resp


# --- the tree of one request ----------------------------------------------------------------------------------


async def test_request_that_fell_over_twice_is_one_server_span_with_three_attempt_spans(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(503), m2=status(429, "rate_limit_exceeded", "slow down"))
    base = await start_proxy(traced_config(url, otlp.url))

    code, headers, body = await call(base, chat(max_tokens=50, temperature=0.2))

    assert code == 200, body
    assert headers["x-groq-proxy-model"] == "m3"
    server, attempts = await otlp.wait_for_request(headers["x-request-id"], attempts=3)
    trace = otlp.trace(server.trace_id)
    assert len(trace) == 4  # nothing else in this trace

    # The SERVER span: the request as the client saw it.
    assert server.kind == KIND_SERVER
    assert server.name == "POST /v1/chat/completions"
    assert server.parent_span_id == ""
    assert server.status_code == STATUS_UNSET  # success: left unset, as the HTTP conventions say
    a = server.attributes
    assert a["http.request.method"] == "POST"
    assert a["http.route"] == a["url.path"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "tier-test"
    assert a["gen_ai.response.model"] == "m3"
    assert a["groq_proxy.virtual_model"] == "tier-test"
    assert a["groq_proxy.request_id"] == headers["x-request-id"]
    assert a["groq_proxy.attempts"] == 3
    assert a["groq_proxy.answered_by"] == "up:m3"
    assert a["groq_proxy.stream"] is False
    assert a["groq_proxy.latency_category"] in CATEGORIES
    assert "error.type" not in a

    # Three CLIENT spans, children of the server span, one per attempt, in order.
    assert [s.name for s in attempts] == ["chat m1", "chat m2", "chat m3"]
    for index, span in enumerate(attempts):
        assert span.kind == KIND_CLIENT
        assert span.trace_id == server.trace_id
        assert span.parent_span_id == server.span_id
        assert span.span_id not in (server.span_id, *(s.span_id for s in attempts if s is not span))
        assert server.start_ns <= span.start_ns <= span.end_ns <= server.end_ns
        at = span.attributes
        assert at["groq_proxy.attempt.index"] == index
        assert at["gen_ai.operation.name"] == "chat"
        assert at["gen_ai.provider.name"] == "up"
        assert at["gen_ai.request.model"] == f"m{index + 1}"
        assert at["gen_ai.request.max_tokens"] == 50
        assert at["gen_ai.request.temperature"] == 0.2
        assert at["server.address"] == "127.0.0.1"
        assert at["server.port"] == port_of(url)
        assert at["groq_proxy.virtual_model"] == "tier-test"
    assert attempts[0].end_ns <= attempts[1].start_ns and attempts[1].end_ns <= attempts[2].start_ns

    first, second, third = attempts
    assert first.status_code == STATUS_ERROR
    assert first.status_message == "503: upstream says no"
    assert first.attributes["error.type"] == "status_503"
    assert first.attributes["groq_proxy.attempt.outcome"] == "fell_over"
    assert first.attributes["groq_proxy.attempt.reason"] == "status_503"
    assert first.attributes["http.response.status_code"] == 503
    assert second.status_code == STATUS_ERROR
    assert second.attributes["error.type"] == "rate_limited"
    assert second.attributes["groq_proxy.attempt.outcome"] == "fell_over"
    assert second.attributes["groq_proxy.attempt.reason"] == "rate_limited"
    assert second.attributes["http.response.status_code"] == 429
    for failed in (first, second):
        assert "gen_ai.usage.input_tokens" not in failed.attributes
        assert "gen_ai.response.id" not in failed.attributes

    assert third.status_code == STATUS_UNSET  # not an error; OK is for operators to set, per the spec
    t = third.attributes
    assert t["groq_proxy.attempt.outcome"] == "answered"
    assert "groq_proxy.attempt.reason" not in t and "error.type" not in t
    assert t["http.response.status_code"] == 200
    assert t["gen_ai.response.id"] == "chatcmpl-test"
    assert t["gen_ai.response.model"] == "m3"
    assert t["gen_ai.response.finish_reasons"] == ["stop"]
    assert t["gen_ai.usage.input_tokens"] == USAGE["prompt_tokens"]
    assert t["gen_ai.usage.output_tokens"] == USAGE["completion_tokens"]
    ttfc = t["groq_proxy.time_to_first_chunk_ms"]
    assert isinstance(ttfc, float) and 0 < ttfc <= server.duration_ns / 1e6  # within the request it belongs to

    # Each attempt told its upstream which span it belongs to.
    assert scripted.models_sent() == ["m1", "m2", "m3"]
    assert upstream_traceparents(scripted) == [f"00-{server.trace_id}-{s.span_id}-01" for s in attempts]

    # What the collector needs to know about the sender.
    assert server.resource["service.name"] == "groq-proxy"
    assert server.resource["telemetry.sdk.language"] == "python"
    assert server.schema_url == SEMCONV_SCHEMA
    assert server.scope_name == "groq-proxy"


async def test_streamed_answer_records_usage_and_first_chunk_time(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url))

    code, headers, body = await call(base, chat(stream=True))

    assert code == 200 and body.endswith(b"data: [DONE]\n\n")
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert server.attributes["groq_proxy.stream"] is True
    assert server.attributes["http.response.status_code"] == 200
    a = attempt.attributes
    assert attempt.status_code == STATUS_UNSET
    assert a["groq_proxy.attempt.outcome"] == "answered"
    assert a["gen_ai.response.id"] == "chatcmpl-test"
    assert a["gen_ai.response.model"] == "m1"
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (7, 3)  # counted once
    assert a["groq_proxy.time_to_first_chunk_ms"] * 1_000_000 <= attempt.duration_ns


async def test_stream_cut_midway_is_an_error_span_covering_the_stream(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("cut", cut_after=3)
    base = await start_proxy(traced_config(url, otlp.url))

    code, headers, body = await call(base, chat(stream=True))

    assert code == 200  # the 200 went out with the first event; the failure is an SSE error event
    assert b'"code":"upstream_closed"' in body
    assert scripted.models_sent() == ["m1"]  # after the commit point nothing falls over
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)

    assert attempt.name == "chat m1"
    assert attempt.status_code == STATUS_ERROR
    a = attempt.attributes
    assert a["groq_proxy.attempt.outcome"] == "failed_after_commit"
    assert a["groq_proxy.attempt.reason"] == "upstream_closed"
    assert a["error.type"] == "upstream_closed"
    assert a["gen_ai.response.id"] == "chatcmpl-test"  # learned from the events that did arrive
    # The span did not end at the first chunk: it ends when the stream broke, after the first chunk.
    ttfc_ns = a["groq_proxy.time_to_first_chunk_ms"] * 1_000_000
    assert attempt.end_ns >= attempt.start_ns + ttfc_ns
    assert attempt.end_ns <= server.end_ns

    # The request failed as a whole: the server span says so with the status the metrics use.
    assert server.status_code == STATUS_ERROR
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "502"
    assert "gen_ai.response.model" not in server.attributes


async def test_attempt_span_of_a_slow_stream_ends_after_its_last_chunk(upstream, otlp, aiohttp_server, start_proxy):
    slow = SlowStream(gap_s=0.05)
    server_ = await aiohttp_server(slow.app())
    base = await start_proxy(traced_config(f"http://127.0.0.1:{server_.port}/openai/v1", otlp.url, {"tier-test": ["m1"]}))

    code, headers, body = await call(base, chat(stream=True))

    assert code == 200 and body.endswith(b"data: [DONE]\n\n")
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert attempt.attributes["groq_proxy.attempt.outcome"] == "answered"
    assert len(slow.sent_ns) == 6  # role chunk, 3 words, finish chunk, [DONE]
    # Headers and the first event came long before the end; the span lasts until the last event was sent
    # (the proxy cannot have read [DONE] before the upstream wrote it).
    assert attempt.start_ns <= slow.headers_sent_ns
    assert attempt.end_ns >= slow.sent_ns[-1]
    ttfc_end = attempt.start_ns + attempt.attributes["groq_proxy.time_to_first_chunk_ms"] * 1_000_000
    assert ttfc_end < slow.sent_ns[-1] <= attempt.end_ns <= server.end_ns
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 3


async def test_client_that_goes_away_mid_stream_leaves_a_cancelled_attempt(otlp, aiohttp_server):
    slow = SlowStream(gap_s=0.02, repeat=200)  # about 12 s of stream if nobody hangs up
    server_ = await aiohttp_server(slow.app())
    config = traced_config(f"http://127.0.0.1:{server_.port}/openai/v1", otlp.url, {"tier-test": ["m1"]})
    # Served as `groq-proxy serve` serves it (web.run_app: handlers are not cancelled when a client leaves);
    # aiohttp's test server would cancel the handler instead.
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/chat/completions", json=chat(stream=True)) as resp:
                request_id = resp.headers["x-request-id"]
                assert await resp.content.readany()
                resp.close()  # hang up after the first chunk

        server, (attempt,) = await otlp.wait_for_request(request_id, attempts=1)
        await asyncio.wait_for(slow.finished.wait(), 5)
    finally:
        await runner.cleanup()
    assert attempt.attributes["groq_proxy.attempt.outcome"] == "cancelled"
    assert attempt.attributes["groq_proxy.attempt.reason"] == "client_disconnected"
    assert attempt.status_code == STATUS_ERROR
    assert len(slow.sent_ns) < len(slow.words) + 3  # the proxy stopped reading: the upstream did not send it all
    assert server.attributes["http.response.status_code"] == 499


# --- context propagation and sampling -------------------------------------------------------------------------


async def test_incoming_traceparent_makes_the_server_span_its_child(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(traced_config(url, otlp.url))
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()

    code, headers, _ = await call(base, chat(), {"traceparent": f"00-{trace_id}-{parent_id}-01",
                                                  "tracestate": "vendor=opaque"})

    assert code == 200
    server, attempts = await otlp.wait_for_request(headers["x-request-id"], attempts=2)
    assert server.trace_id == trace_id
    assert server.parent_span_id == parent_id
    assert server.flags & 0x300 == 0x300  # the parent is known to be remote
    assert all(s.trace_id == trace_id and s.parent_span_id == server.span_id for s in attempts)
    assert all(s.flags & 0x300 == 0x100 for s in attempts)  # their parent is local
    # Each attempt passes on the same trace with itself as the parent, not the caller's header.
    sent = upstream_traceparents(scripted)
    assert sent == [f"00-{trace_id}-{s.span_id}-01" for s in attempts]
    assert all(parent_id not in tp for tp in sent)


@pytest.mark.parametrize("header", ["00-{t}-{p}", "00-{t}-0000000000000000-01", "00-" + "0" * 32 + "-{p}-01",
                                    "garbage", "01-{t}-{p}-01-extra"])
async def test_invalid_traceparent_starts_a_new_trace(header, upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url))
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()

    code, headers, _ = await call(base, chat(), {"traceparent": header.format(t=trace_id, p=parent_id)})

    assert code == 200
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert server.parent_span_id == "" and server.trace_id not in (trace_id, "0" * 32)
    assert upstream_traceparents(scripted) == [f"00-{server.trace_id}-{attempt.span_id}-01"]


async def test_caller_that_does_not_sample_gets_no_spans(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)  # a fallback too: its attempt spans would be there if recorded
    base = await start_proxy(traced_config(url, otlp.url))
    unsampled = os.urandom(16).hex()

    code, skipped_headers, _ = await call(base, chat(), {"traceparent": f"00-{unsampled}-{os.urandom(8).hex()}-00"})
    assert code == 200
    # A sampled request after it: once its spans are in, anything of the first would be in too (queue order).
    code, headers, _ = await call(base, chat())
    assert code == 200
    await otlp.wait_for_request(headers["x-request-id"], attempts=2)

    assert otlp.trace(unsampled) == []
    assert otlp.request_span(skipped_headers["x-request-id"]) is None
    assert len(otlp.spans) == 3


async def test_sample_ratio_zero_still_follows_a_sampled_caller(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url, telemetry={"sample_ratio": 0.0}))
    trace_id = os.urandom(16).hex()

    for _ in range(5):
        assert (await call(base, chat()))[0] == 200
    code, headers, _ = await call(base, chat(), {"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
    assert code == 200

    server, _ = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert server.trace_id == trace_id
    assert {s.trace_id for s in otlp.spans} == {trace_id}  # the five unsampled requests left nothing


# --- outcomes, categories, content ----------------------------------------------------------------------------


async def test_model_cooling_down_shows_as_a_skipped_attempt(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    config = traced_config(url, otlp.url, routing={"cooldown_after_failures": 1, "cooldown_s": 60})
    base = await start_proxy(config)

    assert (await call(base, chat()))[0] == 200  # m1 fails and starts cooling down
    code, headers, _ = await call(base, chat())

    assert code == 200
    assert scripted.models_sent() == ["m1", "m2", "m2"]
    server, (skipped, answered) = await otlp.wait_for_request(headers["x-request-id"], attempts=2)
    assert skipped.name == "chat m1"
    assert skipped.kind == KIND_CLIENT and skipped.parent_span_id == server.span_id
    assert skipped.status_code == STATUS_UNSET  # a skip is a decision, not a failure
    s = skipped.attributes
    assert s["groq_proxy.attempt.outcome"] == "skipped"
    assert s["groq_proxy.attempt.reason"] == "cooldown"
    assert s["groq_proxy.attempt.index"] == 0
    assert s["gen_ai.request.model"] == "m1" and s["gen_ai.provider.name"] == "up"
    assert "error.type" not in s and "http.response.status_code" not in s
    assert "server.address" not in s and "server.port" not in s  # nothing was sent: no made-up "" and port 0
    assert answered.attributes["groq_proxy.attempt.index"] == 1
    assert answered.attributes["groq_proxy.attempt.outcome"] == "answered"
    assert server.attributes["groq_proxy.attempts"] == 1  # attempts actually sent


async def test_request_passed_back_to_the_client_is_one_passed_back_attempt(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(422, None, "messages: bad role")
    base = await start_proxy(traced_config(url, otlp.url))

    code, headers, _ = await call(base, chat())

    assert code == 422
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert attempt.attributes["groq_proxy.attempt.outcome"] == "passed_back"
    assert attempt.attributes["http.response.status_code"] == 422
    assert server.attributes["http.response.status_code"] == 422


async def test_all_models_failing_is_an_error_server_span(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(500), m2=status(502), m3=status(503))
    base = await start_proxy(traced_config(url, otlp.url))

    code, headers, _ = await call(base, chat())

    assert code == 502
    server, attempts = await otlp.wait_for_request(headers["x-request-id"], attempts=3)
    assert server.status_code == STATUS_ERROR
    assert server.attributes["error.type"] == "502"
    assert "groq_proxy.latency_category" not in server.attributes  # only answers are categorised
    assert [s.attributes["error.type"] for s in attempts] == ["status_500", "status_502", "status_503"]
    assert all(s.status_code == STATUS_ERROR for s in attempts)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("thresholds", "category"), [
    ({"excellent": 0, "good": 0, "acceptable": 0, "poor": 0}, "critical"),
    ({"excellent": 600_000, "good": 600_000, "acceptable": 600_000, "poor": 600_000}, "excellent"),
])
async def test_latency_category_is_on_the_server_span(thresholds, category, stream, upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url, latency={"tier-test": thresholds}))

    code, headers, _ = await call(base, chat(stream=stream))

    assert code == 200
    server, _ = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert server.attributes["groq_proxy.latency_category"] == category


async def test_content_is_not_recorded_unless_turned_on(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url))

    ids = [(await call(base, chat(stream=stream)))[1]["x-request-id"] for stream in (False, True)]

    for request_id in ids:
        server, (attempt,) = await otlp.wait_for_request(request_id, attempts=1)
        for span in (server, attempt):
            assert not any(k in span.attributes for k in ("gen_ai.input.messages", "gen_ai.output.messages"))
    for export in otlp.exports:
        assert b"Hello there" not in export.body and b'"hi"' not in export.body


async def test_content_is_recorded_when_turned_on(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url, telemetry={"record_content": True}))

    code, headers, _ = await call(base, chat())

    assert code == 200
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert orjson.loads(server.attributes["gen_ai.input.messages"]) == [
        {"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]} for m in MESSAGES
    ]
    output = orjson.loads(attempt.attributes["gen_ai.output.messages"])
    assert output == [{"role": "assistant", "parts": [{"type": "text", "content": "Hello there!"}],
                       "finish_reason": "stop"}]


async def test_streamed_completion_is_recorded_when_turned_on(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url, telemetry={"record_content": True}))
    code, headers, _ = await call(base, chat(stream=True))
    assert code == 200
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    output = orjson.loads(attempt.attributes["gen_ai.output.messages"])
    assert output == [{"role": "assistant", "parts": [{"type": "text", "content": "Hello there!"}],
                       "finish_reason": "stop"}]


async def test_unsampled_caller_context_and_tracestate_still_go_upstream(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url))
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    code, headers, _ = await call(base, chat(), headers={"traceparent": incoming, "tracestate": "vendor=1"})
    assert code == 200
    sent = {k.lower(): v for k, v in scripted.requests[-1]["headers"].items()}
    assert sent["traceparent"] == incoming and sent["tracestate"] == "vendor=1"


async def test_a_client_error_passed_back_leaves_the_server_span_unset(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(422, "bad_field")
    base = await start_proxy(traced_config(url, otlp.url))
    code, headers, _ = await call(base, chat())
    assert code == 422
    server, (attempt,) = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert server.status_code == 0 and "error.type" not in server.attributes


async def test_provider_key_never_reaches_the_collector(upstream, otlp, start_proxy):
    # Every path that puts upstream text into a span, with an upstream that echoes the key it was given.
    scripted, url = upstream
    echo = f"Incorrect API key provided: {KEY}"
    scripted.behaviours.update(
        m1=status(401, "invalid_api_key", echo),
        m2=status(503, message=echo),
        m3=Behaviour("error_event", cut_after=2),
        a1=status(400, None, echo),
    )
    config = traced_config(url, otlp.url, {"tier-test": ["m1", "m2", "m3"], "tier-a": ["a1"], "tier-ok": ["ok1"]},
                           telemetry={"record_content": True})
    base = await start_proxy(config)

    answers = [await call(base, body, {"Authorization": "Bearer client-key"})
               for body in (chat(), chat(stream=True), chat("tier-a"), chat("tier-ok"), chat("tier-ok", stream=True))]

    for _, headers, _ in answers:
        await otlp.wait_for(lambda r, rid=headers["x-request-id"]: r.request_span(rid))
    assert len(otlp.spans) == 4 + 4 + 2 + 2 + 2  # (server + attempts) per request
    for export in otlp.exports:
        assert KEY.encode() not in export.body
        assert b"client-key" not in export.body
    messages = [s.status_message for s in otlp.spans if s.status_message]
    assert any("Incorrect API key provided" in m for m in messages)  # the echo was recorded, without the key


# --- export: endpoints, failures, never in the way ------------------------------------------------------------


@pytest.fixture
def quick_retries(monkeypatch):
    """Export retries with millisecond waits, so a test sees every retry without waiting seconds."""
    monkeypatch.setattr(Exporter, "backoff_s", 0.01)
    monkeypatch.setattr(Exporter, "max_backoff_s", 0.05)


async def test_dead_collector_costs_only_the_spans(upstream, aiohttp_server, proxy_log, quick_retries):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    dead = f"http://127.0.0.1:{closed_port()}"
    app = build_app(traced_config(url, dead))
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    exporter = app[STATE].exporter

    for round_ in (1, 2, 3):
        code, headers, body = await call(base, chat(stream=round_ == 2))
        assert code == 200 and headers["x-groq-proxy-model"] == "m2"
        await until(lambda n=round_: exporter.failed >= 3 * n, what=f"export round {round_} failed")

    assert exporter.exported == 0 and exporter.failed == 9
    warnings = records(proxy_log, "trace_export_failed")
    assert len(warnings) == 1  # once per outage, not once per batch
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].fields["url"] == dead + "/v1/traces"
    assert warnings[0].fields["error"].startswith("ConnectFailed: cannot connect to 127.0.0.1:")


async def test_collector_that_keeps_failing_gets_the_batch_retried_then_given_up(upstream, otlp, start_proxy,
                                                                                   proxy_log, quick_retries):
    scripted, url = upstream
    otlp.fail_status = 503
    base = await start_proxy(traced_config(url, otlp.url))

    _, lost, _ = await call(base, chat())
    lost_id = lost["x-request-id"]
    await until(lambda: records(proxy_log, "trace_export_failed"), what="export failure logged")
    # The server span and its one attempt, refused on the first POST and on each of the 3 retries.
    assert len(otlp.rejected) == 2 * (1 + Exporter.retries)
    assert len({s.span_id for s in otlp.rejected}) == 2
    otlp.fail_status = None
    _, kept, _ = await call(base, chat())
    await otlp.wait_for_request(kept["x-request-id"], attempts=1)
    await until(lambda: records(proxy_log, "trace_export_recovered"), what="recovery logged")

    failed = records(proxy_log, "trace_export_failed")
    assert len(failed) == 1 and failed[0].fields["error"] == "status 503"
    assert len(records(proxy_log, "trace_export_recovered", logging.INFO)) == 1
    assert otlp.request_span(lost_id) is None  # given up after its retries, not retried forever
    assert {s.span_id for s in otlp.spans}.isdisjoint(s.span_id for s in otlp.rejected)


async def test_collector_that_fails_twice_then_accepts_gets_every_span_once(upstream, aiohttp_server, otlp,
                                                                            quick_retries):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)  # a fallback: one failed attempt, one answered
    otlp.fail_next = 2
    app = build_app(traced_config(url, otlp.url))
    server = await aiohttp_server(app)
    exporter = app[STATE].exporter

    code, headers, _ = await call(f"http://127.0.0.1:{server.port}", chat())

    assert code == 200
    request_span, attempts = await otlp.wait_for_request(headers["x-request-id"], attempts=2)
    assert [a.attributes["groq_proxy.attempt.outcome"] for a in attempts] == ["fell_over", "answered"]
    await until(lambda: exporter.exported == 3, what="all three spans exported")
    assert len(otlp.spans) == 3 and len({s.span_id for s in otlp.spans}) == 3  # every span, none twice
    assert otlp.fail_next == 0 and exporter.retried == 2 and exporter.failed == 0
    assert {s.span_id for s in otlp.rejected} <= {s.span_id for s in otlp.spans}


async def test_export_retry_waits_for_the_collectors_retry_after(otlp, monkeypatch):
    monkeypatch.setattr(Exporter, "backoff_s", 0.001)
    otlp.fail_next, otlp.fail_next_status, otlp.retry_after = 1, 429, "1"
    tracer = Tracer()
    tracer.end(Span(7, 0, "s", KIND_SERVER, {}))
    exporter = Exporter(tracer, Encoder("retry-after"), otlp.traces_url, interval_s=3600)
    exporter.start()
    try:
        await exporter.flush()
    finally:
        await exporter.close()

    assert otlp.posts == 2 and exporter.exported == 1 and exporter.retried == 1
    assert otlp.post_times[1] - otlp.post_times[0] >= 0.95  # it waited the second the collector asked for


@pytest.mark.parametrize("refusal", [400, 401, 413])
async def test_export_refused_for_good_is_not_retried(refusal, otlp, quick_retries):
    otlp.fail_next, otlp.fail_next_status = 1, refusal
    tracer = Tracer()
    for i in range(3):
        tracer.end(Span(i + 1, 0, "s", KIND_SERVER, {}))
    exporter = Exporter(tracer, Encoder("refused"), otlp.traces_url, interval_s=3600)
    exporter.start()
    try:
        await exporter.flush()
    finally:
        await exporter.close()

    assert otlp.posts == 1 and exporter.retried == 0
    assert exporter.failed == 3 and exporter.exported == 0 and not tracer.queue


def test_retry_after_header_forms():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from proxy.telemetry.otlp import _retry_after

    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None and _retry_after("-1") is None
    later = _retry_after(format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True))
    assert 25 < later <= 30
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


async def test_collector_that_always_fails_keeps_memory_bounded_and_the_proxy_serving(upstream, aiohttp_server, otlp,
                                                                                     monkeypatch):
    monkeypatch.setattr(Exporter, "backoff_s", 0.02)
    monkeypatch.setattr(Exporter, "max_backoff_s", 0.1)
    scripted, url = upstream
    otlp.fail_status = 503
    app = build_app(traced_config(url, otlp.url))
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    exporter = app[STATE].exporter
    tracer = exporter.tracer
    tracer.max_queue = 20

    for _ in range(40):  # two spans each: 80 spans, four times what the queue may hold
        code, _, _ = await call(base, chat())
        assert code == 200
        assert len(tracer.queue) <= 20  # a batch being retried stays inside the bound

    # Every span ended is accounted for: given up after its retries, dropped on a full queue, or still queued.
    await until(lambda: exporter.failed + tracer.dropped + len(tracer.queue) == 80, what="all 80 spans accounted")
    await until(lambda: exporter.failed > 0, what="a batch given up")
    assert tracer.dropped > 0 and exporter.exported == 0 and otlp.spans == []
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert f'groq_proxy_trace_spans_dropped_total{{reason="queue_full"}} {tracer.dropped}' in text
    assert 'groq_proxy_trace_spans_dropped_total{reason="export_failed"} ' in text
    otlp.fail_status = None  # the collector is back: the shutdown's last flush goes through at once


async def test_export_waiting_on_a_stuck_collector_does_not_hold_requests(upstream, otlp, start_proxy):
    scripted, url = upstream
    otlp.hold = asyncio.Event()
    base = await start_proxy(traced_config(url, otlp.url))

    assert (await call(base, chat()))[0] == 200
    await otlp.wait_for(lambda r: r.held == 1)  # the exporter is now waiting on the collector
    answers = [await call(base, chat(stream=stream)) for stream in (False, True, False)]

    assert [a[0] for a in answers] == [200, 200, 200]
    assert otlp.held == 1 and otlp.exports == []  # all three were answered while the export still hung
    otlp.hold.set()
    for _, headers, _ in answers:
        await otlp.wait_for_request(headers["x-request-id"], attempts=1)


async def test_otel_environment_selects_endpoint_service_and_headers(upstream, otlp, start_proxy):
    scripted, url = upstream
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url + "/", "OTEL_SERVICE_NAME": "proxy-from-env",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=tok123, x-tenant = blue"}
    config = traced_config(url, None, env=env)  # no endpoint and no `enabled` in [telemetry]
    assert config.telemetry.tracing is True
    assert config.telemetry.traces_url == otlp.url + "/v1/traces"
    base = await start_proxy(config)

    code, headers, _ = await call(base, chat())

    assert code == 200
    server, _ = await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    assert server.resource["service.name"] == "proxy-from-env"
    sent = otlp.exports[0].headers
    assert (sent["x-collector-token"], sent["x-tenant"]) == ("tok123", "blue")
    assert sent["Content-Type"] == "application/x-protobuf"


@pytest.mark.parametrize(("env", "telemetry", "expected"), [
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/custom/path",
      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}, {}, (True, "http://traces:4318/custom/path", 1.0)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, {}, (True, "http://jaeger:4318/v1/traces", 1.0)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "OTEL_SDK_DISABLED": "true"}, {},
     (False, "http://jaeger:4318/v1/traces", 1.0)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
      "OTEL_TRACES_SAMPLER_ARG": "0.25"}, {}, (True, "http://jaeger:4318/v1/traces", 0.25)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "OTEL_TRACES_SAMPLER": "always_off"}, {},
     (True, "http://jaeger:4318/v1/traces", 0.0)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, {"endpoint": "http://table:4318"},
     (True, "http://table:4318/v1/traces", 1.0)),
    ({}, {}, (False, "http://127.0.0.1:4318/v1/traces", 1.0)),
    ({}, {"enabled": True}, (True, "http://127.0.0.1:4318/v1/traces", 1.0)),
])
def test_otel_variables_and_the_telemetry_table(env, telemetry, expected):
    raw = {"providers": {"up": {"base_url": "http://up"}}, "models": {"t": {"chain": ["up:m"]}},
           "telemetry": telemetry}
    t = parse_config(raw, env=env).telemetry
    assert (t.tracing, t.traces_url, t.sample_ratio) == expected


async def test_exporter_sends_large_queues_in_batches(otlp):
    tracer = Tracer()
    for i in range(600):
        span = Span(i + 1, 0, f"span {i}", KIND_SERVER, {"i": i})
        tracer.end(span)
    exporter = Exporter(tracer, Encoder("batch-test"), otlp.traces_url, interval_s=3600)
    exporter.start()
    try:
        await exporter.flush()
    finally:
        await exporter.close()

    assert [len(e.spans) for e in otlp.exports] == [512, 88]
    assert [s.attributes["i"] for s in otlp.spans] == list(range(600))
    assert exporter.exported == 600 and exporter.failed == 0 and not tracer.queue


def test_full_queue_drops_spans_instead_of_growing():
    tracer = Tracer(max_queue=3)
    for i in range(5):
        tracer.end(Span(1, 0, "s", KIND_SERVER, {}))
    assert len(tracer.queue) == 3 and tracer.dropped == 2


# --- the hand-written encoder against the official protobuf classes -------------------------------------------

ATTRS = {
    "str": "héllo ✓",
    "empty": "",
    "true": True,
    "false": False,
    "zero": 0,
    "int": 42,
    "negative": -5,
    "big": 2**62 + 1,
    "min": -(2**63),
    "float": 0.2,
    "negative_float": -1.5e300,
    "float_whole": 3.0,
    "tuple": ("stop", "length"),
    "empty_tuple": (),
    "list": ["a", "b"],
    "skipped": None,
}


def _roundtrip(spans: list[Span], service: str = "svc", resource: dict | None = None) -> ExportTraceServiceRequest:
    encoder = Encoder(service, resource)
    return ExportTraceServiceRequest.FromString(encoder.request([encoder.span(s) for s in spans]))


def test_encoder_round_trips_every_attribute_type():
    span = Span(0x0123456789ABCDEF0123456789ABCDEF, 0xFEDCBA9876543210, "chat m1", KIND_CLIENT, dict(ATTRS))
    span.span_id = 0x8000000000000001  # top bit set: still 8 bytes, big-endian
    span.start_ns, span.end_ns = 1_700_000_000_123_456_789, 1_700_000_001_987_654_321
    span.set_error("status_503", "503: upstream says no ✗")
    span.add_event("groq_proxy.policy.decision", {"policy": "budget", "decision": "continue", "left": -3, "x": None})
    span.add_event("bare")

    request = _roundtrip([span], "groq-proxy", {"deployment.environment": "test"})

    (rs,) = request.resource_spans
    (ss,) = rs.scope_spans
    (s,) = ss.spans
    assert s.trace_id.hex() == "0123456789abcdef0123456789abcdef"
    assert s.span_id.hex() == "8000000000000001"
    assert s.parent_span_id.hex() == "fedcba9876543210"
    assert (s.name, s.kind) == ("chat m1", KIND_CLIENT)
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (span.start_ns, span.end_ns)
    assert (s.status.code, s.status.message) == (STATUS_ERROR, "503: upstream says no ✗")
    decoded = decode(request.SerializeToString())[0]
    expected = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ATTRS.items() if v is not None}
    expected["error.type"] = "status_503"
    assert decoded.attributes == expected
    assert [type(decoded.attributes[k]) for k in ("true", "zero", "float_whole")] == [bool, int, float]
    kinds = {kv.key: kv.value.WhichOneof("value") for kv in s.attributes}
    assert kinds["tuple"] == kinds["empty_tuple"] == kinds["list"] == "array_value"
    assert kinds["float_whole"] == "double_value" and kinds["true"] == "bool_value" and kinds["min"] == "int_value"
    assert [(e.name, e.attributes) for e in decoded.events] == [
        ("groq_proxy.policy.decision", {"policy": "budget", "decision": "continue", "left": -3}), ("bare", {})]
    assert all(span.start_ns <= e.time_ns for e in decoded.events)
    assert s.flags == 0x101  # sampled, parent known to be local
    assert decoded.resource == {"service.name": "groq-proxy", "telemetry.sdk.name": "groq-proxy",
                                "telemetry.sdk.language": "python", "deployment.environment": "test"}
    assert (ss.scope.name, ss.scope.version) == ("groq-proxy", "0.1.0")
    assert ss.schema_url == rs.schema_url == SEMCONV_SCHEMA


def test_encoder_cache_keeps_equal_values_of_different_types_apart():
    # True == 1 == 1.0 in Python; the encoded pair cache must not hand one's bytes to the other.
    spans = [Span(1, 0, "s", KIND_SERVER, {"v": value, "w": ("a",)}) for value in (True, 1, 1.0, "1", True)]
    for s in spans:
        s.end_ns = s.start_ns
    request = _roundtrip(spans)
    values = [{kv.key: kv.value for kv in s.attributes}["v"] for s in request.resource_spans[0].scope_spans[0].spans]
    assert [v.WhichOneof("value") for v in values] == ["bool_value", "int_value", "double_value", "string_value",
                                                     "bool_value"]
    assert [decode(request.SerializeToString())[i].attributes["w"] for i in range(5)] == [["a"]] * 5


def test_encoder_root_span_and_remote_parent_flags():
    root = Span(7, 0, "GET /", KIND_SERVER, {})
    remote = Span(7, 9, "POST /v1/chat/completions", KIND_SERVER, {})
    remote.remote_parent = True
    for s in (root, remote):
        s.end_ns = s.start_ns + 1
    (a, b) = _roundtrip([root, remote]).resource_spans[0].scope_spans[0].spans
    assert a.parent_span_id == b"" and a.flags == 0x101
    assert b.parent_span_id.hex() == "0000000000000009" and b.flags == 0x301
    assert a.status.code == STATUS_UNSET and a.status.message == ""


def test_encoder_long_strings_and_many_spans():
    # Lengths past one varint byte (>127) and past two (>16383) in names, values and whole messages.
    spans = [Span(i + 1, 0, "n" * (i * 100), KIND_CLIENT, {"text": "x" * (i * 9000)}) for i in range(4)]
    for s in spans:
        s.end_ns = s.start_ns
    decoded = decode(_roundtrip(spans).SerializeToString())
    assert [len(s.name) for s in decoded] == [0, 100, 200, 300]
    assert [len(s.attributes["text"]) for s in decoded] == [0, 9000, 18000, 27000]


# --- the names come from opentelemetry-semantic-conventions, at a pinned version -------------------------------


def test_attribute_names_come_from_the_semantic_conventions_package():
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
    from opentelemetry.semconv.attributes import error_attributes, http_attributes, server_attributes

    from proxy.telemetry import semconv

    for name in ("GEN_AI_OPERATION_NAME", "GEN_AI_PROVIDER_NAME", "GEN_AI_REQUEST_MODEL", "GEN_AI_RESPONSE_MODEL",
                 "GEN_AI_RESPONSE_FINISH_REASONS", "GEN_AI_USAGE_INPUT_TOKENS", "GEN_AI_USAGE_OUTPUT_TOKENS"):
        assert getattr(semconv, name) == getattr(gen_ai_attributes, name)
    assert semconv.HTTP_RESPONSE_STATUS_CODE == http_attributes.HTTP_RESPONSE_STATUS_CODE
    assert semconv.SERVER_PORT == server_attributes.SERVER_PORT
    assert semconv.ERROR_TYPE == error_attributes.ERROR_TYPE


def test_pinned_schema_is_the_installed_conventions_release():
    """A newer semconv package may rename GenAI attributes: upgrading it must be a deliberate change of the pin
    (SCHEMA_URL, the README, pyproject's `opentelemetry-semantic-conventions~=`), not a silent one."""
    from opentelemetry.semconv.schemas import Schemas

    assert SEMCONV_SCHEMA == list(Schemas)[-1].value == "https://opentelemetry.io/schemas/1.44.0"
