"""The aiohttp application: routes, the handlers that read a request into a context, and the lifecycle of
what the app owns (the upstream session, the embedded simulator)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from aiohttp import web, web_urldispatcher

from proxy.app.config import Config
from proxy.app.cache_routes import admin_cache_delete
from proxy.app.policy_routes import admin_usage, close_chain, my_usage, open_chain
from proxy.pipeline.context import RequestContext
from proxy.routing.cooldown import Cooldowns
from proxy.app import http_errors
from proxy.app.errors import ProxyError, new_request_id
from proxy.routing.latency import default_thresholds
from proxy.telemetry.logs import emit, register_secrets
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.observe import Observer
from proxy.telemetry.otlp import Encoder, Exporter
from proxy.pipeline.pipeline import Pipeline
from proxy.routing.router import Router
from proxy.telemetry.tracing import Tracer
from proxy.upstream.providers import Upstreams
from proxy.app.validation import READ_TIMEOUT, read_json, validate_chat, validate_embeddings

if TYPE_CHECKING:
    from proxy.sim.simulator import SimulatorConfig

PREFIXES = ("/v1", "/openai/v1")


@dataclass
class ProxyState:
    """What the running app holds; filled in on start-up (the simulator may change the provider URLs)."""

    config: Config
    simulate: bool = False
    simulator_config: "SimulatorConfig | None" = None
    router: Router | None = None
    pipeline: Pipeline | None = None
    upstreams: Upstreams | None = None
    observer: Observer | None = None
    exporter: Exporter | None = None  # or proxy.telemetry.sdk.SdkExporter, which has the same surface
    models: list = field(default_factory=list)
    models_body: bytes = b""


STATE = web.AppKey("state", ProxyState)


_request_id = new_request_id


def _id_header() -> dict[str, str]:
    """Every response names its request. The proxy makes the id itself and never echoes a client's
    `x-request-id`: the id keys our logs and traces, so it must be unique and cannot be a client's text."""
    return {"x-request-id": _request_id()}


async def _answer(request: web.Request, operation: str, validate) -> web.StreamResponse:
    started = time.perf_counter()
    state = request.app[STATE]
    observer = state.observer
    span = observer.request_started(request, operation)
    request_id = _request_id()
    ctx = None
    status = 499  # stays so only when the handler is cancelled (the client went away)
    try:
        try:
            identity = state.pipeline.policies.authenticate(request.headers)  # [auth]: 401 before the body is read
            body = await read_json(request, state.config.server.max_body_bytes)
            route = state.router.resolve(validate(body))
            ctx = RequestContext(
                request_id, operation, route, body, operation == "chat" and body.get("stream") is True, started
            )
            ctx.span = span
            ctx.identity = identity
            response = await state.pipeline.handle(request, ctx)
        except ProxyError as error:
            response = error.to_response({"x-request-id": request_id, **state.pipeline.extra_headers})
        except Exception:
            emit(logging.ERROR, "internal_error", request_id=request_id, exc_info=True)
            error = ProxyError(500, f"Internal error in the proxy (request {request_id}).", type="server_error")
            response = error.to_response({"x-request-id": request_id})
        status = response.status
        return response
    finally:
        observer.request_ended(span, ctx, status, started)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "chat", validate_chat)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "embeddings", validate_embeddings)


async def list_models(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].models_body, content_type="application/json", headers=_id_header())


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: what `client.models.retrieve` asks; ids with a slash arrive as the path tail."""
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    for entry in state.models:
        if entry["id"] == model_id:
            entry = {**entry, **_observed_fields(state, model_id)}
            return web.Response(body=orjson.dumps(entry), content_type="application/json", headers=_id_header())
    return ProxyError(404, f"The model `{model_id}` does not exist.", param="model",
                      code="model_not_found").to_response(_id_header())


def _observed_fields(state: ProxyState, model_id: str) -> dict:
    """Extra fields of GET /v1/models/{id}: the observed latency the router orders chains by (per model of a
    virtual model's chain), so an operator sees what the router sees."""
    if state.pipeline is None:
        return {}
    observed = state.pipeline.routing.observed
    vm = state.config.models.get(model_id)
    if vm is not None:
        return {"chain": [t.key for t in vm.chain],
                "observed_latency": {t.key: observed.view(t.key) for t in vm.chain}}
    route = state.router.resolve(model_id)
    if len(route.chain) == 1:
        view = observed.view(route.chain[0].key)
        if view is not None:
            return {"observed_latency": view}
    return {}


async def metrics(request: web.Request) -> web.Response:
    observer = request.app[STATE].observer
    if observer is None or observer.metrics is None:
        return ProxyError(404, "Metrics are turned off (telemetry.metrics = false).",
                          code="unknown_url").to_response(_id_header())
    state = request.app[STATE]
    exporter = state.exporter
    observed = state.pipeline.routing.observed if state.pipeline is not None else None
    return web.Response(body=observer.metrics.render(exporter, observed),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8", **_id_header()})


async def admin_benchmark(request: web.Request) -> web.Response:
    """POST /admin/benchmark: the model benchmark, run through this proxy over loopback."""
    from proxy.admin.model_bench import BenchRequest, run_benchmark

    state = request.app[STATE]
    key = state.config.server.admin_key
    if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
        return ProxyError(401, "The admin endpoints need the admin key (server.admin_key_env) as a Bearer token.",
                          type="authentication_error", code="invalid_api_key").to_response(_id_header())
    try:
        req = BenchRequest.from_body(await read_json(request, 1 << 20))
        vm = state.config.models.get(req.model)
        state.router.resolve(req.model)
    except ProxyError as error:
        return error.to_response(_id_header())
    host, port = request.transport.get_extra_info("sockname")[:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    thresholds = vm.latency if vm else default_thresholds(req.model)
    report = await run_benchmark(f"http://{'[' + host + ']' if ':' in host else host}:{port}", req, thresholds)
    return web.Response(body=orjson.dumps(report), content_type="application/json", headers=_id_header())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=_id_header())


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = state.pipeline is not None and state.upstreams is not None and state.upstreams.ready
    body = {"status": "ready" if ready else "starting"}
    if ready and state.pipeline.policies.store is not None:  # a store that is down degrades, it does not stop
        body["store"] = state.pipeline.policies.store.status()
    return web.json_response(body, status=200 if ready else 503, headers=_id_header())


async def not_found(request: web.Request) -> web.Response:
    return ProxyError(404, f"Unknown path {request.path}.", code="unknown_url").to_response(_id_header())


def _method_not_allowed(allowed: str):
    async def handler(request: web.Request) -> web.Response:
        error = ProxyError(
            405, f"{request.method} is not allowed on {request.path}; use {allowed}.", code="method_not_allowed"
        )
        return error.to_response({"Allow": allowed, **_id_header()})

    return handler


class _NotAPath(web_urldispatcher.PlainResource):
    """Request targets that are not a path (`OPTIONS *`, `CONNECT host:443` from a client that takes the proxy
    for a forward proxy): no route matches them, not even `/{tail:.*}`, and aiohttp would answer its own text
    404 without x-request-id. Indexed under `/`, which the router tries last, so it costs real paths nothing."""

    def __init__(self) -> None:
        super().__init__("")

    def _match(self, path: str) -> dict[str, str] | None:
        return None if path.startswith("/") else {}


def models_list(config: Config) -> list[dict]:
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "groq-proxy"} for name in config.models]
    if config.routing.auto_model is not None:  # the name that lets the proxy choose the tier
        data.insert(0, {"id": config.routing.auto_model, "object": "model", "created": created,
                        "owned_by": "groq-proxy"})
    for target in config.real_targets():
        model_id = target.model if target.provider == config.default_provider else target.key
        data.append({"id": model_id, "object": "model", "created": created, "owned_by": target.provider})
    return data


async def _lifecycle(app: web.Application):
    state = app[STATE]
    sim_runner = None
    if state.simulate:
        from proxy.sim.simulator import SimulatorConfig, start_simulator

        sim_runner, url = await start_simulator(state.simulator_config or SimulatorConfig())
        state.config = state.config.with_base_urls(url)
        emit(
            logging.WARNING,
            "simulated_upstream",
            message="No Groq key and no config: answering from the built-in simulator, not from Groq. "
            "Set GROQ_API_KEY (or give --config) to use Groq.",
            simulator=url,
        )
    config = state.config
    register_secrets(*(key for p in config.providers.values() for key in (p.api_keys or (p.api_key,))))
    upstreams = Upstreams(config)
    await upstreams.open()
    state.upstreams = upstreams
    state.router = Router(config)
    state.models = models_list(config)
    state.models_body = orjson.dumps({"object": "list", "data": state.models})
    telemetry = config.telemetry
    tracer = Tracer(telemetry.sample_ratio, parent_based=telemetry.parent_based) if telemetry.tracing else None
    if tracer is not None and telemetry.exporter == "sdk":
        from proxy.telemetry.sdk import SdkExporter  # the SDK is imported only by those who chose it

        state.exporter = SdkExporter(tracer, telemetry.service_name, telemetry.sdk_exporters,
                                     interval_s=telemetry.export_interval_s)
        state.exporter.start()
    elif tracer is not None:
        state.exporter = Exporter(tracer, Encoder(telemetry.service_name), telemetry.traces_url,
                                  dict(telemetry.headers), interval_s=telemetry.export_interval_s)
        state.exporter.start()
    state.observer = Observer(config, tracer, ProxyMetrics() if telemetry.metrics else None)
    chain = await open_chain(config, state.observer.metrics)
    chain.record = state.observer.decision
    state.pipeline = Pipeline(config, upstreams, Cooldowns(config.routing), chain, state.observer,
                              router=state.router)
    yield
    state.pipeline = None
    await close_chain(chain)
    if state.exporter is not None:
        await state.exporter.close()
    await upstreams.close()
    if sim_runner is not None:
        await sim_runner.cleanup()


def build_app(config: Config, *, simulate: bool = False, simulator_config=None) -> web.Application:
    server = config.server
    http_errors.install()
    handler_args = {
        # A client that hangs up cancels its handler (aiohttp >= 3.9 no longer does by default), so the
        # upstream call in flight stops with it; aiohttp reads the flag only when a connection is lost.
        "handler_cancellation": True,
        "logger": http_errors.HTTP_LOGGER,  # marks the app whose parse errors get the OpenAI shape
        # aiohttp closes a connection that has no whole request head this long after it opened or after
        # its last response (so also the idle keep-alive time); read_json applies it to a stalled body.
        "keepalive_timeout": server.request_read_timeout_s,
        "max_line_size": server.max_url_bytes,
        "max_field_size": server.max_header_bytes,
        "max_headers": server.max_headers,
    }
    app = web.Application(client_max_size=server.max_body_bytes, handler_args=handler_args)
    app[STATE] = ProxyState(config=config, simulate=simulate, simulator_config=simulator_config)
    app[READ_TIMEOUT] = server.request_read_timeout_s
    app.cleanup_ctx.append(_lifecycle)
    routes = [("/healthz", "GET", healthz), ("/readyz", "GET", readyz), ("/metrics", "GET", metrics),
              ("/admin/benchmark", "POST", admin_benchmark), ("/admin/usage", "GET", admin_usage),
              ("/admin/cache", "DELETE", admin_cache_delete)]
    for prefix in PREFIXES:
        routes += [
            (prefix + "/chat/completions", "POST", chat_completions),
            (prefix + "/embeddings", "POST", embeddings),
            (prefix + "/models", "GET", list_models),
            (prefix + "/models/{model_id:.+}", "GET", get_model),
            (prefix + "/usage", "GET", my_usage),
        ]
    for path, method, handler in routes:
        if method == "GET":
            app.router.add_get(path, handler)  # HEAD too
        else:
            app.router.add_route(method, path, handler)
        app.router.add_route("*", path, _method_not_allowed(method))
    app.router.add_route("*", "/{tail:.*}", not_found)
    not_a_path = _NotAPath()
    app.router.register_resource(not_a_path)
    not_a_path.add_route("*", not_found)
    return app
