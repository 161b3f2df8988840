"""Key pools: `api_key_envs` spreads requests over keys round robin; a key that answers 401/403 or 429 rests,
and the same model is tried with the next key before the chain moves on. Keys are named by their variable,
never their value, in logs, spans and metrics."""

from __future__ import annotations

import pytest

from proxy.app.config import ConfigError, parse_config
from proxy.sim.testing import status
from tests.conftest import KEYS, post_chat, routing_config

MESSAGES = [{"role": "user", "content": "hi"}]
A, B, C = KEYS["KEY_A"], KEYS["KEY_B"], KEYS["KEY_C"]


def body(**extra):
    return {"model": "tier-x", "messages": MESSAGES, **extra}


async def test_requests_spread_round_robin_over_the_keys(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}, keys=("KEY_A", "KEY_B", "KEY_C")))
    for _ in range(6):
        code, _, _ = await post_chat(base, body())
        assert code == 200
    assert scripted.keys_sent() == [A, B, C, A, B, C]
    assert scripted.models_sent() == ["m1"] * 6


@pytest.mark.parametrize("code", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_refused_key_rests_and_the_same_model_is_tried_with_the_next(code, stream, upstream, start_proxy,
                                                                             proxy_log):
    scripted, url = upstream
    scripted.by_key[A] = {"m1": status(code, "invalid_api_key", message=f"key {A} is wrong")}
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}, keys=("KEY_A", "KEY_B")))

    status_code, headers, raw = await post_chat(base, body(stream=stream))
    assert status_code == 200 and headers["x-groq-proxy-model"] == "m1"
    assert scripted.keys_sent() == [A, B] and scripted.models_sent() == ["m1", "m1"]

    for _ in range(3):  # KEY_A rests: every request goes with KEY_B, to the first model
        assert (await post_chat(base, body(stream=stream)))[0] == 200
    assert scripted.keys_sent()[2:] == [B, B, B] and scripted.models_sent()[2:] == ["m1"] * 3

    lines = [r for r in proxy_log.records if r.getMessage() == "attempt" or "attempt" in r.getMessage()]
    text = proxy_log.text + "".join(str(getattr(r, "fields", "")) for r in lines)
    assert "KEY_A" in text and A not in text and B not in text  # named by its variable, never its value


async def test_a_429_rests_that_model_and_key_only_and_charges_no_cooldown(upstream, start_proxy):
    scripted, url = upstream
    scripted.by_key[A] = {"m1": status(429, "rate_limit_exceeded", retry_after="30")}
    config = routing_config(url, {"tier-x": ["m1", "m2"]}, keys=("KEY_A", "KEY_B"),
                            routing={"cooldown_after_failures": 1})
    base = await start_proxy(config)

    assert (await post_chat(base, body()))[0] == 200
    assert list(zip(scripted.keys_sent(), scripted.models_sent())) == [(A, "m1"), (B, "m1")]
    # KEY_A still serves m2 (its 429 was about m1), and m1 is not cooling down (KEY_B serves it).
    scripted.behaviours["m1"] = status(503, message="down for everyone")
    assert (await post_chat(base, body()))[0] == 200
    assert list(zip(scripted.keys_sent(), scripted.models_sent()))[2:] == [(B, "m1"), (A, "m2")]


async def test_every_key_rate_limited_on_a_model_moves_the_chain_on(upstream, start_proxy):
    scripted, url = upstream
    scripted.by_key[A] = {"m1": status(429, "rate_limit_exceeded")}
    scripted.by_key[B] = {"m1": status(429, "rate_limit_exceeded")}
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}, keys=("KEY_A", "KEY_B")))
    code, headers, _ = await post_chat(base, body())
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m1", "m1", "m2"]
    # Both keys rest on m1 (key_rest_s, no retry-after given): the next request goes to m2 at once.
    code, headers, _ = await post_chat(base, body())
    assert code == 200 and scripted.models_sent()[3:] == ["m2"]


async def test_every_key_refused_is_a_failure_with_every_key_resting_named(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(401, "invalid_api_key", message=f"Invalid API Key {A} / {B}")
    base = await start_proxy(routing_config(url, {"tier-x": ["m1"]}, keys=("KEY_A", "KEY_B")))
    code, _, raw = await post_chat(base, body())
    assert code == 502 and b"Invalid API Key [redacted] / [redacted]" in raw  # every pool value is a secret
    code, _, raw = await post_chat(base, body())
    assert code == 503 and b"every key is resting" in raw and len(scripted.requests) == 2


async def test_key_names_on_spans_and_metrics_never_values(upstream, start_proxy):
    import aiohttp

    scripted, url = upstream
    scripted.by_key[A] = {"m1": status(401, "invalid_api_key")}
    base = await start_proxy(routing_config(url, {"tier-x": ["m1"]}, keys=("KEY_A", "KEY_B")))
    assert (await post_chat(base, body()))[0] == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_key_attempts_total{provider="up",key="KEY_A",outcome="fell_over"} 1' in text
    assert 'groq_proxy_key_attempts_total{provider="up",key="KEY_B",outcome="answered"} 1' in text
    assert A not in text and B not in text


def test_api_key_env_and_api_key_envs_together_is_a_config_error():
    raw = {"providers": {"up": {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "KEY_A",
                                "api_key_envs": ["KEY_B", "KEY_C"]}}, "models": {"t": {"chain": ["up:m"]}}}
    with pytest.raises(ConfigError, match=r"^providers\.up\.api_key_envs: set api_key_env .* not both"):
        parse_config(raw, env=KEYS)


@pytest.mark.parametrize("value, message", [
    ([], "providers.up.api_key_envs: must be a non-empty list"),
    (["KEY_A", "gsk_abcdef"], "providers.up.api_key_envs[1]: must be the name of an environment variable"),
    (["KEY_A", "KEY_A"], "providers.up.api_key_envs[1]: KEY_A is listed twice"),
])
def test_bad_pools_name_the_key(value, message):
    raw = {"providers": {"up": {"base_url": "http://127.0.0.1:1/v1", "api_key_envs": value}},
           "models": {"t": {"chain": ["up:m"]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env=KEYS)
    assert str(err.value).startswith(message) and "gsk_abcdef" not in str(err.value)


def test_a_pool_key_value_with_a_newline_is_refused_without_showing_it():
    raw = {"providers": {"up": {"base_url": "http://127.0.0.1:1/v1", "api_key_envs": ["KEY_A", "KEY_B"]}},
           "models": {"t": {"chain": ["up:m"]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={**KEYS, "KEY_B": "sk-secret-value\n"})
    assert str(err.value).startswith("providers.up.api_key_envs: the value of $KEY_B holds whitespace")
    assert "sk-secret-value" not in str(err.value)
