"""The admin key check every /admin endpoint makes: one place, so how admin access is granted changes in one
place. Compared in constant time; the key is never echoed."""

from __future__ import annotations

import hmac

from aiohttp import web

from proxy.app.errors import ProxyError, new_request_id


def admin_refusal(request: web.Request, admin_key: str | None) -> web.Response | None:
    """None when the request carries the admin key as a Bearer token; otherwise the error to answer (403 when
    no admin key is configured, 401 when the one presented is missing or wrong)."""
    headers = {"x-request-id": new_request_id()}
    if admin_key is None:
        return ProxyError(403, f"{request.path} needs an admin key: set server.admin_key_env.",
                          type="authentication_error", code="admin_key_not_configured").to_response(headers)
    presented = request.headers.get("Authorization", "")
    if not hmac.compare_digest(presented.encode(), f"Bearer {admin_key}".encode()):
        return ProxyError(401, "The admin endpoints need the admin key (server.admin_key_env) as a Bearer token.",
                          type="authentication_error", code="invalid_api_key").to_response(headers)
    return None
