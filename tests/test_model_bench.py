"""The model benchmark (benchmarkLatency / benchmarkInference): `groq-proxy bench-model` and
POST /admin/benchmark, run through the real proxy against real local upstreams."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from proxy.app.config import parse_config
from proxy.sim.testing import ScriptedUpstream, status
from tests.conftest import ADMIN, ADMIN_KEY, config_for
from tests.procs import GROQ_PROXY, clean_env

# The README's standard row (a virtual model whose name names no tier): ms limits of each category.
STANDARD = ((300, "excellent"), (500, "good"), (800, "acceptable"), (1600, "poor"))


def standard_category(ms: float) -> str:
    return next((name for limit, name in STANDARD if ms <= limit), "critical")


BENCH = {"model": "tier-test", "prompt": "Write a short story about a robot", "runs": 3, "max_tokens": 20}


async def admin(base: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """POST /admin/benchmark, with the admin key unless `headers` say otherwise."""
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/admin/benchmark", data=orjson.dumps(body),
                          headers=ADMIN if headers is None else headers) as r:
            return r.status, await r.json()


def bench_config(url: str, **tables):
    return config_for(url, server={"admin_key_env": "TEST_ADMIN_KEY"}, **tables)


async def test_admin_benchmark_reports_each_run_and_the_summary(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)  # every run falls over to m2: the report says who answered
    base = await start_proxy(bench_config(url))
    code, report = await admin(base, BENCH)
    assert code == 200
    runs, summary = report["runs"], report["summary"]
    assert [r["run"] for r in runs] == [1, 2, 3] and all(r["ok"] for r in runs)
    for r in runs:
        assert r["model"] == "m2"
        assert 0 < r["ttft_ms"] <= r["latency_ms"]
        assert r["completion_tokens"] == 3 and r["tokens_per_s"] > 0
        assert r["category"] == standard_category(r["ttft_ms"])  # a stream is judged by its first token
    assert summary["succeeded"] == 3 and summary["answered_by"] == {"m2": 3}
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"]
    assert summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p95"]
    assert summary["category"] == standard_category(summary["ttft_ms"]["p95"])
    # The runs were real streamed requests with the asked-for fields, through the chain.
    sent = [r["body"] for r in scripted.requests]
    assert len(sent) == 6 and all(b["stream"] is True and b["max_tokens"] == 20 for b in sent)
    assert sent[0]["messages"] == [{"role": "user", "content": BENCH["prompt"]}]


async def test_admin_benchmark_judges_by_the_tiers_own_thresholds(upstream, start_proxy):
    scripted, url = upstream
    zero = {"excellent": 0, "good": 0, "acceptable": 0, "poor": 0}  # any time above 0 ms is critical
    raw = {"server": {"keepalive_s": 0, "admin_key_env": "ADMIN_KEY"}, "providers": {"up": {"base_url": url}},
           "models": {"tier-test": {"chain": ["up:m1"], "latency_ms": zero}}}
    base = await start_proxy(parse_config(raw, env={"ADMIN_KEY": ADMIN_KEY}))
    code, report = await admin(base, {**BENCH, "runs": 2})
    assert code == 200
    assert [r["category"] for r in report["runs"]] == ["critical", "critical"]
    assert report["summary"]["category"] == "critical"


async def test_admin_benchmark_counts_failed_runs(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(500)
    base = await start_proxy(bench_config(url))
    code, report = await admin(base, {**BENCH, "runs": 2})
    assert code == 200
    assert report["summary"]["succeeded"] == 0
    assert all(not r["ok"] and r["error"].startswith("502") for r in report["runs"])


@pytest.mark.parametrize(
    "body, param",
    [
        ({**BENCH, "model": ""}, "model"),
        ({k: v for k, v in BENCH.items() if k != "prompt"}, "prompt"),
        ({**BENCH, "runs": 0}, "runs"),
        ({**BENCH, "runs": "3"}, "runs"),
        ({**BENCH, "max_tokens": True}, "max_tokens"),
        ({**BENCH, "temperature": 3}, "temperature"),
    ],
)
async def test_admin_benchmark_bad_fields_are_400(upstream, start_proxy, body, param):
    scripted, url = upstream
    base = await start_proxy(bench_config(url))
    code, answer = await admin(base, body)
    assert code == 400 and answer["error"]["param"] == param
    assert scripted.requests == []


async def test_admin_benchmark_unknown_model_is_404(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(bench_config(url))
    code, answer = await admin(base, {**BENCH, "model": "nope"})
    assert code == 404 and answer["error"]["code"] == "model_not_found"


async def test_admin_key_guards_the_benchmark(aiohttp_server, start_proxy):
    scripted = ScriptedUpstream()
    server = await aiohttp_server(scripted.app())
    raw = {
        "server": {"admin_key_env": "ADMIN_KEY", "keepalive_s": 0},
        "providers": {"up": {"base_url": f"http://127.0.0.1:{server.port}/openai/v1"}},
        "models": {"tier-test": {"chain": ["up:m1"]}},
    }
    base = await start_proxy(parse_config(raw, env={"ADMIN_KEY": "admin-secret-123"}))
    code, answer = await admin(base, BENCH, {})
    assert code == 401 and answer["error"]["type"] == "authentication_error"
    assert "admin-secret-123" not in orjson.dumps(answer).decode()
    assert scripted.requests == []
    code, report = await admin(base, BENCH, {"Authorization": "Bearer admin-secret-123"})
    assert code == 200 and report["summary"]["succeeded"] == 3


async def test_the_benchmark_is_off_without_an_admin_key(upstream, start_proxy):
    """No server.admin_key_env: the admin API is off, so nobody can spend the provider key through it."""
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    for headers in ({}, ADMIN):
        code, answer = await admin(base, BENCH, headers)
        assert code == 403 and answer["error"]["code"] == "admin_key_not_configured"
        assert "server.admin_key_env" in answer["error"]["message"]
    assert scripted.requests == []


async def test_bench_model_command_prints_progress_and_json():
    """The real command, with no key and no config: an in-process proxy on the built-in simulator."""
    proc = await asyncio.create_subprocess_exec(
        *GROQ_PROXY, "bench-model", "--model", "tier-fast", "--prompt", "hello there", "--runs", "2",
        "--max-tokens", "12", "--temperature", "0.7", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    report = orjson.loads(out)
    assert report["summary"]["succeeded"] == 2 and report["summary"]["model"] == "tier-fast"
    assert all(r["completion_tokens"] == 12 and r["model"] == "openai/gpt-oss-20b" for r in report["runs"])
    progress = [line for line in err.decode().splitlines() if line.startswith("run ")]
    assert [line.split(":")[0] for line in progress] == ["run 1/2", "run 2/2"]


async def test_bench_model_table_output_and_bad_flags():
    proc = await asyncio.create_subprocess_exec(
        *GROQ_PROXY, "bench-model", "--model", "tier-fast", "--runs", "1", "--max-tokens", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0
    text = out.decode()
    assert "latency ms" in text and "overall tier-fast: 1/1 ok" in text and "openai/gpt-oss-20b" in text
    proc = await asyncio.create_subprocess_exec(
        *GROQ_PROXY, "bench-model", "--model", "tier-fast", "--runs", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2 and b"'runs' must be an integer from 1 to 100" in err
