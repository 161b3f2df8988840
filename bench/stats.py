"""Statistics over the runs: a side's median over its interleaved rounds (--repeat), the noise of a run, and
the per-round tracing loss. The ratios, targets and table are computed from what this returns."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.load import Run


@dataclass
class Median:
    """One side of one cell over its rounds (--repeat): the median of each figure, each taken on its own (the
    median req/s and the median p99 may come from different rounds), and the range of req/s."""

    mode: str
    connections: int
    side: str
    rounds: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us_per_request: float
    others: float  # median cores taken by other work and the hypervisor
    rps_min: float
    rps_max: float
    errors: int  # over all the rounds


def noise(run: Run | Median) -> float:
    """Cores other processes and the hypervisor took during a run (for a Median, the median over its rounds)."""
    if isinstance(run, Median):
        return run.others
    return run.cpu_cores.get("other", 0.0) + run.cpu_cores.get("steal", 0.0)


def medians(runs: list[Run]) -> list[Median]:
    cells: dict[tuple[str, int, str], list[Run]] = {}
    for run in runs:
        cells.setdefault((run.mode, run.connections, run.side), []).append(run)
    out = []
    for (mode, connections, side), rs in cells.items():
        def med(attr: str) -> float:
            return statistics.median(getattr(r, attr) for r in rs)

        out.append(Median(
            mode=mode, connections=connections, side=side, rounds=len(rs),
            rps=med("rps"), p50_ms=med("p50_ms"), p90_ms=med("p90_ms"), p99_ms=med("p99_ms"),
            cpu_us_per_request=med("cpu_us_per_request"), others=statistics.median(noise(r) for r in rs),
            rps_min=min(r.rps for r in rs), rps_max=max(r.rps for r in rs), errors=sum(r.errors for r in rs),
        ))
    return out


def find_run(runs: list, mode: str, connections: int, side: str, round_: int | None = None):
    """The run (or Median) of a side in a cell; with `round_`, the run of that round."""
    return next((r for r in runs if (r.mode, r.connections, r.side) == (mode, connections, side)
                 and (round_ is None or r.round == round_)), None)


def tracing_by_round(runs: list[Run], mode: str, connections: int) -> list[dict]:
    """Per round, the req/s proxy+tracing lost against the proxy of the same round, and the CPU per request
    it added, in percent (both None where a round lacks one of the two)."""
    out = []
    for round_ in sorted({r.round for r in runs if (r.mode, r.connections) == (mode, connections)}):
        proxy = find_run(runs, mode, connections, "proxy", round_)
        traced = find_run(runs, mode, connections, "proxy+tracing", round_)
        if not (proxy and traced):
            continue
        cpu = ((traced.cpu_us_per_request / proxy.cpu_us_per_request - 1.0) * 100.0
               if proxy.cpu_us_per_request else None)
        out.append({"mode": mode, "connections": connections, "round": round_,
                    "lost_pct": loss_pct(traced, proxy), "cpu_added_pct": cpu})
    return out


def loss_pct(tracing: Run | Median, proxy: Run | Median) -> float | None:
    """Throughput proxy+tracing loses against proxy, in percent (negative: it was faster)."""
    return (1.0 - tracing.rps / proxy.rps) * 100.0 if proxy.rps else None
