"""`[telemetry] exporter = "sdk"`: the same spans through the OpenTelemetry SDK, configured by OTEL_* variables.

Real receivers on both transports: `tests.otlp_receiver` (OTLP/HTTP, protobuf) and `tests.otlp_grpc_receiver`
(OTLP/gRPC, the TraceService of opentelemetry-proto). A request that falls over once is sent through a proxy
with the built-in exporter and through one with the SDK's, with the same caller `traceparent`; the decoded
trees must be equal. A second test hands the very same span objects to both exporters and compares every
field, ids and nanosecond times included.
"""

from __future__ import annotations

import json
import sys
import time

import aiohttp
import orjson
import pytest

from proxy.app.config import ConfigError, parse_config
from proxy.app.server import STATE, build_app
from proxy.sim.testing import status
from proxy.telemetry.otlp import Encoder
from proxy.telemetry.sdk import SdkExporter
from proxy.telemetry.tracing import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, Span, Tracer
from tests.conftest import until
from tests.otlp_grpc_receiver import otlp_grpc  # noqa: F401  (a fixture)
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, decode, otlp  # noqa: F401  (otlp is a fixture)

KEY = "sk-test-secret-upstream-key"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
# Differ from request to request by nature (ids the upstream or the proxy made up, measured times).
VOLATILE = {"groq_proxy.request_id", "gen_ai.response.id", "groq_proxy.time_to_first_chunk_ms",
            "groq_proxy.latency_category"}


def config(upstream_url: str, telemetry: dict, env: dict[str, str] | None = None):
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"up": {"base_url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY"}},
        "models": {"tier-test": {"chain": ["up:m1", "up:m2"]}},
        "telemetry": {"export_interval_s": 0.05, **telemetry},
    }
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": KEY, **(env or {})})


@pytest.fixture
def sdk_env(monkeypatch):
    """Sets OTEL_* variables where the SDK's exporters read them (os.environ) and returns them for the config;
    the batch processor's delay is cut from 5 s so spans arrive quickly."""
    def set_env(**values: str) -> dict[str, str]:
        values = {"OTEL_BSP_SCHEDULE_DELAY": "50", **values}
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return values

    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    return set_env


async def fallback_request(aiohttp_server, app) -> tuple[str, int, int]:
    """One request through `app` that falls over from m1 (503) to m2: (request id, wall-clock ns before, after)."""
    server = await aiohttp_server(app)
    before = time.time_ns()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                                data=orjson.dumps({"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}),
                                headers={"Content-Type": "application/json",
                                         "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-groq-proxy-model"] == "m2"
            request_id = resp.headers["x-request-id"]
            await resp.read()
    return request_id, before, time.time_ns()


def tree(spans: list[ReceivedSpan]) -> list[dict]:
    """One request's spans as comparable records: ids replaced by their place in the tree, volatile values out."""
    server = next(s for s in spans if s.kind == KIND_SERVER)
    out = []
    for s in sorted(spans, key=lambda s: (s.kind != KIND_SERVER, s.attributes.get("groq_proxy.attempt.index", -1))):
        out.append({
            "name": s.name, "kind": s.kind, "trace_id": s.trace_id,
            "parent": s.parent_span_id if s is server else ("server" if s.parent_span_id == server.span_id else "?"),
            "attributes": {k: v for k, v in s.attributes.items() if k not in VOLATILE},
            "volatile": sorted(k for k in s.attributes if k in VOLATILE),
            "status": (s.status_code, s.status_message),
            "events": [(e.name, e.attributes) for e in s.events],
            "remote_parent": s.flags & 0x300,  # the SDK leaves the trace-flag bits (0xff) of `flags` at 0
            "scope": (s.scope_name, s.scope_version, s.schema_url),
        })
    return out


def times_hold(spans: list[ReceivedSpan], before: int, after: int) -> None:
    """Times are wall-clock nanoseconds inside the request's window, each attempt inside the request."""
    server = next(s for s in spans if s.kind == KIND_SERVER)
    assert before <= server.start_ns <= server.end_ns <= after
    attempts = sorted((s for s in spans if s.kind == KIND_CLIENT), key=lambda s: s.start_ns)
    for a in attempts:
        assert server.start_ns <= a.start_ns <= a.end_ns <= server.end_ns
    assert attempts[0].end_ns <= attempts[1].start_ns


async def builtin_tree(upstream_url: str, aiohttp_server) -> list[dict]:
    """The fallback request's tree as the built-in exporter sends it (to a receiver of its own)."""
    receiver = OtlpReceiver()
    receiver.url = f"http://127.0.0.1:{(await aiohttp_server(receiver.app())).port}"
    app = build_app(config(upstream_url, {"enabled": True, "endpoint": receiver.url}))
    request_id, before, after = await fallback_request(aiohttp_server, app)
    server, attempts = await receiver.wait_for_request(request_id, attempts=2)
    times_hold([server, *attempts], before, after)
    return tree([server, *attempts])


async def test_sdk_over_otlp_http_sends_the_same_tree_as_the_builtin_exporter(upstream, otlp, aiohttp_server,
                                                                               sdk_env):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    expected = await builtin_tree(url, aiohttp_server)
    env = sdk_env(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp.traces_url,
                  OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test")
    app = build_app(config(url, {"exporter": "sdk"}, env))
    assert app[STATE].config.telemetry.sdk_exporters == ("otlp_proto_http",)

    request_id, before, after = await fallback_request(aiohttp_server, app)

    server, attempts = await otlp.wait_for_request(request_id, attempts=2)
    spans = [server, *attempts]
    assert tree(spans) == expected
    times_hold(spans, before, after)
    assert [a.attributes["groq_proxy.attempt.outcome"] for a in attempts] == ["fell_over", "answered"]
    assert attempts[0].status_code == STATUS_ERROR
    assert server.trace_id == CALLER_TRACE and server.parent_span_id == CALLER_SPAN
    # The resource is the SDK's, configured the standard way.
    assert server.resource["service.name"] == "groq-proxy"
    assert server.resource["deployment.environment.name"] == "test"
    assert server.resource["telemetry.sdk.name"] == "opentelemetry"
    assert otlp.exports[0].headers["Content-Type"] == "application/x-protobuf"
    exporter = app[STATE].exporter
    await until(lambda: exporter.exported == 3, what="the SDK export counted")  # for /metrics


async def test_sdk_over_otlp_grpc_sends_the_same_tree_as_the_builtin_exporter(upstream, otlp_grpc, aiohttp_server,
                                                                               sdk_env):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    expected = await builtin_tree(url, aiohttp_server)
    env = sdk_env(OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp_grpc.endpoint,
                  OTEL_SERVICE_NAME="proxy-over-grpc", OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-tenant=blue")
    app = build_app(config(url, {"exporter": "sdk"}, env))  # no endpoint in the table: tracing on from the env
    assert app[STATE].config.telemetry.tracing is True
    assert app[STATE].config.telemetry.sdk_exporters == ("otlp_proto_grpc",)

    request_id, before, after = await fallback_request(aiohttp_server, app)

    def complete(r):
        server = next((s for s in r.spans if s.attributes.get("groq_proxy.request_id") == request_id), None)
        children = [s for s in r.spans if server and s.parent_span_id == server.span_id]
        return [server, *children] if len(children) == 2 else None

    spans = await otlp_grpc.wait_for(complete)
    assert tree(spans) == expected
    times_hold(spans, before, after)
    assert spans[0].resource["service.name"] == "proxy-over-grpc"
    assert otlp_grpc.metadata[0]["x-tenant"] == "blue"
    assert len({s.span_id for s in otlp_grpc.spans}) == len(otlp_grpc.spans)  # none twice


async def test_the_same_span_objects_come_out_identical_from_both_exporters(otlp, sdk_env):
    """Field for field, ids and nanosecond times included: the SDK path converts nothing lossily."""
    sdk_env(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp.traces_url)
    root = Span(0x0123456789ABCDEF0123456789ABCDEF, 0, "POST /v1/chat/completions", KIND_SERVER,
                {"groq_proxy.request_id": "req_1", "skipped": None},
                (("http.request.method", "POST"), ("url.path", "/v1/chat/completions")))
    root.closing = (("http.response.status_code", 502), ("groq_proxy.attempts", 2), ("groq_proxy.stream", False))
    root.add_event("groq_proxy.policy.decision", {"policy": "budget", "decision": "allow", "remaining": 5})
    root.status = STATUS_ERROR
    child = Span(root.trace_id, root.span_id, "chat m1", KIND_CLIENT, {"gen_ai.request.temperature": 0.2})
    child.closing = (("gen_ai.response.finish_reasons", ("stop", "length")),)
    child.set_error("status_503", "503: upstream says no")
    remote = Span(0xABC, 0xDEF, "POST /v1/embeddings", KIND_SERVER, {"n": 1})
    remote.remote_parent = True
    spans = [child, root, remote]
    for i, s in enumerate(spans):
        s.start_ns, s.end_ns = 1_700_000_000_123_456_789 + i, 1_700_000_000_987_654_321 + i

    encoder = Encoder("same")
    builtin = decode(encoder.request([encoder.span(s) for s in spans]))
    tracer = Tracer()
    tracer.queue.extend(spans)
    exporter = SdkExporter(tracer, "same", ("otlp_proto_http",), interval_s=3600)
    await exporter.close()  # hands the queue to the SDK, flushes and shuts it down
    received = await otlp.wait_for(lambda r: len(r.spans) == 3 and r.spans)

    def fields(s: ReceivedSpan) -> dict:
        d = dict(vars(s))
        del d["resource"]  # the built-in's own resource vs the SDK's (telemetry.sdk.*)
        d["flags"] &= 0x300  # the SDK leaves the trace-flag bits (0xff) of `flags` at 0
        return d

    assert [fields(s) for s in received] == [fields(s) for s in builtin]
    assert exporter.exported == 3 and exporter.failed == 0 and not tracer.queue


# --- start-up: what is accepted and what is refused, naming the key ------------------------------------------


RAW = {"providers": {"up": {"base_url": "http://up"}}, "models": {"t": {"chain": ["up:m"]}}}


def telemetry_of(telemetry: dict, env: dict[str, str]):
    return parse_config({**RAW, "telemetry": telemetry}, env=env).telemetry


def test_grpc_is_refused_by_the_builtin_exporter_with_the_way_out():
    with pytest.raises(ConfigError) as err:
        telemetry_of({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert str(err.value) == (
        "telemetry: OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported by the built-in exporter; use http/protobuf "
        '(OTLP/HTTP, port 4318), or set [telemetry] exporter = "sdk" for the OpenTelemetry SDK\'s exporters '
        "(grpc included)")


@pytest.mark.parametrize(("env", "expected"), [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
     (True, ("otlp_proto_grpc",))),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
     (True, ("otlp_proto_http",))),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, (True, ("otlp_proto_grpc",))),  # the SDK's default: gRPC
    ({"OTEL_TRACES_EXPORTER": "console"}, (True, ("console",))),
    ({"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     (True, ("console", "otlp_proto_http"))),
    ({"OTEL_TRACES_EXPORTER": "none"}, (False, ())),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, (False, ())),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, (True, ("otlp_proto_grpc",))),  # the SDK's to interpret
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, (False, ("console",))),
    ({}, (False, ("otlp_proto_grpc",))),
])
def test_sdk_exporter_is_chosen_the_standard_way(env, expected):
    t = telemetry_of({"exporter": "sdk"}, env)
    assert t.exporter == "sdk"
    assert (t.tracing, t.sdk_exporters) == expected


@pytest.mark.parametrize(("telemetry", "env", "message"), [
    ({"exporter": "grpc"}, {},
     'telemetry.exporter: must be "otlp" (the built-in OTLP/HTTP exporter) or "sdk" (the OpenTelemetry SDK\'s '
     "exporters), got 'grpc'"),
    ({"exporter": "sdk", "endpoint": "http://c:4317"}, {},
     'telemetry.endpoint: not used with exporter = "sdk": the SDK\'s exporters read OTEL_EXPORTER_OTLP_ENDPOINT '
     "(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"),
    ({"exporter": "sdk"}, {"OTEL_TRACES_EXPORTER": "zipkin"},
     "telemetry: OTEL_TRACES_EXPORTER=zipkin is not an installed trace exporter; installed: console, none, otlp, "
     "otlp_proto_grpc, otlp_proto_http"),
    ({"exporter": "sdk"}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "telemetry: OTEL_EXPORTER_OTLP_PROTOCOL=http/json is not one of grpc, http/protobuf"),
])
def test_sdk_exporter_mistakes_are_start_up_errors(telemetry, env, message):
    with pytest.raises(ConfigError) as err:
        telemetry_of(telemetry, env)
    assert str(err.value) == message


# --- the whole command: `groq-proxy serve` with OTEL_TRACES_EXPORTER=console ------------------------------------


async def test_serve_with_the_console_exporter_prints_the_request_tree(tmp_path, unused_tcp_port):
    import asyncio
    import os
    import signal

    config_file = tmp_path / "proxy.toml"
    config_file.write_text('[providers.groq]\nbase_url = "https://api.groq.com/openai/v1"\n\n'
                           '[models.tier-fast]\nchain = ["groq:openai/gpt-oss-20b"]\n\n'
                           '[telemetry]\nexporter = "sdk"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GROQ_"))}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="console-test")
    groq_proxy = os.path.join(os.path.dirname(sys.executable), "groq-proxy")
    proc = await asyncio.create_subprocess_exec(
        groq_proxy, "serve", "--simulate", "--config", str(config_file), "--port", str(unused_tcp_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        base = f"http://127.0.0.1:{unused_tcp_port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # a safety net of 30 s for the process to start and bind
                assert proc.returncode is None, "groq-proxy exited"
                try:
                    async with session.get(base + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("groq-proxy not ready in 30 s")
            async with session.post(base + "/v1/chat/completions",
                                    json={"model": "tier-fast", "messages": [{"role": "user", "content": "hi"}]}) as resp:
                assert resp.status == 200
                request_id = resp.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)  # shutting down flushes the SDK's batch processor to the console
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    spans = [json.loads(chunk) for chunk in _json_objects(out.decode())]
    server = next(s for s in spans if s["kind"] == "SpanKind.SERVER")
    (attempt,) = [s for s in spans if s["kind"] == "SpanKind.CLIENT"]
    assert server["name"] == "POST /v1/chat/completions" and attempt["name"] == "chat openai/gpt-oss-20b"
    assert server["attributes"]["groq_proxy.request_id"] == request_id
    assert attempt["context"]["trace_id"] == server["context"]["trace_id"]
    assert attempt["parent_id"] == server["context"]["span_id"]
    assert server["resource"]["attributes"]["service.name"] == "console-test"


def _json_objects(text: str) -> list[str]:
    """The top-level JSON objects the console exporter printed one after another."""
    decoder, pos, out = json.JSONDecoder(), 0, []
    while True:
        start = text.find("{", pos)
        if start < 0:
            return out
        _, end = decoder.raw_decode(text, start)
        out.append(text[start:end])
        pos = end


async def test_spans_the_sdk_exporter_gives_up_are_counted_as_export_failed(otlp, sdk_env):
    sdk_env(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=otlp.traces_url)
    otlp.fail_status = 400  # not retryable: the SDK's exporter reports the batch failed at once
    tracer = Tracer()
    for i in range(4):
        tracer.end(Span(i + 1, 0, "s", KIND_SERVER, {}))
    exporter = SdkExporter(tracer, "refused", ("otlp_proto_http",), interval_s=3600)
    await exporter.close()

    assert len(otlp.rejected) == 4 and otlp.spans == []
    assert exporter.failed == 4 and exporter.exported == 0
