"""What the proxy's own upstream client (proxy/upstream/http1.py) means for a user of the gateway, checked through the
whole proxy: base URLs of every shape, answers aiohttp's ClientSession used to smooth over (compressed,
redirected, empty), slow and short-lived upstreams, and the provider key kept out of every failure.

Upstreams are real local servers on port 0: small aiohttp apps, or raw asyncio servers for bytes an aiohttp
server will not send.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl

import orjson
import pytest
import trustme
from aiohttp import web

from proxy.app.config import Config, parse_config
from proxy.sim.testing import completion, stream_events
from proxy.upstream.providers import Provider
from tests.conftest import config_for, read_request
from tests.test_fallback import KEY, attempt_lines, call, chat, config_with, content_of


class Recording:
    """An aiohttp upstream that answers every POST, whatever its path, with `answer(request, body)`, and
    records the path (with its query) and the headers each request came with."""

    def __init__(self, answer=None) -> None:
        self.answer = answer or ok_answer
        self.seen: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.seen.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        return await self.answer(request, body)


async def ok_answer(request: web.Request, body: dict) -> web.StreamResponse:
    if request.path.endswith("/embeddings"):
        data = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        return web.json_response(data)
    if not body.get("stream"):
        return web.json_response(completion(body["model"]))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in stream_events(body["model"]):
        await resp.write(event)
    await resp.write_eof()
    return resp


def single(url: str, **provider) -> Config:
    """A config whose one virtual model has one model: what that model's failure looks like to the client."""
    return config_for(url, {"tier-test": ["m1"]}, provider=provider)


def assert_openai_error(r, status: int) -> dict:
    assert r.status == status, r.body
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}, error
    return error


async def chain_behind(aiohttp_server, upstream, answer) -> tuple[Recording, Config]:
    """A config whose chain is m1 on a provider that answers with `answer`, then m2 on the scripted upstream."""
    odd = Recording(answer)
    server = await aiohttp_server(odd.app())
    scripted, url = upstream
    config = config_with({"odd": f"http://127.0.0.1:{server.port}/v1", "up": url}, {"tier-test": ["odd:m1", "up:m2"]})
    return odd, config


def assert_m2_answered(r, stream: bool) -> None:
    assert r.status == 200, r.body
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert content_of(r.body, stream) == "Hello there!"


# --- base URLs ----------------------------------------------------------------------------------------------

BASE_PATHS = {
    # base_url after the port -> the path (and query) the chat request goes to
    "": "/chat/completions",
    "/openai/v1/": "/openai/v1/chat/completions",
    "/a/deep/prefix/v1": "/a/deep/prefix/v1/chat/completions",
    "/v1?api-version=2024-10-01": "/v1/chat/completions?api-version=2024-10-01",
    "/v1/?api-version=1&x=y": "/v1/chat/completions?api-version=1&x=y",
    # What cannot stand in a request line is percent-encoded, as yarl did for ClientSession; escapes stay.
    "/my models/v1": "/my%20models/v1/chat/completions",
    "/modèles/v1?région=eu": "/mod%C3%A8les/v1/chat/completions?r%C3%A9gion=eu",
    "/already%20escaped/v1": "/already%20escaped/v1/chat/completions",
}


@pytest.mark.parametrize("suffix", list(BASE_PATHS))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_base_url_prefix_query_and_trailing_slash_reach_the_right_path(suffix, stream, aiohttp_server,
                                                                            start_proxy):
    up = Recording()
    server = await aiohttp_server(up.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}{suffix}"))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert content_of(r.body, stream) == "Hello there!"
    assert [s["path"] for s in up.seen] == [BASE_PATHS[suffix]]
    assert up.seen[0]["headers"]["Host"] == f"127.0.0.1:{server.port}"  # a non-default port is named


async def test_embeddings_keep_the_prefix_and_query_too(aiohttp_server, start_proxy):
    up = Recording()
    server = await aiohttp_server(up.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/v1/?k=v"))
    r = await call(base, {"model": "tier-test", "input": "hi"}, path="/v1/embeddings")
    assert r.status == 200, r.body
    assert [s["path"] for s in up.seen] == ["/v1/embeddings?k=v"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_ipv6_literal_upstream(stream, aiohttp_server, start_proxy):
    up = Recording()
    server = await aiohttp_server(up.app(), host="::1")
    base = await start_proxy(config_for(f"http://[::1]:{server.port}/openai/v1"))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert content_of(r.body, stream) == "Hello there!"
    assert up.seen[0]["headers"]["Host"] == f"[::1]:{server.port}"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_host_name_that_cannot_be_looked_up_is_a_connect_error(stream, upstream, start_proxy, proxy_log):
    # `api..groq.com` (a typo) fails in the IDNA encoding before any DNS query: still no connection, not a 500.
    scripted, url = upstream
    config = config_with({"typo": "http://api..example/v1", "up": url}, {"tier-test": ["typo:m1", "up:m2"]})
    base = await start_proxy(config)

    r = await call(base, chat(stream=stream))

    assert_m2_answered(r, stream)
    lines = attempt_lines(proxy_log)
    assert (lines[0]["outcome"], lines[0]["reason"]) == ("fell_over", "connect_error")


def test_https_on_its_default_port_is_not_named_in_the_host_header():
    config = parse_config({
        "providers": {
            "groq": {"base_url": "https://api.groq.com/openai/v1"},
            "explicit": {"base_url": "https://api.groq.com:443/openai/v1"},
            "odd": {"base_url": "https://api.groq.com:8443/openai/v1"},
            "plain": {"base_url": "http://[2001:db8::1]:80/v1"},
        },
        "models": {"m": {"chain": ["groq:x"]}},
    }, env={})
    headers = {name: Provider.from_config(p).origin.host_header for name, p in config.providers.items()}
    assert headers == {"groq": "api.groq.com", "explicit": "api.groq.com", "odd": "api.groq.com:8443",
                       "plain": "[2001:db8::1]"}


async def test_https_upstream_trusted_through_ssl_cert_file(aiohttp_server, start_proxy, tmp_path, monkeypatch):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    up = Recording()
    server = await aiohttp_server(up.app(), ssl=server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    base = await start_proxy(config_for(f"https://localhost:{server.port}/openai/v1"))

    for stream in (False, True):
        r = await call(base, chat(stream=stream))
        assert r.status == 200, r.body
        assert content_of(r.body, stream) == "Hello there!"
    assert up.seen[0]["headers"]["Host"] == f"localhost:{server.port}"
    assert up.seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"


async def test_https_upstream_with_an_untrusted_certificate_is_a_connect_error(aiohttp_server, start_proxy,
                                                                              proxy_log):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(server_ctx)
    server = await aiohttp_server(Recording().app(), ssl=server_ctx)
    base = await start_proxy(single(f"https://localhost:{server.port}/openai/v1"))

    r = await call(base, chat())

    error = assert_openai_error(r, 503)  # no model could be reached
    assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
    assert attempt_lines(proxy_log)[0]["reason"] == "connect_error"


# --- answers ClientSession used to smooth over -----------------------------------------------------------


async def gzipped(request: web.Request, body: dict) -> web.StreamResponse:
    """Compresses every answer, whatever the request's Accept-Encoding says. ClientSession decoded this; the
    proxy's client decodes nothing, so the attempt fails and the next model answers."""
    if body.get("stream"):
        raw = b"".join(stream_events(body["model"]))
        kind = "text/event-stream"
    else:
        raw = orjson.dumps(completion(body["model"]))
        kind = "application/json"
    return web.Response(body=gzip.compress(raw), headers={"Content-Type": kind, "Content-Encoding": "gzip"})


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_compressed_answer_falls_over_and_never_reaches_the_client(stream, aiohttp_server, upstream,
                                                                         start_proxy, proxy_log):
    _, config = await chain_behind(aiohttp_server, upstream, gzipped)
    base = await start_proxy(config)

    r = await call(base, chat(stream=stream))

    assert_m2_answered(r, stream)
    assert [x["outcome"] for x in attempt_lines(proxy_log)] == ["fell_over", "answered"]


async def gzipped_unless_told(request: web.Request, body: dict) -> web.StreamResponse:
    """Compresses unless the request's Accept-Encoding leaves gzip out: RFC 9110 (12.5.3) lets a server take
    a request without Accept-Encoding as accepting any encoding."""
    if "gzip" in request.headers.get("Accept-Encoding", "gzip"):
        return await gzipped(request, body)
    return await ok_answer(request, body)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_upstream_free_to_compress_is_told_not_to(stream, aiohttp_server, start_proxy, proxy_log):
    server = await aiohttp_server(Recording(gzipped_unless_told).app())
    base = await start_proxy(single(f"http://127.0.0.1:{server.port}/v1"))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert content_of(r.body, stream) == "Hello there!"
    assert [x["outcome"] for x in attempt_lines(proxy_log)] == ["answered"]


def redirect_to(status: int):
    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": "https://elsewhere.example/v1" + request.path_qs},
                            text="<html>moved</html>", content_type="text/html")
    return answer


@pytest.mark.parametrize("code", [301, 302, 307, 308])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_redirect_falls_over_to_the_next_model(code, stream, aiohttp_server, upstream, start_proxy,
                                                      proxy_log):
    # A redirect is about the provider's base URL, not about the request: another model may well answer.
    moved, config = await chain_behind(aiohttp_server, upstream, redirect_to(code))
    base = await start_proxy(config)

    r = await call(base, chat(stream=stream))

    assert_m2_answered(r, stream)
    assert len(moved.seen) == 1  # not followed: the provider key stays with the origin it was configured for
    lines = attempt_lines(proxy_log)
    assert (lines[0]["outcome"], lines[0]["reason"], lines[0]["status"]) == ("fell_over", f"status_{code}", code)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_redirect_from_the_only_model_is_a_bad_gateway(stream, aiohttp_server, start_proxy):
    moving = await aiohttp_server(Recording(redirect_to(308)).app())
    base = await start_proxy(single(f"http://127.0.0.1:{moving.port}/v1"))

    r = await call(base, chat(stream=stream))

    error = assert_openai_error(r, 502)
    assert error["code"] == "all_models_failed"
    assert "308" in error["message"]
    assert "location" not in r.headers


def empty(status: int, **headers):
    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        return web.Response(status=status, headers=headers)
    return answer


EMPTY_ANSWERS = {
    # case -> (answer, the reason logged for a plain request, for a streamed one)
    "204": (empty(204), "status_204", "status_204"),
    "202": (empty(202), "status_202", "status_202"),
    "200_empty_json": (empty(200, **{"Content-Type": "application/json"}), "malformed", "malformed"),
    "200_empty_stream": (empty(200, **{"Content-Type": "text/event-stream"}), "malformed", "upstream_closed"),
}


@pytest.mark.parametrize("case", list(EMPTY_ANSWERS))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_empty_answer_is_not_an_answer(case, stream, aiohttp_server, upstream, start_proxy, proxy_log):
    answer, plain_reason, stream_reason = EMPTY_ANSWERS[case]
    _, config = await chain_behind(aiohttp_server, upstream, answer)
    base = await start_proxy(config)

    r = await call(base, chat(stream=stream))

    assert_m2_answered(r, stream)
    lines = attempt_lines(proxy_log)
    assert (lines[0]["outcome"], lines[0]["reason"]) == ("fell_over", stream_reason if stream else plain_reason)


# --- slow, trickling and short-lived upstreams --------------------------------------------------------------


def http_answer(body: dict) -> bytes:
    """A whole HTTP/1.1 answer to one chat request: JSON with a length, or a chunked SSE stream."""
    if not body.get("stream"):
        data = orjson.dumps(completion(body["model"]))
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in stream_events(body["model"]))
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks + b"0\r\n\r\n")


async def read_chat(reader: asyncio.StreamReader) -> dict:
    raw = await read_request(reader)
    return orjson.loads(raw.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_answer_trickling_in_byte_by_byte_arrives_whole(stream, raw_server, start_proxy):
    async def trickle(reader, writer):
        while True:
            try:
                body = await read_chat(reader)
            except asyncio.IncompleteReadError:
                return
            answer = http_answer(body)
            for i in range(0, len(answer), 7):  # status line, headers, chunk sizes: every one cut somewhere
                writer.write(answer[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0)

    port = await raw_server(trickle)
    base = await start_proxy(single(f"http://127.0.0.1:{port}/v1"))

    for _ in range(2):  # the second over the same kept-alive connection
        r = await call(base, chat(stream=stream))
        assert r.status == 200, r.body
        assert content_of(r.body, stream) == "Hello there!"
        if stream:
            assert r.body == b"".join(stream_events("m1"))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_body_that_trickles_past_the_deadline_is_a_timeout(stream, raw_server, start_proxy, proxy_log):
    async def endless(reader, writer):
        body = await read_chat(reader)
        answer = http_answer(body)
        head, _, rest = answer.partition(b"\r\n\r\n")
        # Head and (for a stream) the first event at once, then one byte now and then, never the end.
        first = rest.index(b"\n\n") + 4 if stream else 1
        writer.write(head + b"\r\n\r\n" + rest[:first])
        for byte in rest[first:-10]:
            await asyncio.sleep(0.02)
            if writer.is_closing() or reader.at_eof():  # the proxy gave up
                return
            writer.write(bytes((byte,)))

    port = await raw_server(endless)
    # The head (and first event) come at once, so the first-byte deadline is generous: only the whole-answer
    # deadline is meant to pass, and a busy machine must not make the first one pass instead.
    base = await start_proxy(single(f"http://127.0.0.1:{port}/v1", first_byte_timeout_s=2, timeout_s=2))

    r = await call(base, chat(stream=stream))

    if stream:  # past the commit point: one error event ends the stream
        assert r.status == 200
        assert b'"code":"timeout"' in r.body.split(b"\n\n")[-2]
    else:
        error = assert_openai_error(r, 504)
        assert "not complete in" in error["message"]
    assert attempt_lines(proxy_log)[0]["reason"] == "timeout"


class CloseAfterEach:
    """A raw upstream that answers one request per connection and closes it, either saying so
    (`Connection: close`) or not (a keep-alive answer, then the close)."""

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.connections = 0

    async def __call__(self, reader, writer) -> None:
        self.connections += 1
        body = await read_chat(reader)
        answer = http_answer(body)
        if self.announce:
            answer = answer.replace(b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n", 1)
        writer.write(answer)
        await writer.drain()


@pytest.mark.parametrize("announce", [True, False], ids=["connection_close", "silent_close"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_upstream_closing_after_every_answer_is_never_a_failure(announce, stream, raw_server, start_proxy,
                                                                      proxy_log):
    closer = CloseAfterEach(announce)
    port = await raw_server(closer)
    base = await start_proxy(single(f"http://127.0.0.1:{port}/v1"))

    for _ in range(5):
        r = await call(base, chat(stream=stream))
        assert r.status == 200, r.body
        assert content_of(r.body, stream) == "Hello there!"

    assert closer.connections == 5
    assert {x["outcome"] for x in attempt_lines(proxy_log)} == {"answered"}


# --- the provider key ---------------------------------------------------------------------------------------


async def echo_back(reader, writer):
    """Sends the proxy's own request (head, provider key and all) back as the 'answer'."""
    writer.write(await read_request(reader))
    await writer.drain()


async def echo_with_a_status_line(reader, writer):
    """A valid status line, then the proxy's request as header lines and body: broken HTTP full of the key."""
    request = await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + request.split(b"\r\n", 1)[1] + b"\x00\x01")
    await writer.drain()


async def headers_then_reset(reader, writer):
    request = await read_request(reader)
    writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 999\r\n\r\n" + request)
    await writer.drain()
    writer.transport.abort()


SENT_BACK = {
    # handler -> the reason logged: bytes that are not an HTTP answer are malformed; a reset is a closed connection
    echo_back: "malformed",
    echo_with_a_status_line: "malformed",
    headers_then_reset: "upstream_closed",
}


@pytest.mark.parametrize("handler", list(SENT_BACK))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_an_upstream_that_sends_our_request_back_leaks_no_key(handler, stream, raw_server, start_proxy,
                                                                    proxy_log):
    port = await raw_server(handler)
    base = await start_proxy(single(f"http://127.0.0.1:{port}/v1"))

    r = await call(base, chat(stream=stream))

    error = assert_openai_error(r, 502)
    assert error["code"] == "all_models_failed"
    assert attempt_lines(proxy_log)[0]["reason"] == SENT_BACK[handler]
    # Not even a redacted key: the client's error texts never carried it (logs and spans show the same detail).
    logged = "\n".join(str(getattr(rec, "fields", "")) + rec.getMessage() for rec in proxy_log.records)
    for text in (r.body.decode(), logged, str(dict(r.headers))):
        assert KEY not in text and "[redacted]" not in text


# --- the request the proxy sends ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_compressed_request_goes_upstream_as_the_json_the_proxy_wrote(stream, aiohttp_server, start_proxy):
    # aiohttp's server decodes the client's body; the proxy sends its own JSON: the client's encoding is not its.
    up = Recording()
    server = await aiohttp_server(up.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/v1"))

    r = await call(base, gzip.compress(orjson.dumps(chat(stream=stream))), headers={"Content-Encoding": "gzip"})

    assert r.status == 200, r.body
    assert content_of(r.body, stream) == "Hello there!"
    assert "Content-Encoding" not in up.seen[0]["headers"]
    assert up.seen[0]["body"]["model"] == "m1"
