"""GET /metrics after real requests through the proxy, read with a strict Prometheus text-format parser;
latency categories and the rolling p95 warning; the alert rules and dashboard under deploy/ name only metrics
that a scrape has.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.app.config import parse_config
from proxy.routing.latency import CATEGORIES, TIER_DEFAULTS, RollingP95, Thresholds, default_thresholds
from proxy.telemetry.metrics import Counter, Histogram
from proxy.sim.testing import USAGE, Behaviour, status

KEY = "sk-test-secret-upstream-key"
ROOT = Path(__file__).resolve().parent.parent
ZERO = {"excellent": 0, "good": 0, "acceptable": 0, "poor": 0}  # every answer is critical
HUGE = {"excellent": 600_000, "good": 600_000, "acceptable": 600_000, "poor": 600_000}  # every answer excellent


# --- a strict parser of the Prometheus text format (0.0.4) ----------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"(,|$)')


class Scrape:
    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        family = None
        seen: set[tuple] = set()
        assert text.endswith("\n"), "the exposition ends with a newline"
        for line in text[:-1].split("\n"):
            assert line, "no blank lines"
            if line.startswith("# HELP "):
                name, _, help_ = line[7:].partition(" ")
                assert name not in self.helps, f"HELP for {name} twice"
                self.helps[name] = help_
                continue
            if line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
                assert name not in self.types, f"TYPE for {name} twice"
                self.types[name] = kind
                family = name
                continue
            assert not line.startswith("#"), line
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, label_text, value = match.groups()
            assert family is not None and self._family_of(name) == family, f"{name} outside its family ({family})"
            labels = self._labels(label_text or "")
            key = (name, tuple(sorted(labels.items())))
            assert key not in seen, f"duplicate sample {line!r}"
            seen.add(key)
            self.samples[name].append((labels, float(value)))
        assert set(self.helps) == set(self.types)

    def _family_of(self, name: str) -> str | None:
        if name in self.types and self.types[name] != "histogram":
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) == "histogram":
                return base
        return None

    @staticmethod
    def _labels(text: str) -> dict[str, str]:
        labels, pos = {}, 0
        while pos < len(text):
            m = _LABEL.match(text, pos)
            assert m, f"bad labels: {text!r}"
            name, raw = m.group(1), m.group(2)
            assert name not in labels
            labels[name] = raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
            pos = m.end()
        return labels

    def value(self, name: str, **labels) -> float:
        """The one sample of `name` whose labels are exactly `labels`; 0 when there is none."""
        found = [v for ls, v in self.samples.get(name, ()) if ls == labels]
        assert len(found) <= 1
        return found[0] if found else 0.0

    def total(self, name: str, **match) -> float:
        """The sum over the samples of `name` whose labels include `match`."""
        return sum(v for ls, v in self.samples.get(name, ()) if all(ls.get(k) == v2 for k, v2 in match.items()))

    def series(self, name: str) -> list[dict]:
        return [ls for ls, _ in self.samples.get(name, ())]

    def check_histograms(self) -> None:
        """Every histogram series: buckets in rising `le` order, cumulative, +Inf last and equal to _count."""
        for family, kind in self.types.items():
            if kind != "histogram":
                continue
            buckets = defaultdict(list)
            for labels, value in self.samples.get(family + "_bucket", ()):
                rest = {k: v for k, v in labels.items() if k != "le"}
                buckets[tuple(sorted(rest.items()))].append((float(labels["le"]), value))
            counts = {tuple(sorted(ls.items())): v for ls, v in self.samples.get(family + "_count", ())}
            sums = {tuple(sorted(ls.items())): v for ls, v in self.samples.get(family + "_sum", ())}
            assert set(buckets) == set(counts) == set(sums), family
            for key, rows in buckets.items():
                bounds = [b for b, _ in rows]
                assert bounds == sorted(bounds) and bounds[-1] == math.inf, (family, key)
                values = [v for _, v in rows]
                assert values == sorted(values), f"{family}{key} buckets are not cumulative: {values}"
                assert values[-1] == counts[key], (family, key)
                assert sums[key] >= 0

    def buckets(self, family: str, **labels) -> dict[float, float]:
        return {float(ls["le"]): v for ls, v in self.samples.get(family + "_bucket", ())
                if {k: x for k, x in ls.items() if k != "le"} == labels}


def test_parser_reads_what_the_renderer_writes_with_escapes():
    counter = Counter("t_total", "help text", ("a",))
    counter.inc(('quote " back \\ new\nline',), 2)
    counter.inc(("plain",), 0.5)
    hist = Histogram("t_seconds", "h", ("a",), (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        hist.observe(("x",), v)
    out: list[str] = []
    counter.render(out)
    hist.render(out)
    text = "".join(out)
    # The renderer's own escaping, checked on the bytes (not only through the test's parser): \ " and newline.
    assert 't_total{a="quote \\" back \\\\ new\\nline"} 2\n' in text, text
    assert 't_seconds_bucket{a="x",le="0.1"} 2\n' in text and 't_seconds_bucket{a="x",le="+Inf"} 4\n' in text, text

    scrape = Scrape(text)

    assert scrape.value("t_total", a='quote " back \\ new\nline') == 2
    assert scrape.value("t_total", a="plain") == 0.5
    assert scrape.buckets("t_seconds", a="x") == {0.1: 2, 1.0: 3, math.inf: 4}  # le is inclusive: 0.1 <= 0.1
    assert scrape.value("t_seconds_count", a="x") == 4
    assert scrape.value("t_seconds_sum", a="x") == pytest.approx(3.65)
    scrape.check_histograms()


def test_parser_rejects_broken_exposition():
    with pytest.raises(AssertionError):
        Scrape("# HELP a x\n# TYPE a counter\na{b=\"1\"} 1\na{b=\"1\"} 2\n")  # duplicate series
    with pytest.raises(AssertionError):
        Scrape("# HELP a x\n# TYPE a counter\nb 1\n")  # sample outside its family
    with pytest.raises(AssertionError):
        Scrape('# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
               ).check_histograms()  # not cumulative


# --- the proxy's /metrics after real requests -----------------------------------------------------------------


def metrics_config(url: str, telemetry: dict | None = None):
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {"up": {"base_url": url, "api_key_env": "TEST_UPSTREAM_KEY"}},
        "models": {
            "tier-test": {"chain": ["up:m1"], "latency_ms": HUGE},
            "tier-fb": {"chain": ["up:f1", "up:f2", "up:f3"], "latency_ms": ZERO},
            "tier-bad": {"chain": ["up:b1", "up:b2"]},
            "tier-down": {"chain": ["up:d1", "up:d2"]},
            "tier-cut": {"chain": ["up:c1"]},
        },
        "telemetry": telemetry or {},
    }
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": KEY})


async def post(base: str, body: dict) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.read()


async def scrape(base: str) -> Scrape:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            return Scrape(await resp.text())


def chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


@pytest.fixture
async def scraped(upstream, start_proxy) -> Scrape:
    """One scrape after a known mix of requests: answers, fallbacks, a 4xx, streams, a cut stream, failures."""
    scripted, url = upstream
    scripted.behaviours.update(
        f1=status(503), f2=status(429, "rate_limit_exceeded"),
        b1=status(400, "invalid_value", "bad temperature"),
        d1=status(500), d2=status(502),
        c1=Behaviour("cut", cut_after=3),
    )
    base = await start_proxy(metrics_config(url))
    calls = [
        (chat("tier-test"), 200), (chat("tier-test", stream=True), 200), (chat("m1"), 200),
        (chat("tier-fb"), 200), (chat("tier-fb", stream=True), 200),
        (chat("tier-bad"), 400),
        (chat("tier-down"), 502),
        (chat("tier-cut", stream=True), 200),  # the 200 went out before the cut
        (chat("no-such-model"), 404),
        ({"messages": []}, 400),
    ]
    for body, expected in calls:
        code, text = await post(base, body)
        assert code == expected, text
    return await scrape(base)


async def test_requests_are_counted_by_virtual_model_real_model_and_status(scraped):
    s = scraped
    assert s.value("groq_proxy_requests_total", virtual_model="tier-test", model="m1", status="200") == 2
    assert s.value("groq_proxy_requests_total", virtual_model="m1", model="m1", status="200") == 1  # a real model asked by name
    assert s.value("groq_proxy_requests_total", virtual_model="tier-fb", model="f3", status="200") == 2
    assert s.total("groq_proxy_requests_total", virtual_model="tier-bad", status="400") == 1
    assert s.value("groq_proxy_requests_total", virtual_model="tier-down", model="none", status="502") == 1
    # A stream that broke after its 200 counts as the failure it was, not as a success.
    assert s.value("groq_proxy_requests_total", virtual_model="tier-cut", model="none", status="502") == 1
    # Names nobody configured do not become label values.
    assert s.value("groq_proxy_requests_total", virtual_model="invalid", model="none", status="404") == 1
    assert s.value("groq_proxy_requests_total", virtual_model="invalid", model="none", status="400") == 1
    assert s.total("groq_proxy_requests_total") == 10
    assert not any("no-such-model" in v for ls in s.series("groq_proxy_requests_total") for v in ls.values())


async def test_histograms_are_cumulative_and_match_their_counts(scraped):
    s = scraped
    s.check_histograms()
    for labels, value in s.samples["groq_proxy_requests_total"]:
        assert s.value("groq_proxy_request_duration_seconds_count", **labels) == value
    assert s.total("groq_proxy_request_duration_seconds_count") == 10
    assert s.total("groq_proxy_request_duration_seconds_sum") > 0
    # Overhead: one observation per request that reached the pipeline (not the 404 and the invalid body).
    assert s.value("groq_proxy_overhead_seconds_count") == 8
    assert s.value("groq_proxy_overhead_seconds_bucket", le="+Inf") == 8
    # Time in upstream attempts, per real model: one per attempt sent.
    upstream = {ls["model"]: v for ls, v in s.samples["groq_proxy_upstream_duration_seconds_count"]}
    assert upstream == {"m1": 3, "f1": 2, "f2": 2, "f3": 2, "b1": 1, "d1": 1, "d2": 1, "c1": 1}


async def test_time_to_first_token_only_for_streamed_answers(scraped):
    s = scraped
    ttft = {(ls["virtual_model"], ls["model"]): v for ls, v in s.samples["groq_proxy_time_to_first_token_seconds_count"]}
    assert ttft == {("tier-test", "m1"): 1, ("tier-fb", "f3"): 1}
    buckets = s.buckets("groq_proxy_time_to_first_token_seconds", virtual_model="tier-test", model="m1")
    assert buckets[math.inf] == 1 and len(buckets) == 18


async def test_tokens_in_and_out_come_from_the_usage(scraped):
    s = scraped
    prompt, completion = USAGE["prompt_tokens"], USAGE["completion_tokens"]
    assert s.value("groq_proxy_tokens_total", virtual_model="tier-test", model="m1", type="input") == 2 * prompt
    assert s.value("groq_proxy_tokens_total", virtual_model="tier-test", model="m1", type="output") == 2 * completion
    assert s.value("groq_proxy_tokens_total", virtual_model="tier-fb", model="f3", type="input") == 2 * prompt
    assert s.value("groq_proxy_tokens_total", virtual_model="tier-fb", model="f3", type="output") == 2 * completion
    assert s.total("groq_proxy_tokens_total") == 5 * (prompt + completion)  # answered requests only
    # The semconv histogram: per request, by operation, requested model and token type.
    labels = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "tier-test", "gen_ai_token_type": "input"}
    assert s.value("gen_ai_client_token_usage_count", **labels) == 2
    assert s.value("gen_ai_client_token_usage_sum", **labels) == 2 * prompt
    assert s.buckets("gen_ai_client_token_usage", **labels) == {
        16: 2, 64: 2, 256: 2, 1024: 2, 4096: 2, 16384: 2, 65536: 2, math.inf: 2}


async def test_attempts_and_fallbacks_by_reason(scraped):
    s = scraped
    attempts = {(ls["model"], ls["outcome"]): v for ls, v in s.samples["groq_proxy_attempts_total"]}
    assert attempts == {
        ("m1", "answered"): 3, ("f1", "fell_over"): 2, ("f2", "fell_over"): 2, ("f3", "answered"): 2,
        ("b1", "passed_back"): 1, ("d1", "fell_over"): 1, ("d2", "fell_over"): 1, ("c1", "failed_after_commit"): 1,
    }
    fallbacks = {(ls["virtual_model"], ls["model"], ls["reason"]): v for ls, v in s.samples["groq_proxy_fallbacks_total"]}
    assert fallbacks == {
        ("tier-fb", "f1", "status_503"): 2, ("tier-fb", "f2", "rate_limited"): 2,
        ("tier-down", "d1", "status_500"): 1, ("tier-down", "d2", "status_502"): 1,
    }


async def test_latency_categories_are_counted(scraped):
    s = scraped
    categories = {(ls["virtual_model"], ls["category"]): v for ls, v in s.samples["groq_proxy_latency_category_total"]}
    # tier-test's thresholds make every answer excellent, tier-fb's every answer critical; m1 by name gets the
    # standard row (its category depends on speed, but it is one of the five). Failures are not categorised.
    assert categories[("tier-test", "excellent")] == 2
    assert categories[("tier-fb", "critical")] == 2
    assert {c for (vm, c) in categories if vm == "m1"} <= set(CATEGORIES)
    assert sum(v for (vm, _), v in categories.items() if vm == "m1") == 1
    assert {vm for vm, _ in categories} == {"tier-test", "tier-fb", "m1"}


async def test_metrics_can_be_turned_off(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(metrics_config(url, {"metrics": False}))
    assert (await post(base, chat("tier-test")))[0] == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"


async def test_fresh_proxy_scrape_is_valid_and_lists_every_family(upstream, start_proxy):
    scripted, url = upstream
    s = await scrape(await start_proxy(metrics_config(url)))
    assert s.types == {
        "groq_proxy_requests_total": "counter", "groq_proxy_request_duration_seconds": "histogram",
        "groq_proxy_time_to_first_token_seconds": "histogram", "groq_proxy_tokens_total": "counter",
        "groq_proxy_attempts_total": "counter", "groq_proxy_fallbacks_total": "counter",
        "groq_proxy_upstream_duration_seconds": "histogram", "groq_proxy_overhead_seconds": "histogram",
        "groq_proxy_latency_category_total": "counter", "gen_ai_client_token_usage": "histogram",
        "groq_proxy_key_attempts_total": "counter", "groq_proxy_observed_latency_ms": "gauge",
        "groq_proxy_audio_bytes_total": "counter", "groq_proxy_audio_duration_seconds": "histogram",
        "groq_proxy_reloads_total": "counter", "groq_proxy_config_generation": "gauge",
    }
    # Only the reload families have series from the start: both results at 0, and the first generation.
    assert dict(s.samples) == {"groq_proxy_reloads_total": [({"result": "ok"}, 0.0), ({"result": "error"}, 0.0)],
                               "groq_proxy_config_generation": [({}, 1.0)]}


# --- latency categories and the rolling p95 -------------------------------------------------------------------


@pytest.mark.parametrize(("ms", "category"), [
    (0, "excellent"), (50, "excellent"), (50.001, "good"), (100, "good"), (100.5, "acceptable"), (150, "acceptable"),
    (151, "poor"), (300, "poor"), (300.01, "critical"), (1e9, "critical"),
])
def test_threshold_edges_belong_to_the_better_category(ms, category):
    assert Thresholds(50, 100, 150, 300).category(ms) == category


def test_tier_defaults_by_virtual_model_name():
    assert TIER_DEFAULTS["fast"] == Thresholds(50, 100, 150, 300)
    assert TIER_DEFAULTS["standard"] == Thresholds(300, 500, 800, 1600)
    assert TIER_DEFAULTS["premium"] == Thresholds(800, 1200, 2000, 4000)
    assert default_thresholds("tier-fast") is TIER_DEFAULTS["fast"]
    assert default_thresholds("tier-premium") is TIER_DEFAULTS["premium"]
    assert default_thresholds("tier-standard") is TIER_DEFAULTS["standard"]
    assert default_thresholds("my-model") is TIER_DEFAULTS["standard"]
    raw = {"providers": {"up": {"base_url": "http://up"}},
           "models": {"tier-fast": {"chain": ["up:a"]}, "custom": {"chain": ["up:a"], "latency_ms": {"poor": 5000}}}}
    models = parse_config(raw, env={}).models
    assert models["tier-fast"].latency == TIER_DEFAULTS["fast"]
    assert models["custom"].latency == Thresholds(300, 500, 800, 5000)


def changes(caplog) -> list[tuple[int, dict]]:
    return [(r.levelno, r.fields) for r in caplog.records
            if r.name == "groq_proxy" and r.getMessage() == "latency_category_changed"]


def test_rolling_p95_warns_once_per_change(proxy_log):
    standard = TIER_DEFAULTS["standard"]  # 300 / 500 / 800 / 1600
    rolling = RollingP95(window=20, every=20)  # judged at every 20th answer (sorting on each answer cost ~15 us)

    for _ in range(19):
        rolling.add("tier-standard", "m1", 1000, standard)
    assert rolling.category("tier-standard", "m1") is None and changes(proxy_log) == []  # too few to judge
    for _ in range(31):
        rolling.add("tier-standard", "m1", 1000, standard)  # p95 1000 ms: poor, judged at 20 and 40
    for _ in range(20):
        rolling.add("tier-standard", "m1", 5000, standard)  # p95 5000 ms: critical
    for _ in range(20):
        rolling.add("tier-standard", "m1", 10, standard)  # judged at 80: the 5000s still hold the p95
    for _ in range(30):
        rolling.add("tier-standard", "m1", 400, standard)  # judged at 100: p95 400, good: out of the bad ones

    assert rolling.category("tier-standard", "m1") == "good"
    got = [(level, f["previous"], f["category"], f["p95_ms"]) for level, f in changes(proxy_log)]
    assert got == [
        (logging.WARNING, "excellent", "poor", 1000),
        (logging.WARNING, "poor", "critical", 5000),
        (logging.INFO, "critical", "good", 400),
    ]
    assert all((f["virtual_model"], f["model"]) == ("tier-standard", "m1") for _, f in changes(proxy_log))


def test_rolling_p95_is_kept_per_model(proxy_log):
    fast = TIER_DEFAULTS["fast"]
    rolling = RollingP95(window=20, every=20)
    for _ in range(40):
        rolling.add("tier-fast", "slow-one", 500, fast)
        rolling.add("tier-fast", "quick-one", 20, fast)
    assert rolling.category("tier-fast", "slow-one") == "critical"
    assert rolling.category("tier-fast", "quick-one") == "excellent"
    assert [(f["model"], f["category"]) for _, f in changes(proxy_log)] == [("slow-one", "critical")]


def test_rolling_p95_judges_every_twentieth_answer_until_the_window_fills(proxy_log):
    rolling = RollingP95()  # defaults: window 200, judged every 20 answers until full
    standard = TIER_DEFAULTS["standard"]
    for _ in range(20):
        rolling.add("v", "m", 100, standard)
    assert rolling.category("v", "m") == "excellent"
    for _ in range(19):
        rolling.add("v", "m", 10_000, standard)
    assert rolling.category("v", "m") == "excellent"  # not judged again yet (39 answers)
    rolling.add("v", "m", 10_000, standard)
    assert rolling.category("v", "m") == "critical"  # judged at 40
    assert len(changes(proxy_log)) == 1


async def test_slow_model_through_the_proxy_warns_once(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    base = await start_proxy(metrics_config(url))
    for _ in range(60):  # f1 answers every time; tier-fb's zero thresholds make each answer critical
        assert (await post(base, chat("tier-fb")))[0] == 200
    got = changes(proxy_log)
    assert len(got) == 1, got
    level, fields = got[0]
    assert level == logging.WARNING
    assert (fields["virtual_model"], fields["model"], fields["category"]) == ("tier-fb", "f1", "critical")
    assert scripted.models_sent() == ["f1"] * 60


# --- the alert rules and the dashboard ------------------------------------------------------------------------

_METRIC_REF = re.compile(r"\b((?:groq_proxy|gen_ai_client)_[a-z_]+)")


def referenced(text: str) -> set[str]:
    return set(_METRIC_REF.findall(text))


def dashboard() -> dict:
    return json.loads((ROOT / "deploy/grafana/groq-proxy-dashboard.json").read_text())


async def test_alerts_and_dashboard_name_only_metrics_a_scrape_has(scraped):
    have = set(scraped.samples)
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", ())]
    for where, names in (("alerts.yml", referenced(alerts)), ("dashboard", referenced("\n".join(exprs)))):
        assert names, where
        assert names <= have, f"{where} names metrics /metrics does not have: {sorted(names - have)}"
    # Every label a query groups or filters by is a label of some scraped series.
    labels = {k for series in scraped.samples.values() for ls, _ in series for k in ls}
    labels |= {"instance", "job"}  # added by Prometheus to every scraped series
    used = set(re.findall(r"\b(?:by|without) \(([^)]*)\)", alerts + "\n".join(exprs)))
    used = {name.strip() for group in used for name in group.split(",") if name.strip()}
    used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!=|!~|=)", alerts + "\n".join(exprs)))
    assert used <= labels, sorted(used - labels)


def test_dashboard_is_a_grafana_dashboard():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 7
    for p in graphs:
        assert p["title"] and p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
        assert p["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
    text = json.dumps(board)
    for name in ("groq_proxy_requests_total", "groq_proxy_request_duration_seconds_bucket",
                 "groq_proxy_time_to_first_token_seconds_bucket", "groq_proxy_tokens_total",
                 "groq_proxy_fallbacks_total", "groq_proxy_overhead_seconds_bucket",
                 "groq_proxy_latency_category_total"):
        assert name in text, name
