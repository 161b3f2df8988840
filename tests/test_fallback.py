"""The chain of attempts before the commit point: which failures fall over, what goes back to the client
unchanged, the all-failed answer, the headers the proxy sends and drops, and the per-attempt log lines.

Everything runs against real local servers: the proxy app, `ScriptedUpstream`, and small aiohttp apps here.
The helpers at the top are shared with the other test files of this suite (streaming, cool-down).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app.config import Config, parse_config
from proxy.telemetry.logs import JsonFormatter
from proxy.sim.testing import Behaviour, ChatUpstream, completion, status, stream_events
from tests.conftest import closed_port_url, config_for

KEY = "sk-test-secret-upstream-key"
MESSAGES = [{"role": "user", "content": "hi"}]
# Short deadlines for every test that makes a model hang (a timeout is a failure we provoke, not a measure).
QUICK = {"first_byte_timeout_s": 0.2, "timeout_s": 0.5}


# --- helpers shared by this suite ---------------------------------------------------------------------------


def chat(model: str = "tier-test", *, stream: bool = False, **extra) -> dict:
    body = {"model": model, "messages": MESSAGES, **extra}
    if stream:
        body["stream"] = True
    return body


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy
    body: bytes

    def json(self):
        return orjson.loads(self.body)


async def call(base: str, body: dict | bytes, *, headers: dict | None = None, path: str = "/v1/chat/completions"):
    """One request with aiohttp's client; the whole raw body is read."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + path, data=data, headers=hdrs) as resp:
            raw = await resp.read()
            return Reply(resp.status, CIMultiDictProxy(CIMultiDict(resp.headers)), raw)


def config_with(providers: dict[str, str | dict], chains: dict[str, list[str]], **tables) -> Config:
    """A config with several providers. `providers` maps name -> base URL (or a provider table);
    `chains` maps virtual model -> ['provider:model', ...]."""
    raw_providers = {}
    for name, value in providers.items():
        table = {"base_url": value} if isinstance(value, str) else dict(value)
        raw_providers[name] = {"api_key_env": "TEST_UPSTREAM_KEY", **table}
    raw = {
        "server": {"keepalive_s": 0, **tables.pop("server", {})},
        "providers": raw_providers,
        "models": {name: {"chain": chain} for name, chain in chains.items()},
        **tables,
    }
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": KEY})


def sse_blocks(body: bytes) -> list[bytes]:
    """The events of an SSE body (LF framing), without their blank-line terminator."""
    assert body.endswith(b"\n\n"), body[-80:]
    return body[:-2].split(b"\n\n")


def data_events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order; comments are left out."""
    return [b[len(b"data: "):] for b in sse_blocks(body) if b.startswith(b"data:")]


def content_of(body: bytes, stream: bool) -> str:
    if not stream:
        return orjson.loads(body)["choices"][0]["message"]["content"]
    text = ""
    for data in data_events(body):
        if data != b"[DONE]":
            for choice in orjson.loads(data)["choices"]:
                text += choice["delta"].get("content") or ""
    return text


class StallingUpstream(ChatUpstream):
    """An upstream that sends its status and headers (and, for streams, `prefix`) and then stalls until
    the proxy hangs up. Gives a first byte without a first event, or a body that never completes."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.requests: list[dict] = []

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append({"headers": dict(request.headers), "body": body})
        kind = "text/event-stream" if body.get("stream") else "application/json"
        resp = web.StreamResponse(headers={"Content-Type": kind})
        await resp.prepare(request)
        await resp.write(self.prefix if body.get("stream") else b'{"id": "chatcmpl-stall", ')
        await asyncio.sleep(30)  # cancelled when the proxy gives up and closes the connection
        return resp


def attempt_lines(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "groq_proxy" and r.getMessage() == "attempt"]


# --- falling over before the first data event --------------------------------------------------------------

# failure name -> (behaviour of m1, the reason the attempt log gives)
FALLOVER_CASES = {
    "no_answer_in_time": (Behaviour("hang", delay_s=5), None),
    "408": (status(408), "status_408"),
    "409": (status(409), "status_409"),
    "429": (status(429, "rate_limit_exceeded", retry_after="1"), "rate_limited"),
    "498": (status(498, message="flex tier capacity exceeded"), "status_498"),
    "500": (status(500), "status_500"),
    "502": (status(502), "status_502"),
    "503": (status(503), "status_503"),
    "404_model_not_found": (status(404, "model_not_found", "The model `m1` does not exist"), "model_not_found"),
    "400_model_decommissioned": (status(400, "model_decommissioned", "m1 was decommissioned"), "model_decommissioned"),
    "413_rate_limit_exceeded": (status(413, "rate_limit_exceeded", "Request too large for TPM"), "rate_limit_exceeded"),
    "401_provider_key": (status(401, "invalid_api_key", "Invalid API Key"), "status_401"),
    "403_provider_key": (status(403, "permission_denied", "Key not allowed to use this model"), "status_403"),
    "upstream_closes": (Behaviour("close"), "upstream_closed"),
    "first_event_is_error": (Behaviour("error_event", cut_after=0), None),
    "ends_before_any_event": (Behaviour("cut", cut_after=0), None),
    "first_event_malformed": (Behaviour("malformed", cut_after=0), "malformed"),
    "200_not_json": (Behaviour("status", status=200, body=b"<html>Bad gateway</html>"), "malformed"),
}
# A stream has first_byte_timeout_s for its first event; a plain answer only its whole timeout_s (Groq sends nothing
# of it before all of it is generated).
STREAM_REASONS = {"first_event_is_error": "upstream_error_event", "ends_before_any_event": "upstream_closed",
                  "no_answer_in_time": "first_byte_timeout"}
PLAIN_REASONS = {"first_event_is_error": "malformed", "ends_before_any_event": "upstream_closed",
                 "no_answer_in_time": "timeout"}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(FALLOVER_CASES))
async def test_failure_before_first_event_falls_over_to_next_model(case, stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    behaviour, reason = FALLOVER_CASES[case]
    scripted.behaviours["m1"] = behaviour
    base = await start_proxy(config_for(url, provider=QUICK))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.headers["x-groq-proxy-attempts"] == "2"
    assert r.headers["x-request-id"].startswith("req_")
    assert scripted.models_sent() == ["m1", "m2"]
    assert content_of(r.body, stream) == "Hello there!"
    if stream:
        assert r.body == b"".join(stream_events("m2"))  # nothing of m1's attempt reached the client
    lines = attempt_lines(proxy_log)
    assert [(x["target"], x["outcome"]) for x in lines] == [("up:m1", "fell_over"), ("up:m2", "answered")]
    expected = reason or (STREAM_REASONS if stream else PLAIN_REASONS)[case]
    assert lines[0]["reason"] == expected
    assert lines[0]["next"] == "up:m2"


async def test_stream_with_only_a_comment_is_not_an_answer(upstream, start_proxy):
    # A comment is not a first event: the upstream that ends after one has not answered.
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", events=[b": ping\n\n"])
    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=True))
    assert r.status == 200
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.body == b"".join(stream_events("m2"))
    assert scripted.models_sent() == ["m1", "m2"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_connection_refused_falls_over_to_next_provider(stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    config = config_with({"dead": closed_port_url(), "up": url}, {"tier-test": ["dead:m1", "up:m2"]})
    base = await start_proxy(config)

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.headers["x-groq-proxy-provider"] == "up"
    assert r.headers["x-groq-proxy-attempts"] == "2"
    assert content_of(r.body, stream) == "Hello there!"
    assert scripted.models_sent() == ["m2"]
    first = attempt_lines(proxy_log)[0]
    assert (first["target"], first["outcome"], first["reason"]) == ("dead:m1", "fell_over", "connect_error")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_connect_timeout_falls_over_to_next_provider(stream, black_hole_url, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    providers = {"far": {"base_url": black_hole_url, "connect_timeout_s": 0.1}, "up": url}
    base = await start_proxy(config_with(providers, {"tier-test": ["far:m1", "up:m2"]}))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.headers["x-groq-proxy-attempts"] == "2"
    assert content_of(r.body, stream) == "Hello there!"
    first = attempt_lines(proxy_log)[0]
    assert (first["target"], first["outcome"], first["reason"]) == ("far:m1", "fell_over", "connect_timeout")


async def test_total_timeout_of_a_plain_answer_falls_over(upstream, aiohttp_server, start_proxy, proxy_log):
    # Status and headers arrive at once (the first byte), the body never completes: `timeout_s` ends it.
    scripted, url = upstream
    stalling = StallingUpstream()
    slow = await aiohttp_server(stalling.app())
    providers = {"slow": {"base_url": f"http://127.0.0.1:{slow.port}/openai/v1", **QUICK}, "up": url}
    base = await start_proxy(config_with(providers, {"tier-test": ["slow:m1", "up:m2"]}))

    r = await call(base, chat())

    assert r.status == 200, r.body
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.headers["x-groq-proxy-attempts"] == "2"
    assert r.json()["choices"][0]["message"]["content"] == "Hello there!"
    assert len(stalling.requests) == 1 and scripted.models_sent() == ["m2"]
    first = attempt_lines(proxy_log)[0]
    assert (first["outcome"], first["reason"]) == ("fell_over", "timeout")


async def test_stream_with_headers_but_no_event_in_time_falls_over(upstream, aiohttp_server, start_proxy, proxy_log):
    # A 200 and a comment are not a first event: the first-byte deadline still runs out, and the chain moves on.
    scripted, url = upstream
    stalling = StallingUpstream(prefix=b": processing\n\n")
    slow = await aiohttp_server(stalling.app())
    providers = {"slow": {"base_url": f"http://127.0.0.1:{slow.port}/openai/v1", **QUICK}, "up": url}
    base = await start_proxy(config_with(providers, {"tier-test": ["slow:m1", "up:m2"]}))

    r = await call(base, chat(stream=True))

    assert r.status == 200
    assert r.headers["x-groq-proxy-model"] == "m2"
    assert r.headers["x-groq-proxy-attempts"] == "2"
    assert r.body == b"".join(stream_events("m2"))
    first = attempt_lines(proxy_log)[0]
    assert (first["outcome"], first["reason"]) == ("fell_over", "first_byte_timeout")


# --- errors that belong to the client ---------------------------------------------------------------------

PASSED_BACK = {
    "400": status(400, None, "'messages[0].name' is not supported"),
    "400_other_code": status(400, "invalid_value", "temperature must be <= 2"),
    "422": status(422, None, "Unprocessable: tool schema"),
    "404_other_code": status(404, "unknown_url", "Unknown request URL"),
    "413_too_large": status(413, "request_too_large", "Request body too large"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(PASSED_BACK))
async def test_other_client_errors_go_back_unchanged(case, stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    behaviour = PASSED_BACK[case]
    scripted.behaviours["m1"] = behaviour

    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=stream))

    assert r.status == behaviour.status
    assert r.body == orjson.dumps(behaviour.body)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["x-groq-proxy-attempts"] == "1"
    assert scripted.models_sent() == ["m1"]
    assert [(x["target"], x["outcome"]) for x in attempt_lines(proxy_log)] == [("up:m1", "passed_back")]


async def test_passed_back_error_reaches_openai_client_as_its_status(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(422, "bad_tool", "Unprocessable: tool schema")
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.UnprocessableEntityError) as info:
            await client.chat.completions.create(model="tier-test", messages=MESSAGES)
    assert info.value.code == "bad_tool"
    assert scripted.models_sent() == ["m1"]


# --- every model failed ------------------------------------------------------------------------------------


def error_of(r: Reply) -> dict:
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()["error"]


def assert_lists_attempts(message: str, keys: list[str], *, what: str) -> None:
    """The message names each model, what failed and the time it took, in chain order."""
    positions = [message.index(k + ": ") for k in keys]
    assert positions == sorted(positions), message
    parts = re.findall(r"(up:m\d): (.*?) after (\d+) ms", message)
    assert [p[0] for p in parts] == keys, message
    assert all(what in p[1] for p in parts), message


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_all_rate_limited_is_429_with_retry_after(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(
        m1=status(429, "rate_limit_exceeded", "tokens per minute", retry_after="7"),
        m2=status(429, "rate_limit_exceeded", "tokens per minute", retry_after="3"),
        m3=status(429, "rate_limit_exceeded", "tokens per minute", retry_after="5"),
    )
    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=stream))

    assert r.status == 429
    assert r.headers["retry-after"] == "3"  # the soonest any model may answer again
    assert r.headers["x-request-id"].startswith("req_")
    error = error_of(r)
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "tier-test" in error["message"] and r.headers["x-request-id"] in error["message"]
    assert_lists_attempts(error["message"], ["up:m1", "up:m2", "up:m3"], what="429 rate_limit_exceeded")
    assert scripted.models_sent() == ["m1", "m2", "m3"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_all_timed_out_is_504_without_client_retry(stream, upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = Behaviour("hang", delay_s=5)
    base = await start_proxy(config_for(url, provider={"first_byte_timeout_s": 0.05, "timeout_s": 0.5}))
    r = await call(base, chat(stream=stream))

    assert r.status == 504
    assert r.headers["x-should-retry"] == "false"
    error = error_of(r)
    assert error["code"] == "all_models_failed"
    assert_lists_attempts(error["message"], ["up:m1", "up:m2", "up:m3"], what="no first" if stream else "not complete")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_some_timed_out_others_failed_is_502_not_504(stream, upstream, start_proxy):
    # 504 says every model timed out; one timeout among other failures is the mixed case.
    scripted, url = upstream
    scripted.behaviours.update(m1=Behaviour("hang", delay_s=5), m2=status(503), m3=status(503))
    base = await start_proxy(config_for(url, provider=QUICK))
    r = await call(base, chat(stream=stream))
    assert r.status == 502
    assert error_of(r)["code"] == "all_models_failed"
    assert scripted.models_sent() == ["m1", "m2", "m3"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_all_connections_refused_is_503(stream, start_proxy):
    dead = closed_port_url()
    config = config_with({"up": dead}, {"tier-test": ["up:m1", "up:m2"]})
    base = await start_proxy(config)
    r = await call(base, chat(stream=stream))

    assert r.status == 503
    assert r.headers["x-request-id"].startswith("req_")
    error = error_of(r)
    assert error["code"] == "all_models_failed"
    assert_lists_attempts(error["message"], ["up:m1", "up:m2"], what="Connect")


async def test_all_connects_refused_or_timed_out_is_503(black_hole_url, start_proxy):
    providers = {"up": closed_port_url(), "far": {"base_url": black_hole_url, "connect_timeout_s": 0.1}}
    base = await start_proxy(config_with(providers, {"tier-test": ["up:m1", "far:m2"]}))
    r = await call(base, chat())
    assert r.status == 503
    message = error_of(r)["message"]
    assert re.search(r"up:m1: .*Connect.* after \d+ ms; far:m2: connect timed out after \d+ ms", message), message


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_mixed_failures_are_502_without_client_retry(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(500, message="internal"), m2=Behaviour("close"), m3=status(429))
    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=stream))

    assert r.status == 502
    assert r.headers["x-should-retry"] == "false"
    error = error_of(r)
    assert error["type"] == "server_error" and error["code"] == "all_models_failed"
    message = error["message"]
    assert re.search(r"up:m1: 500: internal after \d+ ms", message), message
    assert re.search(r"up:m3: 429: upstream says no after \d+ ms", message), message
    assert_lists_attempts(message, ["up:m1", "up:m2", "up:m3"], what="")


async def test_all_failed_reaches_openai_client_without_retries(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(503, message="over capacity")
    base = await start_proxy(config_for(url))
    # The SDK's default retries would multiply the load; x-should-retry: false must stop them.
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=2) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="tier-test", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.code == "all_models_failed"
    assert scripted.models_sent() == ["m1", "m2", "m3"]


async def test_all_failed_after_keepalives_is_one_sse_error_event(upstream, start_proxy):
    # Keep-alives already sent the 200: the all-failed error can only arrive as an error event.
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = Behaviour("hang", delay_s=5)
    config = config_for(url, provider={"first_byte_timeout_s": 0.1, "timeout_s": 0.5}, server={"keepalive_s": 0.02})
    base = await start_proxy(config)
    r = await call(base, chat(stream=True))

    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["x-request-id"].startswith("req_")
    blocks = sse_blocks(r.body)
    assert blocks[0] == b": keep-alive"
    assert set(blocks[:-1]) == {b": keep-alive"}
    assert blocks[-1].startswith(b"data: ")
    error = orjson.loads(blocks[-1][len(b"data: "):])["error"]
    assert error["code"] == "all_models_failed"
    assert_lists_attempts(error["message"], ["up:m1", "up:m2", "up:m3"], what="no first")
    assert b"[DONE]" not in r.body


async def test_all_failed_after_keepalives_raises_in_openai_client(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = Behaviour("hang", delay_s=5)
    config = config_for(url, provider={"first_byte_timeout_s": 0.1, "timeout_s": 0.5}, server={"keepalive_s": 0.02})
    base = await start_proxy(config)
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
    assert "up:m3" in info.value.message


# --- headers -------------------------------------------------------------------------------------------------

HOP_BY_HOP = ("Connection", "Keep-Alive", "TE", "Transfer-Encoding", "Upgrade", "Proxy-Authorization")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_client_credentials_and_hop_by_hop_headers_stay_at_the_proxy(stream, upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    sent = {
        "Authorization": "Bearer client-own-key",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Keep-Alive": "timeout=5, max=100",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Connection": "keep-alive, TE, Upgrade",
        "X-Client-Trace": "abc-123",
    }
    # Sent chunked, so the client's own Transfer-Encoding header is real too.
    async def body():
        yield orjson.dumps(chat(stream=stream))

    async with aiohttp.ClientSession() as session:
        async with session.post(
            base + "/v1/chat/completions", data=body(), headers={"Content-Type": "application/json", **sent}
        ) as resp:
            assert resp.status == 200
            await resp.read()

    (request,) = scripted.requests
    got = CIMultiDict(request["headers"])
    assert got["Authorization"] == f"Bearer {KEY}"
    assert "client-own-key" not in str(request["headers"])
    for name in HOP_BY_HOP:
        if name == "Connection":
            assert got.get(name, "keep-alive").lower() == "keep-alive"  # the proxy's own, if any
        elif name == "Transfer-Encoding":
            assert "chunked" not in got.get(name, "").lower()
        else:
            assert name not in got, (name, request["headers"])
    assert "cHJveHk6c2VjcmV0" not in str(request["headers"])
    assert got["X-Client-Trace"] == "abc-123"  # ordinary end-to-end headers do go through
    assert request["body"] == {"model": "m1", "messages": MESSAGES, **({"stream": True} if stream else {})}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_headers_named_in_connection_and_client_credentials_are_not_forwarded(stream, upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    sent = {
        "Connection": "keep-alive, X-Hop-Only",  # the client says X-Hop-Only is for this hop alone
        "X-Hop-Only": "hop-value",
        "Cookie": "session=cookie-value",
        "x-api-key": "x-api-key-value",
        "api-key": "api-key-value",
        "X-End-To-End": "kept",
    }
    r = await call(base, chat(stream=stream), headers=sent)
    assert r.status == 200
    (request,) = scripted.requests
    got = CIMultiDict(request["headers"])
    for name in ("X-Hop-Only", "Cookie", "x-api-key", "api-key"):
        assert name not in got, name
    assert "-value" not in str(request["headers"])
    assert got["X-End-To-End"] == "kept"


async def test_every_response_has_a_request_id(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(pb=status(422), f1=status(500), f2=status(503))
    config = config_for(url, {"tier-test": ["m1"], "tier-pb": ["pb"], "tier-fail": ["f1", "f2"]})
    base = await start_proxy(config)

    answers = {
        "success": await call(base, chat()),
        "success_stream": await call(base, chat(stream=True)),
        "passed_back": await call(base, chat("tier-pb")),
        "passed_back_stream": await call(base, chat("tier-pb", stream=True)),
        "all_failed": await call(base, chat("tier-fail")),
        "all_failed_stream": await call(base, chat("tier-fail", stream=True)),
        "bad_json": await call(base, b"{not json"),
        "bad_field": await call(base, {"model": "tier-test", "messages": "hi"}),
        "unknown_model": await call(base, chat("no-such-model")),
    }
    expected_status = {
        "success": 200, "success_stream": 200, "passed_back": 422, "passed_back_stream": 422,
        "all_failed": 502, "all_failed_stream": 502, "bad_json": 400, "bad_field": 400, "unknown_model": 404,
    }
    assert {k: r.status for k, r in answers.items()} == expected_status
    ids = {k: r.headers.get("x-request-id", "") for k, r in answers.items()}
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", v) for v in ids.values()), ids
    assert len(set(ids.values())) == len(ids)  # one id per request


async def test_provider_key_never_reaches_client_or_log(upstream, start_proxy, proxy_log):
    # An upstream that echoes the key it was given, OpenAI-style ("Incorrect API key provided: sk-...").
    scripted, url = upstream
    echo = f"Incorrect API key provided: {KEY}"
    scripted.behaviours.update(
        m1=status(401, "invalid_api_key", echo),
        m2=status(503, message=echo),
        m3=status(400, None, echo),  # passed back to the client
        a1=status(500, message=echo),
        a2=status(429, message=echo),
    )
    config = config_for(url, {"tier-test": ["m1", "m2", "m3"], "tier-fail": ["a1", "a2"], "tier-ok": ["ok1"]})
    base = await start_proxy(config)
    answers = [
        await call(base, body)
        for body in (chat(), chat(stream=True), chat("tier-fail"), chat("tier-fail", stream=True),
                     chat("tier-ok"), chat("tier-ok", stream=True), b"[]")
    ]
    assert [r.status for r in answers] == [400, 400, 502, 502, 200, 200, 400]
    assert any(b"[redacted]" in r.body for r in answers)  # the echo did come back, without the key
    for r in answers:
        assert KEY.encode() not in r.body
        assert all(KEY not in v for v in r.headers.values())
    assert all(r.headers["x-request-id"] for r in answers)

    records = [r for r in proxy_log.records if r.name == "groq_proxy"]
    assert len(attempt_lines(proxy_log)) == 3 + 2 + 3 + 2 + 1 + 1
    formatter = JsonFormatter()
    for record in records:
        assert KEY not in formatter.format(record)
        assert KEY not in repr(vars(record))  # not only the JSON output: the record any handler gets
    assert any("[redacted]" in str(f.get("detail")) for f in attempt_lines(proxy_log))


async def test_provider_key_absent_from_every_log_record_field(upstream, start_proxy, proxy_log):
    # Whatever handler an operator attaches, the records themselves carry no key.
    scripted, url = upstream
    scripted.behaviours.update(m1=status(503), m2=Behaviour("close"))
    base = await start_proxy(config_for(url))
    assert (await call(base, chat(stream=True))).status == 200
    assert (await call(base, chat())).status == 200
    records = [r for r in proxy_log.records if r.name == "groq_proxy"]
    assert [r.getMessage() for r in records] == ["attempt"] * 3 + ["request"] + ["attempt"] * 3 + ["request"]
    for record in records:
        assert KEY not in repr(vars(record))


# --- one log line per attempt --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_each_attempt_is_one_structured_log_line(stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(503), m2=status(404, "model_not_found"))
    base = await start_proxy(config_for(url))
    started = time.perf_counter()
    r = await call(base, chat(stream=stream))
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert r.status == 200 and r.headers["x-groq-proxy-attempts"] == "3"

    records = [rec for rec in proxy_log.records if rec.name == "groq_proxy" and rec.getMessage() == "attempt"]
    assert [rec.levelno for rec in records] == [logging.WARNING, logging.WARNING, logging.INFO]
    fields = [rec.fields for rec in records]
    request_id = r.headers["x-request-id"]
    assert [f["request_id"] for f in fields] == [request_id] * 3
    assert [f["attempt"] for f in fields] == [0, 1, 2]
    assert [f["target"] for f in fields] == ["up:m1", "up:m2", "up:m3"]
    assert [f["outcome"] for f in fields] == ["fell_over", "fell_over", "answered"]
    assert [f.get("reason") for f in fields] == ["status_503", "model_not_found", None]
    assert [f.get("next") for f in fields] == ["up:m2", "up:m3", None]
    assert [f["status"] for f in fields] == [503, 404, 200]
    assert all(f["requested"] == "tier-test" and f["ms"] > 0 for f in fields)
    assert sum(f["ms"] for f in fields) <= elapsed_ms  # each attempt's own time, all within the request
    line = orjson.loads(JsonFormatter().format(records[0]))
    assert line["event"] == "attempt" and line["target"] == "up:m1" and line["level"] == "warning"


async def test_last_model_failing_logs_next_as_none(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(500), m2=status(500), m3=status(500))
    base = await start_proxy(config_for(url))
    r = await call(base, chat())
    assert r.status == 502
    fields = attempt_lines(proxy_log)
    assert [f["outcome"] for f in fields] == ["fell_over"] * 3
    assert [f["next"] for f in fields] == ["up:m2", "up:m3", None]


async def test_first_model_answering_is_one_attempt(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", body=completion("m1", "first!"))
    base = await start_proxy(config_for(url))
    r = await call(base, chat())
    assert r.status == 200
    assert r.headers["x-groq-proxy-model"] == "m1" and r.headers["x-groq-proxy-attempts"] == "1"
    assert r.json()["choices"][0]["message"]["content"] == "first!"
    assert r.headers["x-upstream-request-id"] == "req_up"
    assert scripted.models_sent() == ["m1"]
    assert [(f["target"], f["outcome"]) for f in attempt_lines(proxy_log)] == [("up:m1", "answered")]


# --- a 200 that is not an answer ---------------------------------------------------------------------------

NOT_A_COMPLETION = {
    "empty_object": {},
    "choices_not_a_list": {"choices": "nope"},
    "choices_empty": {"choices": []},
    "choice_not_an_object": {"choices": [1]},
    "choice_without_message": {"choices": [{"index": 0, "finish_reason": "stop"}]},
    "message_not_an_object": {"choices": [{"index": 0, "message": "hi"}]},
    "error_object": {"error": {"message": "overloaded", "type": "server_error"}},
    "error_beside_choices": {"error": "partial", **completion("m1")},
    "array": [completion("m1")],
    "string": "Hello there!",
}


@pytest.mark.parametrize("case", list(NOT_A_COMPLETION))
async def test_200_that_is_not_a_chat_completion_falls_over(case, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("status", status=200, body=orjson.dumps(NOT_A_COMPLETION[case]))
    base = await start_proxy(config_for(url))

    r = await call(base, chat())

    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2"
    assert r.json() == completion("m2")
    first = attempt_lines(proxy_log)[0]
    assert (first["target"], first["outcome"], first["reason"]) == ("up:m1", "fell_over", "malformed")


async def test_smallest_chat_completion_is_an_answer(upstream, start_proxy):
    # What a completion must have, and no more: choices, each an object with a message object.
    scripted, url = upstream
    smallest = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
    scripted.behaviours["m1"] = Behaviour("status", status=200, body=orjson.dumps(smallest))
    base = await start_proxy(config_for(url))
    r = await call(base, chat())
    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m1" and r.json() == smallest


NOT_EMBEDDINGS = {
    "empty_object": {},
    "data_not_a_list": {"object": "list", "data": "nope"},
    "data_empty": {"object": "list", "data": []},
    "item_not_an_object": {"object": "list", "data": [[0.1, 0.2]]},
    "item_without_embedding": {"object": "list", "data": [{"object": "embedding", "index": 0}]},
    "error_object": {"error": {"message": "overloaded", "type": "server_error"}},
    "a_chat_completion": completion("m1"),
}


@pytest.mark.parametrize("case", list(NOT_EMBEDDINGS))
async def test_200_that_is_not_an_embeddings_list_falls_over(case, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("status", status=200, body=orjson.dumps(NOT_EMBEDDINGS[case]))
    base = await start_proxy(config_for(url))

    r = await call(base, {"model": "tier-test", "input": "hello"}, path="/v1/embeddings")

    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2"
    assert r.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    first = attempt_lines(proxy_log)[0]
    assert (first["target"], first["outcome"], first["reason"]) == ("up:m1", "fell_over", "malformed")


async def test_smallest_embeddings_list_is_an_answer(upstream, start_proxy):
    scripted, url = upstream
    smallest = {"data": [{"embedding": [0.5]}]}
    scripted.behaviours["m1"] = Behaviour("status", status=200, body=orjson.dumps(smallest))
    base = await start_proxy(config_for(url))
    r = await call(base, {"model": "tier-test", "input": "hello"}, path="/v1/embeddings")
    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m1" and r.json() == smallest


NOT_AN_ANSWER_DETAILS = [
    ("/v1/chat/completions", "string", "200 with a body that is not a JSON object"),
    ("/v1/chat/completions", "error_object", "200 with an error: overloaded"),
    ("/v1/chat/completions", "choices_empty", "200 without choices: not a chat completion"),
    ("/v1/chat/completions", "choice_without_message", "200 with a choice that has no message: not a chat completion"),
    ("/v1/embeddings", "data_not_a_list", "200 without data: not an embeddings list"),
    ("/v1/embeddings", "error_object", "200 with an error: overloaded"),
    ("/v1/embeddings", "item_without_embedding", "200 with a data item that has no embedding"),
]


@pytest.mark.parametrize("path,case,detail", NOT_AN_ANSWER_DETAILS)
async def test_a_200_that_is_not_an_answer_says_what_it_lacks(path, case, detail, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    bodies = NOT_A_COMPLETION if path == "/v1/chat/completions" else NOT_EMBEDDINGS
    scripted.behaviours["m1"] = Behaviour("status", status=200, body=orjson.dumps(bodies[case]))
    base = await start_proxy(config_for(url))
    request = chat() if path == "/v1/chat/completions" else {"model": "tier-test", "input": "hello"}
    r = await call(base, request, path=path)
    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2"
    first = attempt_lines(proxy_log)[0]
    assert (first["outcome"], first["reason"], first["detail"]) == ("fell_over", "malformed", detail)
