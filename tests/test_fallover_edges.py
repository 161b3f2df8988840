"""The exact edges of the README's routing rules, each one a line a small change could move unnoticed.

Which statuses fall over (403 as well as 401; an error code only on the status it belongs to), which status the
client gets when every model failed (504 only when every attempt sent timed out, 503 only when none could be
reached, skipped models not counted), and which client headers never go upstream (those named in the client's
`Connection` header, however many `Connection` lines it sends; cookies and the client's API keys).
Everything runs through the real proxy against `ScriptedUpstream` (proxy/sim/testing.py) or raw servers.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from multidict import CIMultiDict

from proxy.sim.testing import Behaviour, status, stream_events
from tests.conftest import closed_port_url, config_for
from tests.test_fallback import KEY, MESSAGES, StallingUpstream, attempt_lines, call, chat, config_with, content_of

QUICK = {"first_byte_timeout_s": 0.2, "timeout_s": 0.5}
HANG = Behaviour("hang", delay_s=5)


def quick_and_normal(url: str, chains: dict[str, list[str]]):
    """Provider `slow` (short deadlines, for the models made to hang) and `up` (the default ones, so an answer
    from a healthy model is never mistaken for a timeout on a busy machine), both at the scripted upstream."""
    return config_with({"slow": {"base_url": url, **QUICK}, "up": url}, chains)
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


# --- which answers fall over --------------------------------------------------------------------------------

# The README's list, one row per status it names (403 is the one the main table leaves out).
FALLS_OVER = {
    "401": (status(401, "invalid_api_key", "Invalid API Key"), "status_401"),
    "403": (status(403, "permission_denied", "Forbidden: key not allowed for this model"), "status_403"),
    "403_no_body_code": (status(403, None, "Access denied"), "status_403"),
    "408": (status(408), "status_408"),
    "409": (status(409, message="conflict"), "status_409"),
    "429_without_retry_after": (status(429, "rate_limit_exceeded"), "rate_limited"),
    "498": (status(498, message="flex tier capacity exceeded"), "status_498"),
    "404_model_not_found": (status(404, "model_not_found"), "model_not_found"),
    "400_model_decommissioned": (status(400, "model_decommissioned"), "model_decommissioned"),
    "413_rate_limit_exceeded": (status(413, "rate_limit_exceeded"), "rate_limit_exceeded"),
    "501": (status(501), "status_501"),
    "504": (status(504), "status_504"),
    "599": (status(599), "status_599"),
    "399": (status(399), "status_399"),
}


@STREAMS
@pytest.mark.parametrize("case", list(FALLS_OVER))
async def test_status_named_by_the_readme_falls_over(case, stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    behaviour, reason = FALLS_OVER[case]
    scripted.behaviours["m1"] = behaviour
    base = await start_proxy(config_for(url))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert (r.headers["x-groq-proxy-model"], r.headers["x-groq-proxy-attempts"]) == ("m2", "2")
    assert content_of(r.body, stream) == "Hello there!"
    assert scripted.models_sent() == ["m1", "m2"]
    lines = attempt_lines(proxy_log)
    assert [(x["target"], x["outcome"]) for x in lines] == [("up:m1", "fell_over"), ("up:m2", "answered")]
    assert (lines[0]["reason"], lines[0]["status"]) == (reason, behaviour.status)


# A 4xx that is the request's fault goes back unchanged: an error code falls over only on its own status.
PASSED_BACK = {
    "400_other_code": status(400, "invalid_request_error", "temperature must be <= 2"),
    "400_model_not_found": status(400, "model_not_found", "code of a 404, on a 400"),
    "404_model_decommissioned": status(404, "model_decommissioned", "code of a 400, on a 404"),
    "413_model_not_found": status(413, "model_not_found", "code of a 404, on a 413"),
    "400_rate_limit_exceeded": status(400, "rate_limit_exceeded", "code of a 413, on a 400"),
    "422": status(422, None, "Unprocessable: tool schema"),
    "402": status(402, "payment_required", "billing"),
    "451": status(451, None, "unavailable for legal reasons"),
    "499": status(499, None, "client closed request"),
}


@STREAMS
@pytest.mark.parametrize("case", list(PASSED_BACK))
async def test_other_4xx_goes_back_to_the_client_and_does_not_fall_over(case, stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    behaviour = PASSED_BACK[case]
    scripted.behaviours["m1"] = behaviour
    base = await start_proxy(config_for(url))

    r = await call(base, chat(stream=stream))

    assert r.status == behaviour.status
    assert r.body == orjson.dumps(behaviour.body)
    assert scripted.models_sent() == ["m1"]
    assert [(x["target"], x["outcome"]) for x in attempt_lines(proxy_log)] == [("up:m1", "passed_back")]


# --- the status of an all-failed answer ---------------------------------------------------------------------


def _all_failed(r) -> str:
    error = r.json()["error"]
    assert error["code"] == "all_models_failed", error
    return error["message"]


@STREAMS
async def test_one_timeout_and_one_500_is_502_not_504(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=HANG, m2=status(500, message="internal"))
    base = await start_proxy(quick_and_normal(url, {"tier-test": ["slow:m1", "up:m2"]}))

    r = await call(base, chat(stream=stream))

    assert r.status == 502, r.body
    assert r.headers["x-should-retry"] == "false"
    message = _all_failed(r)
    # A stream waits for its first event; a plain answer has only timeout_s (Groq sends it whole).
    hung = "slow:m1: no first" if stream else "slow:m1: not complete in"
    assert hung in message and "up:m2: 500: internal" in message


@STREAMS
async def test_a_500_then_a_timeout_is_502_not_504(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(500), m2=HANG)
    base = await start_proxy(quick_and_normal(url, {"tier-test": ["up:m1", "slow:m2"]}))
    r = await call(base, chat(stream=stream))
    assert r.status == 502, r.body


async def test_a_stalled_body_and_no_answer_together_are_504(upstream, aiohttp_server, start_proxy, proxy_log):
    # A model that sent headers and stalled, one that sent nothing: a plain request has only timeout_s (Groq
    # sends a plain answer whole), so both are `timeout`, and together they are "all timed out".
    scripted, url = upstream
    scripted.behaviours["m2"] = HANG
    slow = await aiohttp_server(StallingUpstream().app())
    providers = {"slow": {"base_url": f"http://127.0.0.1:{slow.port}/openai/v1", **QUICK},
                 "up": {"base_url": url, **QUICK}}
    base = await start_proxy(config_with(providers, {"tier-test": ["slow:m1", "up:m2"]}))

    r = await call(base, chat())

    assert r.status == 504, r.body
    assert r.headers["x-should-retry"] == "false"
    assert [x["reason"] for x in attempt_lines(proxy_log)] == ["timeout", "timeout"]


async def test_a_refused_connection_and_a_timeout_is_502(upstream, start_proxy):
    # Neither "all timed out" nor "none could be reached": one model was reached and was too slow.
    scripted, url = upstream
    scripted.behaviours["m2"] = HANG
    providers = {"dead": closed_port_url(), "up": {"base_url": url, **QUICK}}
    base = await start_proxy(config_with(providers, {"tier-test": ["dead:m1", "up:m2"]}))
    r = await call(base, chat())
    assert r.status == 502, r.body


@STREAMS
async def test_a_refused_connection_and_a_500_is_502_not_503(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m2"] = status(500)
    providers = {"dead": closed_port_url(), "up": url}
    base = await start_proxy(config_with(providers, {"tier-test": ["dead:m1", "up:m2"]}))
    r = await call(base, chat(stream=stream))
    assert r.status == 502, r.body
    assert "dead:m1" in _all_failed(r)


async def test_a_skipped_model_does_not_stop_the_others_timing_out_from_being_504(upstream, start_proxy):
    scripted, url = upstream
    chains = {"tier-test": ["up:m1", "slow:m2"], "warm": ["up:m1", "up:m3"]}
    base = await start_proxy(quick_and_normal(url, chains))
    scripted.behaviours.update(m1=status(429, "rate_limit_exceeded", retry_after="60"), m2=HANG)
    assert (await call(base, chat("warm"))).headers["x-groq-proxy-model"] == "m3"  # m1 now cooling down

    r = await call(base, chat())

    assert r.status == 504, r.body
    message = _all_failed(r)
    assert "up:m1: skipped (cooling down" in message and "slow:m2: not complete in" in message
    assert scripted.models_sent() == ["m1", "m3", "m2"]  # m1 was not called the second time


async def test_a_skipped_model_does_not_stop_the_others_unreachable_from_being_503(upstream, start_proxy):
    scripted, url = upstream
    providers = {"up": url, "dead": closed_port_url()}
    base = await start_proxy(config_with(providers, {"tier-test": ["up:m1", "dead:m2"], "warm": ["up:m1", "up:m3"]}))
    scripted.behaviours["m1"] = status(429, "rate_limit_exceeded", retry_after="60")
    assert (await call(base, chat("warm"))).headers["x-groq-proxy-model"] == "m3"  # m1 now cooling down

    r = await call(base, chat())

    assert r.status == 503, r.body
    assert "up:m1: skipped" in _all_failed(r)


# --- what the client sends that never goes upstream ---------------------------------------------------------


@STREAMS
async def test_headers_named_in_connection_cookies_and_client_keys_stay_at_the_proxy(stream, upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    sent = {
        "Authorization": "Bearer client-own-key",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Cookie": "session=cookie-secret",
        "x-api-key": "client-x-api-key",
        "api-key": "client-azure-style-key",
        "Connection": "keep-alive, X-Hop-Secret, x-other-HOP",
        "X-Hop-Secret": "hop-secret-1",
        "X-Other-Hop": "hop-secret-2",
        "X-Client-Trace": "abc-123",
    }
    r = await call(base, chat(stream=stream), headers=sent)
    assert r.status == 200

    (request,) = scripted.requests
    got = CIMultiDict(request["headers"])
    assert got["Authorization"] == f"Bearer {KEY}"  # the provider's key instead of the client's
    for name in ("Proxy-Authorization", "Cookie", "x-api-key", "api-key", "X-Hop-Secret", "X-Other-Hop"):
        assert name not in got, (name, request["headers"])
    for secret in ("client-own-key", "cHJveHk6c2VjcmV0", "cookie-secret", "client-x-api-key", "client-azure-style-key",
                   "hop-secret"):
        assert secret not in str(request["headers"]), secret
    assert got["X-Client-Trace"] == "abc-123"


async def test_every_connection_header_line_names_hop_by_hop_headers(upstream, start_proxy):
    # A field sent on several lines is one list (RFC 9110, 5.3): a header named on the second line is hop-by-hop too.
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    port = int(base.rsplit(":", 1)[1])
    body = orjson.dumps(chat())
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: X-First-Hop\r\nConnection: close, X-Second-Hop\r\n"
        "X-First-Hop: one\r\nX-Second-Hop: two\r\nX-Kept: three\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + body)
        answer = await asyncio.wait_for(reader.read(), 10)  # Connection: close: the proxy closes after answering
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]

    (request,) = scripted.requests
    got = CIMultiDict(request["headers"])
    assert "X-First-Hop" not in got and "X-Second-Hop" not in got, request["headers"]
    assert got["X-Kept"] == "three"
    assert request["body"] == {"model": "m1", "messages": MESSAGES}


async def test_a_fallover_sends_the_same_forwarded_headers_to_the_next_model(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config_for(url))
    r = await call(base, chat(stream=True), headers={"Cookie": "c=1", "X-Client-Trace": "t-1"})
    assert r.status == 200 and r.body == b"".join(stream_events("m2"))
    assert len(scripted.requests) == 2
    for request in scripted.requests:
        got = CIMultiDict(request["headers"])
        assert got["X-Client-Trace"] == "t-1" and "Cookie" not in got and got["Authorization"] == f"Bearer {KEY}"
