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
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode
from weakref import WeakKeyDictionary

import orjson

from policies.chain import PolicyChain
from policies.concurrency import Concurrency
from policies.rate_limit import RateLimit
from policies.stores.base import StoreUnavailable
from proxy.app.errors import ProxyError
from proxy.upstream.http1 import Response, UpstreamError, split_url

if TYPE_CHECKING:
    from policies.identity import Identity
    from proxy.app.config import Config
    from proxy.upstream.providers import Upstreams

OWNER_TTL_S = 30 * 86400.0  # how long an owner is remembered when the object says nothing of its expiry
# What a file or batch id may look like; anything else is not found. It starts with a letter, a digit or `_`:
# `.` and `..` would be dot segments of the provider's path (`/files/../content` is served as `/content`).
ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


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
        self.body_s = config.providers[name].body_timeout_s  # a download, whole, from its request on
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


def parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
