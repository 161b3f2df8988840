"""A request's routing plan: the order of its chain, its deadline, whether and when to hedge.

From the tier's config (`max_latency_ms`, `hedge`, `hedge_after_ms`, `max_hedges`) and the request's headers
(`x-max-latency-ms`, `x-hedge`, `x-hedge-after-ms`). A request with none of them gets one shared plan per
virtual model, made at start-up: the common case costs a dict look-up.
"""

from __future__ import annotations

from proxy.app.config import Config
from proxy.routing.hints import NONE
from proxy.routing.observed import ObservedLatency


class Plan:
    __slots__ = ("deadline_s", "hedge_after_ms", "max_hedges")

    def __init__(self, target_ms: float | None = None, hedge_after_ms=None, max_hedges: int = 1) -> None:
        self.deadline_s = target_ms / 1000.0 if target_ms is not None else None
        self.hedge_after_ms = hedge_after_ms  # None: no hedging; milliseconds; or "auto"
        self.max_hedges = max_hedges

    def hedge_delay(self, target, stream: bool, observed: ObservedLatency) -> float | None:
        """Seconds to wait for `target` before hedging; None when there is nothing to go by ("auto" and the
        model not observed yet)."""
        if self.hedge_after_ms == "auto":
            p90 = observed.p90(target.key, stream)
            return None if p90 is None else p90 / 1000.0
        return self.hedge_after_ms / 1000.0


PLAIN = Plan()


class Planner:
    def __init__(self, config: Config, observed: ObservedLatency) -> None:
        self._observed = observed
        self._models = config.models
        self._static = {name: self._make(vm, NONE) for name, vm in config.models.items()}

    def _make(self, vm, hints) -> Plan:
        target = hints.max_latency_ms if hints.max_latency_ms is not None else (vm.max_latency_ms if vm else None)
        hedge = hints.hedge
        if hedge is None:
            hedge = hints.hedge_after_ms is not None or (vm is not None and vm.hedge)
        after = None
        if hedge:
            after = hints.hedge_after_ms
            if after is None:
                after = vm.hedge_after_ms if vm is not None and vm.hedge_after_ms is not None else "auto"
        if target is None and after is None:
            return PLAIN
        return Plan(target, after, vm.max_hedges if vm is not None else 1)

    def plan(self, ctx) -> Plan:
        """The request's plan; a latency target also reorders `ctx.chain` by observed latency."""
        virtual = ctx.route.virtual
        if ctx.hints is NONE:
            plan = self._static.get(virtual, PLAIN) if virtual is not None else PLAIN
        else:
            plan = self._make(self._models.get(virtual) if virtual is not None else None, ctx.hints)
        if plan.deadline_s is not None and len(ctx.chain) > 1:
            ctx.chain = self._observed.order(ctx.chain, plan.deadline_s * 1000.0, ctx.stream)
        return plan
