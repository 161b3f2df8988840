"""`concurrency`: requests in flight per virtual model, per key, or in all, held from admission to the end.

A slot is taken at admission (with every other claim of the request) and given back in `after()`, which runs
when the request ends however it ends: a stream holds its slot until its last byte or its client's going.
Over the limit the request queues up to `wait_s`, then gets 429. On Redis a slot is a lease that the replica
holding it renews; a replica that dies stops renewing and its slots free themselves when the lease ends.
"""

from __future__ import annotations

import itertools
import os
from types import MappingProxyType
from typing import Mapping

from policies.base import CONTINUE, Decision, Policy, Reject
from policies.schema import check_keys, choice, count, seconds, table
from policies.scopes import scope
from policies.stores.base import SLOT, Claim
from proxy.app.config import ConfigError

PER = ("model", "global", "key")
_PROCESS = os.urandom(6).hex() + ":"  # a lease id is unique across replicas: this process's id and a count
_leases = itertools.count()


class Concurrency(Policy):
    uses_store = True
    settles_claims = True  # the chain frees the slot when the request ends, however it ends

    def __init__(self, per: str = "model", limits: Mapping[str, int] | None = None, limit: int | None = None,
                 wait_s: float = 0.0) -> None:
        self.per = per
        self.limits = MappingProxyType(dict(limits or {}))
        self.limit = limit
        self.wait_s = wait_s
        self._keys: dict[str, str] = {}  # who -> its counter's key

    @classmethod
    def options(cls, raw: Mapping, where: str) -> dict:
        check_keys(raw, {"per", "limits", "limit", "wait_s"}, where)
        per = choice(raw, "per", where, PER, "model")
        limits = {}
        for name, value in table(raw, "limits", where).items():
            limits[name] = count({name: value}, name, f"{where}.limits")
        if per != "model" and limits:
            raise ConfigError(f"{where}.limits: only with per = \"model\"; use `limit` for per = \"{per}\"")
        limit = count(raw, "limit", where)
        if limit is None and not limits:
            raise ConfigError(f"{where}: set `limit`" + (" or `limits` (per virtual model)" if per == "model" else ""))
        return {"per": per, "limits": limits, "limit": limit, "wait_s": seconds(raw, "wait_s", where, 0.0)}

    def slot_for(self, ctx) -> tuple[str, int] | None:
        """The counter's key and limit of the request's slot; None when no limit applies to it."""
        limit = self.limit
        if self.per == "model":
            limit = self.limits.get(ctx.route.virtual or ctx.route.requested, limit)
        if limit is None:
            return None
        who = scope(ctx, self.per)
        key = self._keys.get(who)
        if key is None:
            if len(self._keys) > 10000:  # identities from clients' `user` fields: keep the cache bounded
                self._keys.clear()
            key = self._keys[who] = f"cc:{self.name}:{who}"
        return key, limit

    async def on_request(self, ctx) -> Decision:
        slot = self.slot_for(ctx)
        if slot is not None:
            ctx.policy.claim(self, Claim(SLOT, slot[0], slot[1], 1, 0.0, self.mode == "shadow",
                                         _PROCESS + str(next(_leases))))
        return CONTINUE

    def refused(self, ctx, claim: Claim, admission) -> Reject:
        waited = f" after waiting {self.wait_s:g}s" if self.wait_s else ""
        return Reject(429, f"Too many requests in flight: the limit is {claim.limit} ({self.per}){waited}. Try again "
                      "shortly.", code="concurrency_limit_exceeded", type="rate_limit_error",
                      headers={"retry-after": "1"})
