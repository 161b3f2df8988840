"""The policy interface: hooks that return decisions; only the pipeline writes to the client.

This is the seam later work fills (budgets, throughput, cache). A policy subclasses `Policy` and overrides the
hooks it needs; every hook of the base class continues, so a policy that does nothing is a valid policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from proxy.app.errors import ProxyError

if TYPE_CHECKING:
    from proxy.pipeline.context import RequestContext


class Decision:
    """What a hook tells the pipeline to do next."""


@dataclass(frozen=True, slots=True)
class Continue(Decision):
    pass


@dataclass(frozen=True, slots=True)
class Reject(Decision):
    """Answer the client with this error; no upstream attempt is made."""

    error: ProxyError


CONTINUE = Continue()


class Policy:
    name = "policy"

    async def on_request(self, ctx: "RequestContext") -> Decision:
        """Before any attempt: admit, or reject with an OpenAI-shaped error."""
        return CONTINUE

    async def after(self, ctx: "RequestContext") -> None:
        """After the request ended, whatever its outcome: settle what `on_request` reserved."""


class PolicyChain:
    """The ordered list of policies; the first decision that is not Continue wins."""

    def __init__(self, policies: Sequence[Policy] = ()) -> None:
        self.policies = tuple(policies)

    def __bool__(self) -> bool:
        return bool(self.policies)

    async def on_request(self, ctx: "RequestContext", record: Callable[..., None] | None = None) -> Decision:
        """Asks each policy in order; `record(ctx, policy, decision)` sees every decision (the trace's events)."""
        for policy in self.policies:
            decision = await policy.on_request(ctx)
            if record is not None:
                record(ctx, policy.name, type(decision).__name__)
            if not isinstance(decision, Continue):
                return decision
        return CONTINUE

    async def after(self, ctx: "RequestContext") -> None:
        for policy in reversed(self.policies):
            await policy.after(ctx)
