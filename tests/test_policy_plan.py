"""The built-ins' plan (policies/plan.py) against the generic path: the same requests through a chain that plans
and one that does not must leave the same counters, answers, headers, bodies, metrics and span events. Then the
plan's own edges: a token budget's period ending under a cached plan, a reload, many identities, the chains that
are not planned, and the memory store's one-call step."""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest

from policies.chain import PolicyChain
from policies.identity import hash_key
from policies.plan import Planned, plannable
from policies.scopes import period_bounds
from policies.stores.memory import MemoryStore
from proxy.app.policy_routes import PolicyMetrics
from proxy.app.validation import validate_chat
from proxy.pipeline.context import Attempt, RequestContext
from proxy.routing.router import Router
from tests.conftest import config_for
from tests.policy_examples import Journal
from tests.test_reload import env, proxy, reload, toml  # noqa: F401  (env and proxy are fixtures)

KEY = "gp-test-plan-key"
BUILTINS = [
    {"use": "request_budget", "types": {"default": {"prompt": 1000, "completion": 300}}},
    {"use": "token_budget", "per": "user", "tokens": 400},
    {"use": "rate_limit", "per": "user", "requests_per_minute": 6, "tokens_per_minute": 900},
    {"use": "rate_limit", "name": "everyone", "requests_per_minute": 9},
    {"use": "concurrency", "per": "model", "limits": {"tier-test": 3}},
]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Side:
    """One chain over its own memory store, with its metrics and span events recorded."""

    def __init__(self, tables: list[dict], clock: Clock, planned: bool, auth: bool = False) -> None:
        extra = {"auth": {"keys": [{"id": "k1", "sha256": hash_key(KEY), "team": "blue"}]}} if auth else {}
        self.config = config_for("http://127.0.0.1:1/v1", {"tier-test": ["m1"], "tier-other": ["m2"]},
                                 policies=tables, **extra)
        pc = self.config.policies
        self.store = MemoryStore(clock)
        self.chain = PolicyChain(pc.policies, keys=pc.keys, store=self.store, request_types=pc.request_types,
                                 metrics=PolicyMetrics())
        if not planned:
            self.chain._plans = None
        self.events: list[tuple] = []
        self.chain.record = lambda ctx, name, label, mode: self.events.append((ctx.request_id, name, label, mode))
        self.router = Router(self.config)
        self.count = 0

    async def start(self, body: dict, headers: dict, operation: str = "chat") -> tuple[RequestContext, object]:
        self.count += 1
        model = validate_chat(body) if operation == "chat" else body["model"]
        ctx = RequestContext(f"req_{self.count}", operation, self.router.resolve(model), body, False)
        ctx.span = _Span()
        ctx.identity = self.chain.authenticate(headers)
        self.chain.begin(ctx, headers)
        return ctx, await self.chain.on_request(ctx)

    async def end(self, ctx: RequestContext, usage: dict | None, events: int = 0) -> None:
        attempt = Attempt(0, ctx.route.chain[0])
        attempt.usage, attempt.outcome, attempt.first_byte, attempt.events = usage, "answered", 1.0, events
        ctx.attempts.append(attempt)
        ctx.answered = attempt
        await self.chain.after(ctx)

    def counters(self) -> tuple:
        return dict(self.store._tat), {k: list(v) for k, v in self.store._budgets.items()}, dict(self.store._slots)


class _Span:
    def __init__(self) -> None:
        self.attrs: dict = {}


class Twins:
    """The planned and the generic chain, fed the same requests; every step compared."""

    def __init__(self, tables: list[dict], t: float = 1_000_000.0, auth: bool = False) -> None:
        self.clock = Clock(t)
        self.planned = Side(tables, self.clock, True, auth)
        self.generic = Side(tables, self.clock, False, auth)
        assert self.planned.chain._plans is not None

    async def start(self, body: dict, headers: dict | None = None, operation: str = "chat") -> tuple:
        headers = headers or {}
        a_ctx, a = await self.planned.start(orjson.loads(orjson.dumps(body)), headers, operation)
        b_ctx, b = await self.generic.start(orjson.loads(orjson.dumps(body)), headers, operation)
        assert _decision(a) == _decision(b)
        assert a_ctx.policy.headers == b_ctx.policy.headers
        assert list(a_ctx.policy.headers) == list(b_ctx.policy.headers)  # the order the answer carries them in
        assert a_ctx.body == b_ctx.body
        self.same()
        return (a_ctx, b_ctx), a

    async def end(self, pair: tuple, usage: dict | None, events: int = 0) -> None:
        await self.planned.end(pair[0], usage, events)
        await self.generic.end(pair[1], usage, events)
        self.same()

    def same(self) -> None:
        assert self.planned.counters() == self.generic.counters()
        assert self.planned.chain.metrics.decisions.fold() == self.generic.chain.metrics.decisions.fold()
        assert self.planned.chain.metrics.requests.values == self.generic.chain.metrics.requests.values
        assert self.planned.events == self.generic.events


def _decision(decision) -> tuple:
    return (decision.label, getattr(decision, "status", None), getattr(decision, "message", None),
            dict(getattr(decision, "headers", None) or {}))


def chat(user: str = "ann", content: str = "hello there", **fields) -> dict:
    return {"model": "tier-test", "messages": [{"role": "user", "content": content}], "user": user, **fields}


USAGE = {"prompt_tokens": 9, "completion_tokens": 21, "total_tokens": 30}


async def test_planned_requests_leave_what_the_generic_path_leaves():
    twins = Twins(BUILTINS)
    held = []
    steps = [
        (chat(), {}),  # no completion limit: given the type's 300
        (chat(user="al", max_tokens=5000), {}),  # lowered to 300: its header, the field the client used
        (chat(user="bo", max_completion_tokens=40), {"x-request-type": "summarization"}),
        (chat(user="bob", max_completion_tokens=3000), {}),
        (chat(user="cy", max_tokens=None), {"x-request-type": "unknown-type", "x-module": "m"}),
        (chat(content="x" * 9000), {}),  # over the prompt budget: 400 from request_budget
        (chat(user="dd", max_completion_tokens=395), {"x-request-type": "contentGeneration"}),  # over 400 tokens
        (chat(user="ed", max_tokens=50), {"x-request-type": "chat"}),  # 1000 for completions: kept
    ]
    for body, headers in steps:
        pair, decision = await twins.start(body, headers)
        if decision.label == "continue" and len(held) < 2:
            held.append(pair)  # in flight: their slots and reservations stay taken for now
        else:
            await twins.end(pair, USAGE)
    assert isinstance(held[1][0].policy, Planned)
    assert held[1][0].policy.headers["x-groq-proxy-completion-limit"] == "300; lowered from 5000"
    assert held[1][0].body["max_tokens"] == 300
    for pair in held:
        await twins.end(pair, None, events=12)  # a cut stream: settled to the estimate
    # Each limit refuses in turn, the same on both sides: the model's 3 slots (the buckets refilled a minute on)...
    twins.clock.t += 61
    held = [(await twins.start(chat(user=f"s{i}", max_completion_tokens=5)))[0] for i in range(3)]
    pair, decision = await twins.start(chat(user="s9", max_completion_tokens=5))
    assert decision.code == "concurrency_limit_exceeded"
    for pair in [*held, pair]:  # the refused one too: after() runs for every request
        await twins.end(pair, USAGE)
    # ...a user's 6 requests a minute (the buckets refilled a minute on)...
    twins.clock.t += 61
    codes = []
    for _ in range(7):
        pair, decision = await twins.start(chat(user="eve", max_completion_tokens=5))
        codes.append(getattr(decision, "code", decision.label))
        await twins.end(pair, USAGE)
    assert codes == ["continue"] * 6 + ["rate_limit_exceeded"]
    # ...and a user's 400 tokens a day, while a reservation of 390 is in flight.
    twins.clock.t += 61
    long = {"x-request-type": "contentGeneration"}  # 4000 for completions: 380 kept
    pair, decision = await twins.start(chat(user="fay", max_completion_tokens=380), long)
    assert decision.label == "continue"
    refused, decision = await twins.start(chat(user="fay", max_completion_tokens=20), long)
    assert decision.code == "insufficient_quota"
    await twins.end(refused, USAGE)
    await twins.end(pair, {"total_tokens": 500})  # more than reserved: charged what was used
    pair, decision = await twins.start(chat(user="gus", max_completion_tokens=50))
    await twins.end(pair, {"total_tokens": 0})  # nothing used (the upstream answered nothing): nothing charged
    assert twins.planned.store._budgets[pair[0].policy.plan.budgets[0][0]][0] == 0


async def test_with_auth_the_plan_is_per_key_and_its_team():
    tables = [{"use": "token_budget", "per": "team", "tokens": 10_000},
              {"use": "rate_limit", "per": "key", "requests_per_minute": 100, "tokens_per_minute": 100_000},
              {"use": "concurrency", "per": "key", "limit": 2}]
    twins = Twins(tables, auth=True)
    headers = {"Authorization": f"Bearer {KEY}"}
    pairs = [(await twins.start(chat(), headers))[0] for _ in range(3)]
    assert [p[0].policy.__class__ for p in pairs[:2]] == [Planned, Planned]
    assert "k:k1" in next(iter(twins.planned.store._slots))
    assert any(":t:blue:" in key for key in twins.planned.store._budgets)
    for pair in pairs:
        await twins.end(pair, USAGE)


async def test_one_requests_and_one_tokens_limit_write_their_headers_after_request_budgets():
    twins = Twins([{"use": "request_budget"},
                   {"use": "rate_limit", "requests_per_minute": 50, "tokens_per_minute": 20_000}])
    for body in (chat(max_tokens=5000), chat(), chat(max_completion_tokens=7)):
        pair, _ = await twins.start(body)
        assert pair[0].policy.plan.pair is not None  # the usual shape's own way of writing them
        await twins.end(pair, USAGE)
    assert list(pair[0].policy.headers)[0] == "x-ratelimit-limit-requests"


@pytest.mark.parametrize("defaults, planned", [((100, 300), False), ((200, 200), True)])
async def test_a_request_without_a_completion_limit_reserves_each_policys_default(defaults, planned):
    twins = Twins([{"use": "request_budget"},
                   {"use": "token_budget", "per": "global", "tokens": 10_000, "default_completion": defaults[0]},
                   {"use": "rate_limit", "tokens_per_minute": 50_000, "default_completion": defaults[1]}])
    body = {"model": "tier-test", "input": "a question of about forty bytes in length"}  # no max_output_tokens
    pair, decision = await twins.start(body, operation="responses")
    assert decision.label == "continue"
    assert isinstance(pair[0].policy, Planned) is planned  # differing defaults: each its own, the generic way
    await twins.end(pair, USAGE)


async def test_a_chain_that_reserves_no_tokens_plans_a_request_without_a_completion_limit():
    twins = Twins([{"use": "request_budget"}, {"use": "concurrency", "per": "model", "limits": {"tier-test": 2}}])
    pair, _ = await twins.start({"model": "tier-test", "input": "hello"}, operation="responses")
    assert isinstance(pair[0].policy, Planned)
    await twins.end(pair, USAGE)


async def test_shadow_limits_over_their_limit_are_recorded_by_both_the_same():
    tables = [{"use": "rate_limit", "requests_per_minute": 2, "mode": "shadow"},
              {"use": "token_budget", "per": "global", "tokens": 100, "mode": "shadow"}]
    twins = Twins(tables)
    for _ in range(4):
        pair, decision = await twins.start(chat(max_completion_tokens=30))
        assert decision.label == "continue"
        await twins.end(pair, USAGE)
    assert ("rate_limit", "reject", "shadow") in twins.planned.chain.metrics.decisions.fold()


async def test_a_plan_compiled_in_one_budget_period_is_not_used_in_the_next(monkeypatch):
    start, end = period_bounds("minute", 1_000_000.0)
    now = [end - 1.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    tables = [{"use": "token_budget", "per": "user", "tokens": 500, "period": "minute"}]
    twins = Twins(tables, t=now[0])
    pair, _ = await twins.start(chat(max_completion_tokens=300))
    await twins.end(pair, {"total_tokens": 300})
    plan = pair[0].policy.plan
    assert plan.expires == end
    assert list(twins.planned.store._budgets) == [f"tb:token_budget:u:ann:{start}"]
    # The same identity right after the minute: a new period, a new key, the whole budget again.
    now[0] = twins.clock.t = end + 0.5
    pair, decision = await twins.start(chat(max_completion_tokens=300))
    assert decision.label == "continue"  # 300 more would not fit in the old period's 500
    assert pair[0].policy.plan is not plan
    assert f"tb:token_budget:u:ann:{end}" in twins.planned.store._budgets
    await twins.end(pair, {"total_tokens": 300})


async def test_the_plans_kept_are_bounded_however_many_identities(monkeypatch):
    monkeypatch.setattr("policies.chain.MAX_PLANS", 5)
    twins = Twins([{"use": "rate_limit", "per": "user", "requests_per_minute": 2}])
    for i in range(23):
        pair, decision = await twins.start(chat(user=f"user-{i}"))
        assert decision.label == "continue"
        assert len(twins.planned.chain._plans) <= 5
        await twins.end(pair, USAGE)
    for _ in range(2):  # the first user's plan was dropped long ago: compiled again, same counter
        pair, decision = await twins.start(chat(user="user-0"))
    assert decision.label == "reject"


async def test_a_hedge_reserves_from_a_planned_request_as_from_any():
    twins = Twins([{"use": "token_budget", "per": "global", "tokens": 1000},
                   {"use": "rate_limit", "requests_per_minute": 100, "tokens_per_minute": 5000}])
    pair, _ = await twins.start(chat(max_completion_tokens=100))
    assert isinstance(pair[0].policy, Planned)
    assert await twins.planned.chain.reserve_hedge(pair[0]) is True
    assert await twins.generic.chain.reserve_hedge(pair[1]) is True
    twins.same()
    await twins.end(pair, USAGE)


def test_only_the_builtins_on_the_memory_store_are_planned():
    clock = Clock(0.0)
    assert Side(BUILTINS, clock, True).chain._plans is not None
    # request_budget after a policy that reserves, or in shadow: the generic path, which orders them as written
    assert Side(BUILTINS[1:] + BUILTINS[:1], clock, True).chain._plans is None
    assert Side([{"use": "request_budget", "mode": "shadow"}, *BUILTINS[1:]], clock, True).chain._plans is None
    assert Side([*BUILTINS, {"use": "tests.policy_examples:Journal", "label": "j"}], clock, True).chain._plans is None
    assert not plannable(Side(BUILTINS, clock, True).chain.policies, object())  # a store without take: Redis
    Journal.events = []


def test_take_is_all_or_nothing_and_decides_as_admit_now():
    store = MemoryStore(Clock(100.0))
    gcras = (("g:r", 2, 60.0, 30.0, False), ("g:t", 100, 60.0, 0.6, True))
    budgets = (("b", 50, 200.0),)
    slots = (("s", 1),)
    got = store.take(gcras, budgets, slots, 40)
    assert got == [(1.0, 30.0), (60.0, 24.0)]
    before = (dict(store._tat), {k: list(v) for k, v in store._budgets.items()}, dict(store._slots))
    for rows in [(gcras, budgets, (("s2", 1),), 20),  # the budget: 40 + 20 > 50
                 (gcras, (("b2", 50, 200.0),), slots, 5),  # the slot is held
                 ((("g:r2", 2, 60.0, 30.0, False), ("g:t", 100, 60.0, 0.6, True)), (), (), 61)]:  # tokens
        assert store.take(*rows) is None
        assert (dict(store._tat), {k: list(v) for k, v in store._budgets.items()}, dict(store._slots)) == before
    store.give_back(gcras[1:], budgets, slots, 40, 10)
    assert store._slots == {} and store._budgets["b"] == [10, 0, 200.0]
    assert store._tat["g:t"] == pytest.approx(100.0 + 10 * 0.6)


async def test_a_reload_plans_with_the_new_policies_and_the_counters_carry_over(upstream, proxy):
    _, url = upstream
    tables = ('[[policies]]\nuse = "rate_limit"\nper = "user"\nrequests_per_minute = {rpm}\n'
              '[[policies]]\nuse = "concurrency"\nper = "model"\nlimits = {{ "tier-test" = 5 }}\n')
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}, tables.format(rpm=100)))

    async def post() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/chat/completions", json=chat("ann")) as resp:
                return resp.status, dict(resp.headers)

    for _ in range(2):
        status, headers = await post()
        assert status == 200 and headers["x-ratelimit-limit-requests"] == "100"
    path.write_text(toml(url, {"tier-test": ["m1"]}, tables.format(rpm=3)))
    assert (await reload(base))[0] == 200
    status, headers = await post()  # the same identity and model: its plan is the new chain's
    assert status == 200 and headers["x-ratelimit-limit-requests"] == "3"
    # The two before the reload still count, as the time they took of the bucket (2 x 0.6 s of its 60 s).
    assert headers["x-ratelimit-remaining-requests"] == "1"
    status, headers = await post()
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
    status, headers = await post()
    assert status == 429
