"""Cool-downs: a model that said 429 with retry-after, or failed several times in a row, is skipped for a while
and tried again afterwards. Unit tests with an injected clock, then through the proxy with real (short) waits."""

from __future__ import annotations

import asyncio
import re

import pytest

from proxy.app.config import RoutingConfig
from proxy.routing.cooldown import Cooldowns
from proxy.sim.testing import Behaviour, ok, status, stream_events
from tests.conftest import config_for
from tests.test_fallback import attempt_lines, call, chat, content_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cooldowns(after: int = 3, cooldown_s: float = 30.0, max_s: float = 300.0) -> tuple[Cooldowns, Clock]:
    clock = Clock()
    routing = RoutingConfig(cooldown_after_failures=after, cooldown_s=cooldown_s, max_cooldown_s=max_s)
    return Cooldowns(routing, clock=clock), clock


# --- Cooldowns, with an injected clock ----------------------------------------------------------------------


def test_failure_counts_of_many_models_are_bounded_oldest_forgotten_first():
    routing = RoutingConfig(cooldown_after_failures=3, cooldown_s=30, max_cooldown_s=300)
    cd = Cooldowns(routing, clock=Clock(), max_tracked=3)
    cd.failed("up:a")
    for name in ("b", "c", "d"):
        cd.failed(f"up:{name}")
    cd.failed("up:b")  # b failed again: now the most recent
    cd.failed("up:e")
    assert list(cd._failures) == ["up:d", "up:b", "up:e"]
    cd.failed("up:b")  # its third failure in a row: the count survived the others
    assert cd.remaining("up:b") == 30


def test_running_cooldowns_are_bounded_expired_ones_go_first():
    clock = Clock()
    routing = RoutingConfig(cooldown_after_failures=3, cooldown_s=30, max_cooldown_s=300)
    cd = Cooldowns(routing, clock=clock, max_tracked=3)
    cd.failed("up:short", retry_after_s=5)
    cd.failed("up:long1", retry_after_s=100)
    cd.failed("up:long2", retry_after_s=100)
    clock.advance(10)  # `short` has ended, the others run
    cd.failed("up:new", retry_after_s=50)
    assert set(cd._until) == {"up:long1", "up:long2", "up:new"}
    cd.failed("up:newer", retry_after_s=200)  # all running: the one ending first (`new`) makes room
    assert set(cd._until) == {"up:long1", "up:long2", "up:newer"}
    assert cd.remaining("up:newer") == 200


def test_unknown_model_is_not_cooling_down():
    cd, _ = cooldowns()
    assert cd.remaining("up:m1") == 0.0


def test_failures_in_a_row_start_a_cooldown_at_the_threshold():
    cd, clock = cooldowns(after=3, cooldown_s=30)
    assert cd.failed("up:m1") == 0.0
    assert cd.failed("up:m1") == 0.0
    assert cd.remaining("up:m1") == 0.0
    assert cd.failed("up:m1") == 30.0
    assert cd.remaining("up:m1") == 30.0
    clock.advance(10)
    assert cd.remaining("up:m1") == pytest.approx(20.0)
    clock.advance(20)
    assert cd.remaining("up:m1") == 0.0  # over exactly at its end
    clock.advance(0.5)
    assert cd.remaining("up:m1") == 0.0


def test_the_count_starts_again_after_a_cooldown():
    cd, clock = cooldowns(after=2, cooldown_s=5)
    cd.failed("k")
    assert cd.failed("k") == 5.0
    clock.advance(6)
    assert cd.remaining("k") == 0.0
    assert cd.failed("k") == 0.0  # one failure after the cool-down is not yet two in a row
    assert cd.remaining("k") == 0.0
    assert cd.failed("k") == 5.0


def test_a_success_resets_the_count():
    cd, _ = cooldowns(after=2, cooldown_s=5)
    cd.failed("k")
    cd.succeeded("k")
    assert cd.failed("k") == 0.0
    assert cd.remaining("k") == 0.0
    assert cd.failed("k") == 5.0


def test_retry_after_starts_a_cooldown_at_once():
    cd, clock = cooldowns(after=3, cooldown_s=30)
    assert cd.failed("k", retry_after_s=2.5) == 2.5
    assert cd.remaining("k") == 2.5
    clock.advance(2.5)
    assert cd.remaining("k") == 0.0


def test_retry_after_is_capped_by_max_cooldown():
    cd, _ = cooldowns(max_s=60)
    assert cd.failed("k", retry_after_s=86400) == 60.0
    assert cd.remaining("k") == 60.0


def test_the_longer_of_retry_after_and_cooldown_wins_at_the_threshold():
    cd, _ = cooldowns(after=2, cooldown_s=30)
    cd.failed("a")
    assert cd.failed("a", retry_after_s=2) == 30.0
    cd.failed("b")
    assert cd.failed("b", retry_after_s=90) == 90.0


@pytest.mark.parametrize("retry_after", [None, 0, -1])
def test_no_cooldown_without_a_positive_retry_after(retry_after):
    cd, _ = cooldowns(after=3)
    assert cd.failed("k", retry_after_s=retry_after) == 0.0
    assert cd.remaining("k") == 0.0


def test_models_cool_down_independently():
    cd, clock = cooldowns(after=1, cooldown_s=10)
    cd.failed("up:m1")
    clock.advance(4)
    cd.failed("up:m2")
    assert cd.remaining("up:m1") == pytest.approx(6.0)
    assert cd.remaining("up:m2") == pytest.approx(10.0)
    assert cd.remaining("up:m3") == 0.0


def test_a_success_does_not_end_a_running_cooldown():
    # A straggler's success (a request that started before the cool-down) does not reopen the model early.
    cd, _ = cooldowns(after=1, cooldown_s=10)
    cd.failed("k")
    cd.succeeded("k")
    assert cd.remaining("k") == 10.0


# --- through the proxy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_model_that_said_429_with_retry_after_is_skipped_next_time(stream, upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(429, "rate_limit_exceeded", retry_after="30")
    base = await start_proxy(config_for(url))

    first = await call(base, chat(stream=stream))
    assert first.headers["x-groq-proxy-model"] == "m2"
    scripted.behaviours["m1"] = ok()  # would answer now, but its retry-after has not passed
    second = await call(base, chat(stream=stream))

    assert second.status == 200
    assert second.headers["x-groq-proxy-model"] == "m2"
    assert second.headers["x-groq-proxy-attempts"] == "1"  # a skip sends nothing
    assert content_of(second.body, stream) == "Hello there!"
    assert scripted.models_sent() == ["m1", "m2", "m2"]
    lines = attempt_lines(proxy_log)
    assert lines[0]["cooldown_s"] == 30
    skip = lines[2]
    assert (skip["target"], skip["outcome"], skip["reason"], skip["next"]) == ("up:m1", "skipped", "cooldown", "up:m2")
    assert skip["request_id"] == second.headers["x-request-id"]


async def test_a_model_is_tried_again_when_its_retry_after_has_passed(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(429, "rate_limit_exceeded", retry_after_ms="200")
    base = await start_proxy(config_for(url))

    assert (await call(base, chat())).headers["x-groq-proxy-model"] == "m2"
    scripted.behaviours["m1"] = ok()
    assert (await call(base, chat())).headers["x-groq-proxy-model"] == "m2"
    await asyncio.sleep(0.3)  # waiting out the cool-down, not measuring anything
    third = await call(base, chat())
    assert third.headers["x-groq-proxy-model"] == "m1"
    assert scripted.models_sent() == ["m1", "m2", "m2", "m1"]


async def test_a_skip_is_listed_in_the_all_failed_message(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(429, "rate_limit_exceeded", retry_after="30"), m2=status(500))
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))

    assert (await call(base, chat())).status == 502
    r = await call(base, chat())

    assert r.status == 502
    message = r.json()["error"]["message"]
    assert re.search(r"up:m1: skipped \(cooling down for \d+(\.\d)?s more\)", message), message
    assert re.search(r"up:m2: 500.* after \d+ ms", message), message
    assert message.index("up:m1") < message.index("up:m2")
    assert scripted.models_sent() == ["m1", "m2", "m2"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_failures_in_a_row_cool_a_model_down_then_it_is_tried_again(stream, upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(500)
    config = config_for(url, routing={"cooldown_after_failures": 2, "cooldown_s": 0.2})
    base = await start_proxy(config)

    for _ in range(2):
        r = await call(base, chat(stream=stream))
        assert r.headers["x-groq-proxy-model"] == "m2" and r.headers["x-groq-proxy-attempts"] == "2"
    assert scripted.models_sent() == ["m1", "m2", "m1", "m2"]

    scripted.behaviours["m1"] = ok()
    skipped = await call(base, chat(stream=stream))
    assert skipped.headers["x-groq-proxy-model"] == "m2"
    assert skipped.headers["x-groq-proxy-attempts"] == "1"
    assert scripted.models_sent()[4:] == ["m2"]

    await asyncio.sleep(0.3)  # the cool-down is over
    again = await call(base, chat(stream=stream))
    assert again.headers["x-groq-proxy-model"] == "m1"
    assert again.headers["x-groq-proxy-attempts"] == "1"
    if stream:
        assert again.body == b"".join(stream_events("m1"))
    assert scripted.models_sent()[5:] == ["m1"]


async def test_failures_that_are_not_in_a_row_do_not_cool_down(upstream, start_proxy):
    scripted, url = upstream
    config = config_for(url, routing={"cooldown_after_failures": 2, "cooldown_s": 30})
    base = await start_proxy(config)
    for behaviour in (status(503), ok(), status(503), ok()):
        scripted.behaviours["m1"] = behaviour
        await call(base, chat())
    # m1 failed twice, but a success came between: it is still tried first.
    assert scripted.models_sent() == ["m1", "m2", "m1", "m1", "m2", "m1"]


async def test_a_passed_back_client_error_is_not_a_failure_of_the_model(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(400, None, "bad request")
    config = config_for(url, routing={"cooldown_after_failures": 1, "cooldown_s": 30})
    base = await start_proxy(config)
    assert [(await call(base, chat())).status for _ in range(3)] == [400, 400, 400]
    assert scripted.models_sent() == ["m1", "m1", "m1"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_when_every_model_is_cooling_down_the_first_to_recover_is_probed(stream, upstream, start_proxy):
    """Refusing every request for a whole cool-down would turn a blip into an outage: one model is still
    tried (the one whose cool-down ends first), once, and as soon as it answers again, requests get answers."""
    scripted, url = upstream
    scripted.behaviours.update(m1=status(500), m2=Behaviour("close"))
    config = config_for(url, {"tier-test": ["m1", "m2"]}, routing={"cooldown_after_failures": 1, "cooldown_s": 30})
    base = await start_proxy(config)
    assert (await call(base, chat(stream=stream))).status == 502

    r = await call(base, chat(stream=stream))  # both cooling down: m1's ends first, so m1 is probed, once

    assert r.status == 502 and r.headers["x-should-retry"] == "false"
    error = r.json()["error"]
    assert error["code"] == "all_models_failed" and "All 2 model(s)" in error["message"]
    assert "up:m1: skipped" in error["message"] and "up:m2: skipped" in error["message"]
    assert "up:m1: 500" in error["message"]
    # m2's request went on the connection m1's 500 left in the pool; a close without a byte of an answer there
    # looks like a stale connection, so the client sends it once more on a new one before it counts.
    assert scripted.models_sent() == ["m1", "m2", "m2", "m1"]

    # The upstream recovers while both cool-downs still run. m1's was restarted by the failed probe, so m2's
    # now ends first: m2 is probed, answers, and the request gets its answer without waiting 30 s.
    scripted.behaviours.update(m1=Behaviour("ok"), m2=Behaviour("ok"))
    r = await call(base, chat(stream=stream))
    assert r.status == 200 and r.headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m1", "m2", "m2", "m1", "m2"]


async def test_all_cooling_down_after_429s_probes_the_shortest_wait_and_answers_429(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(
        m1=status(429, "rate_limit_exceeded", retry_after="20"), m2=status(429, "rate_limit_exceeded", retry_after="9")
    )
    base = await start_proxy(config_for(url, {"tier-test": ["m1", "m2"]}))
    first = await call(base, chat())
    assert first.status == 429 and first.headers["retry-after"] == "9"

    r = await call(base, chat())  # m2's wait ends first: it alone is asked again, and is still limited

    assert r.status == 429
    assert 1 <= int(r.headers["retry-after"]) <= 9 and r.headers["x-should-retry"] == "true"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert scripted.models_sent() == ["m1", "m2", "m2"]
