"""What the router learns while it runs, in one place: key pools per provider, Groq's rate-limit view per model
and key, observed latency per model. Built once per app, and again on a reload from the one before it: what
was learned of the providers and models still configured carries over."""

from __future__ import annotations

import time
from typing import Callable

from proxy.app.config import Config
from proxy.routing.keys import KeyPool
from proxy.routing.observed import ObservedLatency
from proxy.routing.ratelimits import RateLimits


class RoutingState:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 previous: "RoutingState | None" = None) -> None:
        old_pools = previous.pools if previous is not None else {}
        self.pools = {}
        for name, p in config.providers.items():
            pool = old_pools.get(name)  # a pool of the same keys keeps its resting keys and its turn
            names = p.api_key_envs or ("",)
            self.pools[name] = pool if pool is not None and pool.names == names else KeyPool(names, clock)
        # Groq's view per model and key is bounded and keyed by model: shared as it is.
        self.limits = previous.limits if previous is not None else RateLimits(clock)
        self.observed = ObservedLatency((t.key for t in config.real_targets()),
                                        previous.observed if previous is not None else None)
        self.key_rest_s = config.routing.key_rest_s
