"""The automatic tier: a request for `[routing] auto_model` gets its virtual model chosen by the proxy.

`x-model-tier` (a virtual model's name, with or without its `tier-` prefix) decides when given. Otherwise the
request type (`x-request-type`, else `default`) picks a tier through `[routing.request_types]`; with a latency
target, that tier is kept if it is expected to meet the target, else the fastest tier expected to meet it is
taken (else the fastest). A tier's expected latency is its fastest model's observed p50; not observed yet
counts as meeting the target, as for a chain.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.app.config import TIER_PREFIX, Config
from proxy.app.errors import ProxyError
from proxy.routing.hints import MODEL_TIER, REQUEST_TYPE
from proxy.routing.observed import ObservedLatency
from proxy.routing.router import Route, Router


class TierChooser:
    def __init__(self, config: Config, router: Router, observed: ObservedLatency) -> None:
        auto = config.routing.auto_model
        # Each tier's route as the auto model's: the client asked for `auto` (gen_ai.request.model says so),
        # the tier chosen is the virtual model (spans, metrics, x-groq-proxy-model).
        self._routes = {name: replace(router.virtual(name), requested=auto) for name in config.models} if auto else {}
        self._observed = observed
        self._models = config.models
        types = dict(config.routing.request_types)
        self._types = types
        # The tiers `auto` chooses among: those the request-type table names, else every virtual model.
        self._tiers = tuple(dict.fromkeys(types.values())) or tuple(config.models)
        self._default = types.get("default") or self._tiers[0]

    def _named(self, name: str) -> str:
        for candidate in (name, TIER_PREFIX + name):
            if candidate in self._models:
                return candidate
        names = ", ".join(n[len(TIER_PREFIX):] if n.startswith(TIER_PREFIX) else n for n in self._tiers)
        raise ProxyError(400, f"The header {MODEL_TIER} names no tier: {name[:60]!r} (tiers: {names}).",
                         param=MODEL_TIER, code="invalid_header")

    def _expected(self, tier: str, stream: bool) -> float | None:
        values = [self._observed.expected(t.key, stream) for t in self._models[tier].chain]
        if any(v is None for v in values):
            return None
        return min(values)

    def choose(self, headers, hints, stream: bool) -> Route:
        if hints.tier is not None:
            return self._routes[self._named(hints.tier)]
        kind = headers.get(REQUEST_TYPE)
        tier = self._types.get(kind, self._default) if kind is not None else self._default
        target = hints.max_latency_ms
        if target is not None:
            expected = self._expected(tier, stream)
            if expected is not None and expected > target:
                ranked = sorted((self._expected(t, stream) or 0.0, i, t) for i, t in enumerate(self._tiers))
                meeting = [t for e, _, t in ranked if e <= target]
                tier = meeting[0] if meeting else ranked[0][2]
        return self._routes[tier]
