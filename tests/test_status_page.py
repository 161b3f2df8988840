"""GET /status and GET /status.json: each virtual model with its chain, each model's state (ok, cooling down
until when, rate-limited, keys resting), observed latency and its category, the last minutes' requests and
errors, global budgets and limits, the cache's hit rate, version and uptime; no secret, no client input.

The page itself is checked in a real headless Chromium when one is installed (`tests/browser.py` finds it):
the page loads, renders what status.json says, and refreshes itself. Where no browser is installed the same
test still checks the page's static contract (self-contained, its content security policy, that it reads
status.json) and the JSON it renders; it records which it did as the `browser` property of the test report
and prints it (`pytest -rP`).
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime

import aiohttp
import orjson
import pytest

from policies.identity import hash_key
from proxy import __version__
from proxy.app.config import parse_config
from proxy.sim.testing import Behaviour, status
from tests.browser import Browser, find_browser

PROVIDER_KEY = "sk-test-secret-upstream-key"
POOL_KEYS = {"POOL_KEY_A": "sk-pool-secret-a", "POOL_KEY_B": "sk-pool-secret-b"}
PROXY_KEY = "gp-status-proxy-key"
CLIENT_TEXT = "client-made-up-model-7731"


def config(url: str, **tables):
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"up": {"base_url": url, "api_key_env": "TEST_UPSTREAM_KEY"}},
        # tier-fast's thresholds make a local answer "excellent" however loaded the machine, and a minute "good"
        "models": {"tier-test": {"chain": ["up:m1", "up:m2"]},
                   "tier-fast": {"chain": ["up:m3"], "latency_ms": {"excellent": 30000, "good": 60000,
                                                                    "acceptable": 90000, "poor": 120000}}},
        "routing": {"cooldown_after_failures": 1, "cooldown_s": 120},
        **tables,
    }
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": PROVIDER_KEY, **POOL_KEYS})


POLICIES = {
    "auth": {"keys": [{"id": "app", "sha256": hash_key(PROXY_KEY), "user": "alice"}]},
    "policies": [
        {"use": "token_budget", "name": "all-day", "per": "global", "tokens": 100000, "period": "day"},
        {"use": "token_budget", "name": "per-key", "per": "key", "tokens": 5000},
        {"use": "rate_limit", "name": "global-rpm", "per": "global", "requests_per_minute": 1000},
        {"use": "tests.policy_examples:RememberingCache"},
    ],
}


def chat(model: str = "tier-test", prompt: str = "hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


async def post(base: str, payload, headers: dict | None = None) -> int:
    async with aiohttp.ClientSession() as session:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        async with session.post(base + "/v1/chat/completions", data=data,
                                headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            await resp.read()
            return resp.status


async def get(base: str, path: str):
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path) as resp:
            return resp.status, resp.headers, await resp.read()


async def status_json(base: str) -> tuple[dict, str]:
    code, headers, body = await get(base, "/status.json")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    return orjson.loads(body), body.decode()


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def traffic(base: str, scripted) -> None:
    """m1 fails (a cool-down of 120 s), m2 answers but says no request is left for 2 minutes (rate-limited
    by prediction), m3 answers three times (observed latency); a bad body, a made-up explicit model."""
    scripted.behaviours.update(
        m1=status(503),
        m2=Behaviour(headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2m0s",
                              "x-ratelimit-remaining-tokens": "4000", "x-ratelimit-reset-tokens": "2m0s"}))
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    assert await post(base, chat(), auth) == 200  # m1 fails, m2 answers
    for i in range(3):
        assert await post(base, chat("tier-fast", f"question {i}"), auth) == 200  # three misses, on m3
    assert await post(base, chat("tier-fast", "question 0"), auth) == 200  # a cache hit
    assert await post(base, b"{broken", auth) == 400
    assert await post(base, chat(f"up:{CLIENT_TEXT}", "question x"), auth) == 200  # only a client names it: `other`


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_status_json_reports_states_latency_counts_budgets_and_cache(upstream, start_proxy, backend,
                                                                          redis_store_table):
    scripted, url = upstream
    before = time.time()
    store = {"store": redis_store_table} if backend == "redis" else {}
    base = await start_proxy(config(url, **POLICIES, **store))
    await traffic(base, scripted)
    data, text = await status_json(base)

    assert (data["object"], data["version"], data["pid"]) == ("status", __version__, os.getpid())
    assert before - 1 <= epoch(data["started_at"]) <= epoch(data["now"]) and data["uptime_s"] >= 0
    assert (data["refresh_s"], data["window_s"], data["simulated"]) == (3, 300, False)

    virtual = {vm["name"]: vm for vm in data["virtual_models"]}
    assert list(virtual) == ["tier-test", "tier-fast", "other", "invalid"]
    assert [e["model"] for e in virtual["tier-test"]["chain"]] == ["up:m1", "up:m2"]
    assert [e["state"] for e in virtual["tier-test"]["chain"]] == ["cooling_down", "rate_limited"]
    counts = {name: vm["last_5m"] for name, vm in virtual.items()}
    assert counts == {"tier-test": {"requests": 1, "client_errors": 0, "errors": 0},
                      "tier-fast": {"requests": 4, "client_errors": 0, "errors": 0},
                      "other": {"requests": 1, "client_errors": 0, "errors": 0},
                      "invalid": {"requests": 0, "client_errors": 1, "errors": 0}}
    assert virtual["tier-fast"]["last_1m"] == counts["tier-fast"]  # all of it within the last minute
    [entry] = virtual["tier-fast"]["chain"]
    assert entry["category"] == {"ttft": None, "total": "excellent"}  # no stream yet: no time to first token

    models = {m["model"]: m for m in data["models"]}
    assert list(models) == ["up:m1", "up:m2", "up:m3"]  # the config's models: never a client's
    m1, m2, m3 = models["up:m1"], models["up:m2"], models["up:m3"]
    assert m1["state"] == "cooling_down" and 60 < epoch(m1["until"]) - epoch(data["now"]) <= 120
    assert m1["last_5m"] == {"answered": 0, "failed": 1, "skipped": 0}
    assert m2["state"] == "rate_limited" and 60 < epoch(m2["until"]) - epoch(data["now"]) <= 120
    assert m2["keys"] == [{"key": "TEST_UPSTREAM_KEY", "state": "rate_limit_predicted", "until": m2["until"],
                           "remaining_requests": 0, "remaining_tokens": 4000}]
    assert (m3["state"], m3["until"], m3["last_5m"]["answered"]) == ("ok", None, 3)
    latency = m3["observed_latency"]
    assert latency["total_samples"] == 3 and 0 < latency["total_p50_ms"] <= latency["total_p90_ms"]
    assert latency["ttft_samples"] == 0 and latency["ttft_p50_ms"] is None

    policies = data["policies"]
    assert [p["name"] for p in policies["configured"]] == ["all-day", "per-key", "global-rpm", "RememberingCache"]
    assert policies["store"]["backend"] == backend and policies["store"]["status"] == "ok"
    [budget] = policies["budgets"]  # the global one only: per-key budgets are the usage API's
    # 5 answers of 10 tokens; the hit charged nothing
    assert (budget["policy"], budget["per"], budget["limit"], budget["used"]) == ("all-day", "global", 100000, 50)
    [limit] = policies["limits"]
    assert (limit["policy"], limit["per"], limit["requests"]["limit"]) == ("global-rpm", "global", 1000)
    assert 0 < limit["requests"]["used"] <= 6  # 5 answers and the hit (an answer from a policy counts for the
    # limits too: issue 9), draining since

    cache = data["cache"]
    assert {k: cache[k] for k in ("hit", "miss", "coalesced", "bypass")} == {"hit": 1, "miss": 5, "coalesced": 0,
                                                                              "bypass": 0}
    assert cache["hit_rate"] == round(1 / 6, 4)
    assert cache["stores"] == {"RememberingCache": {"entries": 5}}  # the policy's own cache_stats() hook

    for secret in (PROVIDER_KEY, PROXY_KEY, hash_key(PROXY_KEY), "alice"):
        assert secret not in text
    assert CLIENT_TEXT not in text and "question" not in text


async def test_streams_give_the_time_to_first_token_and_its_category(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config(url))
    for _ in range(3):
        assert await post(base, chat("tier-fast", stream=True)) == 200
    data, _ = await status_json(base)
    m3 = next(m for m in data["models"] if m["model"] == "up:m3")["observed_latency"]
    assert m3["ttft_samples"] == 3 and 0 < m3["ttft_p50_ms"] <= m3["ttft_p90_ms"] and m3["total_samples"] == 0
    [entry] = next(vm for vm in data["virtual_models"] if vm["name"] == "tier-fast")["chain"]
    assert entry["category"] == {"ttft": "excellent", "total": None}


async def test_without_policies_or_cache_those_fields_are_null(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config(url))
    assert await post(base, chat()) == 200
    data, _ = await status_json(base)
    assert data["policies"] is None and data["cache"] is None
    assert [m["state"] for m in data["models"]] == ["ok", "ok", "ok"]


async def test_a_store_that_is_down_shows_as_such_without_its_password(upstream, start_proxy, redis_server):
    _, url = upstream
    redis_server.stop()
    with_password = redis_server.url.replace("redis://", "redis://ops:hunter2-redis-password@")
    base = await start_proxy(config(url, **POLICIES, store={"backend": "redis", "url": with_password}))
    data, text = await status_json(base)
    policies = data["policies"]
    assert policies["store"]["status"] == "unavailable" and policies["error"] == "the store is unavailable"
    assert policies["budgets"] == [] and "hunter2-redis-password" not in text


async def test_a_pool_whose_keys_all_rest_shows_keys_resting_by_their_names(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours.update(m3=status(401, "invalid_api_key"))
    base = await start_proxy(config(url, providers={"up": {"base_url": url, "api_key_envs": list(POOL_KEYS)}}))
    assert await post(base, chat("tier-fast")) == 502
    data, text = await status_json(base)
    m3 = next(m for m in data["models"] if m["model"] == "up:m3")
    assert m3["state"] == "keys_resting" and m3["until"] is not None
    assert [(k["key"], k["state"]) for k in m3["keys"]] == [("POOL_KEY_A", "resting"), ("POOL_KEY_B", "resting")]
    assert not any(value in text for value in POOL_KEYS.values())


async def test_the_other_bucket_holds_every_made_up_name_in_fixed_memory(upstream, start_proxy):
    """Client input never makes a row: distinct made-up names all land in `other`."""
    _, url = upstream
    base = await start_proxy(config(url))
    for i in range(30):
        assert await post(base, chat(f"up:made-up-{i}")) == 200
    data, text = await status_json(base)
    assert next(vm for vm in data["virtual_models"] if vm["name"] == "other")["last_5m"]["requests"] == 30
    assert "made-up" not in text
    assert [vm["name"] for vm in data["virtual_models"]] == ["tier-test", "tier-fast", "other", "invalid"]


async def test_status_page_in_a_browser_when_one_is_installed(upstream, start_proxy, request):
    scripted, url = upstream
    base = await start_proxy(config(url, **POLICIES))
    await traffic(base, scripted)

    code, headers, page = await get(base, "/status")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp  # nothing loads from anywhere else
    text = page.decode()
    assert not re.search(r"(src|href)\s*=|@import|url\(|https?://", text)  # no external asset at all
    assert 'fetch("status.json"' in text and "setTimeout(refresh" in text  # it reads status.json, again and again

    browser = find_browser()
    ran = browser or "none installed: the page's static contract and its JSON only"
    request.node.user_properties.append(("browser", ran))  # in the test report (--junitxml), and -rP shows:
    print(f"status page browser: {ran}")
    if browser is None:
        return
    async with Browser(browser) as chromium:
        await chromium.open(base + "/status")
        assert await chromium.wait_for("Number(document.body.dataset.loaded) >= 1")
        shown = await chromium.evaluate("""(() => {
            const cell = (sel, cls) => document.querySelector(sel + " ." + cls).textContent;
            const row = n => Array.from(document.querySelectorAll('tr[data-virtual="' + n + '"]')[0].cells)
                             .map(c => c.textContent);
            return {version: document.getElementById("version").textContent,
                    m1: cell('tr[data-model="up:m1"]', "state"), m2: cell('tr[data-model="up:m2"]', "state"),
                    m3: cell('tr[data-model="up:m3"]', "state"), until: cell('tr[data-model="up:m1"]', "until"),
                    fast: row("tier-fast"), category: document.querySelector(
                        'tr[data-entry="up:m3"] .category').textContent,
                    budgets: Array.from(document.querySelectorAll("#budgets tbody tr")).map(r => r.dataset.policy),
                    hitRate: document.getElementById("hit-rate").textContent,
                    banner: document.getElementById("banner").className};
        })()""")
        assert shown["version"] == __version__
        assert (shown["m1"], shown["m2"], shown["m3"]) == ("cooling down", "rate limited", "ok")
        assert re.fullmatch(r"\d{1,2}:\d{2}:\d{2}.*", shown["until"])  # a time of day, in the browser's locale
        assert shown["fast"][0] == "tier-fast" and shown["fast"][5:] == ["4", "0", "0", "4", "0", "0"]
        assert shown["category"] == "excellent"
        assert shown["budgets"] == ["all-day"] and shown["hitRate"] == "16.7 %" and shown["banner"] == ""

        # The page refreshes itself: new traffic shows up without a reload.
        assert await post(base, chat("tier-fast", "question 9"), {"Authorization": f"Bearer {PROXY_KEY}"}) == 200
        assert await chromium.wait_for(
            "document.querySelectorAll('tr[data-virtual=\"tier-fast\"]')[0].cells[5].textContent === '5'")


def test_every_data_file_of_the_packages_is_declared_package_data():
    """An installed wheel (the Dockerfile's) has the page: status.html, like every non-Python file under the
    packages, matches a `[tool.setuptools.package-data]` pattern of its own package."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data_files = [p for top in ("proxy", "policies") for p in (root / top).rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert root / "proxy" / "admin" / "status.html" in data_files
    for path in data_files:
        package = ".".join(path.parent.relative_to(root).parts)
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in declared.get(package, ())), path


async def test_a_reload_keeps_uptime_counts_and_states_of_models_still_configured(upstream, aiohttp_server,
                                                                                 tmp_path, monkeypatch):
    """POST /admin/reload (proxy/app/reload.py) swaps the config: the page shows the new chains at once, and
    what it knew of the models still configured (counts, cool-down, uptime) carries over."""
    from proxy.app.config import load_config
    from proxy.app.server import build_app
    from tests.conftest import ADMIN, ADMIN_KEY

    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PROVIDER_KEY)
    monkeypatch.setenv("TEST_ADMIN_KEY", ADMIN_KEY)

    def write(chains: dict) -> None:
        models = "".join(f'[models.{name}]\nchain = {orjson.dumps(chain).decode()}\n' for name, chain in chains.items())
        path.write_text(f'[server]\nkeepalive_s = 0\nadmin_key_env = "TEST_ADMIN_KEY"\n[routing]\n'
                        f'cooldown_after_failures = 1\ncooldown_s = 120\n[providers.up]\nbase_url = "{url}"\n'
                        f'api_key_env = "TEST_UPSTREAM_KEY"\n{models}')

    path = tmp_path / "proxy.toml"
    write({"tier-test": ["up:m1", "up:m2"], "tier-old": ["up:m3"]})
    server = await aiohttp_server(build_app(load_config(path)))
    base = f"http://127.0.0.1:{server.port}"
    assert await post(base, chat()) == 200  # m1 fails and cools down, m2 answers
    before, _ = await status_json(base)

    write({"tier-test": ["up:m1", "up:m2"], "tier-new": ["up:m4"]})
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/admin/reload", headers=ADMIN) as resp:
            assert resp.status == 200
    after, _ = await status_json(base)
    assert [vm["name"] for vm in after["virtual_models"]] == ["tier-test", "tier-new", "other", "invalid"]
    assert next(vm for vm in after["virtual_models"] if vm["name"] == "tier-test")["last_5m"]["requests"] == 1
    models = {m["model"]: m for m in after["models"]}
    assert list(models) == ["up:m1", "up:m2", "up:m4"]
    assert models["up:m1"]["state"] == "cooling_down" and models["up:m1"]["until"] == before["models"][0]["until"]
    assert models["up:m2"]["last_5m"]["answered"] == 1 and models["up:m4"]["last_5m"]["answered"] == 0
    assert after["started_at"] == before["started_at"]
