"""The usage API (`GET /v1/usage`, `GET /admin/usage`): what an identity has used of each budget and limit.

One store read for the whole report. `usage_percent` is what was used (budgets: charged tokens, not the
reservations of requests in flight, which are shown apart as `reserved`; limits: the GCRA bucket's fill).
The summary fields take the highest percentage of their kind: `total_usage_percent` over the budgets,
`request_usage_percent` and `token_usage_percent` over the limits.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from policies.identity import Identity
from policies.rate_limit import RateLimit
from policies.scopes import iso
from policies.token_budget import TokenBudget


def _percent(used: float, limit: float) -> float:
    return round(100.0 * used / limit, 2) if limit else 0.0


def _applies(per: str, only: str | None) -> bool:
    return only is None or per == "global" or per == only


async def usage_report(chain, identity: Identity, models: list[str], only: str | None = None) -> dict:
    """`only` (key, user or team) keeps the budgets and limits counted per that, and global ones."""
    now = time.time()
    rows, claims = [], []
    for policy in chain.policies:
        if isinstance(policy, TokenBudget) and _applies(policy.per, only):
            claim = policy.claim_for(SimpleNamespace(identity=identity, route=None), now)
            rows.append(("budget", policy, None, [claim]))
            claims.append(claim)
        elif isinstance(policy, RateLimit) and _applies(policy.per, only if policy.per != "model" else None):
            for model in (models if policy.per == "model" else [None]):
                route = SimpleNamespace(virtual=model, requested=model)
                parts = policy.claims_for(SimpleNamespace(identity=identity, route=route))
                rows.append(("limit", policy, model, parts))
                claims += parts
    values = iter(await chain.store.read(claims) if claims else [])
    budgets, limits = [], []
    for kind, policy, model, parts in rows:
        if kind == "budget":
            used, reserved = next(values)
            claim = parts[0]
            budgets.append({"policy": policy.name, "per": policy.per, "period": policy.period, "limit": claim.limit,
                            "used": int(used), "reserved": int(reserved),
                            "usage_percent": _percent(used, claim.limit), "resets_at": iso(claim.param)})
            continue
        entry = {"policy": policy.name, "per": policy.per}
        if model is not None:
            entry["model"] = model
        for claim in parts:
            used, _ = next(values)
            used = min(int(used), claim.limit)
            entry[claim.header] = {"limit": claim.limit, "used": used, "usage_percent": _percent(used, claim.limit)}
        limits.append(entry)
    requests = [e["requests"]["usage_percent"] for e in limits if "requests" in e]
    tokens = [e["tokens"]["usage_percent"] for e in limits if "tokens" in e]
    return {
        "object": "usage",
        "identity": {"key": identity.key, "user": identity.user, "team": identity.team},
        "budgets": budgets,
        "limits": limits,
        "total_usage_percent": max((b["usage_percent"] for b in budgets), default=0.0),
        "is_within_budget": all(b["used"] < b["limit"] for b in budgets),
        "request_usage_percent": max(requests, default=0.0),
        "token_usage_percent": max(tokens, default=0.0),
        "is_within_limits": all(p < 100.0 for p in requests + tokens),
    }
