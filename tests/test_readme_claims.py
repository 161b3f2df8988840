"""README claims that had no test of their own, each checked through the real proxy against real local servers:

- a provider without `api_key_env` sends no Authorization header (and never the client's);
- Groq's `x-groq-region` and `x-ratelimit-*` headers and its request id (as `x-upstream-request-id`) reach the
  client on every answer, streamed or not, and only those of the model that answered;
- `OTEL_EXPORTER_OTLP_PROTOCOL` other than `http/protobuf` is a start-up config error naming the variable;
- `OTEL_EXPORTER_OTLP_TRACES_HEADERS` reach the collector as request headers and never appear in a log line;
- a `sample_ratio` between 0 and 1 records some traces and not others, decided from the trace id, and a caller's
  sampled flag wins over it;
- answers from the simulator, its errors included, say so in `x-groq-proxy-simulated`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.app.config import ConfigError, parse_config
from proxy.sim.testing import ChatUpstream, completion, status, stream_events
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)
from tests.test_fallback import call, chat, content_of
from tests.test_tracing import traced_config

MESSAGES = [{"role": "user", "content": "hi"}]


# --- a provider without a key -------------------------------------------------------------------------------


def keyless_config(url: str):
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"local": {"base_url": url}},  # no api_key_env
        "models": {"tier-test": {"chain": ["local:m1", "local:m2"]}},
    }
    return parse_config(raw, env={"GROQ_API_KEY": "gsk_not_for_this_provider"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/completions#stream", "/v1/embeddings"])
async def test_a_provider_without_api_key_env_gets_no_authorization(path, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)  # the fall-over sends no key either
    base = await start_proxy(keyless_config(url))
    route, _, mode = path.partition("#")
    if route.endswith("embeddings"):
        body = {"model": "tier-test", "input": "hello"}
    else:
        body = chat(stream=mode == "stream")

    r = await call(base, body, path=route, headers={"Authorization": "Bearer client-own-key"})

    assert r.status == 200, r.body
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert len(scripted.requests) == 2
    for request in scripted.requests:
        got = CIMultiDict(request["headers"])
        assert "Authorization" not in got, request["headers"]
        assert "client-own-key" not in str(request["headers"])
        assert "gsk_not_for_this_provider" not in str(request["headers"])


# --- headers passed on from the upstream --------------------------------------------------------------------

GROQ_HEADERS = {
    "x-groq-region": "dls",
    "x-ratelimit-limit-requests": "14400",
    "x-ratelimit-limit-tokens": "18000",
    "x-ratelimit-remaining-requests": "14370",
    "x-ratelimit-remaining-tokens": "17997",
    "x-ratelimit-reset-requests": "2m59.56s",
    "x-ratelimit-reset-tokens": "7.66s",
}


class GroqHeadersUpstream(ChatUpstream):
    """Answers as Groq does, with its rate-limit view, region and request id in the headers; `fail[model]` makes
    that model answer with the status instead (its own headers still set, as Groq's 429s have them)."""

    def __init__(self) -> None:
        self.fail: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/v1/chat/completions", self._chat)
        app.router.add_post("/openai/v1/embeddings", self._embeddings)
        return app

    @staticmethod
    def _headers(model: str) -> dict[str, str]:
        return {**{k: f"{v}-{model}" for k, v in GROQ_HEADERS.items()}, "x-request-id": f"req_{model}",
                "x-unlisted-upstream-header": "not passed on"}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = body["model"]
        headers = self._headers(model)
        if model in self.fail:
            error = {"error": {"message": "no", "type": "invalid_request_error", "code": "x"}}
            return web.json_response(error, status=self.fail[model], headers=headers)
        if not body.get("stream"):
            return web.json_response(completion(model), headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        for event in stream_events(model):
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        out = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
               "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        return web.json_response(out, headers=self._headers(body["model"]))


def assert_groq_headers_of(headers, model: str) -> None:
    for name, value in GROQ_HEADERS.items():
        assert headers.get(name) == f"{value}-{model}", (name, dict(headers))
    assert headers["x-upstream-request-id"] == f"req_{model}"
    assert headers["x-request-id"].startswith("req_") and headers["x-request-id"] != f"req_{model}"  # the proxy's
    assert "x-unlisted-upstream-header" not in headers


async def _groq_proxy(aiohttp_server, start_proxy, up: GroqHeadersUpstream) -> str:
    server = await aiohttp_server(up.app())
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"up": {"base_url": f"http://127.0.0.1:{server.port}/openai/v1", "api_key_env": "K"}},
        "models": {"tier-test": {"chain": ["up:m1", "up:m2"]}},
    }
    return await start_proxy(parse_config(raw, env={"K": "sk-test-secret-upstream-key"}))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_groq_rate_limit_region_and_request_id_headers_reach_the_client(stream, aiohttp_server, start_proxy):
    base = await _groq_proxy(aiohttp_server, start_proxy, GroqHeadersUpstream())
    r = await call(base, chat(stream=stream))
    assert r.status == 200
    assert content_of(r.body, stream) == "Hello there!"
    assert_groq_headers_of(r.headers, "m1")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_after_a_fallover_the_headers_are_those_of_the_model_that_answered(stream, aiohttp_server, start_proxy):
    up = GroqHeadersUpstream()
    up.fail["m1"] = 429
    base = await _groq_proxy(aiohttp_server, start_proxy, up)
    r = await call(base, chat(stream=stream))
    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2"
    assert_groq_headers_of(r.headers, "m2")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_passed_back_client_error_carries_the_groq_headers_too(stream, aiohttp_server, start_proxy):
    up = GroqHeadersUpstream()
    up.fail["m1"] = 422
    base = await _groq_proxy(aiohttp_server, start_proxy, up)
    r = await call(base, chat(stream=stream))
    assert r.status == 422
    assert_groq_headers_of(r.headers, "m1")


async def test_embeddings_answers_carry_the_groq_headers(aiohttp_server, start_proxy):
    base = await _groq_proxy(aiohttp_server, start_proxy, GroqHeadersUpstream())
    r = await call(base, {"model": "tier-test", "input": "hello"}, path="/v1/embeddings")
    assert r.status == 200 and r.json()["data"][0]["embedding"] == [0.5]
    assert_groq_headers_of(r.headers, "m1")


# --- OTLP protocol and headers from the environment ---------------------------------------------------------

BASE_RAW = {"providers": {"up": {"base_url": "http://127.0.0.1:1/openai/v1"}}, "models": {"t": {"chain": ["up:m"]}}}


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
@pytest.mark.parametrize("protocol", ["grpc", "http/json"])
def test_an_unsupported_otlp_protocol_is_a_config_error_naming_the_variable(variable, protocol):
    env = {variable: protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    with pytest.raises(ConfigError) as info:
        parse_config(BASE_RAW, env=env)
    message = str(info.value)
    assert f"{variable}={protocol}" in message and "http/protobuf" in message, message


def test_the_traces_protocol_wins_over_the_general_one():
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert parse_config(BASE_RAW, env=env).telemetry.tracing is True


def test_serve_refuses_to_start_with_grpc_and_says_why(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[providers.up]\nbase_url = "http://127.0.0.1:1/openai/v1"\n'
                      '[models.t]\nchain = ["up:m"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GROQ_"))}
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("groq-proxy: config error: telemetry: OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), lines[0]
    assert "listening" not in proc.stdout + proc.stderr


TOKEN = "collector-token-7f3a9c"


async def test_traces_headers_reach_the_collector_and_are_never_logged(upstream, otlp, start_proxy, proxy_log):
    scripted, url = upstream
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
           # the traces variable wins over the general one (as the OpenTelemetry SDKs read them)
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"Authorization=Bearer%20{TOKEN},x-tenant = blue",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-general=not-used"}
    config = traced_config(url, None, env=env)
    assert TOKEN not in repr(config) and TOKEN not in str(config)
    otlp.fail_status = 401  # first refused (a warning is logged), then accepted (an info line)
    base = await start_proxy(config)

    await call(base, chat())
    await otlp.wait_for(lambda r: len(r.rejected) == 2)
    otlp.fail_status = None
    r = await call(base, chat(stream=True))
    await otlp.wait_for_request(r.headers["x-request-id"], attempts=1)

    sent = CIMultiDict(otlp.exports[0].headers)
    assert sent["Authorization"] == f"Bearer {TOKEN}"  # percent-decoded, as the OTLP exporter spec says
    assert sent["x-tenant"] == "blue"
    assert "x-general" not in sent
    events = {r.getMessage() for r in proxy_log.records if r.name == "groq_proxy"}
    assert {"trace_export_failed", "trace_export_recovered"} <= events
    for record in proxy_log.records:
        assert TOKEN not in record.getMessage() and TOKEN not in str(getattr(record, "fields", "")), record
    assert TOKEN not in proxy_log.text
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            assert TOKEN not in await resp.text()


# --- sampling between 0 and 1 -------------------------------------------------------------------------------

LOW_HALF = (1 << 63) - 1  # a trace id whose low 64 bits are below the bound of ratio 0.5: recorded by ratio
HIGH_HALF = (1 << 64) - 1  # one whose low 64 bits are above it: not recorded by ratio


def traceparent(low64: int, high64: int, sampled: bool) -> tuple[str, str]:
    trace_id = f"{high64:016x}{low64:016x}"
    return trace_id, f"00-{trace_id}-{0xabcdef:016x}-{'01' if sampled else '00'}"


async def test_half_the_new_traces_are_recorded_and_the_trace_id_decides(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url, {"tier-test": ["m1"]}, telemetry={"sample_ratio": 0.5}))
    total = 80
    for _ in range(total):
        assert (await call(base, chat())).status == 200

    # A recorded request sends its attempt's traceparent upstream; one not recorded sends none.
    propagated = [r["headers"].get("traceparent") for r in scripted.requests]
    recorded = {tp.split("-")[1] for tp in propagated if tp}
    # 0 or all 80 with a fair ratio: a chance of 2**-79 each.
    assert 0 < len(recorded) < total, len(recorded)
    # A recorded trace is whole (server span and attempt span); the same decision for export and propagation.
    await otlp.wait_for(lambda r: len(r.spans) >= 2 * len(recorded))
    assert len(otlp.spans) == 2 * len(recorded)
    assert {s.trace_id for s in otlp.spans} == recorded
    for trace_id in recorded:
        assert int(trace_id[16:], 16) < 1 << 63, trace_id  # decided from the trace id: below the ratio's bound


_MARKERS = itertools.count(0x1000)


async def _recorded(otlp, base, headers: dict) -> bool:
    """Whether a request with these headers was recorded. A marker request that is always recorded follows it:
    spans leave in the order they ended, so once the marker's arrived, the first request's would have too."""
    first = await call(base, chat(), headers=headers)
    marker_id, marker = traceparent(LOW_HALF - 1, next(_MARKERS), sampled=True)  # a new trace id each time
    await call(base, chat(), headers={"traceparent": marker})
    await otlp.wait_for(lambda r: r.trace(marker_id))
    return otlp.request_span(first.headers["x-request-id"]) is not None


async def test_with_half_sampling_a_callers_sampled_flag_wins(upstream, otlp, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, otlp.url, {"tier-test": ["m1"]}, telemetry={"sample_ratio": 0.5}))
    _, unlikely = traceparent(HIGH_HALF, 1, sampled=True)  # the ratio alone would not record it
    _, likely = traceparent(1, 2, sampled=False)  # the ratio alone would record it
    assert await _recorded(otlp, base, {"traceparent": unlikely}) is True
    assert await _recorded(otlp, base, {"traceparent": likely}) is False


async def test_traceidratio_without_parent_decides_by_the_trace_id_alone(upstream, otlp, start_proxy):
    scripted, url = upstream
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    base = await start_proxy(traced_config(url, otlp.url, {"tier-test": ["m1"]}, env=env))
    _, low_unsampled = traceparent(5, 3, sampled=False)
    _, high_sampled = traceparent(HIGH_HALF - 5, 4, sampled=True)
    for _ in range(2):  # and the same trace id gets the same answer every time
        assert await _recorded(otlp, base, {"traceparent": low_unsampled}) is True
        assert await _recorded(otlp, base, {"traceparent": high_sampled}) is False


@pytest.mark.parametrize("encoded", ["%0d%0aX-Injected: 1", "%0a", "%00", "%7f"])
def test_an_otlp_header_that_decodes_to_a_control_character_is_refused_without_echoing_it(encoded):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"x-token=secret-{encoded}"}
    with pytest.raises(ConfigError) as info:
        parse_config(BASE_RAW, env=env)
    message = str(info.value)
    assert message.startswith("telemetry: OTEL_EXPORTER_OTLP_TRACES_HEADERS: the header 'x-token'"), message
    assert "secret" not in message


@pytest.mark.parametrize(("env", "telemetry", "expected"), [
    # OTEL_SDK_DISABLED=true turns tracing off "unless enabled = true" in the table
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, {"enabled": True},
     (True, "http://c:4318/v1/traces")),
    # "/v1/traces is appended unless already there"
    ({}, {"endpoint": "http://c:4318/v1/traces"}, (True, "http://c:4318/v1/traces")),
    ({}, {"endpoint": "http://c:4318/"}, (True, "http://c:4318/v1/traces")),
    ({}, {"endpoint": "http://c:4318/prefix"}, (True, "http://c:4318/prefix/v1/traces")),
    # an endpoint set but tracing turned off in the table
    ({}, {"endpoint": "http://c:4318", "enabled": False}, (False, "http://c:4318/v1/traces")),
])
def test_telemetry_endpoint_and_switch_rules(env, telemetry, expected):
    t = parse_config({**BASE_RAW, "telemetry": telemetry}, env=env).telemetry
    assert (t.tracing, t.traces_url) == expected


# --- the simulator says so --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_answers_and_errors_from_the_simulator_say_they_are_simulated(stream, start_proxy):
    config = parse_config({"server": {"keepalive_s": 0},
                           "providers": {"groq": {"base_url": "http://127.0.0.1:9/openai/v1"}},
                           "models": {"tier-fast": {"chain": ["groq:openai/gpt-oss-20b"]}}}, env={})
    base = await start_proxy(config, simulate=True)

    answer = await call(base, chat("tier-fast", stream=stream))
    refused = await call(base, chat("tier-fast", stream=stream, n=2))  # the simulator's own 400, passed back

    assert answer.status == 200 and answer.headers["x-groq-proxy-simulated"] == "true"
    assert answer.headers["x-groq-proxy-model"] == "openai/gpt-oss-20b"
    assert refused.status == 400 and refused.json()["error"]["param"] == "n"
    assert refused.headers["x-groq-proxy-simulated"] == "true"


async def test_a_configured_upstream_is_not_called_simulated(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(keyless_config(url))
    r = await call(base, chat())
    assert r.status == 200 and "x-groq-proxy-simulated" not in r.headers
