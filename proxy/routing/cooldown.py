"""Which real models to skip for a while: after a 429 with retry-after, or several failures in a row.

Keys are `provider:model`, and a client may name any: both tables are bounded (a key whose count is old is
forgotten first, an expired cool-down before a running one), so failing made-up models cannot grow memory.
"""

from __future__ import annotations

import time
from typing import Callable

from proxy.app.config import RoutingConfig


MAX_TRACKED = 512  # models with a failure count, and models cooling down, kept at most (each): a config names tens


class Cooldowns:
    def __init__(self, routing: RoutingConfig, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        self._max = max_tracked
        self.reconfigure(routing)
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def reconfigure(self, routing: RoutingConfig) -> None:
        """A reload's new thresholds; the counts and the cool-downs running are kept (proxy/app/reload.py)."""
        self._after = routing.cooldown_after_failures
        self._cooldown_s = routing.cooldown_s
        self._max_s = routing.max_cooldown_s

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
        failures = self._failures
        count = failures.pop(key, 0) + 1  # re-inserted last: the table's order is the order of last failure
        if len(failures) >= self._max:
            del failures[next(iter(failures))]
        failures[key] = count
        seconds = 0.0
        if retry_after_s is not None and retry_after_s > 0:
            seconds = retry_after_s
        if count >= self._after:
            seconds = max(seconds, self._cooldown_s)
            self._failures[key] = 0
        if seconds <= 0:
            return 0.0
        seconds = min(seconds, self._max_s)
        now = self._clock()
        until = self._until
        if key not in until and len(until) >= self._max:
            for expired in [k for k, t in until.items() if t <= now]:
                del until[expired]
            if len(until) >= self._max:  # all still running: the one that ends first goes
                del until[min(until, key=until.__getitem__)]
        until[key] = now + seconds
        return seconds
