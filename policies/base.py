"""The policy interface: hooks that return decisions; only the pipeline writes to the client.

A policy subclasses `Policy` and overrides the hooks it needs; every hook of the base class continues, so a
policy that does nothing is a valid policy. The hooks, in the order the pipeline calls them:

- `on_request(ctx)`: before anything is sent upstream. Admit (`CONTINUE`), refuse (`Reject`) or answer
  without calling upstream (`Respond`; the policies after it still run and may refuse, and every claim is
  admitted before the answer goes out: an answer from the cache is a request for the limits too). A policy that counts something in a shared store adds `Claim`s with
  `ctx.policy.claim(self, claim)` and continues: the chain sends every claim of the request in one store call once all
  `on_request` hooks have continued, and asks the claim's policy (`refused`) for its `Reject` if one does
  not fit.
- `before_attempt(ctx, attempt)`: before each upstream attempt; `Skip(reason)` passes over that model.
- `hedge_claims(ctx)`: a hedge is about to put a second attempt in flight; the claims to reserve for it (a
  budget reserves what the first attempt did). The chain admits them in one store call, all or nothing: if one
  does not fit, no hedge starts. They are given back when the request ends, and what every attempt produced
  is charged by `after`'s settlement.
- `on_response(ctx, attempt)`: an attempt answered (a stream: once it has ended). The answer has gone out,
  so only what the policy records matters; a decision here is recorded, not acted upon.
- `after(ctx)`: the request ended, whatever the outcome (rejected, failed, the client gone). Called for every
  policy whose `on_request` ran, in reverse order, each isolated from the others' exceptions. Settle here:
  `ctx.policy.settle(settlement)` hands the store what to return and charge, again one store call for the request.

Each policy table in the config also sets `mode` (enforce | shadow) and `on_error` (open | closed); the
chain applies both, so a policy never looks at them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterable, Iterable, Mapping

from proxy.app.errors import ProxyError

if TYPE_CHECKING:
    from proxy.pipeline.context import Attempt, RequestContext


class Decision:
    """What a hook tells the pipeline to do next."""

    __slots__ = ()
    label = "continue"


class Continue(Decision):
    __slots__ = ()


CONTINUE = Continue()


@dataclass(frozen=True, slots=True)
class Reject(Decision):
    """Answer the client with an OpenAI-shaped error; no upstream attempt is made."""

    status: int
    message: str
    code: str | None = None
    type: str = "invalid_request_error"
    headers: Mapping[str, str] | None = None
    param: str | None = None
    label = "reject"

    def error(self) -> ProxyError:
        return ProxyError(self.status, self.message, type=self.type, code=self.code, param=self.param,
                          headers=dict(self.headers) if self.headers else None)


@dataclass(frozen=True, slots=True)
class Skip(Decision):
    """From `before_attempt`: do not try this model; the chain moves on to the next."""

    reason: str
    label = "skip"


@dataclass(frozen=True, slots=True)
class Respond(Decision):
    """Answer without calling upstream. A plain answer is `body` (a dict is sent as JSON, bytes as they are);
    a streamed answer is `events`: SSE events as bytes (each `data: ...\\n\\n`), a list or an async iterator,
    sent with `text/event-stream` as they come (a cache replays a stream this way)."""

    body: dict | bytes | None = None
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    events: Iterable[bytes] | AsyncIterable[bytes] | None = None
    label = "respond"


class Policy:
    """A request policy. `name` is what metrics, spans and logs call it (the table's `use`, or its `name`).
    The chain sets `mode` and `on_error` from the table; a policy that changes the request itself (as
    request_budget lowers a completion limit) must not do so when `mode` is "shadow"."""

    name = "policy"
    mode = "enforce"
    on_error = "open"
    wait_s: float = 0  # a policy whose claims may wait for capacity sets how long
    uses_store = False  # True for a policy that keeps state in the store (claims, a cache): several processes need Redis
    # True: at the end the chain settles this policy's admitted claims for it, each to what the request used
    # (`PolicyChain._settle_claims`), in one pass with every other such policy's; after() still runs when
    # the policy overrides it. The built-ins that count (token_budget, rate_limit, concurrency) do.
    settles_claims = False

    def refused(self, ctx: "RequestContext", claim, admission) -> Reject:
        """The store refused one of this policy's claims: the answer to give (a policy that claims overrides)."""
        return Reject(429, f"Refused by the policy {self.name}.", code="rate_limit_exceeded", type="rate_limit_error")

    async def on_request(self, ctx: "RequestContext") -> Decision:
        return CONTINUE

    async def before_attempt(self, ctx: "RequestContext", attempt: "Attempt") -> Decision:
        return CONTINUE

    def hedge_claims(self, ctx: "RequestContext") -> list:
        """What a second attempt in flight reserves (a hedge): none unless the policy counts tokens."""
        return []

    async def on_response(self, ctx: "RequestContext", attempt: "Attempt") -> Decision:
        return CONTINUE

    async def after(self, ctx: "RequestContext") -> None:
        """Settle what `on_request` reserved."""

    async def start(self, store, metrics) -> None:
        """The app is starting: open what the policy owns. `store` is the `[store]` config
        (policies.config.StoreConfig); `metrics` the proxy's metric set (None when metrics are off), whose
        `all` a policy may extend with series of its own."""

    async def close(self) -> None:
        """The app is stopping: release what the policy owns."""

