"""The policy interface through the real proxy: hooks, their order, decisions, mode and on_error, and the
config that loads built-in and custom policies (tests/policy_examples.py stands for an operator's module)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pytest

from proxy.app.config import ConfigError
from proxy.sim.testing import USAGE
from tests.conftest import config_for, until
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)
from tests.policy_examples import Journal, RequireModule, UsageUpstream

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}


def journal(*tables: dict) -> list[dict]:
    return [{"use": "tests.policy_examples:Journal", **t} for t in tables]


async def post(base: str, body: dict = BODY, headers: dict | None = None, path: str = "/v1/chat/completions"):
    async with aiohttp.ClientSession() as session:
        async with session.post(base + path, json=body, headers=headers or {}) as resp:
            return resp.status, resp.headers, await resp.read()


@pytest.fixture(autouse=True)
def fresh_journal():
    Journal.events = []
    yield


async def test_custom_policy_from_config_rejects_and_admits(upstream, start_proxy):
    scripted, url = upstream
    config = config_for(url, policies=[{"use": "tests.policy_examples:RequireModule", "allowed": ["sentinel"]}])
    base = await start_proxy(config)
    status, _, body = await post(base)
    assert status == 403
    assert orjson.loads(body)["error"] == {"message": "x-module must be one of ['sentinel']",
                                           "type": "permission_error",
                                           "param": None, "code": "module_not_allowed"}
    assert scripted.requests == []
    status, _, _ = await post(base, headers={"x-module": "sentinel", "x-request-type": "chat"})
    assert status == 200
    sent = scripted.requests[0]["headers"]
    assert not {"x-module", "x-request-type"} & {k.lower() for k in sent}  # the proxy's own headers stay here
    policy = config.policies.policies[0]
    assert isinstance(policy, RequireModule) and policy.name == "RequireModule"
    assert policy.seen == {None: 1, "sentinel": 1}  # after() ran for the rejected request too


def test_unknown_options_are_startup_errors_naming_the_key():
    url = "http://127.0.0.1:1/v1"
    cases = [
        ({"use": "tests.policy_examples:RequireModule", "allowed": [], "colour": "red"}, "policies[0].colour"),
        ({"use": "tests.policy_examples:RequireModule"}, "policies[0].allowed: required"),
        ({"use": "rate_limit", "requests_per_minute": 5, "burst": 3}, "policies[0].burst: unknown key"),
        ({"use": "token_budget", "tokens": 10, "period": "week"}, "policies[0].period: must be one of"),
        ({"use": "no_such_policy"}, "policies[0].use"),
        ({"use": "tests.policy_examples:Nope"}, "policies[0].use"),
        ({"use": "request_budget", "mode": "dry"}, "policies[0].mode: must be one of enforce, shadow"),
        ({"use": "request_budget", "on_error": "maybe"}, "policies[0].on_error: must be one of open, closed"),
        ({"use": "concurrency", "per": "model"}, "policies[0]: set `limit`"),
        ({"use": "concurrency", "limit": 2, "wait_s": float("inf")}, "policies[0].wait_s: must be a finite number"),
        ({"use": "rate_limit", "requests_per_minute": 5, "wait_s": float("inf")}, "policies[0].wait_s: must be a finite"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as info:
            config_for(url, policies=[table])
        assert message in str(info.value), (table, str(info.value))
    with pytest.raises(ConfigError, match=r"policies\[1\].name: another policy is called 'rate_limit'"):
        config_for(url, policies=[{"use": "rate_limit", "requests_per_minute": 1},
                                  {"use": "rate_limit", "tokens_per_minute": 1}])


async def test_after_runs_for_every_policy_that_ran_in_reverse_even_when_one_rejects(upstream, start_proxy):
    """Before: a Reject returned before the try whose finally runs after(), so an earlier policy's
    reservation (a concurrency slot) leaked. Now every policy whose on_request ran is settled."""
    scripted, url = upstream
    config = config_for(url, policies=journal({"label": "a", "name": "a"},
                                              {"label": "b", "name": "b", "decide": "reject"},
                                              {"label": "c", "name": "c"}))
    base = await start_proxy(config)
    status, _, body = await post(base)
    assert status == 418 and orjson.loads(body)["error"]["code"] == "journal_said_no"
    assert Journal.events == [("on_request", "a"), ("on_request", "b"), ("after", "b", None), ("after", "a", None)]
    assert scripted.requests == []


async def test_a_failing_after_does_not_stop_the_others(upstream, start_proxy, caplog):
    scripted, url = upstream
    config = config_for(url, policies=journal({"label": "a", "name": "a"},
                                              {"label": "b", "name": "b", "fail_in": "after"}))
    base = await start_proxy(config)
    status, _, _ = await post(base)
    assert status == 200
    assert [e[:2] for e in Journal.events if e[0] == "after"] == [("after", "b"), ("after", "a")]
    assert Journal.events[-1] == ("after", "a", USAGE)  # the usage is on the context by then
    assert any(r.getMessage() == "policy_error" and r.levelno == logging.ERROR for r in caplog.records)


async def test_hooks_order_skip_and_on_response(upstream, start_proxy):
    scripted, url = upstream
    config = config_for(url, policies=journal({"label": "a", "decide": "skip_m1"}))
    base = await start_proxy(config)
    status, headers, _ = await post(base)
    assert status == 200 and headers["x-groq-proxy-model"] == "m2"
    assert [r["body"]["model"] for r in scripted.requests] == ["m2"]
    assert Journal.events == [("on_request", "a"), ("before_attempt", "a", "m1"), ("before_attempt", "a", "m2"),
                              ("on_response", "a", "m2"), ("after", "a", USAGE)]


async def test_respond_answers_without_upstream_plain_and_streamed(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=journal({"decide": "respond", "label": "cache"})))
    status, _, body = await post(base)
    assert status == 200 and orjson.loads(body) == {"answered_by": "cache"}
    base = await start_proxy(config_for(url, policies=journal({"decide": "respond_stream", "label": "cache"})))
    status, headers, body = await post(base, {**BODY, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert body == b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    assert scripted.requests == []


async def test_on_error_open_lets_through_closed_answers_503(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=journal({"label": "a", "fail_in": "on_request"})))
    status, _, _ = await post(base)
    assert status == 200
    base = await start_proxy(config_for(url, policies=journal({"label": "a", "fail_in": "on_request",
                                                                "on_error": "closed"})))
    status, _, body = await post(base)
    assert status == 503
    assert orjson.loads(body)["error"]["code"] == "policy_unavailable"
    assert ("after", "a", None) in Journal.events  # it ran, so it is settled


async def test_shadow_reject_changes_nothing_but_is_counted_and_traced(upstream, start_proxy, otlp):
    scripted, url = upstream
    config = config_for(url, policies=journal({"label": "a", "name": "gate", "decide": "reject", "mode": "shadow"}),
                        telemetry={"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05})
    base = await start_proxy(config)
    status, headers, _ = await post(base)
    assert status == 200
    server, _ = await otlp.wait_for_request(headers["x-request-id"], 1)
    events = [(e.name, e.attributes) for e in server.events]
    assert ("groq_proxy.policy.decision", {"policy": "gate", "decision": "reject", "mode": "shadow"}) in events
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_policy_decisions_total{policy="gate",decision="reject",mode="shadow"} 1' in text


async def test_enforced_reject_has_its_span_event_and_counter(upstream, start_proxy, otlp):
    """Issue 12 item 5: the policy Reject path, its answer and the span event it leaves."""
    scripted, url = upstream
    config = config_for(url, policies=journal({"label": "a", "name": "gate", "decide": "reject"}),
                        telemetry={"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05})
    base = await start_proxy(config)
    status, headers, body = await post(base)
    assert status == 418
    assert orjson.loads(body) == {"error": {"message": "a says no", "type": "invalid_request_error", "param": None,
                                            "code": "journal_said_no"}}
    server, _ = await otlp.wait_for_request(headers["x-request-id"], 0)
    assert server.attributes["http.response.status_code"] == 418
    assert [(e.name, e.attributes) for e in server.events] == [
        ("groq_proxy.policy.decision", {"policy": "gate", "decision": "reject", "mode": "enforce"})]
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_policy_decisions_total{policy="gate",decision="reject",mode="enforce"} 1' in text


async def test_after_runs_when_the_client_goes_away_mid_stream(aiohttp_server, start_proxy):
    hold = asyncio.Event()
    held = UsageUpstream(hold=hold)
    server = await aiohttp_server(held.app())
    config = config_for(f"http://127.0.0.1:{server.port}/openai/v1", policies=journal({"label": "a"}))
    base = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json={**BODY, "stream": True}) as resp:
            assert resp.status == 200
            await resp.content.readany()
    hold.set()  # the upstream goes on; the proxy finds the client gone on its next write
    await until(lambda: any(e[0] == "after" for e in Journal.events), what="after() of an abandoned stream")


async def test_a_policy_skipping_every_model_gets_503_not_a_timeout(upstream, start_proxy):
    """Before: with no attempt sent, the all-failed error took the timeout branch (504)."""
    scripted, url = upstream
    config = config_for(url, chains={"tier-test": ["m1"]}, policies=journal({"label": "a", "decide": "skip_m1"}))
    base = await start_proxy(config)
    status, _, body = await post(base)
    assert status == 503 and orjson.loads(body)["error"]["code"] == "all_models_failed"
    assert "skipped (m1 is not for this request)" in orjson.loads(body)["error"]["message"]
    assert scripted.requests == []
