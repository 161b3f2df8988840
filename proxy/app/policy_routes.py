"""What the app does for the policies: open the store and build the chain at start, close them at the end,
and answer the usage API (`GET /v1/usage` for the caller, `GET /admin/usage` for anyone, with the admin key)."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from policies.chain import PolicyChain
from policies.concurrency import Concurrency
from policies.config import PoliciesConfig
from policies.identity import Identity, body_identity
from policies.stores.base import StoreUnavailable
from policies.stores.memory import MemoryStore
from policies.usage import usage_report
from proxy.app.admin_auth import admin_only
from proxy.app.config import Config
from proxy.app.errors import ProxyError, new_request_id
from proxy.telemetry.logs import emit, register_secrets
from proxy.telemetry.metrics import Counter


class PolicyMetrics:
    def __init__(self) -> None:
        self.decisions = Counter("groq_proxy_policy_decisions_total",
                                 "Policy decisions by policy, decision (continue, reject, skip, respond, error) and "
                                 "mode (enforce, shadow).", ("policy", "decision", "mode"))
        self.requests = Counter("groq_proxy_key_requests_total",
                                "Requests by proxy key id (none without [auth]) and request type (x-request-type; "
                                "types the config does not name count as other).", ("key_id", "request_type"))


def _warn_unknown_models(config: Config, pc: PoliciesConfig) -> None:
    """A concurrency limit per model whose name is no virtual model nor alias (a typo of `tier-fast`, say) limits only
    requests that name exactly that model: allowed (a real model asked for directly is one), and said at start."""
    known = {*config.models, *config.aliases, config.routing.auto_model}
    for index, policy in enumerate(pc.policies):
        if isinstance(policy, Concurrency) and policy.per == "model":
            for name in policy.limits:
                if name not in known:
                    emit(logging.WARNING, "policy_limit_unknown_model", key=f"policies[{index}].limits.{name}"[:300],
                         message="no virtual model or alias has this name: the limit applies only to requests that "
                                 "ask for exactly this model")


async def open_chain(config: Config, metrics, previous: tuple[Config, PolicyChain] | None = None) -> PolicyChain:
    """The store, opened (a Redis that is down does not stop the start), and the chain over it. On a reload,
    `previous` is the running config and chain: a store configured the same is the running one, so its counters
    (all of them, in memory too) carry over by their keys."""
    pc: PoliciesConfig = config.policies or PoliciesConfig()
    store = None
    if pc.uses_store or pc.policies or pc.keys is not None:  # [auth]: who owns each file and batch is kept there
        if previous is not None and previous[1].store is not None and \
                (previous[0].policies or PoliciesConfig()).store == pc.store:
            store = previous[1].store
        elif pc.store.backend == "redis":
            from policies.stores.redis import RedisStore
            from policies.stores.redis_connect import parse_url

            register_secrets(parse_url(pc.store.url).password, pc.store.connect.sentinel_password)
            store = RedisStore(pc.store.url, timeout_s=pc.store.timeout_s, lease_s=pc.store.lease_s,
                               prefix=pc.store.prefix, connect=pc.store.connect)
        else:
            store = MemoryStore()
        if store.backend == "memory" and pc.uses_store:
            emit(logging.WARNING, "policy_store_memory",
                 message="Limits, budgets and the cache are kept in this process only (store.backend = \"memory\"): "
                         "run one process, or use the Redis store to share them between processes.")
        if previous is None or store is not previous[1].store:
            await store.start()
    _warn_unknown_models(config, pc)
    for policy in pc.policies:
        await policy.start(pc.store, metrics)
    policy_metrics = None
    if metrics is not None and (pc.policies or pc.keys is not None):
        policy_metrics = getattr(metrics, "policy", None)  # one set of families, however many reloads
        if policy_metrics is None:
            policy_metrics = metrics.policy = PolicyMetrics()
            metrics.all = metrics.all + (policy_metrics.decisions, policy_metrics.requests)
    return PolicyChain(pc.policies, keys=pc.keys, store=store, request_types=pc.request_types, metrics=policy_metrics)


async def close_chain(chain: PolicyChain, *, keep_store: bool = False) -> None:
    """The policies' own resources, and the store unless a newer chain took it over (`keep_store`)."""
    for policy in chain.policies:
        await policy.close()
    if chain.store is not None and not keep_store:
        await chain.store.close()


def _id() -> dict[str, str]:
    return {"x-request-id": new_request_id()}


def _json(obj: dict) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json", headers=_id())


async def _report(generation, identity: Identity, only: str | None) -> web.Response:
    """The report from one generation, held to the end of the store read: a reload meanwhile neither changes
    the policies or models it reads nor closes the store under it (proxy/app/reload.py)."""
    chain = generation.pipeline.policies
    generation.enter()
    try:
        if chain.store is None:
            return _json(await usage_report(chain, identity, [], only))
        return _json(await usage_report(chain, identity, list(generation.config.models), only))
    except StoreUnavailable:
        return ProxyError(503, "The usage store is unavailable; try again shortly.", type="server_error",
                          code="policy_unavailable").to_response(_id())
    finally:
        generation.leave()


async def my_usage(request: web.Request) -> web.Response:
    """GET /v1/usage: the caller's own budgets and limits (the caller's key with [auth], else `user=`)."""
    from proxy.app.server import STATE

    generation = request.app[STATE].generation  # once: the keys it authenticates with are those it reports on
    chain = generation.pipeline.policies
    try:
        identity = chain.authenticate(request.headers)
    except ProxyError as error:
        return error.to_response(_id())
    if identity is None:
        identity = body_identity({"user": request.query.get("user")})
    return await _report(generation, identity, None)


@admin_only
async def admin_usage(request: web.Request) -> web.Response:
    """GET /admin/usage?key=ID (or user=, team=): anyone's usage, with the admin key."""
    from proxy.app.server import STATE

    generation = request.app[STATE].generation
    chain = generation.pipeline.policies
    given = [(name, request.query[name]) for name in ("key", "user", "team") if request.query.get(name)]
    if len(given) != 1:
        error = ProxyError(400, "Give exactly one of ?key=ID, ?user=NAME or ?team=NAME.", param="key")
        return error.to_response(_id())
    kind, value = given[0]
    if kind == "key":
        found = [k for k in (chain.keys.keys if chain.keys else ()) if k.id == value]
        if not found:
            return ProxyError(404, f"No proxy key has the id {value[:64]!r}.", param="key",
                              code="key_not_found").to_response(_id())
        identity = found[0].identity
    elif kind == "user":
        identity = Identity(None, value[:256], None)
    else:
        identity = Identity(None, None, value[:256])
    return await _report(generation, identity, kind)
