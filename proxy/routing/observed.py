"""Observed latency per model: what the router orders a chain by when a request has a latency target, what
`hedge_after_ms = "auto"` waits for, and what /metrics and GET /v1/models/{id} show.

Two series per model, because they measure different things: time to first token of answered streams, and the
whole time of answered plain requests. Each is a ring of the last `WINDOW` samples; p50 and p90 are computed
from it when asked, at most once every `EVERY` new samples. Only models the config names are tracked.
"""

from __future__ import annotations

from collections import deque

WINDOW = 64
EVERY = 8
MIN_SAMPLES = 3  # below this a model is "not observed yet" (and assumed to meet a target: it must be tried)


def percentiles(ordered: list[float]) -> tuple[float, float]:
    """p50 and p90 of samples in ascending order (at least one): the router's rule, and the status page's."""
    n = len(ordered)
    return ordered[min(n - 1, n // 2)], ordered[min(n - 1, int(0.9 * n))]


class Series:
    __slots__ = ("samples", "_fresh", "_p50", "_p90", "count")

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self._fresh = 0
        self._p50: float | None = None
        self._p90: float | None = None
        self.count = 0

    def add(self, ms: float) -> None:
        self.samples.append(ms)
        self.count += 1
        self._fresh += 1

    def _compute(self) -> None:
        if self._fresh == 0 and self._p50 is not None:
            return
        if self._fresh < EVERY and self._p50 is not None:
            return
        self._p50, self._p90 = percentiles(sorted(self.samples))
        self._fresh = 0

    def p50(self) -> float | None:
        if len(self.samples) < MIN_SAMPLES:
            return None
        self._compute()
        return self._p50

    def p90(self) -> float | None:
        if len(self.samples) < MIN_SAMPLES:
            return None
        self._compute()
        return self._p90


class ObservedLatency:
    def __init__(self, models, previous: "ObservedLatency | None" = None) -> None:
        """`models`: the `provider:model` keys the config names; no other is tracked. After a reload, the
        series of the models still named are `previous`'s own (still fed by the requests it started)."""
        models = tuple(models)
        old_ttft = previous._ttft if previous is not None else {}
        old_total = previous._total if previous is not None else {}
        self._ttft = {key: old_ttft.get(key) or Series() for key in models}
        self._total = {key: old_total.get(key) or Series() for key in models}

    def add(self, key: str, stream: bool, ms: float) -> None:
        series = (self._ttft if stream else self._total).get(key)
        if series is not None:
            series.add(ms)

    def series(self, key: str, stream: bool) -> Series | None:
        return (self._ttft if stream else self._total).get(key)

    def expected(self, key: str, stream: bool) -> float | None:
        series = self.series(key, stream)
        return series.p50() if series is not None else None

    def p90(self, key: str, stream: bool) -> float | None:
        series = self.series(key, stream)
        return series.p90() if series is not None else None

    def order(self, chain: tuple, target_ms: float, stream: bool) -> tuple:
        """The chain with the models expected to meet `target_ms` first, in their configured order, then the
        others, fastest first. A model not observed yet is expected to meet it."""
        meets, late = [], []
        for target in chain:
            expected = self.expected(target.key, stream)
            if expected is None or expected <= target_ms:
                meets.append(target)
            else:
                late.append((expected, len(late), target))
        if not late:
            return chain
        late.sort()
        return tuple(meets) + tuple(t for _, _, t in late)

    def view(self, key: str) -> dict | None:
        """What GET /v1/models/{id} shows of a model: p50/p90 and sample counts of each series."""
        if key not in self._ttft:
            return None
        out = {}
        for name, table in (("ttft", self._ttft), ("total", self._total)):
            series = table[key]
            out[f"{name}_p50_ms"] = _round(series.p50())
            out[f"{name}_p90_ms"] = _round(series.p90())
            out[f"{name}_samples"] = series.count
        return out

    def keys(self):
        return self._ttft.keys()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
