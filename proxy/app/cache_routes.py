"""`DELETE /admin/cache`: empties the response caches (every `use = "cache"` policy), all of it, one model's
entries (`?model=NAME`, the virtual model or the real model named directly) or one entry (`?key=KEY`, the
64 hex digits a response through the cache names in `x-groq-proxy-cache-key`). With the admin key: the route
is declared behind `admin_only` in proxy/app/admin_routes.py."""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from policies.cache.policy import ResponseCache
from proxy.app.errors import ProxyError, new_request_id

_KEY = re.compile(r"^[0-9a-f]{64}$")


async def admin_cache_delete(request: web.Request) -> web.Response:
    from proxy.app.server import STATE

    state = request.app[STATE]  # the admin key was checked where the route is declared (admin_only)
    headers = {"x-request-id": new_request_id()}
    model, key = request.query.get("model"), request.query.get("key")
    if model is not None and key is not None:
        return ProxyError(400, "Give ?model=NAME or ?key=KEY, not both (neither empties the whole cache).",
                          param="key").to_response(headers)
    if key is not None and not _KEY.match(key):
        return ProxyError(400, "?key= is the 64 hex digits of x-groq-proxy-cache-key.", param="key",
                          code="invalid_cache_key").to_response(headers)
    if model is not None and (not model or len(model) > 256):
        return ProxyError(400, "?model= must name a model.", param="model").to_response(headers)
    generation = state.generation  # held to the end: a reload closes the old caches' stores after this delete
    caches = [p for p in generation.pipeline.policies.policies if isinstance(p, ResponseCache)]
    if not caches:
        return ProxyError(404, "No response cache is configured ([[policies]] use = \"cache\").",
                          code="cache_not_configured").to_response(headers)
    deleted = 0
    generation.enter()
    try:
        for cache in caches:
            deleted += await cache.store.delete(model=model, key=key)
    except Exception:  # Redis unreachable (a RedisError or an OSError): the store's fault, not the request's
        return ProxyError(503, "The cache store is unavailable; try again shortly.", type="server_error",
                          code="cache_unavailable").to_response(headers)
    finally:
        generation.leave()
    body = {"deleted": deleted, "policies": [c.name for c in caches]}
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers=headers)
