"""`/status.json` and the status page of `groq-proxy serve --workers N`: real worker processes on one port, and
whichever of them answers, the report covers every worker (proxy/admin/status_workers.py)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

from proxy.admin.status_workers import SAMPLES, merge
from proxy.app.config import parse_config
from proxy.sim.testing import status
from proxy.app.workers import SUPPORTED as WORKERS_SUPPORTED
from tests.browser import Browser, find_browser
from tests.procs import clean_env, start_serving

pytestmark = pytest.mark.skipif(not WORKERS_SUPPORTED, reason="serve --workers needs SO_REUSEPORT (Linux)")

REQUESTS = 40


async def chat_on_new_connections(base: str, model: str, n: int) -> None:
    """n plain requests, each on a connection of its own (the kernel picks a worker per connection)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async def one(_):
            async with session.post(base + "/v1/chat/completions",
                                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        await asyncio.gather(*(one(i) for i in range(n)))


async def status_json(base: str) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(base + "/status.json") as resp:
            assert resp.status == 200
            return orjson.loads(await resp.read())


async def from_each_worker(base: str, workers: int) -> list[dict]:
    """status.json asked on new connections until each worker has answered at least once (the answering
    worker's `pid`); 200 asks are a safety net, the kernel spreads connections far sooner."""
    answers, pids = [], set()
    for _ in range(200):
        answers.append(await status_json(base))
        pids.add(answers[-1]["pid"])
        if len(pids) == workers:
            return answers
    raise AssertionError(f"only workers {pids} answered status.json")


def virtual(report: dict, name: str) -> dict:
    return next(vm for vm in report["virtual_models"] if vm["name"] == name)


async def test_every_worker_answers_status_json_for_the_whole_proxy(tmp_path, request):
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", env=clean_env())
    try:
        await chat_on_new_connections(base, "tier-fast", REQUESTS)
        answers = await from_each_worker(base, 2)
        for report in answers:  # whichever worker answers, it counts all 40, with every worker's latency
            assert virtual(report, "tier-fast")["last_5m"]["requests"] == REQUESTS
            assert report["workers"] == 2 and report["workers_answered"] == 2 and len(report["pids"]) == 2
            assert report["pid"] in report["pids"]
            assert virtual(report, "tier-fast")["last_1m"]["requests"] == REQUESTS
            assert sum(m["last_5m"]["answered"] for m in report["models"]) == REQUESTS
            assert sum(m["observed_latency"]["total_samples"] for m in report["models"]) == REQUESTS
            assert SAMPLES not in report
            assert all(sorted(m["worker_states"]) == ["ok"] and m["worker_states"]["ok"] == 2
                       for m in report["models"])
        # Both workers had some of the traffic: their own /metrics series say so (one per worker).
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/metrics") as resp:
                text = await resp.text()
        assert re.search(r'^groq_proxy_observed_latency_ms\{[^}]*worker="0"\} ', text, re.M)
        assert re.search(r'^groq_proxy_observed_latency_ms\{[^}]*worker="1"\} ', text, re.M)

        browser = find_browser()
        request.node.user_properties.append(("browser", browser or "none installed: status.json only"))
        print(f"status page browser: {browser or 'none installed'}")
        if browser is not None:
            async with Browser(browser) as chromium:
                await chromium.open(base + "/status")
                assert await chromium.wait_for("Number(document.body.dataset.loaded) >= 1")
                shown = await chromium.evaluate("""(() => ({
                    workers: document.getElementById("workers").textContent,
                    fast: Array.from(document.querySelectorAll('tr[data-virtual="tier-fast"]')[0].cells)
                          .map(c => c.textContent)}))()""")
                assert shown["workers"] == "2 of 2 answered"
                assert shown["fast"][0] == "tier-fast" and shown["fast"][5:] == [str(REQUESTS), "0", "0"] * 2
    finally:
        await proxy.stop()
    assert proxy.process.returncode == 0


async def test_a_cool_down_on_one_worker_shows_as_the_worst_state_and_on_how_many(tmp_path, upstream,
                                                                                   redis_store_table):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    path = tmp_path / "proxy.toml"
    path.write_text(f"""
[providers.up]
base_url = "{url}"
api_key_env = "TEST_UPSTREAM_KEY"

[models.tier-test]
chain = ["up:m1", "up:m2"]

[routing]
cooldown_after_failures = 1
cooldown_s = 120

[[policies]]
use = "rate_limit"
name = "global-rpm"
per = "global"
requests_per_minute = 2
""" + "[store]\n" + "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in redis_store_table.items()))
    env = clean_env(TEST_UPSTREAM_KEY="sk-test-secret-upstream-key")
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", "--no-check", "--config", str(path),
                                      env=env)
    try:
        await chat_on_new_connections(base, "tier-test", 1)  # m1 fails on one worker, which cools it down
        for report in await from_each_worker(base, 2):
            m1 = next(m for m in report["models"] if m["model"] == "up:m1")
            assert m1["state"] == "cooling_down" and m1["until"] is not None
            assert m1["worker_states"] == {"cooling_down": 1, "ok": 1}
            assert m1["last_5m"]["failed"] == 1
            assert next(m for m in report["models"] if m["model"] == "up:m2")["last_5m"]["answered"] == 1
            entry = virtual(report, "tier-test")["chain"][0]
            assert entry["model"] == "up:m1" and entry["state"] == "cooling_down"
            assert "sk-test-secret" not in orjson.dumps(report).decode()
            # the shared store's limits, read once by the answering worker: the one request counted (2 a minute:
            # the bucket drains it in 30 s, not in the 60 ms of 1000 a minute, which a busy machine outlasted)
            limit = next(x for x in report["policies"]["limits"] if x["policy"] == "global-rpm")
            assert limit["requests"]["limit"] == 2 and 0 < limit["requests"]["used"] <= 1, limit
    finally:
        await proxy.stop()


def report(pid: int, samples: list[float], requests: int, state: str = "ok", until: str | None = None) -> dict:
    """A worker's report as it answers a sibling, reduced to one model of one virtual model."""
    window = {"requests": requests, "client_errors": 0, "errors": 0}
    attempts = {"answered": requests, "failed": 0, "skipped": 0}
    return {
        "pid": pid, "models": [{
            "model": "up:m1", "state": state, "until": until,
            "keys": [{"key": "K", "state": "ok", "remaining_requests": 100 - requests}],
            "observed_latency": {"ttft_p50_ms": None, "ttft_p90_ms": None, "ttft_samples": 0,
                                 "total_p50_ms": 1.0, "total_p90_ms": 1.0, "total_samples": len(samples)},
            "last_1m": attempts, "last_5m": attempts}],
        "virtual_models": [{"name": "tier", "chain": [{"model": "up:m1", "state": state,
                                                       "category": {"ttft": None, "total": None}}],
                            "last_1m": window, "last_5m": window}],
        "cache": None,
        SAMPLES: {"up:m1": {"ttft": [], "total": samples}},
    }


def test_merged_latency_is_the_percentile_of_every_worker_s_samples_not_an_average_of_percentiles():
    config = parse_config({"providers": {"up": {"base_url": "http://127.0.0.1:9/v1"}},
                           "models": {"tier": {"chain": ["up:m1"], "latency_ms": {
                               "excellent": 100, "good": 200, "acceptable": 300, "poor": 400}}}}, env={})
    fast = report(1, [10.0] * 9, 9)
    slow = report(2, [1000.0] * 3, 3, state="cooling_down", until="2026-01-01T00:00:10.000Z")
    merged = merge(fast, [slow], 3, config)
    latency = merged["models"][0]["observed_latency"]
    # 12 samples: p50 is a fast one, p90 a slow one (an average of the two p50s would say 505 ms)
    assert (latency["total_p50_ms"], latency["total_p90_ms"], latency["total_samples"]) == (10.0, 1000.0, 12)
    assert latency["ttft_p50_ms"] is None
    entry = merged["virtual_models"][0]["chain"][0]
    assert entry["category"]["total"] == "excellent" and entry["state"] == "cooling_down"
    assert merged["virtual_models"][0]["last_5m"]["requests"] == 12
    assert merged["models"][0]["keys"][0]["remaining_requests"] == 91  # the lowest any worker saw
    assert (merged["workers"], merged["workers_answered"], merged["pids"]) == (3, 2, [1, 2])
    assert merged["models"][0]["until"] == "2026-01-01T00:00:10.000Z"
