"""Routing around Groq's rate limits: the proxy reads `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` per
model and key from every answer, and a request whose estimated tokens would not fit goes to the next key or
model (attempt `skipped`, reason `rate_limit_predicted`) instead of earning a 429."""

from __future__ import annotations

import pytest

from proxy.routing.ratelimits import RateLimits, estimate_tokens, go_duration
from proxy.sim.testing import Behaviour, status
from tests.conftest import KEYS, attempt_fields, post_chat, routing_config

MESSAGES = [{"role": "user", "content": "x" * 400}]  # about 100 tokens of prompt by the estimate


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("text, seconds", [
    ("2m59.56s", 179.56), ("7.66s", 7.66), ("100ms", 0.1), ("1h2m3s", 3723.0), ("0", 0.0), ("1.5h", 5400.0),
    ("250us", 0.00025), ("3s", 3.0),
])
def test_go_durations(text, seconds):
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "3s4", "ms", "1d", "-1s", "1.2.3s"])
def test_not_go_durations(text):
    assert go_duration(text) is None


def test_the_estimate_is_prompt_bytes_over_four_plus_the_completion_limit():
    body = {"messages": MESSAGES, "max_completion_tokens": 50}
    assert estimate_tokens(body) == len(b'[{"role":"user","content":"' + b"x" * 400 + b'"}]') // 4 + 50
    assert estimate_tokens({"messages": MESSAGES, "max_tokens": 7}) == estimate_tokens({"messages": MESSAGES}) + 7


def test_a_request_that_does_not_fit_is_blocked_until_the_reset():
    clock = Clock()
    limits = RateLimits(clock)
    limits.observe("up:m", 0, {"x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "7.66s",
                               "x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "2m59.56s"})
    assert limits.blocked("up:m", 0, lambda: 400) is None
    reason, wait = limits.blocked("up:m", 0, lambda: 600)
    assert reason == "rate_limit_predicted" and wait == pytest.approx(7.66)
    assert limits.blocked("up:m", 1, lambda: 600) is None  # another key has its own view
    clock.now += 7.7
    assert limits.blocked("up:m", 0, lambda: 600) is None  # refilled


def test_what_is_sent_is_taken_off_until_the_next_answer():
    limits = RateLimits(Clock())
    limits.observe("up:m", 0, {"x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "10s",
                               "x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "10s"})
    limits.spend("up:m", 0, 300)
    assert limits.blocked("up:m", 0, lambda: 300)[0] == "rate_limit_predicted"
    limits.spend("up:m", 0, 0)
    assert limits.blocked("up:m", 0, lambda: 1)[0] == "rate_limit_predicted"  # no request left


def test_a_rest_blocks_until_it_ends():
    clock = Clock()
    limits = RateLimits(clock)
    limits.rest("up:m", 1, 5.0)
    assert limits.blocked("up:m", 1, lambda: 1) == ("rate_limited", pytest.approx(5.0))
    clock.now += 5.1
    assert limits.blocked("up:m", 1, lambda: 1) is None


def test_state_is_bounded():
    limits = RateLimits(Clock(), max_tracked=8)
    for i in range(100):
        limits.rest(f"up:m{i}", 0, 60)
    assert len(limits._states) == 8


def low_tokens(remaining: int, reset: str = "7.66s") -> Behaviour:
    return Behaviour("ok", headers={"x-ratelimit-remaining-tokens": str(remaining), "x-ratelimit-reset-tokens": reset,
                                    "x-ratelimit-remaining-requests": "100", "x-ratelimit-reset-requests": "1m"})


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_that_would_not_fit_goes_to_the_next_model(stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = low_tokens(300)
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}))
    ask = {"model": "tier-x", "messages": MESSAGES, "stream": stream}

    assert (await post_chat(base, {**ask, "max_completion_tokens": 10}))[0] == 200  # m1 says 300 tokens left
    code, headers, _ = await post_chat(base, {**ask, "max_completion_tokens": 1000})  # ~1100: would not fit
    assert code == 200 and headers["x-groq-proxy-model"] == "m2"
    code, headers, _ = await post_chat(base, {**ask, "max_completion_tokens": 10})  # ~110 fits in what is left
    assert code == 200 and headers["x-groq-proxy-model"] == "m1"

    assert scripted.models_sent() == ["m1", "m2", "m1"]  # m1 never earned a 429
    skipped = [f for f in attempt_fields(proxy_log) if f["outcome"] == "skipped"]
    assert [(f["target"], f["reason"]) for f in skipped] == [("up:m1", "rate_limit_predicted")]


async def test_a_request_that_would_not_fit_goes_to_the_next_key_of_the_same_model(upstream, start_proxy):
    scripted, url = upstream
    scripted.by_key[KEYS["KEY_A"]] = {"m1": low_tokens(200)}
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}, keys=("KEY_A", "KEY_B")))
    ask = {"model": "tier-x", "messages": MESSAGES, "max_completion_tokens": 500}
    for _ in range(3):
        assert (await post_chat(base, ask))[0] == 200
    # KEY_A (turn 1) reports 200 tokens left; turn 3 would have used KEY_A again: it goes with KEY_B, to m1.
    assert scripted.keys_sent() == [KEYS["KEY_A"], KEYS["KEY_B"], KEYS["KEY_B"]]
    assert scripted.models_sent() == ["m1", "m1", "m1"]


async def test_no_requests_left_skips_the_model_until_the_reset(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = Behaviour("ok", headers={"x-ratelimit-remaining-requests": "0",
                                                         "x-ratelimit-reset-requests": "2m59.56s"})
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}))
    for _ in range(2):
        assert (await post_chat(base, {"model": "tier-x", "messages": MESSAGES}))[0] == 200
    assert scripted.models_sent() == ["m1", "m2"]


async def test_every_model_predicted_over_its_limit_is_a_429_with_when(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = low_tokens(100, "30s")
    base = await start_proxy(routing_config(url, {"tier-x": ["m1"]}))
    assert (await post_chat(base, {"model": "tier-x", "messages": [{"role": "user", "content": "hi"}]}))[0] == 200
    code, headers, raw = await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "max_tokens": 1000})
    assert code == 429 and 1 <= int(headers["retry-after"]) <= 30
    assert b"rate limit would not fit" in raw and len(scripted.requests) == 1


async def test_retry_after_of_a_429_rests_the_model_and_key_until_then(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(429, "rate_limit_exceeded", retry_after="30")
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}, keys=("KEY_A", "KEY_B")))
    assert (await post_chat(base, {"model": "tier-x", "messages": MESSAGES}))[0] == 200
    scripted.behaviours.pop("m1")  # m1 would answer now, but both keys rest on it for 30 s
    assert (await post_chat(base, {"model": "tier-x", "messages": MESSAGES}))[0] == 200
    assert scripted.models_sent() == ["m1", "m1", "m2", "m2"]
