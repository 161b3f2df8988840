"""The admin API: reload, the running config, usage, the model benchmark (and the cache's invalidation).

Every route is in `ADMIN_ROUTES`, each handler behind `admin_only` (proxy/app/admin_auth.py): off without an
admin key. They are served on the public port, or, with `server.admin_port`, only on that port, by an app of
their own that shares the proxy's state (the public port then answers 404 for /admin/*, so a load balancer
that exposes it exposes no admin route even to a leaked admin key).
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from proxy.admin.config_view import render
from proxy.app.admin_auth import admin_only
from proxy.app.cache_routes import admin_cache_delete
from proxy.app.errors import ProxyError, new_request_id
from proxy.app.listen import ListenError, url_of
from proxy.app.policy_routes import admin_usage
from proxy.app.reload import ReloadRefused
from proxy.app.workers import RELOAD_SIBLINGS
from proxy.app.validation import read_json
from proxy.routing.latency import default_thresholds
from proxy.telemetry.logs import emit


def _id() -> dict[str, str]:
    return {"x-request-id": new_request_id()}


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=_id())


@admin_only
async def admin_reload(request: web.Request) -> web.Response:
    """POST /admin/reload: what SIGHUP does, answered: 200 with the new generation, or 400 with the reason the
    file was refused (the running config stays)."""
    from proxy.app.server import STATE

    try:
        result = await request.app[STATE].reloads.reload("admin")
    except ReloadRefused as exc:
        return ProxyError(400, f"The config was not reloaded (the running config stays): {exc}",
                          code="config_invalid").to_response(_id())
    reload_siblings = request.app.get(RELOAD_SIBLINGS)
    if reload_siblings is not None:  # --workers: answered once every worker runs the new config
        result["workers"] = await reload_siblings()
        refused = {i: r.get("error") for i, r in result["workers"].items() if r.get("status") == "refused"}
        if refused:
            return ProxyError(500, "The config was reloaded on this worker but refused by worker(s) "
                              + "; ".join(f"{i}: {reason}" for i, reason in refused.items()),
                              type="server_error", code="config_reload_partial").to_response(_id())
    return _json(result)


@admin_only
async def admin_config(request: web.Request) -> web.Response:
    """GET /admin/config: the running config, secrets masked."""
    from proxy.app.server import STATE

    state = request.app[STATE]
    return web.Response(body=render(state.config), content_type="application/json", headers=_id())


@admin_only
async def admin_benchmark(request: web.Request) -> web.Response:
    """POST /admin/benchmark: the model benchmark, run through this proxy's public port over loopback."""
    from proxy.admin.model_bench import BenchRequest, run_benchmark
    from proxy.app.server import STATE

    state = request.app[STATE]
    try:
        req = BenchRequest.from_body(await read_json(request, 1 << 20))
        vm = state.config.models.get(req.model)
        state.router.resolve(req.model)
    except ProxyError as error:
        return error.to_response(_id())
    thresholds = vm.latency if vm else default_thresholds(req.model)
    report = await run_benchmark(_public_url(request, state), req, thresholds)
    return _json(report)


def _public_url(request: web.Request, state) -> str:
    """Where the proxy answers chat: this connection's own address, unless this is the admin port."""
    if state.config.server.admin_port is not None and state.public_url is not None:
        return state.public_url
    server = state.config.server
    if server.admin_port is not None:
        host, port = server.host, server.port
    else:
        host, port = request.transport.get_extra_info("sockname")[:2]
    return url_of("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)


ADMIN_ROUTES = [
    ("/admin/benchmark", "POST", admin_benchmark),
    ("/admin/usage", "GET", admin_usage),
    ("/admin/reload", "POST", admin_reload),
    ("/admin/config", "GET", admin_config),
    ("/admin/cache", "DELETE", admin_only(admin_cache_delete)),
]


async def admin_listener(app: web.Application):
    """With `server.admin_port`: the admin routes on their own port, for as long as the app runs."""
    from proxy.app.server import STATE, add_routes, new_application

    state = app[STATE]
    server = state.config.server
    if server.admin_port is None:
        yield
        return
    admin = new_application(server)
    admin[STATE] = state
    add_routes(admin, ADMIN_ROUTES)
    runner = web.AppRunner(admin, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        # With `server.workers` > 1 (the workers branch) every worker listens on the admin port as on the public one.
        reuse_port = getattr(server, "workers", 1) > 1 or None
        await web.TCPSite(runner, server.host, server.admin_port, reuse_port=reuse_port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ListenError(f"server.admin_port: cannot listen on {url_of(server.host, server.admin_port)}: "
                          f"{reason}") from None
    state.admin_url = url_of(server.host, runner.addresses[0][1])
    emit(logging.INFO, "admin_listening", url=state.admin_url)
    yield
    await runner.cleanup()
