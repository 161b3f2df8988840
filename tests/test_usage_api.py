"""GET /v1/usage (the caller's own budgets and limits) and GET /admin/usage?key=|user=|team= (anyone's,
with the admin key), with every field the issue names."""

from __future__ import annotations

import math
import time

import aiohttp
import pytest

from policies.identity import hash_key
from tests.conftest import config_for

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
KEY, OTHER, ADMIN = "gp-usage-alice", "gp-usage-bob", "admin-secret-for-tests"
AUTH = {"keys": [{"id": "alice-app", "sha256": hash_key(KEY), "user": "alice", "team": "search"},
                 {"id": "bob-app", "sha256": hash_key(OTHER), "user": "bob", "team": "search"}]}
POLICIES = [
    {"use": "token_budget", "name": "daily", "per": "key", "tokens": 1000, "period": "day"},
    {"use": "token_budget", "name": "team-month", "per": "team", "tokens": 10000, "period": "month"},
    {"use": "rate_limit", "per": "key", "requests_per_minute": 10, "tokens_per_minute": 1000},
]


async def call(base: str, method: str, path: str, headers: dict, body: dict | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()


async def start(upstream, start_proxy, store=None, **extra):
    _, url = upstream
    from proxy.app.config import parse_config

    raw = {"server": {"keepalive_s": 0, "admin_key_env": "ADMIN_KEY"},
           "providers": {"up": {"base_url": url}}, "models": {"tier-test": {"chain": ["up:m1"]}},
           "auth": AUTH, "policies": POLICIES, **({"store": store} if store else {}), **extra}
    return await start_proxy(parse_config(raw, env={"ADMIN_KEY": ADMIN}))


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_my_usage_and_admin_usage(upstream, start_proxy, redis_store_table, backend):
    base = await start(upstream, start_proxy, redis_store_table if backend == "redis" else None)
    alice, bob = {"Authorization": f"Bearer {KEY}"}, {"x-api-key": OTHER}
    first = time.monotonic()
    for _ in range(3):
        assert (await call(base, "POST", "/v1/chat/completions", alice, BODY))[0] == 200
    assert (await call(base, "POST", "/v1/chat/completions", bob, BODY))[0] == 200

    status, mine = await call(base, "GET", "/v1/usage", alice)
    drained = math.ceil((time.monotonic() - first) * 1000 / 60)  # what the bucket refilled since: 1000 a minute
    assert status == 200
    assert mine["identity"] == {"key": "alice-app", "user": "alice", "team": "search"}
    daily, team = mine["budgets"]
    assert daily == {"policy": "daily", "per": "key", "period": "day", "limit": 1000, "used": 30, "reserved": 0,
                     "usage_percent": 3.0, "resets_at": daily["resets_at"]}
    assert team["per"] == "team" and team["period"] == "month" and team["used"] == 40  # alice's and bob's
    assert team["usage_percent"] == 0.4 and team["resets_at"].endswith("-01T00:00:00Z")
    [limit] = mine["limits"]
    assert limit["policy"] == "rate_limit" and limit["per"] == "key"
    assert limit["requests"] == {"limit": 10, "used": 3, "usage_percent": 30.0}
    assert limit["tokens"]["limit"] == 1000 and 30 - drained <= limit["tokens"]["used"] <= 31  # 3 x 10, less what drained
    assert mine["total_usage_percent"] == 3.0 and mine["is_within_budget"] is True
    assert mine["request_usage_percent"] == 30.0 and mine["token_usage_percent"] == limit["tokens"]["usage_percent"]
    assert mine["is_within_limits"] is True

    admin = {"Authorization": f"Bearer {ADMIN}"}
    status, bobs = await call(base, "GET", "/admin/usage?key=bob-app", admin)
    assert status == 200 and bobs["budgets"][0]["used"] == 10 and bobs["limits"][0]["requests"]["used"] == 1
    status, teams = await call(base, "GET", "/admin/usage?team=search", admin)
    assert status == 200 and [b["policy"] for b in teams["budgets"]] == ["team-month"]
    assert teams["budgets"][0]["used"] == 40 and teams["limits"] == []

    assert (await call(base, "GET", "/admin/usage?key=bob-app", alice))[0] == 401
    assert (await call(base, "GET", "/admin/usage?key=nobody", admin))[0] == 404
    status, error = await call(base, "GET", "/admin/usage?key=a&user=b", admin)
    assert status == 400 and error["error"]["param"] == "key"
    assert (await call(base, "GET", "/v1/usage", {}))[0] == 401


async def test_admin_usage_needs_an_admin_key_configured(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config_for(url, policies=POLICIES[:1]))
    status, body = await call(base, "GET", "/admin/usage?user=x", {})
    assert status == 403 and body["error"]["code"] == "admin_key_not_configured"
    status, body = await call(base, "GET", "/v1/usage?user=carol", {})
    assert status == 200 and body["identity"]["user"] == "carol" and body["budgets"][0]["used"] == 0
