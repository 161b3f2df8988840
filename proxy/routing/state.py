"""What the router learns while it runs, in one place: key pools per provider, Groq's rate-limit view per model
and key, observed latency per model. Built once per app; the pipeline reads and feeds it."""

from __future__ import annotations

import time
from typing import Callable

from proxy.app.config import Config
from proxy.routing.keys import KeyPool
from proxy.routing.observed import ObservedLatency
from proxy.routing.ratelimits import RateLimits


class RoutingState:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.pools = {name: KeyPool(p.api_key_envs or ("",), clock) for name, p in config.providers.items()}
        self.limits = RateLimits(clock)
        self.observed = ObservedLatency(t.key for t in config.real_targets())
        self.key_rest_s = config.routing.key_rest_s
