"""`/status.json` of a proxy run with `--workers N`: any worker's answer covers the whole proxy.

The kernel hands each connection to one worker, and each worker keeps its own counts, cool-downs, rate-limit
views and observed latency; one worker's report alone would be a random N-th of the traffic, a different one
at each refresh. So, as for /metrics (proxy/telemetry/worker_metrics.py), each worker also serves its own
report on a Unix socket in the supervisor's run directory (`worker-I.status.sock`, "connect, read to EOF"),
with the raw latency samples the percentiles come from, and the worker that gets the request reads every
other worker's there and merges them as an operator reads them:

- counts over the window (per virtual model, per real model, the cache's) are summed; the hit rate is
  recomputed from the sums;
- observed latency: p50 and p90 are taken from the union of every worker's samples (each keeps its last 64
  per series), with the same rule and the same 3-sample minimum as one worker's router; never averaged
  percentiles. `*_samples` is the sum of each worker's count;
- a model's (and a key's) state is the worst any worker is in, with `until` the latest time one of those
  workers may try it again, and `worker_states` counting workers per state, so "cooling down on 1 of 2" shows;
  Groq's remaining requests and tokens of a key are the lowest any worker last saw; chain entries' states and
  latency categories are judged again from the merged models;
- budgets, limits and cache entries live in the shared Redis store (several workers need it): this worker's
  read is the whole proxy's; a cache's `in_flight` and `waiting` are per process and summed.

`workers` is the configured count and `workers_answered` how many are in this report (`pids` says which), so
a worker that did not answer in time (being restarted, stuck) is visible. A single process answers alone
(`workers`, `workers_answered` 1) and none of this runs: nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.routing.observed import MIN_SAMPLES, percentiles

PEER_TIMEOUT_S = 2.0
SAMPLES = "_latency_samples"  # only in a worker's answer to a sibling, never in /status.json
# Worst last: the state a model (or key) shows when workers disagree.
MODEL_SEVERITY = ("ok", "rate_limited", "cooling_down", "keys_resting")
KEY_SEVERITY = ("ok", "rate_limit_predicted", "rate_limited", "resting")
PER_PROCESS_CACHE_STATS = ("in_flight", "waiting")  # the rest is the shared store's


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.status.sock")


def latency_samples(observed, keys) -> dict:
    """Each model's raw samples, for the sibling that merges them."""
    out = {}
    for key in keys:
        ttft, total = observed.series(key, True), observed.series(key, False)
        if ttft is not None:
            out[key] = {"ttft": list(ttft.samples), "total": list(total.samples)}
    return out


class WorkerStatus:
    """This worker's place among its siblings for the status page: serves its report, merges theirs."""

    def __init__(self, directory: str, index: int, workers: int) -> None:
        self.directory, self.index, self.workers = directory, index, workers

    def serve_ctx(self, produce: Callable[[web.Application], Awaitable[dict | None]]):
        """An aiohttp cleanup_ctx: the Unix socket on which siblings read this worker's report."""
        from proxy.telemetry.worker_metrics import sibling_socket

        async def ctx(app: web.Application):
            async def answer() -> bytes:
                report = await produce(app)
                return orjson.dumps(report) if report is not None else b""

            async with sibling_socket(socket_path(self.directory, self.index), answer):
                yield

        return ctx

    async def others(self) -> list[dict]:
        """Every sibling's report that comes in time."""
        from proxy.telemetry.worker_metrics import ask_sibling

        async def one(i: int) -> dict | None:
            body = await ask_sibling(socket_path(self.directory, i), PEER_TIMEOUT_S)
            try:
                return orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                return None

        answers = await asyncio.gather(*(one(i) for i in range(self.workers) if i != self.index))
        return [a for a in answers if a is not None]


STATUS_SIBLINGS = web.AppKey("status_siblings", WorkerStatus)


def merge(own: dict, others: list[dict], workers: int, config) -> dict:
    """`own` report (this worker's, with its samples) and its siblings', as one; `config` judges the chains."""
    reports = [own, *others]
    out = dict(own)
    out.pop(SAMPLES, None)
    out["workers"], out["workers_answered"] = workers, len(reports)
    out["pids"] = sorted(r["pid"] for r in reports)
    models = {m["model"]: _merge_model([_find(r["models"], "model", m["model"]) for r in reports], reports)
              for m in own["models"]}
    out["models"] = list(models.values())
    virtual = []
    for vm in own["virtual_models"]:
        rows = [row for row in (_find(r["virtual_models"], "name", vm["name"]) for r in reports) if row]
        merged = {**vm, **_sum_windows(rows)}
        thresholds = config.models[vm["name"]].latency if vm["name"] in config.models else None
        merged["chain"] = [_entry(e, models.get(e["model"]), thresholds) for e in vm["chain"]]
        virtual.append(merged)
    out["virtual_models"] = virtual
    out["cache"] = _merge_cache([r["cache"] for r in reports if r.get("cache") is not None])
    return out


def _find(rows: list[dict], field: str, value: str) -> dict | None:
    return next((row for row in rows if row[field] == value), None)


def _sum_windows(rows: list[dict]) -> dict:
    out = {}
    for window in ("last_1m", "last_5m"):
        totals: dict[str, int] = {}
        for row in rows:
            for name, count in row[window].items():
                totals[name] = totals.get(name, 0) + count
        out[window] = totals
    return out


def _worst(rows: list[dict], severity: tuple[str, ...]) -> tuple[str, str | None, dict[str, int]]:
    """The worst state, when every worker in a not-ok state may try again (the latest `until`), and the
    number of workers per state."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    state = max(counts, key=lambda s: severity.index(s) if s in severity else len(severity))
    untils = [row["until"] for row in rows if row["state"] != "ok" and row.get("until")]
    return state, (max(untils) if untils else None), counts  # ISO 8601 UTC, same format: sorts as time


def _merge_model(rows: list[dict | None], reports: list[dict]) -> dict:
    present = [(row, report) for row, report in zip(rows, reports) if row is not None]
    rows = [row for row, _ in present]
    out = dict(rows[0])
    out["state"], out["until"], out["worker_states"] = _worst(rows, MODEL_SEVERITY)
    out["keys"] = [_merge_key([row["keys"][i] for row in rows if i < len(row["keys"])])
                   for i in range(len(rows[0]["keys"]))]
    out.update(_sum_windows(rows))
    samples = [report.get(SAMPLES, {}).get(out["model"]) for _, report in present]
    if rows[0]["observed_latency"] is not None:
        out["observed_latency"] = _merge_latency([row["observed_latency"] for row in rows], samples)
    return out


def _merge_key(rows: list[dict]) -> dict:
    out = {"key": rows[0]["key"]}
    out["state"], until, counts = _worst(rows, KEY_SEVERITY)
    if until is not None:
        out["until"] = until
    if len(counts) > 1:
        out["worker_states"] = counts
    for field in ("remaining_requests", "remaining_tokens"):
        seen = [row[field] for row in rows if field in row]
        if seen:
            out[field] = min(seen)
    return out


def _merge_latency(views: list[dict], samples: list[dict | None]) -> dict:
    out = {}
    for series in ("ttft", "total"):
        pooled = sorted(ms for s in samples if s for ms in s[series])
        p50, p90 = percentiles(pooled) if len(pooled) >= MIN_SAMPLES else (None, None)
        out[f"{series}_p50_ms"] = round(p50, 1) if p50 is not None else None
        out[f"{series}_p90_ms"] = round(p90, 1) if p90 is not None else None
        out[f"{series}_samples"] = sum(view[f"{series}_samples"] for view in views if view)
    return out


def _entry(entry: dict, model: dict | None, thresholds) -> dict:
    if model is None:
        return entry
    latency = model["observed_latency"] or {}
    category = {kind: (None if thresholds is None or latency.get(f"{kind}_p50_ms") is None
                       else thresholds.category(latency[f"{kind}_p50_ms"])) for kind in ("ttft", "total")}
    return {**entry, "state": model["state"], "category": category}


def _merge_cache(caches: list[dict]) -> dict | None:
    if not caches:
        return None
    out = dict(caches[0])
    for field in ("hit", "miss", "coalesced", "bypass"):
        out[field] = sum(c.get(field, 0) for c in caches)
    looked_up = out["hit"] + out["miss"] + out["coalesced"]
    out["hit_rate"] = round(out["hit"] / looked_up, 4) if looked_up else None
    stores = {name: dict(stats) for name, stats in (out.get("stores") or {}).items()}
    for name, stats in stores.items():
        for field in PER_PROCESS_CACHE_STATS:
            if isinstance(stats.get(field), int):
                stats[field] = sum(c.get("stores", {}).get(name, {}).get(field, 0) or 0 for c in caches)
    out["stores"] = stores
    return out
