"""`rate_limit`: at most N requests and M tokens a minute per `per`, as a GCRA bucket.

GCRA (the Generic Cell Rate Algorithm, a leaky bucket kept as one timestamp): the bucket holds a whole
minute's capacity and refills continuously, so a burst of N is admitted at once and then one request every
60/N seconds. It never admits more than N in a burst, and in any 60 s at most N plus what refilled during
them. Tokens are reserved as the prompt's estimate plus the completion limit, and settled to the reported
usage, so the token bucket tracks what was really used.

Over the limit: 429 `rate_limit_exceeded` with `retry-after`, or, with `wait_s`, the request waits up to
that long for capacity. The answer carries `x-ratelimit-*-requests` and `x-ratelimit-*-tokens` of the
tightest proxy limit that applied, in place of Groq's.
"""

from __future__ import annotations

import math
from typing import Mapping

from policies.base import CONTINUE, Decision, Policy, Reject
from policies.schema import check_keys, choice, count, seconds
from policies.scopes import duration, scope
from policies.stores.base import GCRA, Claim
from proxy.app.config import ConfigError

PER = ("global", "key", "user", "team", "model")
PERIOD_S = 60.0


class RateLimit(Policy):
    uses_store = True
    settles_claims = True  # the chain corrects the tokens claim to what the request used

    def __init__(self, per: str = "global", requests_per_minute: int | None = None,
                 tokens_per_minute: int | None = None, wait_s: float = 0.0, default_completion: int = 1000) -> None:
        self.per = per
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.wait_s = wait_s
        self.default_completion = default_completion
        self._keys: dict[str, tuple[Claim | None, str]] = {}  # who -> (requests claim, tokens key)

    @classmethod
    def options(cls, raw: Mapping, where: str) -> dict:
        check_keys(raw, {"per", "requests_per_minute", "tokens_per_minute", "wait_s", "default_completion"}, where)
        rpm, tpm = count(raw, "requests_per_minute", where), count(raw, "tokens_per_minute", where)
        if rpm is None and tpm is None:
            raise ConfigError(f"{where}: set requests_per_minute, tokens_per_minute or both")
        return {"per": choice(raw, "per", where, PER, "global"), "requests_per_minute": rpm,
                "tokens_per_minute": tpm, "wait_s": seconds(raw, "wait_s", where, 0.0),
                "default_completion": count(raw, "default_completion", where, 1000)}

    def claims_for(self, ctx, tokens: int = 0) -> list[Claim]:
        requests, tokens_key = self._scoped(scope(ctx, self.per))
        out = [requests] if requests is not None else []
        if self.tpm:
            out.append(self._tokens_claim(tokens_key, tokens))
        return out

    def _tokens_claim(self, key: str, tokens: int) -> Claim:
        return Claim(GCRA, key, self.tpm, tokens, PERIOD_S, self.mode == "shadow", "", "tokens")

    def _scoped(self, who: str) -> tuple[Claim | None, str]:
        """The requests claim (the same for every request of `who`: made once) and the tokens key of `who`."""
        known = self._keys.get(who)
        if known is None:
            if len(self._keys) > 10000:  # identities from clients' `user` fields: keep the cache bounded
                self._keys.clear()
            requests = None
            if self.rpm:
                requests = Claim(GCRA, f"rl:{self.name}:{who}:r", self.rpm, 1, PERIOD_S, self.mode == "shadow", "",
                                 "requests")
            known = self._keys[who] = (requests, f"rl:{self.name}:{who}:t")
        return known

    async def on_request(self, ctx) -> Decision:
        state = ctx.policy
        requests, tokens_key = self._scoped(scope(ctx, self.per))
        if requests is not None:
            state.claim(self, requests)
        if self.tpm and state.counts:
            state.claim(self, self._tokens_claim(tokens_key, state.reserve(ctx.operation, self.default_completion)))
        return CONTINUE

    def hedge_claims(self, ctx) -> list[Claim]:
        """A hedge is not another request, but its tokens count: the tokens claim is reserved again."""
        return [c for c in ctx.policy.claims_of(self) if c.header == "tokens"]

    def refused(self, ctx, claim: Claim, admission) -> Reject:
        kind = claim.header
        headers = {f"x-ratelimit-limit-{kind}": str(claim.limit), f"x-ratelimit-remaining-{kind}": "0"}
        if admission.retry_after < 0:  # more tokens than a whole minute holds: waiting will never help
            headers["x-should-retry"] = "false"
            return Reject(429, f"This request needs up to {claim.amount} tokens, more than the limit of "
                          f"{claim.limit} tokens per minute.", code="rate_limit_exceeded", type="tokens",
                          headers=headers)
        wait = admission.retry_after
        headers["x-ratelimit-reset-" + kind] = duration(wait)
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        unit = "requests" if kind == "requests" else "tokens"
        return Reject(429, f"Rate limit reached: {claim.limit} {unit} per minute ({self.per}). Please try again "
                      f"in {duration(wait)}.", code="rate_limit_exceeded", type=unit, headers=headers)
