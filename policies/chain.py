"""The policy chain: runs the configured policies' hooks in order and applies `mode` and `on_error`.

It also owns the two store calls of a request: every `Claim` the policies made in `on_request` goes to the
store in one `admit` (all or nothing), and every `Settlement` made in `after` in one `settle`. With wait_s
set, a request refused for throughput or a slot waits and tries again, up to that long. When the policies are
only the built-ins and the store is the memory store, a request's claims come from a plan compiled once for
its identity and model (policies/plan.py), admitted and settled without a coroutine; whatever the plan does not
decide alike goes the way described here.

Rules it keeps, whatever a policy does:
- a shadow decision never changes the answer (it is recorded in the span, the log and the metrics);
- a policy that raises, or whose store is down, lets the request through (`on_error = "open"`) or gets the
  client a 503 `policy_unavailable` (`"closed"`), logged and counted as the decision `error`;
- `after()` runs for every policy whose `on_request` ran, in reverse order, each isolated from the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Sequence

from policies.base import CONTINUE, Decision, Policy, Reject, Respond, Skip
from policies.estimate import GENERATES, completion_limit, counts_tokens, estimate, used_tokens
from policies.identity import Identity, KeyRing, body_identity
from policies.plan import HEADER_NAMES, MAX_PLANS, Plan, Planned, plannable
from policies.request_budget import lower
from policies.scopes import duration
from policies.stores.base import BUDGET, SLOT, Admission, Claim, Settlement, Store, StoreUnavailable
from proxy.telemetry.logs import emit

if TYPE_CHECKING:
    from proxy.pipeline.context import Attempt, RequestContext

ENFORCE, SHADOW = "enforce", "shadow"
OPEN, CLOSED = "open", "closed"


def _landed(admitting) -> Admission | None:
    """The admission a store call made when the request was cancelled in the very turn it came back (the client
    left as Redis answered): the call's future holds it, the request never read it, so it is not lost. A call
    still on its way when the request is cancelled is the store's to give back when it lands."""
    if isinstance(admitting, asyncio.Future) and admitting.done() and not admitting.cancelled():
        if admitting.exception() is None and admitting.result().ok:
            return admitting.result()
    return None


class PolicyState:
    """What the policies hold for one request: their claims, whether the store admitted them, the headers
    they add to the answer, the settlements to send at the end."""

    __slots__ = ("ran", "claims", "owners", "spans", "headed", "admitted", "admission", "settlements", "headers",
                 "_prompt", "_used", "_reserve", "body", "hedged", "served_tokens", "counts")

    def __init__(self, body: dict, counts: bool = True) -> None:
        self.body = body
        self.counts = counts  # whether token budgets and limits apply (`policies.estimate.counts_tokens`)
        self.ran = 0
        self.claims: list[Claim] = []
        self.owners: list[Policy] = []  # owners[i] made claims[i]
        self.spans: dict[Policy, tuple[int, int]] = {}  # policy -> where its claims are (a policy's are in a row)
        self.headed: list[int] = []  # the claims that feed the x-ratelimit-* headers
        self.admitted = False
        self.admission: Admission | None = None
        self.settlements: list[Settlement] = []
        self.hedged: list[Claim] | None = None  # what hedges reserved for their attempts, given back at the end
        self.headers: dict[str, str] = {}
        self._prompt: int | None = None
        self._used: int | None = None
        self._reserve: tuple | None = None  # (operation, default_completion, tokens) of the last reserve()
        # Set when a policy answers (a cache hit): the tokens that answer costs the budgets and token limits (the
        # entry's with charge_hits, else 0), reserved and charged in place of the estimate and the usage.
        self.served_tokens: int | None = None

    def claim(self, policy: Policy, claim: Claim) -> None:
        if claim.header is not None:  # it feeds the x-ratelimit-* headers
            self.headed.append(len(self.claims))
        self.claims.append(claim)
        self.owners.append(policy)

    def claims_of(self, policy: Policy) -> list[Claim]:
        """The policy's claims that the store took (none when the request was refused or the store was down)."""
        if not self.admitted:
            return _NONE
        span = self.spans.get(policy)
        return self.claims[span[0]:span[1]] if span is not None else _NONE

    def settle(self, settlement: Settlement) -> None:
        self.settlements.append(settlement)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's estimate, made once per request (`policies.set_estimator` replaces it)."""
        if self._prompt is None:
            self._prompt = estimate(self.body)
        return self._prompt

    @property
    def completion_limit(self) -> int | None:
        return completion_limit(self.body)

    def reserve(self, operation: str, default_completion: int) -> int:
        """The tokens a budget or token limit reserves for this request: the prompt's estimate plus the
        completion limit (`default_completion` without one), or what an answer from a policy costs."""
        if self.served_tokens is not None:
            return self.served_tokens
        last = self._reserve
        if last is not None and last[0] == operation and last[1] == default_completion:
            return last[2]  # every budget and token limit of a request asks the same: worked out once
        completion = self.completion_limit if operation in GENERATES else 0
        tokens = self.prompt_tokens + (default_completion if completion is None else completion)
        self._reserve = (operation, default_completion, tokens)
        return tokens

    def used_tokens(self, ctx) -> int:
        """What the request used (`policies.estimate.used_tokens`), worked out once for every policy."""
        if self._used is None:
            self._used = used_tokens(ctx) + (self.served_tokens or 0)
        return self._used


_NONE: list = []


class PolicyChain:
    """The configured policies, the proxy keys and the store. Truthy when there is anything to do."""

    def __init__(self, policies: Sequence[Policy] = (), *, keys: KeyRing | None = None, store: Store | None = None,
                 request_types: frozenset[str] = frozenset({"default"}), metrics=None) -> None:
        self.policies = tuple(policies)
        self.keys = keys
        self.store = store
        self.request_types = request_types
        self.metrics = metrics  # PolicyMetrics, or None when metrics are off
        self.record: Callable | None = None  # the observer's span event, set by the app
        self._logged: dict[tuple, tuple[float, int]] = {}
        self._keys: dict[tuple, tuple[str, str, str]] = {}  # (policy, decision) -> its metric labels
        for p in self.policies:
            p.mode = getattr(p, "mode", ENFORCE)
            p.on_error = getattr(p, "on_error", OPEN)
        cls = Policy
        self._before = tuple(p for p in self.policies if type(p).before_attempt is not cls.before_attempt)
        self._on_response = tuple(p for p in self.policies if type(p).on_response is not cls.on_response)
        self.has_before_attempt = bool(self._before)  # plain attributes: the pipeline asks every request
        self.has_on_response = bool(self._on_response)
        # The policies whose after() settles something, last first: after() runs them in this order.
        self._after = tuple((i, p) for i, p in reversed(tuple(enumerate(self.policies)))
                            if type(p).after is not cls.after)
        self._continue_keys = {p: (p.name, "continue", p.mode) for p in self.policies}  # metric labels
        self._self_settling = any(p.settles_claims for p in self.policies)
        self._hedgers = tuple(p for p in self.policies if type(p).hedge_claims is not cls.hedge_claims)
        self._settle_soon = getattr(store, "settle_soon", None)  # a store that settles in the background
        self._watched = None  # the last future settle_soon gave, already watched for a failure
        # A store whose calls never wait (memory) is called without a coroutine: two fewer a request.
        self._admit_now = getattr(store, "admit_now", None)
        self._settle_now = getattr(store, "settle_now", None)
        self._release_now = getattr(store, "release_now", None)
        # The built-ins on the memory store: each (identity, model, request type, operation) compiled once into a
        # Plan, taken and given back in one store call each (policies/plan.py). None: every request the generic way.
        self._plans: dict[tuple, Plan] | None = {} if plannable(self.policies, store) else None
        self.planned = self._plans is not None  # admit_planned and give_back_planned may serve its requests
        self._take = getattr(store, "take", None)
        self._give_back = getattr(store, "give_back", None)

    def __bool__(self) -> bool:
        return bool(self.policies) or self.keys is not None

    # --- who is asking ----------------------------------------------------------------------------------

    def authenticate(self, headers) -> Identity | None:
        """The key's identity, or None without [auth]; raises the 401 ProxyError for a missing or wrong key."""
        return self.keys.identify(headers) if self.keys is not None else None

    def begin(self, ctx: "RequestContext", headers) -> None:
        """Reads who is asking and what for onto the context, the span and the metrics."""
        if ctx.identity is None:
            ctx.identity = body_identity(ctx.body)
        ctx.headers = headers
        request_type = headers.get("x-request-type") or "default"
        ctx.request_type = request_type[:64]
        module = headers.get("x-module")
        if module:
            ctx.module = module[:64]
        if ctx.span is not None:
            attrs = ctx.span.attrs
            attrs["groq_proxy.request_type"] = ctx.request_type
            if ctx.module:
                attrs["groq_proxy.module"] = ctx.module
            if ctx.identity.key:
                attrs["groq_proxy.key_id"] = ctx.identity.key
        if self.metrics is not None:
            label = request_type if request_type in self.request_types else "other"
            self.metrics.requests.inc((ctx.identity.key or "none", label))

    # --- the hooks --------------------------------------------------------------------------------------

    async def on_request(self, ctx: "RequestContext", planned: bool = True) -> Decision:
        """`planned=False`: `admit_planned` was asked already, and said the generic path decides."""
        if planned and (decision := self.admit_planned(ctx)) is not None:
            return decision
        state = ctx.policy = PolicyState(ctx.body, counts_tokens(ctx))
        answer = None  # a Respond (a cache hit): the policies after it still see the request, and may refuse it
        metrics, continues = self.metrics, self._continue_keys
        for policy in self.policies:
            state.ran += 1
            claims_before = len(state.claims)
            try:
                decision = await policy.on_request(ctx)
            except Exception:
                decision = self._failed(ctx, policy, "on_request")
                if decision is not CONTINUE:
                    return decision
                continue
            claimed = len(state.claims)
            if claimed != claims_before:
                state.spans[policy] = (claims_before, claimed)
            if decision is CONTINUE:
                if claimed == claims_before:  # a claim's decision is known once the store answers
                    if metrics is not None:  # _record's continue, inline: every request has several
                        metrics.decisions.inc(continues[policy])
                    if ctx.span is not None and self.record is not None:
                        self.record(ctx, policy.name, "continue", mode=policy.mode)
                continue
            self._record(ctx, policy, decision)
            if policy.mode == ENFORCE:
                if isinstance(decision, Respond):
                    answer = answer or decision
                    continue
                return decision
        if state.claims and self.store is not None:  # an answer from a policy is a request too: limits count it
            admit_now = self._admit_now
            if admit_now is not None and (admission := admit_now(state.claims)).ok:
                self._took(ctx, state, admission)  # the memory store's usual case, without a coroutine
            else:
                admitted = await self._admit(ctx, state)
                if admitted is not CONTINUE:
                    return admitted
        return answer or CONTINUE

    async def before_attempt(self, ctx: "RequestContext", attempt: "Attempt") -> Decision:
        for policy in self._before:
            try:
                decision = await policy.before_attempt(ctx, attempt)
            except Exception:
                decision = self._failed(ctx, policy, "before_attempt")
                if decision is not CONTINUE:  # closed: this model is not tried
                    return Skip("policy_unavailable")
                continue
            if decision is not CONTINUE:
                self._record(ctx, policy, decision)
                if policy.mode == ENFORCE and isinstance(decision, Skip):
                    return decision
        return CONTINUE

    async def reserve_hedge(self, ctx: "RequestContext") -> bool:
        """A hedge is about to put another attempt in flight: every policy that counts tokens reserves for it
        too, in one store call, all or nothing. False when one has no room for it: then no hedge starts. What
        was reserved is given back at the end; `after`'s settlement charges what every attempt produced."""
        state = ctx.policy
        if state is None or not state.admitted or self.store is None or not self._hedgers:
            return True
        claims, owners = [], []
        for policy in self._hedgers:
            for claim in policy.hedge_claims(ctx):
                claims.append(claim)
                owners.append(policy)
        if not claims:
            return True
        admitting = None
        try:
            admitting = self.store.admit(claims)  # raises StoreUnavailable at once while Redis is known down
            admission = await admitting
        except asyncio.CancelledError:
            if _landed(admitting) is not None:
                state.hedged = [*(state.hedged or ()), *claims]  # given back in `after`
            raise
        except StoreUnavailable:
            closed = False
            for policy in dict.fromkeys(owners):
                self._record(ctx, policy, _ERROR)
                closed = closed or (policy.on_error == CLOSED and policy.mode == ENFORCE)
            return not closed
        if not admission.ok:
            self._record(ctx, owners[admission.failed], _NO_HEDGE)
            return False
        if state.hedged is None:
            state.hedged = []
        state.hedged += claims
        return True

    async def on_response(self, ctx: "RequestContext", attempt: "Attempt") -> None:
        for policy in self._on_response:
            try:
                decision = await policy.on_response(ctx, attempt)
            except Exception:
                self._failed(ctx, policy, "on_response")
                continue
            if decision is not CONTINUE:
                self._record(ctx, policy, decision)

    async def after(self, ctx: "RequestContext") -> None:
        state = ctx.policy
        if state is None:
            return
        if state.__class__ is Planned:
            self.give_back_planned(ctx)
            return
        ran = state.ran
        for index, policy in self._after:  # only those that override after(), whose on_request ran
            if index >= ran:
                continue
            try:
                await policy.after(ctx)
            except Exception:
                self._warn("policy_error", logging.ERROR, request_id=ctx.request_id, policy=policy.name,
                           hook="after", exc_info=True)
        if state.admitted and self._self_settling:
            try:
                used = state.used_tokens(ctx)
            except Exception:  # a replaced estimator that raised: the reservations stand as the charge
                self._warn("policy_error", logging.ERROR, request_id=ctx.request_id, policy="estimator",
                           hook="after", exc_info=True)
                used = -1
            if self._release_now is not None:  # the memory store settles the claims themselves: no Settlements
                self._release_now([c for c, o in zip(state.claims, state.owners) if o.settles_claims], used)
            else:
                self._settle_claims(state, used)
        if state.hedged:  # the hedges' reservations go back; what their attempts produced is in `after`'s charge
            state.settlements += [Settlement(c.kind, c.key, reserved=c.amount, used=0, limit=c.limit, param=c.param)
                                  for c in state.hedged]
        if state.settlements and self.store is not None:
            if self._settle_now is not None:
                self._settle_now(state.settlements)
                return
            if self._settle_soon is not None:
                self._settle_in_background(ctx, state.settlements)
                return
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The client went away and the handler is being cancelled: the settlement must still land.
                await asyncio.shield(asyncio.ensure_future(self._settle(ctx, state.settlements)))
            else:
                await self._settle(ctx, state.settlements)

    # --- a plan (policies/plan.py) --------------------------------------------------------------------

    def admit_planned(self, ctx: "RequestContext") -> Decision | None:
        """`on_request` without a coroutine when the request's plan decides it (policies/plan.py): admitted as
        the generic path would admit it, CONTINUE with the state set. None: the generic path decides, `await
        on_request(ctx, planned=False)`; nothing was taken then."""
        plans = self._plans
        if plans is None:
            return None
        identity, route, op = ctx.identity, ctx.route, ctx.op
        counts = op is None or op.tokens  # policies.estimate.counts_tokens
        key = (identity.key, identity.user, identity.team, route.virtual or route.requested, ctx.request_type,
               ctx.operation, counts)
        plan = plans.get(key)
        body = ctx.body
        try:
            if plan is None or time.time() >= plan.expires:  # a token budget's period has ended: its key changed
                plan = Plan(self.policies, ctx, counts, time.time())
                if len(plans) >= MAX_PLANS:
                    plans.clear()
                plans[key] = plan
            tokens, prompt, lowered = 0, None, False
            if plan.estimates:  # the tokens a budget or tokens limit reserves, as PolicyState.reserve
                prompt = estimate(body)
                completion = completion_limit(body) if plan.generates else 0
                budget = plan.budget
                if budget is not None:  # request_budget's checks, as its on_request makes them
                    if prompt > budget[0]:
                        return None
                    if plan.chat and (completion is None or completion > budget[1]):
                        if completion is not None and plan.reject_over:
                            return None
                        lowered, limit, completion = True, completion, budget[1]
                if completion is None:
                    completion = plan.default_completion
                    if completion is None:  # the policies' default_completion differ: each reserves its own
                        return None
                tokens = prompt + completion
        except Exception:  # NotPlannable, or a replaced estimator that raised: the generic path records that as the
            return None  # error of the policy that asked for the estimate, as always
        got = self._take(plan.gcras, plan.budgets, plan.slots, tokens)
        if got is None:  # a row did not fit: the generic path finds which, and refuses, waits or records it
            return None
        # x-ratelimit-*: the remaining is an int (`take` floors it)
        pair = plan.pair
        if pair is not None:  # one requests limit, then one tokens limit: the usual shape, written at once
            left, back = got[pair[0]]
            tokens_left, tokens_back = got[pair[2]]
            headers = {"x-ratelimit-limit-requests": pair[1],
                       "x-ratelimit-remaining-requests": f"{left}" if left > 0 else "0",
                       "x-ratelimit-reset-requests": duration(back),
                       "x-ratelimit-limit-tokens": pair[3],
                       "x-ratelimit-remaining-tokens": f"{tokens_left}" if tokens_left > 0 else "0",
                       "x-ratelimit-reset-tokens": duration(tokens_back)}
        else:
            headers = {}
            for limit_name, remaining_name, reset_name, i, limit_text, others in plan.heads:
                for j, text in others:  # the tightest limit of its kind: the least remaining, the first of equals
                    if got[j][0] < got[i][0]:
                        i, limit_text = j, text
                left, back = got[i]
                headers[limit_name] = limit_text
                headers[remaining_name] = f"{left}" if left > 0 else "0"
                headers[reset_name] = duration(back)
        if lowered:
            said: dict[str, str] = {}
            lower(body, limit, completion, said)
            if said:  # request_budget's header comes first, as it decided first
                headers = {**said, **headers}
        ctx.policy = Planned(plan, tokens, body, prompt, headers)
        if self.metrics is not None:
            self.metrics.decisions.inc_each(plan.continues)  # counted as one, folded in when read
        if ctx.span is not None and self.record is not None:
            for name, mode in plan.events:
                self.record(ctx, name, "continue", mode=mode)
        return CONTINUE

    def give_back_planned(self, ctx: "RequestContext") -> bool:
        """`after` without a coroutine for a request its plan admitted: what the plan took is charged what the
        request used (or freed), and what hedges reserved given back, as `after` does an admitted request's
        claims. False for any other request: `await after(ctx)`."""
        state = ctx.policy
        if state.__class__ is not Planned:
            return False
        plan = state.plan
        if plan.settles:
            try:
                used = used_tokens(ctx)
            except Exception:  # a replaced estimator that raised: the reservations stand as the charge
                self._warn("policy_error", logging.ERROR, request_id=ctx.request_id, policy="estimator",
                           hook="after", exc_info=True)
                used = -1
            self._give_back(plan.token_gcras, plan.budgets, plan.slots, state.tokens, used)
        if state.hedged:
            self._settle_now([Settlement(c.kind, c.key, reserved=c.amount, used=0, limit=c.limit, param=c.param)
                              for c in state.hedged])
        return True

    # --- the store ------------------------------------------------------------------------------------

    @staticmethod
    def _settle_claims(state: PolicyState, used: int) -> None:
        """The admitted claims of the policies that leave their settling to the chain (`settles_claims`): a
        budget or a tokens limit is charged what the request used (`used`; -1: unknown, what it reserved) in
        place of what it reserved, a slot is freed, a requests limit has nothing to correct."""
        settlements = state.settlements
        for claim, owner in zip(state.claims, state.owners):
            if owner.settles_claims:
                kind = claim.kind
                if kind == SLOT:
                    settlements.append(Settlement(SLOT, claim.key, lease=claim.lease))
                elif kind == BUDGET or claim.header == "tokens":
                    settlements.append(Settlement(kind, claim.key, claim.amount, claim.amount if used < 0 else used,
                                                  claim.limit, claim.param))

    async def _admit(self, ctx: "RequestContext", state: PolicyState) -> Decision:
        deadline = None
        while True:
            admitting = None
            try:
                if self._admit_now is not None:
                    admission = self._admit_now(state.claims)
                else:
                    admitting = self.store.admit(state.claims)  # raises StoreUnavailable at once while Redis is down
                    admission = await admitting
            except asyncio.CancelledError:
                landed = _landed(admitting)
                if landed is not None:  # `after` settles it as it would any admitted request's
                    state.admitted, state.admission = True, landed
                raise
            except StoreUnavailable:
                return self._store_down(ctx, state)
            if admission.ok:
                self._took(ctx, state, admission)
                return CONTINUE
            policy = state.owners[admission.failed]
            claim = state.claims[admission.failed]
            wait_s = getattr(policy, "wait_s", 0)
            if wait_s and admission.retry_after >= 0:
                now = asyncio.get_running_loop().time()
                if deadline is None:
                    deadline = now + wait_s
                left = deadline - now
                if admission.retry_after <= left and left > 0:
                    if claim.kind == SLOT:
                        await self.store.changed(left)
                    else:
                        await asyncio.sleep(admission.retry_after)
                    continue
            decision = policy.refused(ctx, claim, admission)
            self._record(ctx, policy, decision)
            return decision

    def _took(self, ctx: "RequestContext", state: PolicyState, admission: Admission) -> None:
        """The store admitted the request: each policy that claimed is recorded, and the headers set."""
        state.admitted = True
        state.admission = admission
        over = admission.over
        metrics, continues = self.metrics, self._continue_keys
        for policy in state.spans:
            if over and any(state.owners[i] is policy for i in over):
                self._record(ctx, policy, _SHADOW_REJECT)
                continue
            if metrics is not None:  # _record's continue, inline
                metrics.decisions.inc(continues[policy])
            if ctx.span is not None and self.record is not None:
                self.record(ctx, policy.name, "continue", mode=policy.mode)
        if state.headed:
            _ratelimit_headers(state, admission)

    def _store_down(self, ctx: "RequestContext", state: PolicyState) -> Decision:
        owners = list(state.spans)
        state.claims, state.owners, state.spans, state.headed = [], [], {}, []
        closed = False
        for policy in owners:
            self._record(ctx, policy, _ERROR)
            closed = closed or (policy.on_error == CLOSED and policy.mode == ENFORCE)
        self._warn("policy_store_unavailable", request_id=ctx.request_id,
                   policies=",".join(p.name for p in owners), outcome="refused" if closed else "admitted")
        return _unavailable() if closed else CONTINUE

    def _settle_in_background(self, ctx: "RequestContext", settlements: list[Settlement]) -> None:
        """The Redis store's settlement goes with its next call and the answer does not wait for it: one
        round trip less for the client, one wake-up less for the handler. It is queued before the answer
        goes out, so this process's next admission reaches Redis after it (a call carries settlements first)."""
        try:
            future = self._settle_soon(settlements)
        except StoreUnavailable:
            future = None
        if future is None:
            self._settle_failed(ctx.request_id)
            return
        if future is not self._watched:  # settlements sent together share a future: one callback for them all
            self._watched = future
            request_id = ctx.request_id
            future.add_done_callback(lambda f: f.cancelled() or f.exception() is None or
                                     self._settle_failed(request_id))

    def _settle_failed(self, request_id: str) -> None:
        self._warn("policy_settle_failed", request_id=request_id,
                   message="the store is unreachable; the reservation lapses with its period or lease")

    async def _settle(self, ctx: "RequestContext", settlements: list[Settlement]) -> None:
        try:
            await self.store.settle(settlements)
        except StoreUnavailable:
            self._warn("policy_settle_failed", request_id=ctx.request_id,
                       message="the store is unreachable; the reservation lapses with its period or lease")

    # --- outcomes -------------------------------------------------------------------------------------

    def _warn(self, event: str, level: int = logging.WARNING, **fields) -> None:
        """One line per event and policy every 10 s at most, with how many were left out: a Redis outage or
        a broken policy must not turn every request into a log line."""
        key = (event, fields.get("policy"), fields.get("hook"))
        now = time.monotonic()
        last, skipped = self._logged.get(key, (0.0, 0))
        if now - last < 10.0:
            self._logged[key] = (last, skipped + 1)
            return
        self._logged[key] = (now, 0)
        if skipped:
            fields["suppressed"] = skipped
        emit(level, event, **fields)

    def _failed(self, ctx: "RequestContext", policy: Policy, hook: str) -> Decision:
        self._warn("policy_error", logging.ERROR, request_id=ctx.request_id, policy=policy.name, hook=hook,
                   on_error=policy.on_error, exc_info=True)
        self._record(ctx, policy, _ERROR)
        if policy.on_error == CLOSED and policy.mode == ENFORCE:
            return _unavailable()
        return CONTINUE

    def _record(self, ctx: "RequestContext", policy: Policy, decision: Decision) -> None:
        label = decision.label
        if self.metrics is not None:
            key = self._keys.get((policy, label))
            if key is None:  # policies and labels are the config's and the code's: a small, fixed set
                key = self._keys[(policy, label)] = (policy.name, label, policy.mode)
            self.metrics.decisions.inc(key)
        if ctx.span is not None and self.record is not None:
            self.record(ctx, policy.name, label, mode=policy.mode)
        # A log line for what refused, skipped, failed or was only shadowed; not for an enforced answer (a cache
        # hit), which the request's own line shows (`cache`): a busy cache would write every hit twice.
        if label != "continue" and (label != "respond" or policy.mode != ENFORCE):
            fields = {"request_id": ctx.request_id, "policy": policy.name, "decision": label, "mode": policy.mode}
            if isinstance(decision, Reject):
                fields["status"], fields["code"] = decision.status, decision.code
            emit(logging.INFO, "policy_decision", **fields)


class _Labelled:
    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label


_ERROR = _Labelled("error")
_NO_HEDGE = Skip("no_room_for_a_hedge")
_SHADOW_REJECT = _Labelled("reject")


def _unavailable() -> Reject:
    return Reject(503, "A request policy could not decide (its store is unavailable); try again shortly.",
                  code="policy_unavailable", type="server_error", headers={"retry-after": "1"})




def _ratelimit_headers(state: PolicyState, admission: Admission) -> None:
    """x-ratelimit-* of the tightest throughput limit of each kind (requests, tokens) that applied."""
    headed = state.headed
    claims, remaining = state.claims, admission.remaining
    tightest: dict[str, int] = {}  # kind -> index of its claim with the least remaining
    for i in headed:
        kind = claims[i].header
        best = tightest.get(kind)
        if best is None or remaining[i] < remaining[best]:
            tightest[kind] = i
    headers, reset = state.headers, admission.reset
    for kind, i in tightest.items():
        limit_name, remaining_name, reset_name = HEADER_NAMES[kind]
        left = remaining[i]
        headers[limit_name] = str(claims[i].limit)
        headers[remaining_name] = str(int(left)) if left > 0 else "0"
        headers[reset_name] = duration(reset[i])
