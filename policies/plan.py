"""The built-in policies' claims compiled once per (identity, model, request type, operation): a plan.

For every request of one key to one model, request_budget, token_budget, rate_limit and concurrency claim the
same counters with the same limits, and write the same metric labels, span events and header names; only the
tokens (the prompt's estimate and the completion limit) change from one request to the next. The chain compiles
them into a `Plan` at the first request and, on the memory store, takes the plan's rows in one call
(`MemoryStore.take`) and gives them back in one (`MemoryStore.give_back`), with no Claim, Settlement or
Admission made and no policy hook awaited. With auth and the four built-ins on, the chain's on_request and
after went from about 130k instructions a request to 46.5k, and the whole request on the memory store from
+164k over the proxy without policies to +74k (callgrind, `python -m bench.instructions`).

A plan is used only where it decides exactly as the generic path: every policy is one of the four built-ins
(their exact classes), request_budget (at most one) comes first and is enforced, and the store is the memory
store. Anything unusual for one request goes the generic way, which then decides as it always has: a prompt
over its budget, a completion limit refused, a row that does not fit (a shadow one too: its rejection is
recorded there), an estimator that raises. `take` takes nothing unless every row fits, so nothing is counted
twice. A plan holds a token budget's key for its UTC period: it is compiled again once the period has ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from policies.concurrency import Concurrency
from policies.estimate import GENERATES, estimate
from policies.rate_limit import RateLimit
from policies.request_budget import RequestBudget
from policies.stores.base import BUDGET, GCRA, SLOT, Claim
from policies.token_budget import TokenBudget

if TYPE_CHECKING:
    from policies.base import Policy

BUILTINS = (RequestBudget, TokenBudget, RateLimit, Concurrency)
MAX_PLANS = 10000  # identities from clients' `user` fields: the plans kept are bounded
HEADER_NAMES = {kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
                for kind in ("requests", "tokens")}  # the x-ratelimit-* of each kind, planned or not


def plannable(policies: Sequence["Policy"], store) -> bool:
    """Whether the chain can plan these policies on this store."""
    if not policies or not hasattr(store, "take") or not hasattr(store, "give_back"):
        return False
    if any(type(p) not in BUILTINS for p in policies):  # a subclass may override a hook: the generic path runs it
        return False
    budgets = [i for i, p in enumerate(policies) if type(p) is RequestBudget]
    # request_budget lowers the completion limit the policies after it reserve for; in shadow it changes nothing
    return not budgets or (budgets == [0] and policies[0].mode == "enforce")


class Plan:
    """What the built-ins do for every request of one (identity, model, request type, operation)."""

    __slots__ = ("expires", "estimates", "budget", "reject_over", "chat", "generates", "default_completion",
                 "gcras", "token_gcras", "budgets", "slots", "heads", "pair", "continues", "events", "templates",
                 "settles")

    def __init__(self, policies: Sequence["Policy"], ctx, counts: bool, now: float) -> None:
        made: list[tuple[Policy, Claim]] = []  # in the generic path's order of claims
        idle, claimers = [], []  # the policies without claims record their decision first, as the generic path does
        self.budget: tuple[int, int] | None = None
        self.reject_over = False
        for policy in policies:
            kind = type(policy)
            claims: list[Claim] = []
            if kind is RequestBudget:
                if counts:
                    self.budget = policy.types.get(ctx.request_type) or policy.types["default"]
                    self.reject_over = policy.reject_over
            elif kind is TokenBudget:
                if counts:
                    claims.append(policy.claim_for(ctx, now))
            elif kind is RateLimit:
                claims = [c for c in policy.claims_for(ctx) if counts or c.header != "tokens"]
            else:
                slot = policy.slot_for(ctx)
                if slot is not None:
                    claims.append(Claim(SLOT, slot[0], slot[1], 1, 0.0, policy.mode == "shadow"))
            (claimers if claims else idle).append(policy)
            made += [(policy, c) for c in claims]
        if len({c.key for _, c in made}) != len(made):
            raise NotPlannable("two claims of one request on one counter")  # the generic path checks them together
        per_token = [c.kind == BUDGET or c.header == "tokens" for _, c in made]
        self.templates = tuple((p, c, t) for (p, c), t in zip(made, per_token))
        self.gcras = tuple((c.key, c.limit, c.param, c.param / c.limit, t) for (_, c), t in zip(made, per_token)
                           if c.kind == GCRA)
        self.token_gcras = tuple(row for row in self.gcras if row[4])
        self.budgets = tuple((c.key, c.limit, c.param) for _, c in made if c.kind == BUDGET)
        self.slots = tuple((c.key, c.limit) for _, c in made if c.kind == SLOT)
        self.settles = bool(made)
        self.expires = min((c.param for _, c in made if c.kind == BUDGET), default=float("inf"))
        self.estimates = self.budget is not None or any(per_token)  # the prompt's estimate is needed
        self.chat = ctx.operation == "chat"  # request_budget lowers only a chat's completion limit
        self.generates = ctx.operation in GENERATES
        defaults = {p.default_completion for (p, _), t in zip(made, per_token) if t}
        # What a request without a completion limit reserves for it: None when the policies' defaults differ
        # (each reserves its own: the generic path), 0 when nothing reserves tokens.
        self.default_completion = defaults.pop() if len(defaults) == 1 else None if defaults else 0
        heads: dict[str, list] = {}  # kind -> (index among the GCRA rows, its limit written out) of each
        for i, (_, c) in enumerate((p, c) for p, c in made if c.kind == GCRA):
            if c.header is not None:
                heads.setdefault(c.header, []).append((i, str(c.limit)))
        self.heads = tuple((*HEADER_NAMES[kind], rows[0][0], rows[0][1], tuple(rows[1:]))
                           for kind, rows in heads.items())
        # The usual shape, one requests limit then one tokens limit: (its row, its limit, the tokens', theirs).
        self.pair = None
        if list(heads) == ["requests", "tokens"] and len(heads["requests"]) == len(heads["tokens"]) == 1:
            self.pair = (*heads["requests"][0], *heads["tokens"][0])
        ordered = idle + claimers
        self.continues = tuple((p.name, "continue", p.mode) for p in ordered)  # metric labels
        self.events = tuple((p.name, p.mode) for p in ordered)  # span events


class NotPlannable(Exception):
    """This request's policies cannot be planned: the generic path serves it."""


class Planned:
    """The policy state of a request admitted by its plan (the generic path's is `chain.PolicyState`)."""

    __slots__ = ("plan", "tokens", "body", "_prompt", "headers", "hedged")
    admitted = True
    served_tokens = None  # only the cache sets it, and a chain with the cache is not planned

    def __init__(self, plan: Plan, tokens: int, body: dict, prompt: int | None, headers: dict) -> None:
        self.plan = plan
        self.tokens = tokens  # what each budget and tokens limit reserved
        self.body = body
        self._prompt = prompt
        self.headers = headers
        self.hedged: list[Claim] | None = None  # what hedges reserved for their attempts, given back at the end

    @property
    def prompt_tokens(self) -> int:
        if self._prompt is None:
            self._prompt = estimate(self.body)
        return self._prompt

    def claims_of(self, policy: "Policy") -> list[Claim]:
        """The policy's claims as the generic path would have made them (a hedge reserves from them)."""
        tokens = self.tokens
        return [Claim(c.kind, c.key, c.limit, tokens if per_token else c.amount, c.param, c.soft, c.lease, c.header)
                for p, c, per_token in self.plan.templates if p is policy]
