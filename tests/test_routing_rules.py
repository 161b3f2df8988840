"""Rules of the README's "How a request is routed" that had no test of their own: the order in which a model name is
resolved when two kinds of name collide, the provider a bare real model name goes to, and the status of an answer
when every model was rate-limited. Through the real proxy against `ScriptedUpstream`.
"""

from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict

from proxy.app.config import parse_config
from proxy.sim.testing import Behaviour, status, stream_events
from tests.conftest import config_for
from tests.test_fallback import KEY, call, chat, config_with, sse_blocks

STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


def config(url: str, models: dict[str, list[str]], aliases: dict[str, str] | None = None,
           providers: tuple[str, ...] = ("up",)):
    """Providers (in this order) all at `url`, each with its own key so a request shows which one it went to."""
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {p: {"base_url": url, "api_key_env": f"KEY_{p.upper()}"} for p in providers},
        "models": {name: {"chain": chain} for name, chain in models.items()},
        "aliases": aliases or {},
    }
    return parse_config(raw, env={f"KEY_{p.upper()}": f"{KEY}-{p}" for p in providers})


def provider_of(request: dict) -> str:
    return CIMultiDict(request["headers"])["Authorization"].rsplit("-", 1)[1]


async def test_a_virtual_model_wins_over_a_real_model_of_the_same_name(upstream, start_proxy):
    scripted, url = upstream
    models = {"m1": ["up:m2", "up:m3"], "tier-other": ["up:m1"]}  # `m1` is a virtual model and a real one
    base = await start_proxy(config(url, models))

    r = await call(base, chat("m1"))

    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m2"]


async def test_an_alias_wins_over_a_real_model_of_the_same_name(upstream, start_proxy):
    scripted, url = upstream
    models = {"tier-test": ["up:m1", "up:m2"]}
    base = await start_proxy(config(url, models, aliases={"m1": "up:m2", "up:m1": "tier-test"}))

    bare = await call(base, chat("m1"))  # an alias, and a bare real model a chain names
    explicit = await call(base, chat("up:m1"))  # an alias, and an explicit provider:model

    assert bare.status == 200 and bare.headers["x-groq-proxy-model"] == "m2"
    assert explicit.status == 200 and explicit.headers["x-groq-proxy-model"] == "m1"
    assert scripted.models_sent() == ["m2", "m1"]


async def test_an_alias_of_a_virtual_model_falls_over_along_its_chain(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config(url, {"tier-test": ["up:m1", "up:m2"]}, aliases={"old-name": "tier-test"}))
    r = await call(base, chat("old-name", stream=True))
    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2" and r.headers["x-groq-proxy-attempts"] == "2"


async def test_a_bare_real_model_goes_to_the_first_provider_whatever_the_chain_order(upstream, start_proxy):
    scripted, url = upstream
    # `m1` is named at both providers; the chain lists the second provider's first. The first provider in the
    # config is the one bare names refer to.
    models = {"tier-test": ["second:m1", "first:m1"]}
    base = await start_proxy(config(url, models, providers=("first", "second")))

    r = await call(base, chat("m1"))

    assert r.status == 200
    assert r.headers["x-groq-proxy-provider"] == "first"
    assert [provider_of(q) for q in scripted.requests] == ["first"]


@STREAMS
async def test_every_model_rate_limited_without_retry_after_is_still_a_429(stream, upstream, start_proxy):
    # Every model said 429 without saying for how long: a rate limit, for the client to back off from, not a
    # 502 "all models failed" that tells it never to retry (and fires the all-models-failing alert).
    scripted, url = upstream
    for m in ("m1", "m2"):
        scripted.behaviours[m] = status(429, "rate_limit_exceeded", "tokens per minute")
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))

    r = await call(base, chat(stream=stream))

    assert r.status == 429, r.body
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "up:m1: 429" in error["message"] and "up:m2: 429" in error["message"]
    assert r.headers.get("x-should-retry") != "false"
    assert "retry-after" not in r.headers  # no model said when: the proxy does not make a time up


@STREAMS
async def test_rate_limited_and_failed_together_is_not_a_429(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(429, "rate_limit_exceeded", retry_after="5"), m2=status(500))
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))
    r = await call(base, chat(stream=stream))
    assert r.status == 502, r.body
    assert "retry-after" not in r.headers


async def test_after_keepalives_the_chunks_name_the_model_that_answered(upstream, start_proxy):
    # The 200 and its headers went out with the first keep-alive, before any model answered: the headers name
    # no model (not the one that was tried first), and the chunks' `model` field names the one that answered.
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("hang", delay_s=5)
    providers = {"slow": {"base_url": url, "first_byte_timeout_s": 0.2, "timeout_s": 0.5}, "up": url}
    base = await start_proxy(config_with(providers, {"tier-test": ["slow:m1", "up:m2"]}, server={"keepalive_s": 0.02}))

    r = await call(base, chat(stream=True))

    assert r.status == 200
    assert r.headers["x-request-id"].startswith("req_")
    assert "x-groq-proxy-model" not in r.headers and "x-groq-proxy-provider" not in r.headers
    blocks = sse_blocks(r.body)
    assert blocks[0] == b": keep-alive"
    events = [b for b in blocks if b.startswith(b"data: ")]
    assert b"".join(e + b"\n\n" for e in events) == b"".join(stream_events("m2"))
    assert {orjson.loads(e[6:])["model"] for e in events if e != b"data: [DONE]"} == {"m2"}
    assert scripted.models_sent() == ["m1", "m2"]


@pytest.mark.parametrize("wait_ms", ["2500", "2100", "900"])
async def test_the_clients_retry_after_is_never_before_the_models_wait_ends(wait_ms, upstream, start_proxy):
    # A model that said 429 with `retry-after-ms` is skipped until then: a client told to come back sooner would
    # only find every model still cooling down. Whole seconds, rounded up.
    scripted, url = upstream
    for m in ("m1", "m2"):
        scripted.behaviours[m] = status(429, "rate_limit_exceeded", retry_after_ms=wait_ms)
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))

    r = await call(base, chat())

    assert r.status == 429, r.body
    assert int(r.headers["retry-after"]) == -(-int(wait_ms) // 1000)  # the ceiling, in seconds
