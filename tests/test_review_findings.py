"""Defects found by the adversarial review of the merged hardening work (issues 7 and 12), each with the case
that found it: a real proxy, real clients and raw sockets, with inputs the issues did not name."""

from __future__ import annotations

import asyncio
import re

import openai
import orjson
import pytest

from proxy.app.config import parse_config
from tests.conftest import config_for



async def _raw_exchange(port: int, raw: bytes) -> bytes:
    """Sends `raw` and reads until the server closes the connection (every answer below closes it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 20)  # a safety net against a hang, not a threshold
    finally:
        writer.close()


def _status_headers_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(b"OPTIONS * HTTP/1.1", id="options-asterisk"),
    ],
)
async def test_a_request_target_that_is_not_a_path_gets_an_openai_error_with_a_request_id(
    upstream, start_proxy, request_line
):
    """Found with raw sockets: a request target that does not start with `/` matches no route, not even the
    catch-all `/{tail}`, so aiohttp answered its own text/plain `404: Not Found` without x-request-id.
    Before: 404 text/plain, no x-request-id. After: the OpenAI shape."""
    _, url = upstream
    base = await start_proxy(config_for(url))
    port = int(base.rsplit(":", 1)[1])
    raw = await _raw_exchange(port, request_line + b"\r\nHost: api.groq.com:443\r\nConnection: close\r\n\r\n")
    status, headers, body = _status_headers_body(raw)
    assert status == 404, raw[:300]
    assert re.fullmatch(r"req_[0-9a-f]{24}", headers.get("x-request-id", "")), raw[:300]
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "unknown_url", error


@pytest.mark.parametrize("name", ["up:m1\r\nX-Evil: 1", "up:m1\nx", "up:m1\x00", "up:m1\x7f"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_model_name_with_control_characters_is_a_404_not_a_dropped_connection(
    upstream, start_proxy, name, stream
):
    """Found with a JSON body naming `groq:a\\r\\nX-Evil: 1`: the explicit `provider:model` was sent upstream, and
    its model became the `x-groq-proxy-model` response header, which aiohttp refuses to write: the connection
    dropped without an answer and an `Unhandled exception` traceback was logged at error level for every such
    request. Before: openai raised APIConnectionError. After: 404 model_not_found, nothing sent upstream."""
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.NotFoundError) as raised:
            await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                 stream=stream)
    finally:
        await client.close()
    assert raised.value.response.headers["x-request-id"].startswith("req_")
    assert raised.value.body["code"] == "model_not_found"
    assert scripted.requests == []


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_http_proxy_refusing_the_credentials_is_not_passed_back_to_the_client(
    stream, upstream, raw_server, start_proxy, monkeypatch, proxy_log
):
    """Found with `HTTP_PROXY` holding a wrong password in front of an http provider: the forward proxy answers
    the absolute-form request itself with 407, which the proxy took for the provider's 4xx about the request
    and passed back: the openai client got a bare `407 Proxy Authentication Required` for a valid request, and
    the chain stopped. A 407 is about the operator's proxy settings, like 401/403 about the provider key.
    Before: status 407 passed back, the second model never tried. After: it falls over (and the second model,
    reached directly through NO_PROXY, answers)."""
    from tests.forward_proxy import ForwardProxy
    from tests.test_fallback import attempt_lines, call, chat
    from tests.test_proxy_env import assert_no_secret, proxy_url

    scripted, url = upstream  # on 127.0.0.1; `local.test` is the same server, reachable only through the proxy
    port = url.split(":")[2].split("/")[0]
    proxy = ForwardProxy(("someone", "else"), hosts={"local.test": "127.0.0.1"})
    monkeypatch.setenv("HTTP_PROXY", proxy_url(await raw_server(proxy)))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"viaproxy": {"base_url": f"http://local.test:{port}/openai/v1"},
                      "direct": {"base_url": url}},
        "models": {"tier-test": {"chain": ["viaproxy:m1", "direct:m2"]}},
    }
    base = await start_proxy(parse_config(raw, env={}))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert scripted.models_sent() == ["m2"]
    first = attempt_lines(proxy_log)[0]
    assert first["outcome"] == "fell_over" and first["reason"] == "status_407", first
    assert_no_secret(r.body.decode() + str(dict(r.headers)))


async def test_the_sdk_exporters_own_log_lines_are_json_too(tmp_path):
    """Found with `exporter = "sdk"`, OTEL_EXPORTER_OTLP_PROTOCOL=grpc and a collector that is down: the SDK's
    gRPC exporter logs `Failed to export traces to ...` through the `opentelemetry` logger, which nothing routed
    to the JSON handler, so Python's last-resort handler wrote it on stderr as plain text. Before: that line
    broke "one JSON object per line". After: it is a JSON line like aiohttp's and asyncio's."""
    import aiohttp

    from tests.conftest import closed_port_url
    from tests.procs import clean_env, start_serving

    config = tmp_path / "sdk.toml"
    config.write_text('[providers.groq]\nbase_url = "http://127.0.0.1:9/openai/v1"\n'
                      '[models.t]\nchain = ["groq:openai/gpt-oss-20b"]\n[telemetry]\nexporter = "sdk"\n')
    down = closed_port_url().rsplit("/openai/v1", 1)[0]
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_ENDPOINT=down, OTEL_EXPORTER_OTLP_TIMEOUT="1",
               OTEL_BSP_SCHEDULE_DELAY="50")
    proc, base = await start_serving(tmp_path, "sdk", "--simulate", "--config", str(config), env=env)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/chat/completions",
                                    json={"model": "t", "messages": [{"role": "user", "content": "hi"}]}) as resp:
                assert resp.status == 200
            for _ in range(600):  # the event: the SDK reported the batch failed; 60 s only against a hang
                async with session.get(base + "/metrics") as resp:
                    metrics = await resp.text()
                if re.search(r'^groq_proxy_trace_spans_dropped_total\{reason="export_failed"\} [1-9]', metrics, re.M):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the SDK never reported the failed export")
        await proc.wait_for_log(lambda line: "Failed to export" in str(line.get("event", "")))
    finally:
        await proc.stop()
    assert [line for line in proc.other_lines() if "listening on" not in line] == [], proc.stderr


NOT_CHUNKS = [
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b'{"id":"c1","choices":"nope"}', id="choices-a-string"),
    pytest.param(b'{"id":"c1","choices":[1]}', id="choice-not-an-object"),
    pytest.param(b'{"id":"c1","object":"chat.completion.chunk"}', id="no-choices"),
]


@pytest.mark.parametrize("data", NOT_CHUNKS)
async def test_a_stream_whose_first_event_is_not_a_chunk_falls_over(upstream, start_proxy, proxy_log, data):
    """Issue 12 item 1 for streams, found with the openai client: a 200 stream whose first event is a JSON
    object but not a chunk was committed and answered; the client got a ChatCompletionChunk with choices None
    (or 'nope') and the caller's `chunk.choices[0]` raised. Before: 200, outcome answered, m2 never tried.
    After: `malformed`, the next model answers."""
    from proxy.sim.testing import Behaviour
    from tests.test_fallback import attempt_lines

    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", events=[b"data: " + data + b"\n\n", b"data: [DONE]\n\n"])
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    try:
        chunks = [c async for c in await client.chat.completions.create(
            model="tier-test", messages=[{"role": "user", "content": "hi"}], stream=True)]
    finally:
        await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    first = attempt_lines(proxy_log)[0]
    assert (first["target"], first["outcome"], first["reason"]) == ("up:m1", "fell_over", "malformed"), first



def test_every_declared_runtime_dependency_is_imported():
    """Issue 7 item 11 after the merge: redis, aiolimiter and cachetools were still declared in pyproject (and
    pinned in requirements.lock, so installed in the image) while nothing imported them. Before: those three
    failed here. Each declared package must be imported by proxy/ or policies/ under one of its top-level
    names (the OTLP exporters share the `opentelemetry` namespace, which the SDK exporter imports)."""
    import tomllib
    from importlib import metadata
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).resolve().parent.parent
    declared = [Requirement(d) for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
    source = "\n".join(p.read_text() for d in ("proxy", "policies") for p in (root / d).rglob("*.py"))
    tops: dict[str, set[str]] = {}
    for top, dists in metadata.packages_distributions().items():
        for dist in dists:
            tops.setdefault(canonicalize_name(dist), set()).add(top)
    unused = []
    for req in declared:
        if req.marker is not None and not req.marker.evaluate():
            continue
        names = tops.get(canonicalize_name(req.name), set())
        if not any(re.search(rf"^\s*(import|from) {re.escape(n)}\b", source, re.MULTILINE) for n in names):
            unused.append(req.name)
    assert unused == []


def _config_error(raw: dict) -> str:
    from proxy.app.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config(raw, env={})
    return str(raised.value)


_PROVIDER = {"base_url": "http://127.0.0.1:9/v1"}


@pytest.mark.parametrize(
    "table, key",
    [
        ("server", "request_read_timeout_s"),
        ("provider", "timeout_s"),
        ("provider", "first_byte_timeout_s"),
        ("provider", "connect_timeout_s"),
        ("routing", "cooldown_s"),
    ],
)
def test_nan_is_refused_naming_the_key(table, key):
    """Found with `timeout_s = nan` in a config file (TOML has `nan`): every "must be at least" check compared
    `value < minimum`, which is false for NaN, so the proxy started, and the `connect_timeout_s` above
    `timeout_s` check was passed too. Before: accepted. After: `config error: <key>: must be at least ...`."""
    nan = float("nan")
    raw = {"providers": {"groq": dict(_PROVIDER)}, "models": {"t": {"chain": ["groq:m"]}}}
    if table == "provider":
        raw["providers"]["groq"][key] = nan
        where = f"providers.groq.{key}"
    else:
        raw[table] = {key: nan}
        where = f"{table}.{key}"
    message = _config_error(raw)
    assert message.startswith(f"{where}: must be at least"), message


@pytest.mark.parametrize(
    "raw, where",
    [
        pytest.param({"providers": {"groq": {"base_url": "http://[::1/v1"}}, "models": {"t": {"chain": ["groq:m"]}}},
                     "providers.groq.base_url", id="base_url-unclosed-ipv6"),
        pytest.param({"providers": {"groq": dict(_PROVIDER)}, "models": {"t": {"chain": ["groq:m"]}},
                      "telemetry": {"endpoint": "http://[::1"}}, "telemetry.endpoint", id="endpoint-unclosed-ipv6"),
        pytest.param({"providers": {"groq": dict(_PROVIDER)}, "models": {"t": {"chain": ["groq:a\nb"]}}},
                     "models.t.chain[0]", id="chain-model-with-a-line-break"),
        pytest.param({"providers": {"groq": dict(_PROVIDER)}, "models": {"t": {"chain": ["groq:m"]}},
                      "aliases": {"old": "groq:a\r\nX-Evil: 1"}}, "aliases.old", id="alias-with-a-line-break"),
    ],
)
def test_config_mistakes_that_ended_in_a_traceback_or_a_broken_header_are_config_errors(raw, where):
    """Found with `serve --config`: `base_url = "http://[::1/v1"` (or such a telemetry endpoint) ended in
    urlsplit's ValueError traceback; a chain or alias naming a model with a line break started, then every
    request to it dropped its connection (the model is the x-groq-proxy-model header). Before: a traceback, or
    a start. After: one config error naming the key."""
    message = _config_error(raw)
    assert message.startswith(where + ":"), message


async def test_serve_with_an_unclosed_ipv6_base_url_exits_with_one_line(tmp_path):
    from tests.procs import clean_env, run

    config = tmp_path / "bad.toml"
    config.write_text('[providers.groq]\nbase_url = "http://[::1/v1"\n[models.t]\nchain = ["groq:m"]\n')
    proc = await run(tmp_path, "bad", "serve", "--no-check", "--config", str(config), env=clean_env())
    assert proc.process.returncode == 2
    assert proc.stderr.splitlines() == [
        "groq-proxy: config error: providers.groq.base_url: Invalid IPv6 URL, got 'http://[::1/v1'"]


def _endless_head(kind: str):
    """A raw upstream that answers with a response head that never ends: one header value without end, more
    and more headers, or 1xx answers one after another. Sets `gone` when the client closed the connection."""
    gone = asyncio.Event()

    async def handler(reader, writer):
        from tests.conftest import read_request

        await read_request(reader)
        first = {"value": b"HTTP/1.1 200 OK\r\nX-Big: ", "headers": b"HTTP/1.1 200 OK\r\n", "informational": b""}[kind]
        writer.write(first)
        i = 0
        try:
            while not reader.at_eof():
                piece = {"value": b"a" * 65536,
                         "headers": b"".join(b"X-%d: %s\r\n" % (i + j, b"v" * 40) for j in range(1000)),
                         "informational": b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * 500}[kind]
                writer.write(piece)
                i += 1000
                await writer.drain()
                await asyncio.sleep(0)
        except ConnectionError:
            pass
        gone.set()

    return handler, gone


@pytest.mark.parametrize("kind", ["value", "headers", "informational"])
async def test_an_endless_response_head_fails_the_attempt_instead_of_growing_memory(raw_server, kind):
    """Found with a raw upstream sending a 10 MB header line, then 100,000 headers: the upstream client took
    both (httptools buffers a header value without limit, and the client kept every header), and nothing but
    timeout_s bounded a head that never ends (or endless `103 Early Hints`). Issue 7 item 7 bounds an SSE event
    and a body; the head is upstream output too. Before: the request hung until the test's safety net, memory
    growing. After: BadResponse past MAX_HEAD bytes of head, and the connection is closed."""
    from proxy.upstream import http1

    handler, gone = _endless_head(kind)
    port = await raw_server(handler)
    client = http1.Client(environ={})
    try:
        with pytest.raises(http1.BadResponse, match="response head is larger than"):
            await asyncio.wait_for(
                client.request(http1.Origin.of("http", "127.0.0.1", port), "POST", "/", {}, b"{}", 5.0), 60)
        await asyncio.wait_for(gone.wait(), 30)  # the upstream saw the connection closed
    finally:
        await client.close()


@pytest.mark.parametrize("events", [
    pytest.param([b"data: [DONE]\n\n"], id="done-only"),
    pytest.param([b": keep-alive\n\n", b"data:[DONE]\n\n"], id="comment-then-done"),
])
async def test_a_stream_that_is_only_done_falls_over(upstream, start_proxy, proxy_log, events):
    """Found with a raw upstream: a 200 stream whose first data event is `[DONE]` carries no answer, yet it
    was committed and logged `answered`; the openai client got an empty stream. Before: 200, no chunk, m2
    never tried. After: `malformed`, the next model answers."""
    from proxy.sim.testing import Behaviour
    from tests.test_fallback import attempt_lines

    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", events=events)
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    try:
        chunks = [c async for c in await client.chat.completions.create(
            model="tier-test", messages=[{"role": "user", "content": "hi"}], stream=True)]
    finally:
        await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    first = attempt_lines(proxy_log)[0]
    assert (first["target"], first["outcome"], first["reason"]) == ("up:m1", "fell_over", "malformed"), first
