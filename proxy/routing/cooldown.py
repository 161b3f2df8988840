"""Which real models to skip for a while: after a 429 with retry-after, or several failures in a row."""

from __future__ import annotations

import time
from typing import Callable

from proxy.app.config import RoutingConfig


class Cooldowns:
    def __init__(self, routing: RoutingConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._after = routing.cooldown_after_failures
        self._cooldown_s = routing.cooldown_s
        self._max_s = routing.max_cooldown_s
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def remaining(self, key: str) -> float:
        """Seconds this model is still skipped for; 0 when it may be tried."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._until[key]
        return 0.0

    def succeeded(self, key: str) -> None:
        if self._failures:
            self._failures.pop(key, None)

    def failed(self, key: str, retry_after_s: float | None = None) -> float:
        """Counts one failure; returns the cool-down it started (0 when none)."""
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        seconds = 0.0
        if retry_after_s is not None and retry_after_s > 0:
            seconds = retry_after_s
        if count >= self._after:
            seconds = max(seconds, self._cooldown_s)
            self._failures[key] = 0
        if seconds <= 0:
            return 0.0
        seconds = min(seconds, self._max_s)
        self._until[key] = self._clock() + seconds
        return seconds
