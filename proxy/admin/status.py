"""The status page (`GET /status`) and its data (`GET /status.json`): how the tiers are doing, now.

Everything on it is read from what the proxy already keeps, at the moment the page asks: the chains from the
config, each model's cool-down (proxy/routing/cooldown.py), Groq's rate-limit view and the resting pool keys
(ratelimits.py, keys.py), observed latency (observed.py) judged by the virtual model's thresholds
(latency.py), the last minutes' counts (proxy/telemetry/recent.py), the global budgets and limits (the usage
report of policies/usage.py, one store read) and the response cache's hit rate. Nothing is computed for the
page on the request path beyond those counts.

What it shows is the config's names and the proxy's own numbers: no secret (pool keys by their variable's
name, the store's URL without its password) and nothing a client sent (a model only a client named counts in
the `other` row). So, like /metrics, it needs no admin key; it is an operator's page, to be reached the way
/metrics is. With several worker processes each answers for itself (`pid`); budgets and limits on the Redis
store are the whole proxy's.

The cache: hits, misses, bypasses and coalesced requests are counted from the `x-groq-proxy-cache` header
every answer through a cache policy carries; a policy may add its own numbers (entries, bytes) by defining
`cache_stats() -> dict`. With no cache policy and no such answer in the window, `cache` is null.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from importlib import resources

import orjson
from aiohttp import web

from policies.identity import Identity
from policies.stores.base import StoreUnavailable
from policies.usage import usage_report
from proxy import __version__
from proxy.app.errors import ProxyError, new_request_id
from proxy.telemetry.recent import OTHER, SLOT_S, SLOTS

STARTED = web.AppKey("status_started", float)  # wall-clock time the app was built: uptime survives a reload
REFRESH_S = 3  # how often the page asks for status.json
WINDOW_S = SLOT_S * SLOTS
_NOBODY = Identity(None, None, None)  # global budgets and limits do not depend on who asks
_PAGE = resources.files("proxy.admin").joinpath("status.html").read_bytes()
_PAGE_HEADERS = {
    # No external asset can load, and the page's own script may fetch only from this origin.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def status_routes(app: web.Application) -> list[tuple]:
    """The two routes, for the app's route table; notes when the app started."""
    app[STARTED] = time.time()
    return [("/status", "GET", status_page), ("/status.json", "GET", status_json)]


async def status_page(request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8",
                        headers={**_PAGE_HEADERS, "x-request-id": new_request_id()})


async def status_json(request: web.Request) -> web.Response:
    from proxy.app.server import STATE

    state = request.app[STATE]
    headers = {"Cache-Control": "no-store", "x-request-id": new_request_id()}
    if state.pipeline is None or state.observer is None:
        return ProxyError(503, "The proxy is starting or stopping.", type="server_error",
                          code="not_ready").to_response(headers)
    report = await build_status(state, request.app[STARTED])
    return web.Response(body=orjson.dumps(report), content_type="application/json", headers=headers)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def build_status(state, started: float) -> dict:
    generation = state.generation  # once: a reload must not close the store the usage read below is on
    config, pipeline, observer = generation.config, generation.pipeline, generation.pipeline.observer
    now = time.time()
    models = {t.key: _model(t, pipeline, observer, now) for t in config.real_targets()}
    virtual = []
    for name, vm in config.models.items():
        entries = []
        for target in vm.chain:
            latency = models[target.key]["observed_latency"] or {}
            entries.append({
                "model": target.key,
                "state": models[target.key]["state"],
                # each series judged as the tier judges a request: streams by first token, plain by the whole
                "category": {kind: _category(vm.latency, latency.get(f"{kind}_p50_ms")) for kind in ("ttft", "total")},
            })
        virtual.append({"name": name, "chain": entries, **_recent(observer.recent_requests, name)})
    for name in (OTHER, "invalid"):  # names only clients know, and requests that never reached a chain
        virtual.append({"name": name, "chain": [], **_recent(observer.recent_requests, name)})
    generation.enter()
    try:
        policies = await _policies(pipeline.policies, config)
    finally:
        generation.leave()
    return {
        "object": "status",
        "version": __version__,
        "pid": os.getpid(),
        "now": _iso(now),
        "started_at": _iso(started),
        "uptime_s": round(now - started, 1),
        "simulated": config.simulated,
        "refresh_s": REFRESH_S,
        "window_s": WINDOW_S,
        "virtual_models": virtual,
        "models": list(models.values()),
        "policies": policies,
        "cache": _cache(pipeline.policies, observer.recent_cache),
    }


def _recent(counts, name: str) -> dict:
    return {"last_1m": counts.totals(name, 60), "last_5m": counts.totals(name, WINDOW_S)}


def _category(thresholds, ms: float | None) -> str | None:
    return None if ms is None else thresholds.category(ms)


def _no_tokens() -> int:  # the smallest request: blocked only when nothing at all would fit
    return 0


def _model(target, pipeline, observer, now: float) -> dict:
    """One real model: ok, cooling_down, rate_limited (every key refused or predicted to be) or keys_resting
    (every key of its provider resting after a 401/403), with `until` when it may be tried again."""
    key = target.key
    routing = pipeline.routing
    pool = routing.pools[target.provider]
    keys, blocked_for = [], []
    for index, name in enumerate(pool.names):
        resting = pool.rest_left(index)
        blocked = routing.limits.blocked(key, index, _no_tokens)
        entry = {"key": name or None, "state": "ok"}
        if resting > 0:
            entry["state"], entry["until"] = "resting", _iso(now + resting)
        elif blocked is not None:
            entry["state"], entry["until"] = blocked[0], _iso(now + blocked[1])
        view = routing.limits.view(key, index)
        if view:
            entry.update(view)
        keys.append(entry)
        blocked_for.append(resting if resting > 0 else (blocked[1] if blocked else 0.0))
    cooling = pipeline.cooldowns.remaining(key)
    if cooling > 0:
        state, until = "cooling_down", now + cooling
    elif all(wait > 0 for wait in blocked_for):
        resting = all(k["state"] == "resting" for k in keys)
        state, until = ("keys_resting" if resting else "rate_limited"), now + min(blocked_for)
    else:
        state, until = "ok", None
    return {
        "model": key,
        "provider": target.provider,
        "state": state,
        "until": _iso(until) if until is not None else None,
        "keys": keys,
        "observed_latency": routing.observed.view(key),
        **_recent(observer.recent_attempts, key),
    }


async def _policies(chain, config) -> dict | None:
    """The policies configured, and what the global budgets and limits (and those per virtual model) have used."""
    if not chain:
        return None
    out = {
        "configured": [{"name": p.name, "kind": type(p).__name__, "mode": p.mode, "per": getattr(p, "per", None)}
                       for p in chain.policies],
        "store": chain.store.status() if chain.store is not None else None,
        "budgets": [], "limits": [],
    }
    if chain.store is None:
        return out
    try:
        report = await usage_report(chain, _NOBODY, list(config.models), "global")
    except StoreUnavailable:
        out["error"] = "the store is unavailable"
        return out
    out["budgets"], out["limits"] = report["budgets"], report["limits"]
    return out


def _cache(chain, counts) -> dict | None:
    totals = dict.fromkeys(counts.fields, 0)
    for name in counts.names():
        for field, value in counts.totals(name).items():
            totals[field] += value
    providers = [p for p in (chain.policies if chain else ()) if callable(getattr(p, "cache_stats", None))]
    if not providers and not any(totals.values()):
        return None
    looked_up = totals["hit"] + totals["miss"] + totals["coalesced"]
    out = {"window_s": WINDOW_S, **totals,
           "hit_rate": round(totals["hit"] / looked_up, 4) if looked_up else None}
    stats = {}
    for policy in providers:
        try:
            stats[policy.name] = policy.cache_stats()
        except Exception as exc:  # a broken hook must not take the page down
            stats[policy.name] = {"error": type(exc).__name__}
    out["stores"] = stats
    return out
