"""`token_budget`: tokens per identity (`per`) and UTC calendar period, reserved before the call, settled after.

Admission reserves the prompt's estimate plus the completion limit, atomically with every other claim of the
request, and admits only if that fits in what is left (`used + reserved + this <= tokens`). At the end the
reservation is returned and the usage the upstream reported is charged, so the budget is passed by at most
the estimation error of the requests in flight. A spent budget gets 429 `insufficient_quota` with
`x-should-retry: false` (waiting a few seconds will not help) and the time it resets.
"""

from __future__ import annotations

import time
from typing import Mapping

from policies.base import CONTINUE, Decision, Policy, Reject
from policies.schema import check_keys, choice, count
from policies.scopes import PERIODS, iso, period_bounds, scope
from policies.stores.base import BUDGET, Claim
from proxy.app.config import ConfigError

PER = ("key", "user", "team", "global")


class TokenBudget(Policy):
    uses_store = True
    settles_claims = True  # the chain charges each claim what the request used, in place of the reservation

    def __init__(self, tokens: int, per: str = "key", period: str = "day", default_completion: int = 1000) -> None:
        self.tokens, self.per, self.period = tokens, per, period
        self.default_completion = default_completion
        self._keys: dict[str, tuple[int, float, str]] = {}  # scope -> this period's (start, end, Redis key)

    @classmethod
    def options(cls, raw: Mapping, where: str) -> dict:
        check_keys(raw, {"per", "tokens", "period", "default_completion"}, where)
        tokens = count(raw, "tokens", where)
        if tokens is None:
            raise ConfigError(f"{where}.tokens: required, the tokens each {raw.get('per', 'key')} may use a period")
        return {"tokens": tokens, "per": choice(raw, "per", where, PER, "key"),
                "period": choice(raw, "period", where, PERIODS, "day"),
                "default_completion": count(raw, "default_completion", where, 1000)}

    def claim_for(self, ctx, now: float | None = None, amount: int = 0) -> Claim:
        now = time.time() if now is None else now
        who = scope(ctx, self.per)
        known = self._keys.get(who)
        if known is None or not known[0] <= now < known[1]:
            if len(self._keys) > 10000:  # identities from clients' `user` fields: keep the cache bounded
                self._keys.clear()
            start, end = period_bounds(self.period, now)
            known = self._keys[who] = (start, float(end), f"tb:{self.name}:{who}:{start}")
        return Claim(BUDGET, known[2], self.tokens, amount, known[1], self.mode == "shadow")

    async def on_request(self, ctx) -> Decision:
        state = ctx.policy
        if not state.counts:
            return CONTINUE
        state.claim(self, self.claim_for(ctx, amount=state.reserve(ctx.operation, self.default_completion)))
        return CONTINUE

    def hedge_claims(self, ctx) -> list[Claim]:
        """A hedge's attempt may use as much as the first: it reserves the same again while both are in flight."""
        return ctx.policy.claims_of(self)

    def refused(self, ctx, claim: Claim, admission) -> Reject:
        resets = iso(claim.param)
        who = "everyone" if self.per == "global" else f"this {self.per}"
        if claim.amount > self.tokens:
            message = (f"This request needs up to {claim.amount} tokens, more than the whole budget of {who} "
                       f"({self.tokens} tokens a {self.period}). Lower max_completion_tokens or the prompt.")
        else:
            message = (f"The token budget of {who} ({self.tokens} tokens a {self.period}) is spent: this request "
                       f"needs up to {claim.amount} tokens. It resets at {resets}.")
        return Reject(429, message, code="insufficient_quota", type="insufficient_quota",
                      headers={"x-should-retry": "false", "x-groq-proxy-budget-resets-at": resets})
