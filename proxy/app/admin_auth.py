"""Who may call the admin API: whoever presents the admin key (`server.admin_key_env`) as a Bearer token.

With no admin key configured the admin API is off: every /admin route answers 403 and does nothing, so a
proxy started without one never lends its upstream key to an anonymous benchmark or shows its config. The
key is read from the running config at each call, so a reload that sets or changes it takes effect at once.

Every admin handler is wrapped once, where the route is declared: `@admin_only`.
"""

from __future__ import annotations

import functools
import hmac
from typing import Awaitable, Callable

from aiohttp import web

from proxy.app.errors import ProxyError, new_request_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_RUNNING = object()


def admin_refusal(request: web.Request, admin_key: "str | None | object" = _RUNNING) -> web.Response | None:
    """The answer for a caller who may not use the admin API, or None for one who may. The admin key is the
    running config's unless given."""
    if admin_key is _RUNNING:
        from proxy.app.server import STATE  # the app module imports the admin routes: resolved at call time

        admin_key = request.app[STATE].config.server.admin_key
    admin = admin_key
    if admin is None:
        return ProxyError(403, f"{request.path} is off: the admin API needs an admin key; set server.admin_key_env.",
                          type="authentication_error", code="admin_key_not_configured").to_response(_id())
    # Compared in constant time, as bytes: a header is any text, and a non-ASCII str cannot be compared so.
    presented = request.headers.get("Authorization", "").encode("utf-8", "backslashreplace")
    if not hmac.compare_digest(presented, f"Bearer {admin}".encode()):
        return ProxyError(401, "The admin endpoints need the admin key (server.admin_key_env) as a Bearer token.",
                          type="authentication_error", code="invalid_api_key").to_response(_id())
    return None


def admin_only(handler: Handler) -> Handler:
    """`handler`, answered only for the admin key's holder."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = admin_refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)

    return guarded


def _id() -> dict[str, str]:
    return {"x-request-id": new_request_id()}
