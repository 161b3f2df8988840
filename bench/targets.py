"""The issue's targets, and how each is judged on the medians."""

from __future__ import annotations

from dataclasses import dataclass

from bench.load import MODES
from bench.stats import Median, find_run, loss_pct


@dataclass(frozen=True)
class Targets:
    """The issue's targets, for a 2-core machine where wrk, the upstream and the proxy share the cores."""

    rps_non_stream_16: float = 7000.0
    rps_stream_16: float = 6000.0
    added_p50_ms_1: float = 0.25
    rss_mb: float = 60.0
    rss_after_requests: int = 100_000
    tracing_loss_pct_16: float = 20.0  # req/s proxy+tracing may lose against proxy (issue 3, item 7)
    workers_2_ratio_16: float = 1.4  # req/s of `serve --workers 2` over one worker's (issue 11, item 10)
    cache_memory_x_passthrough_16: float = 1.5  # cache hits (memory store) against the pass-through (issue 9, item 8)
    cache_memory_added_p50_ms_1: float = 0.15  # ... and their added p50 over a direct call at 1 connection
    cache_redis_x_passthrough_16: float = 1.0  # cache hits from Redis against the pass-through



TARGETS = Targets()


def target_rows(runs: list[Median], memory: dict, workers: int = 0) -> list[dict]:
    """The targets, judged on the medians (with --repeat 1, on the single runs)."""
    rows = []

    def add(name: str, value: float | None, limit: float, unit: str, higher_is_better: bool) -> None:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        rows.append({"target": name, "value": value, "limit": limit, "unit": unit,
                     "higher_is_better": higher_is_better, "met": ok})

    for mode, limit in (("non-stream", TARGETS.rps_non_stream_16), ("stream", TARGETS.rps_stream_16)):
        run = find_run(runs, mode, 16, "proxy")
        add(f"{mode} req/s at 16 conn", run.rps if run else None, limit, "req/s", True)
    for mode in MODES:
        proxy, direct = find_run(runs, mode, 1, "proxy"), find_run(runs, mode, 1, "direct")
        value = proxy.p50_ms - direct.p50_ms if proxy and direct else None
        add(f"{mode} added p50 at 1 conn", value, TARGETS.added_p50_ms_1, "ms", False)
    enough = memory.get("phase_requests", 0) >= TARGETS.rss_after_requests
    served = memory.get("total_requests") if enough else TARGETS.rss_after_requests
    add(f"RSS after {served:,} requests", memory.get("rss_after_mb") if enough else None,
        TARGETS.rss_mb, "MB", False)
    if any(r.side == "cache-memory" for r in runs):
        for mode in MODES:
            thin = find_run(runs, mode, 16, "pass-through")
            for side, limit in (("cache-memory", TARGETS.cache_memory_x_passthrough_16),
                                ("cache-redis", TARGETS.cache_redis_x_passthrough_16)):
                hits = find_run(runs, mode, 16, side)
                add(f"{mode} {side} hits / pass-through, 16 conn", hits.rps / thin.rps if hits and thin else None,
                    limit, "x", True)
            hits, direct = find_run(runs, mode, 1, "cache-memory"), find_run(runs, mode, 1, "direct")
            add(f"{mode} cache-memory added p50 at 1 conn", hits.p50_ms - direct.p50_ms if hits and direct else None,
                TARGETS.cache_memory_added_p50_ms_1, "ms", False)
    if any(r.side == "proxy+tracing" for r in runs):
        for mode in MODES:
            proxy, tracing = find_run(runs, mode, 16, "proxy"), find_run(runs, mode, 16, "proxy+tracing")
            add(f"{mode} req/s lost to tracing, 16 conn", loss_pct(tracing, proxy) if proxy and tracing else None,
                TARGETS.tracing_loss_pct_16, "%", False)
    if workers == 2:  # the target is for two workers on a 2-core machine
        for mode in MODES:
            proxy, multi = find_run(runs, mode, 16, "proxy"), find_run(runs, mode, 16, "proxy-2w")
            add(f"{mode} req/s 2 workers / 1, 16 conn", multi.rps / proxy.rps if multi and proxy and proxy.rps
                else None, TARGETS.workers_2_ratio_16, "x", True)
    return rows
