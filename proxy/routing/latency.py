"""Latency categories: excellent, good, acceptable, poor, critical, from per-tier thresholds.

Defaults come from the design's table (average range and p95 per tier): a request at or under the low end of
the average is excellent, under the high end good, under the p95 acceptable, under twice the p95 poor,
above that critical. A stream is judged by its time to first token, a plain request by its whole time.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from proxy.telemetry.logs import emit

CATEGORIES = ("excellent", "good", "acceptable", "poor", "critical")


@dataclass(frozen=True)
class Thresholds:
    excellent_ms: float
    good_ms: float
    acceptable_ms: float
    poor_ms: float

    def category(self, ms: float) -> str:
        if ms <= self.excellent_ms:
            return "excellent"
        if ms <= self.good_ms:
            return "good"
        if ms <= self.acceptable_ms:
            return "acceptable"
        if ms <= self.poor_ms:
            return "poor"
        return "critical"


TIER_DEFAULTS = {
    "fast": Thresholds(50, 100, 150, 300),
    "standard": Thresholds(300, 500, 800, 1600),
    "premium": Thresholds(800, 1200, 2000, 4000),
}


def default_thresholds(model_name: str) -> Thresholds:
    """A virtual model named like a tier gets that tier's table row; anything else the standard row."""
    for tier, thresholds in TIER_DEFAULTS.items():
        if tier in model_name:
            return thresholds
    return TIER_DEFAULTS["standard"]


class RollingP95:
    """A model's p95 over its last `window` answers; warns once each time its category changes into or out of
    poor/critical."""

    def __init__(self, window: int = 200, every: int = 20) -> None:
        self._window = window
        self._every = every
        self._samples: dict[tuple[str, str], list] = {}  # key -> [deque of samples, samples since last look]
        self._category: dict[tuple[str, str], str] = {}

    def add(self, virtual: str, model: str, ms: float, thresholds: Thresholds) -> None:
        key = (virtual, model)
        entry = self._samples.get(key)
        if entry is None:
            entry = self._samples[key] = [deque(maxlen=self._window), 0]
        samples = entry[0]
        samples.append(ms)
        entry[1] += 1
        if entry[1] < self._every:  # the p95 is looked at every `every` samples, not on every request
            return
        entry[1] = 0
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        category = thresholds.category(p95)
        before = self._category.get(key, "excellent")
        self._category[key] = category
        bad = ("poor", "critical")
        if category != before and (category in bad or before in bad):
            emit(
                logging.WARNING if category in bad else logging.INFO,
                "latency_category_changed",
                virtual_model=virtual,
                model=model,
                p95_ms=round(p95, 1),
                category=category,
                previous=before,
            )

    def category(self, virtual: str, model: str) -> str | None:
        return self._category.get((virtual, model))
