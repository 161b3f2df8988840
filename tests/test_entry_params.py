"""Per-entry params: a chain entry `{ model = "...", params = {...} }` sends its params to that model only, over
the tier's `params` and under what the client set; config mistakes name the entry's key."""

from __future__ import annotations

import pytest

from proxy.app.config import ConfigError, parse_config
from proxy.sim.testing import status
from tests.conftest import post_chat, routing_config

MESSAGES = [{"role": "user", "content": "hi"}]


def tier():
    return {
        "chain": ["m1", {"model": "m2", "params": {"reasoning_effort": "none", "temperature": 0.3}}],
        "params": {"reasoning_effort": "low", "top_p": 0.9},
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_entry_params_go_to_their_model_only_over_the_tier_under_the_client(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503, message="busy")
    base = await start_proxy(routing_config(url, {"tier-x": tier()}))

    code, headers, body = await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "temperature": 0.7,
                                                 "stream": stream})

    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    first, second = (r["body"] for r in scripted.requests)
    # m1: the tier's params only; the client's temperature kept.
    assert first["reasoning_effort"] == "low" and first["top_p"] == 0.9 and first["temperature"] == 0.7
    # m2: its entry params over the tier's, the client's own temperature still wins over the entry's.
    assert second["reasoning_effort"] == "none" and second["top_p"] == 0.9 and second["temperature"] == 0.7


async def test_the_client_field_wins_over_an_entry_param(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(routing_config(url, {"tier-x": {"chain": [
        {"model": "m2", "params": {"reasoning_effort": "none"}}]}}))
    code, _, _ = await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "reasoning_effort": "high"})
    assert code == 200 and scripted.requests[0]["body"]["reasoning_effort"] == "high"


async def test_a_model_named_directly_gets_no_entry_params(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(routing_config(url, {"tier-x": tier()}))
    code, _, _ = await post_chat(base, {"model": "up:m2", "messages": MESSAGES})
    assert code == 200 and "reasoning_effort" not in scripted.requests[0]["body"]


@pytest.mark.parametrize("entry, message", [
    ({"model": "up:m", "parms": {}}, "models.t.chain[1].parms: unknown key"),
    ({"params": {}}, "models.t.chain[1].model: required"),
    ({"model": "nope:m"}, "models.t.chain[1].model: unknown provider"),
    ({"model": "up:m", "params": 3}, "models.t.chain[1].params: must be a table"),
    ({"model": "up:m", "params": {"messages": []}}, "models.t.chain[1].params.messages: the request sets"),
    (7, "models.t.chain[1]: must be 'provider:model'"),
])
def test_config_errors_name_the_entry_key(entry, message):
    raw = {"providers": {"up": {"base_url": "http://127.0.0.1:1/v1"}}, "models": {"t": {"chain": ["up:a", entry]}}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    assert str(err.value).startswith(message)
