"""Files and batches: objects the provider keeps for the caller, passed to one provider with one key, and hidden
from every proxy key but the one that made them.

Why one key: a file uploaded with one Groq key may be invisible to another (keys belong to projects), so a
batch created with the next key of a pool could not find its input file. Every file and batch call goes to
`[routing] batch_provider` (the first provider by default) with that provider's first key, always; the pool's
round robin and key rest do not apply here.

Who owns what: with `[auth]`, each file and batch id the provider returns is recorded in the policy store
(`policies.stores.base.Owners`: the memory or the Redis store of `[store]`, which `[auth]` always opens, with a
TTL as long as the object lives) against
the proxy key's id. Lists are filtered to the caller's own; a retrieval, a download, a delete or a cancel of
another key's id answers exactly as a missing id does (404, never a 403 that would say it exists); a batch
may only read the caller's own input file. A batch's output and error files become its owner's when the
batch is seen with them. When the store cannot answer, these calls fail closed (503): ownership unknown is
never guessed open. Without `[auth]` there is one caller and everything passes as it is.

Which policies: request-rate limits (`rate_limit`, its requests per minute; its tokens count none here) and
concurrency that is not per model apply, through the same store counters as chat; token budgets, request
budgets and policies of one's own do not (a file is not tokens, and a batch's tokens are billed by the batch).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode
from weakref import WeakKeyDictionary

import orjson
from aiohttp import web

from policies.base import CONTINUE, Reject
from policies.chain import PolicyChain
from policies.concurrency import Concurrency
from policies.rate_limit import RateLimit
from policies.stores.base import StoreUnavailable
from proxy.app.errors import ProxyError, new_request_id
from proxy.pipeline.context import RequestContext
from proxy.routing.router import Route
from proxy.telemetry.logs import emit
from proxy.telemetry.semconv import (
    ERROR_TYPE, HTTP_REQUEST_METHOD, HTTP_RESPONSE_STATUS_CODE, HTTP_ROUTE, REQUEST_ID, URL_PATH,
)
from proxy.telemetry.tracing import STATUS_ERROR
from proxy.upstream.http1 import Response, UpstreamError, split_url

if TYPE_CHECKING:
    from policies.identity import Identity
    from proxy.app.config import Config
    from proxy.upstream.providers import Upstreams

OWNER_TTL_S = 30 * 86400.0  # how long an owner is remembered when the object says nothing of its expiry
ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what a file or batch id may look like; anything else is not found
LIST_QUERY = {"after": ID, "limit": re.compile(r"[1-9][0-9]{0,4}"), "order": re.compile(r"asc|desc"),
              "purpose": re.compile(r"[a-z_]{1,32}")}
# What the policies and the metrics see as the model: none, and the operation as the label.
_ROUTES = {name: Route(name, None, (), label=name) for name in ("files", "batches")}


def not_found(kind: str, object_id: str, param: str | None = None, status: int = 404) -> ProxyError:
    """What a missing id and another key's id both answer."""
    name = "File" if kind == "file" else "Batch"
    return ProxyError(status, f"No such {name} object: {object_id[:128]}", param=param,
                      code=f"{kind}_not_found")


class ProviderObjects:
    """The batch provider, its key, the ownership records and the policies that apply; one per app."""

    def __init__(self, config: "Config", upstreams: "Upstreams") -> None:
        name = config.routing.batch_provider or config.default_provider
        self.config = config
        self.provider = upstreams.providers[name]
        self.upstreams = upstreams
        _, self.base, self.query = split_url(config.providers[name].base_url)
        headers = dict(self.provider.key_headers[0])  # the first key, always (see the module's docstring)
        headers.pop("Content-Type", None)
        self.headers = headers
        self.max_file_bytes = config.server.max_file_bytes
        self._chains: WeakKeyDictionary = WeakKeyDictionary()  # the app's chain -> the chain for these calls

    # --- the upstream ---------------------------------------------------------------------------------------

    def path(self, tail: str, query: dict[str, str] | None = None) -> str:
        q = self.query
        if query:
            q = (q + "&" if q else "?") + urlencode(query)
        return f"{self.base}{tail}{q}"

    async def call(self, method: str, tail: str, *, body: bytes = b"", json: bool = False,
                   query: dict[str, str] | None = None) -> Response:
        """One request to the batch provider; returns once its head has arrived. Failures to reach it are
        a 502 (504 past the provider's timeout_s), said in OpenAI's shape."""
        headers = {**self.headers, "Content-Type": "application/json"} if json else self.headers
        client = self.upstreams.client
        provider = self.provider
        try:
            async with asyncio.timeout(provider.total_s):
                return await client.request(provider.origin, method, self.path(tail, query), headers, body,
                                            provider.connect_s)
        except TimeoutError:
            raise upstream_timeout(provider.total_s) from None
        except UpstreamError as exc:
            raise upstream_failed(exc) from None

    async def read(self, response: Response) -> bytes:
        try:
            async with asyncio.timeout(self.provider.total_s):
                return await response.read()
        except TimeoutError:
            response.close()
            raise upstream_timeout(self.provider.total_s) from None
        except UpstreamError as exc:
            response.close()
            raise upstream_failed(exc) from None
        finally:
            response.release()

    # --- ownership ----------------------------------------------------------------------------------------

    async def record(self, chain: PolicyChain, identity: "Identity | None", kind: str, object_id: Any,
                     expires_at: Any = None) -> None:
        if identity is None or identity.key is None or not isinstance(object_id, str) or not ID.fullmatch(object_id):
            return
        ttl = OWNER_TTL_S
        if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
            ttl = max(ttl, expires_at - time.time() + 86400.0)
        try:
            await chain.store.set_owner(f"{kind}:{object_id}", identity.key, ttl)
        except StoreUnavailable:
            raise store_down() from None

    async def reachable(self, chain: PolicyChain, identity: "Identity | None") -> None:
        """Raises the 503 now if the owner store is down, rather than after the provider has made an object
        nobody could then be recorded as owning."""
        if identity is not None and identity.key is not None:
            await self.visible(chain, identity, "file", ["-"])

    async def forget(self, chain: PolicyChain, identity: "Identity | None", kind: str, object_id: str) -> None:
        if identity is None or identity.key is None:
            return
        try:
            await chain.store.drop_owner(f"{kind}:{object_id}")
        except StoreUnavailable:
            pass  # the record lapses with its TTL; the object is gone either way

    async def check(self, chain: PolicyChain, identity: "Identity | None", kind: str, object_id: str,
                    param: str | None = None, status: int = 404) -> None:
        """Raises the not-found error unless the caller may see this id."""
        if not ID.fullmatch(object_id):
            raise not_found(kind, object_id, param, status)
        if identity is None or identity.key is None:
            return
        if (await self.visible(chain, identity, kind, [object_id]))[0] is False:
            raise not_found(kind, object_id, param, status)

    async def visible(self, chain: PolicyChain, identity: "Identity", kind: str, ids: list) -> list[bool]:
        try:
            owners = await chain.store.owners([f"{kind}:{i}" for i in ids])
        except StoreUnavailable:
            raise store_down() from None
        return [owner == identity.key for owner in owners]

    # --- policies -----------------------------------------------------------------------------------------

    def policies_for(self, chain: PolicyChain) -> PolicyChain | None:
        """The app's chain cut to what applies to these calls (None when nothing does)."""
        mine = self._chains.get(chain)
        if mine is None:
            kept = [p for p in chain.policies if isinstance(p, RateLimit)
                    or (isinstance(p, Concurrency) and p.per != "model")]
            mine = PolicyChain(kept, keys=chain.keys, store=chain.store, request_types=chain.request_types,
                               metrics=chain.metrics) if kept else False
            self._chains[chain] = mine
        return mine or None


def upstream_failed(exc: UpstreamError) -> ProxyError:
    return ProxyError(502, f"The batch provider could not be reached: {str(exc)[:200]}", type="server_error",
                      code="upstream_unavailable")


def upstream_timeout(seconds: float) -> ProxyError:
    return ProxyError(504, f"The batch provider did not answer in {seconds:g} s.", type="server_error",
                      code="upstream_timeout")


def store_down() -> ProxyError:
    return ProxyError(503, "Who owns files and batches cannot be checked now (the store is unavailable); try "
                      "again shortly.", type="server_error", code="policy_unavailable", headers={"retry-after": "1"})


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
        """The provider's answer as it is, unless it is about the proxy's own key (401, 403), which the
        client can do nothing about: that is a 502."""
        if response.status in (401, 403, 407):
            raise ProxyError(502, f"The batch provider refused the proxy's credentials ({response.status}).",
                             type="server_error", code="upstream_auth_failed")
        media = response.headers.get("content-type", "application/json")
        return web.Response(status=response.status, body=body, headers={"Content-Type": media, **self.headers()})

    def list_page(self, page: dict, data: list, has_more: bool) -> web.Response:
        out = {**page, "data": data}
        if "has_more" in page or has_more:
            out["has_more"] = has_more
        if "first_id" in page or "last_id" in page:
            out["first_id"] = data[0].get("id") if data else None
            out["last_id"] = data[-1].get("id") if data else None
        return self.json(out)


MAX_PAGES = 10  # provider pages read for one filtered list at most


async def filtered_list(request: web.Request, call: Call, tail: str, kind: str, on_mine=None) -> web.Response:
    """A list of the caller's own objects. The provider pages, the proxy filters: while a page leaves fewer
    than `limit` of the caller's own and the provider has more, the next provider page is read (up to
    MAX_PAGES), so a client that pages on `has_more` and the last id sees every object of its own.
    `on_mine(item)` is awaited for each object of the caller's that is listed."""
    objects, identity = call.objects, call.identity
    query = list_query(request)
    response = await objects.call("GET", tail, query=query)
    raw = await objects.read(response)
    if response.status != 200 or identity is None or identity.key is None:
        return call.passed(response, raw)
    limit = int(query["limit"]) if "limit" in query else None  # None: the provider's page, however long
    mine: list = []
    page = parse(raw)
    for pages in range(1, MAX_PAGES + 1):
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            return call.passed(response, raw) if pages == 1 else call.list_page({"object": "list"}, mine, True)
        items = [item for item in data if isinstance(item, dict)]
        seen = await objects.visible(call.chain, identity, kind, [item.get("id") for item in items])
        for index, (item, ok) in enumerate(zip(items, seen)):
            if ok:
                mine.append(item)
                if on_mine is not None:
                    await on_mine(item)
                if len(mine) == limit:
                    more = index + 1 < len(items) or page.get("has_more") is True
                    return call.list_page(page, mine, more)
        last = items[-1].get("id") if items else None
        if page.get("has_more") is not True or not isinstance(last, str) or not ID.fullmatch(last):
            return call.list_page(page, mine, page.get("has_more") is True)
        if pages == MAX_PAGES:
            return call.list_page(page, mine, True)
        query["after"] = last
        response = await objects.call("GET", tail, query=query)
        raw = await objects.read(response)
        if response.status != 200:
            return call.passed(response, raw)
        page = parse(raw)
    raise AssertionError("unreachable")


def parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def list_query(request: web.Request) -> dict[str, str]:
    """The list parameters OpenAI's clients send, checked; nothing else of the client's query goes upstream."""
    query = {}
    for name, pattern in LIST_QUERY.items():
        value = request.query.get(name)
        if value is None:
            continue
        if not pattern.fullmatch(value):
            raise ProxyError(400, f"Invalid value for `{name}`.", param=name, code="invalid_value")
        query[name] = value
    return query


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
