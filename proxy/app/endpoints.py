"""The answer to every path the proxy does not serve: a 404 in OpenAI's shape that lists what it does serve.

Nothing else is passed through. A pass-through of unknown paths would lend the provider's key to endpoints
the proxy does not understand (no policies, no ownership, no limits): a new Groq endpoint is served once a
route for it is added to the table in proxy/app/server.py, and the listing here is made from that table, so
it never goes stale.
"""

from __future__ import annotations

import re
from typing import Mapping

from aiohttp import web

from proxy.app.errors import ProxyError, new_request_id


_PATTERN = re.compile(r"\{(\w+):[^}]*\}")  # `{model_id:.+}` is shown as `{model_id}`


def listing(served: Mapping[str, Mapping[str, object]], prefixes: tuple[str, ...]) -> str:
    """`GET, POST /v1/files; ...`: every served path once, its twins under the other prefixes left out."""
    first, others = prefixes[0], prefixes[1:]
    lines = []
    for path, methods in served.items():
        if any(path.startswith(p + "/") for p in others):
            continue
        shown = _PATTERN.sub(r"{\1}", path)
        lines.append(f"{', '.join(methods)} {shown}")
    twins = "".join(f" (each {first} path also under {p})" for p in others)
    return "; ".join(lines) + twins


def unknown_path(served: Mapping[str, Mapping[str, object]], prefixes: tuple[str, ...]):
    message = f"This proxy serves only: {listing(served, prefixes)}."

    async def not_found(request: web.Request) -> web.Response:
        shown = request.path if request.path.startswith("/") else "(not a path)"
        error = ProxyError(404, f"Unknown request URL: {request.method} {shown[:200]}. {message}",
                           code="unknown_url")
        return error.to_response({"x-request-id": new_request_id()})

    return not_found
