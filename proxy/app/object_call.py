"""One request to the files and batches API: authenticated, admitted by the policies that apply to it, answered
in OpenAI's shape whatever fails, counted in the metrics and traced as a SERVER span named by its route.
proxy/app/provider_objects.py says where these calls go and who may see what."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from policies.base import CONTINUE, Reject
from policies.chain import PolicyChain
from proxy.app.errors import ProxyError, new_request_id
from proxy.app.provider_objects import ProviderObjects, parse
from proxy.pipeline.context import RequestContext
from proxy.routing.router import Route
from proxy.telemetry.logs import emit
from proxy.telemetry.request_log import log_request
from proxy.telemetry.semconv import (
    ERROR_TYPE, HTTP_REQUEST_METHOD, HTTP_RESPONSE_STATUS_CODE, HTTP_ROUTE, REQUEST_ID, URL_PATH,
)
from proxy.telemetry.tracing import STATUS_ERROR
from proxy.upstream.http1 import Response

if TYPE_CHECKING:
    from policies.identity import Identity

# What the policies and the metrics see as the model: none, and the operation as the label.
_ROUTES = {name: Route(name, None, (), label=name) for name in ("files", "batches")}


class Call:
    """One file or batch request: authenticated, admitted by the policies that apply, ended by `finish`."""

    __slots__ = ("objects", "chain", "identity", "ctx", "policies", "request_id")

    def __init__(self, objects: ProviderObjects, chain: PolicyChain, operation: str, span) -> None:
        self.objects = objects
        self.chain = chain
        self.identity: "Identity | None" = None
        self.policies: PolicyChain | None = None
        self.request_id = new_request_id()
        self.ctx = RequestContext(self.request_id, operation, _ROUTES[operation], {}, False)
        self.ctx.span = span

    async def begin(self, request: web.Request) -> None:
        """Raises the 401 of a missing or wrong proxy key, or the policies' rejection."""
        self.identity = self.ctx.identity = self.chain.authenticate(request.headers)
        if self.identity is not None and self.ctx.span is not None:
            self.ctx.span.attrs["groq_proxy.key_id"] = self.identity.key
        policies = self.objects.policies_for(self.chain)
        if policies is None:
            return
        ctx = self.ctx
        policies.begin(ctx, request.headers)
        self.policies = policies
        decision = await policies.on_request(ctx)
        if decision is not CONTINUE and isinstance(decision, Reject):
            raise decision.error()

    def headers(self) -> dict[str, str]:
        if self.ctx.policy is not None and self.ctx.policy.headers:
            return {"x-request-id": self.request_id, **self.ctx.policy.headers}
        return {"x-request-id": self.request_id}

    async def finish(self) -> None:
        if self.policies is not None:
            await self.policies.after(self.ctx)

    # --- answers --------------------------------------------------------------------------------------------

    def json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json",
                            headers=self.headers())

    def passed(self, response: Response, body: bytes) -> web.Response:
        """The provider's answer as it is (with its retry-after and rate-limit headers), unless it is about the
        proxy's own key (401, 403), which the client can do nothing about: that is a 502; so is a 5xx that is
        not OpenAI's JSON (a gateway's HTML page), as for chat."""
        status = response.status
        if status in (401, 403, 407):
            raise ProxyError(502, f"The batch provider refused the proxy's credentials ({status}).",
                             type="server_error", code="upstream_auth_failed")
        if status >= 500 and not _error_object(body):
            raise ProxyError(502, f"The batch provider answered {status} without an error object.",
                             type="server_error", code="upstream_error")
        headers = {name: response.headers[name] for name in _PASSED_ON if name in response.headers}
        headers["Content-Type"] = response.headers.get("content-type", "application/json")
        headers.update(self.headers())  # the proxy's own x-ratelimit-* replace the provider's
        return web.Response(status=status, body=body, headers=headers)

    def list_page(self, page: dict, data: list, has_more: bool) -> web.Response:
        out = {**page, "data": data}
        if "has_more" in page or has_more:
            out["has_more"] = has_more
        if "first_id" in page or "last_id" in page:
            out["first_id"] = data[0].get("id") if data else None
            out["last_id"] = data[-1].get("id") if data else None
        return self.json(out)


_PASSED_ON = ("retry-after", "retry-after-ms", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
              "x-ratelimit-reset-requests")


def _error_object(body: bytes) -> bool:
    obj = parse(body)
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict)


async def answer(request: web.Request, operation: str, work) -> web.StreamResponse:
    """Runs `work(call)` for one file or batch request, turns every ProxyError into its answer, and counts
    it: `groq_proxy_requests_total` and the duration with `virtual_model` = files or batches, and a SERVER span
    named by the route (`GET /v1/files/{file_id}`), never by an id."""
    from proxy.app.server import STATE  # the app module imports this one for its routes

    started = time.perf_counter()
    state = request.app[STATE]
    objects = state.objects
    if objects is None or objects.config is not state.config:  # made on first use, again after a reload
        objects = state.objects = ProviderObjects(state.config, state.upstreams)
    observer = state.observer
    span = None
    if observer.tracer is not None:
        route = request.match_info.route.resource.canonical  # one of the proxy's own few routes
        span = observer.tracer.start_request(request.headers.get("traceparent"), f"{request.method} {route}", {
            HTTP_REQUEST_METHOD: request.method, HTTP_ROUTE: route, URL_PATH: request.path})
    generation = state.generation  # its policy chain and store stay open until this call ends (a reload)
    call = Call(objects, generation.pipeline.policies, operation, span)
    status = 499  # stays so only when the handler is cancelled (the client went away)
    generation.enter()
    try:
        try:
            try:
                await call.begin(request)
                response = await work(call)
            finally:
                await call.finish()
        except ProxyError as error:
            response = error.to_response(call.headers())
        except Exception:
            emit(logging.ERROR, "internal_error", request_id=call.request_id, exc_info=True)
            error = ProxyError(500, f"Internal error in the proxy (request {call.request_id}).", type="server_error")
            response = error.to_response(call.headers())
        status = response.status
        return response
    finally:
        generation.leave()
        _ended(observer, call, span, status, started)


def _ended(observer, call: Call, span, status: int, started: float) -> None:
    log_request(call.ctx, request_id=call.request_id, operation=call.ctx.operation, status=status,
                ms=(time.perf_counter() - started) * 1000.0, category=None, cache=None, record_content=False)
    if observer.metrics is not None:
        key = (call.ctx.operation, "none", str(status))
        observer.metrics.requests.inc(key)
        observer.metrics.duration.observe(key, time.perf_counter() - started)
    if span is not None:
        span.attrs[HTTP_RESPONSE_STATUS_CODE] = status
        span.attrs[REQUEST_ID] = call.request_id
        if status >= 500:
            span.status = STATUS_ERROR
            span.attrs[ERROR_TYPE] = str(status)
        observer.tracer.end(span)
