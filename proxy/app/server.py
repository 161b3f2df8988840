"""The aiohttp application: routes, the handlers that read a request into a context, and the lifecycle of
what the app owns (the upstream session, the embedded simulator)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web, web_urldispatcher

from proxy.admin.status import status_routes
from proxy.app import batches_api, files_api
from proxy.app.admin_routes import ADMIN_ROUTES, admin_listener
from proxy.app.config import Config
from proxy.app.drain import DRAIN, Drain
from proxy.app.endpoints import unknown_path
from proxy.app.policy_routes import my_usage
from proxy.app.reload import Generation, Reloads
from proxy.pipeline.context import RequestContext
from proxy.app import http_errors
from proxy.app.errors import ProxyError, new_request_id
from proxy.telemetry.logs import emit
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.observe import Observer
from proxy.telemetry.request_log import cache_result
from proxy.telemetry.otlp import Encoder, Exporter
from proxy.pipeline.pipeline import Pipeline
from proxy.pipeline.whole_answer import WholeAnswer
from proxy.routing.router import Router
from proxy.telemetry.tracing import Tracer
from proxy.telemetry.worker_metrics import WORKER_METRICS
from proxy.upstream.providers import Upstreams
from proxy.app.validation import READ_TIMEOUT, read_json, validate_chat, validate_embeddings
from proxy.app.responses_api import read_responses, validate_responses
from proxy.app.audio_api import (read_speech, read_transcription, read_translation, validate_form,
                                 validate_speech)

if TYPE_CHECKING:
    from proxy.sim.simulator import SimulatorConfig

PREFIXES = ("/v1", "/openai/v1")


@dataclass
class ProxyState:
    """What the running app holds; filled in on start-up (the simulator may change the provider URLs).
    `config`, `router`, `pipeline`, `observer` and the model list are the current generation's (proxy/app/reload.py),
    all set at once by `install`; a request handler reads `generation` once and keeps it to its end."""

    config: Config
    simulate: bool = False
    simulator_config: "SimulatorConfig | None" = None
    simulator_url: str | None = None  # a --workers supervisor's simulator, shared: none is started here
    router: Router | None = None
    pipeline: Pipeline | None = None
    upstreams: Upstreams | None = None
    observer: Observer | None = None
    exporter: Exporter | None = None  # or proxy.telemetry.sdk.SdkExporter, which has the same surface
    models: list = field(default_factory=list)
    models_body: bytes = b""
    objects: Any = None  # proxy.app.provider_objects.ProviderObjects: files and batches, made on first use
    generation: Generation | None = None
    reloads: Reloads | None = None
    public_url: str | None = None  # where the public port listens, once it does (the CLI's banner)
    admin_url: str | None = None  # where server.admin_port listens
    server_overrides: dict = field(default_factory=dict)  # [server] keys the command line set: a reload keeps them
    drain: Drain | None = None  # app[DRAIN], kept here too: a request handler reads the state once

    def install(self, generation: Generation) -> None:
        self.generation = generation
        self.config = generation.config
        self.router = generation.router
        self.pipeline = generation.pipeline
        self.upstreams = generation.pipeline.upstreams  # a reload's providers, over the one pooled client
        self.observer = generation.pipeline.observer
        self.models = generation.models
        self.models_body = generation.models_body


STATE = web.AppKey("state", ProxyState)


_request_id = new_request_id


def _id_header() -> dict[str, str]:
    """Every response names its request. The proxy makes the id itself and never echoes a client's
    `x-request-id`: the id keys our logs and traces, so it must be unique and cannot be a client's text."""
    return {"x-request-id": _request_id()}


async def _answer(request: web.Request, operation: str, validate, read=None) -> web.StreamResponse:
    """One request through the pipeline. `read(request, config)` reads the body of an endpoint other than chat
    and embeddings, and returns it with its operation (proxy/pipeline/operation.py)."""
    started = time.perf_counter()
    state = request.app[STATE]
    generation = state.generation  # this request's config to its end, whatever a reload does
    pipeline = generation.pipeline
    observer = pipeline.observer
    span = observer.request_started(request, operation)
    request_id = _request_id()
    ctx = None
    status = 499  # stays so only when the handler is cancelled (the client went away)
    cache = None
    drain = state.drain
    task = drain.enter(request)  # before the body: an upload under way at a SIGTERM is waited for too
    generation.enter()
    try:
        try:
            identity = pipeline.policies.authenticate(request.headers)  # [auth]: 401 before the body is read
            if read is None:
                op = None
                body = await read_json(request, generation.config.server.max_body_bytes)
            else:
                body, op = await read(request, generation.config)
            route = generation.router.resolve(validate(body))
            if identity is not None and op is not None and op.owned:
                await op.check(pipeline.policies, identity, body)
            ctx = RequestContext(
                request_id, operation, route, body,
                body.get("stream") is True and (operation == "chat" or op is not None and op.sse), started,
            )
            ctx.op = op
            ctx.span = span
            ctx.identity = identity
            drain.attach(task, ctx)
            response = await pipeline.handle(request, ctx)
        except asyncio.CancelledError:
            if not drain.was_cut(task):
                raise
            response = await drain.cut_response(ctx, request_id)
        except ProxyError as error:
            response = error.to_answer({"x-request-id": request_id, **pipeline.extra_headers})
        except Exception:
            emit(logging.ERROR, "internal_error", request_id=request_id, exc_info=True)
            error = ProxyError(500, f"Internal error in the proxy (request {request_id}).", type="server_error")
            response = error.to_response({"x-request-id": request_id})
        status = response.status
        cache = cache_result(response.headers)
        if response.__class__ is WholeAnswer:  # out before the bookkeeping below, which the client need not wait for
            try:
                response.send(request)
            except ConnectionResetError:  # the client left: aiohttp closes the connection (keep_alive is False)
                pass
        return response
    finally:
        drain.leave(task)
        generation.leave()
        observer.request_ended(span, ctx, status, started, request_id, operation, cache)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "chat", validate_chat)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "embeddings", validate_embeddings)


async def responses(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "responses", validate_responses, read_responses)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "transcription", validate_form, read_transcription)


async def translations(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "translation", validate_form, read_translation)


async def speech(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "speech", validate_speech, read_speech)


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


def render_metrics(app: web.Application) -> bytes:
    """This process's own exposition."""
    state = app[STATE]
    observed = state.pipeline.routing.observed if state.pipeline is not None else None
    return state.observer.metrics.render(state.exporter, observed)


async def metrics(request: web.Request) -> web.Response:
    observer = request.app[STATE].observer
    if observer is None or observer.metrics is None:
        return ProxyError(404, "Metrics are turned off (telemetry.metrics = false).",
                          code="unknown_url").to_response(_id_header())
    body = render_metrics(request.app)
    siblings = request.app.get(WORKER_METRICS)
    if siblings is not None:  # --workers N: this scrape covers every worker (proxy/telemetry/worker_metrics.py)
        body = await siblings.merged(body)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                            **_id_header()})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=_id_header())


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.app[DRAIN].draining:  # a SIGTERM: the load balancer is to stop sending requests here
        return web.json_response({"status": "draining"}, status=503, headers=_id_header())
    ready = state.pipeline is not None and state.upstreams is not None and state.upstreams.ready
    body = {"status": "ready" if ready else "starting"}
    if ready and state.pipeline.policies.store is not None:  # a store that is down degrades, it does not stop
        body["store"] = state.pipeline.policies.store.status()
    return web.json_response(body, status=200 if ready else 503, headers=_id_header())


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
    simulator_url = state.simulator_url  # a --workers supervisor's simulator, shared: none is started here
    if simulator_url is not None:
        state.config = state.config.with_base_urls(simulator_url)
    elif state.simulate:
        from proxy.sim.simulator import SimulatorConfig, start_simulator

        sim_runner, simulator_url = await start_simulator(state.simulator_config or SimulatorConfig())
        state.config = state.config.with_base_urls(simulator_url)
        emit(
            logging.WARNING,
            "simulated_upstream",
            message="Answering from the built-in simulator, not from Groq: --simulate was given, or neither a "
            "config nor GROQ_API_KEY. Set GROQ_API_KEY (or give --config), without --simulate, to use Groq.",
            simulator=simulator_url,
        )
    config = state.config
    upstreams = Upstreams(config)
    await upstreams.open()
    state.upstreams = upstreams
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
    state.reloads = Reloads(state, upstreams, tracer, ProxyMetrics() if telemetry.metrics else None, models_list,
                            simulator_url)
    await state.reloads.start(config)
    state.reloads.handle_sighup()
    yield
    state.pipeline = None
    await state.reloads.close()
    if state.exporter is not None:
        await state.exporter.close()
    await upstreams.close()
    if sim_runner is not None:
        await sim_runner.cleanup()


def build_app(config: Config, *, simulate: bool = False, simulator_config=None,
              simulator_url: str | None = None) -> web.Application:
    server = config.server
    app = new_application(server)
    app[STATE] = ProxyState(config=config, simulate=simulate, simulator_config=simulator_config,
                            simulator_url=simulator_url)
    app[DRAIN] = app[STATE].drain = Drain(server.drain_s, server.drain_timeout_s)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(admin_listener)
    routes = [("/healthz", "GET", healthz), ("/readyz", "GET", readyz), ("/metrics", "GET", metrics),
              *status_routes(app)]
    if server.admin_port is None:  # else only on the admin port (proxy/app/admin_routes.py)
        routes += ADMIN_ROUTES
    for prefix in PREFIXES:
        routes += [
            (prefix + "/chat/completions", "POST", chat_completions),
            (prefix + "/embeddings", "POST", embeddings),
            (prefix + "/responses", "POST", responses),
            (prefix + "/audio/transcriptions", "POST", transcriptions),
            (prefix + "/audio/translations", "POST", translations),
            (prefix + "/audio/speech", "POST", speech),
            (prefix + "/models", "GET", list_models),
            (prefix + "/models/{model_id:.+}", "GET", get_model),
            (prefix + "/usage", "GET", my_usage),
            (prefix + "/files", "POST", files_api.upload),
            (prefix + "/files", "GET", files_api.list_files),
            (prefix + "/files/{file_id}", "GET", files_api.retrieve),
            (prefix + "/files/{file_id}", "DELETE", files_api.delete),
            (prefix + "/files/{file_id}/content", "GET", files_api.content),
            (prefix + "/batches", "POST", batches_api.create),
            (prefix + "/batches", "GET", batches_api.list_batches),
            (prefix + "/batches/{batch_id}", "GET", batches_api.retrieve),
            (prefix + "/batches/{batch_id}/cancel", "POST", batches_api.cancel),
        ]
    add_routes(app, routes)
    return app


def new_application(server) -> web.Application:
    """An aiohttp app with the [server] limits: the public one, and the admin port's."""
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
    app[READ_TIMEOUT] = server.request_read_timeout_s
    return app


def add_routes(app: web.Application, routes: list) -> None:
    """`routes` (path, method, handler), each with its 405, then a 404 in OpenAI's shape listing them for every
    other target."""
    served: dict[str, dict] = {}  # path -> method -> handler: a path may take several methods
    for path, method, handler in routes:
        served.setdefault(path, {})[method] = handler
    for path, handlers in served.items():
        for method, handler in handlers.items():
            if method == "GET":
                app.router.add_get(path, handler)  # HEAD too
            else:
                app.router.add_route(method, path, handler)
        app.router.add_route("*", path, _method_not_allowed(", ".join(handlers)))
    # Anything else is answered here, listing what is served: no other path reaches a provider with its key.
    not_found_listing = unknown_path(served, PREFIXES)
    app.router.add_route("*", "/{tail:.*}", not_found_listing)
    not_a_path = _NotAPath()
    app.router.register_resource(not_a_path)
    not_a_path.add_route("*", not_found_listing)
