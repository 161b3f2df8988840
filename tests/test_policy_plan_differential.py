"""The plan against the generic path over random configurations and request sequences: the built-ins in any mix
(request_budget first or not at all, per key, user, team, global and model, shadow ones, limits per virtual
model), with and without [auth], chat, the Responses API, embeddings and audio, completion limits in each
field, request types configured or not, requests held in flight across a budget period's end, hedges, and
attempts that answered, failed or were cut. Every step must leave the same decisions, headers, bodies,
counters, metrics and span events on both sides (tests/test_policy_plan.py's Twins). Seeded: a failure names
its seed, and runs again the same."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from policies import estimate as estimates
from policies.identity import hash_key
from proxy.app.validation import validate_chat
from proxy.pipeline.context import Attempt, RequestContext
from tests import test_policy_plan as plan_tests
from tests.test_policy_plan import KEY, Twins, _decision, _Span

OTHER_KEY = "gp-test-plan-other-key"


class _Audio:
    tokens = False  # an audio operation: requests and slots only


def _policies(rng: random.Random) -> list[dict]:
    out: list[dict] = []
    if rng.random() < 0.6:
        table: dict = {"use": "request_budget"}
        if rng.random() < 0.5:
            table["types"] = {"default": {"prompt": rng.choice([20, 200, 1000]),
                                          "completion": rng.choice([10, 50, 300])},
                              "chat": {"prompt": 50, "completion": 30}}
        if rng.random() < 0.3:
            table["over_completion"] = "reject"
        out.append(table)
    for _ in range(rng.randint(0, 2)):
        table = {"use": "token_budget", "name": f"tb{len(out)}", "tokens": rng.choice([300, 1000, 5000]),
                 "per": rng.choice(["key", "user", "team", "global"]), "period": rng.choice(["minute", "hour", "day"])}
        if rng.random() < 0.3:
            table["default_completion"] = rng.choice([50, 100])
        if rng.random() < 0.2:
            table["mode"] = "shadow"
        out.append(table)
    for _ in range(rng.randint(0, 3)):
        table = {"use": "rate_limit", "name": f"rl{len(out)}",
                 "per": rng.choice(["global", "key", "user", "team", "model"])}
        if rng.random() < 0.8:
            table["requests_per_minute"] = rng.choice([2, 5, 20])
        if rng.random() < 0.6 or "requests_per_minute" not in table:
            table["tokens_per_minute"] = rng.choice([300, 1000, 5000])
        if rng.random() < 0.3:
            table["default_completion"] = rng.choice([50, 100])
        if rng.random() < 0.2:
            table["mode"] = "shadow"
        out.append(table)
    for _ in range(rng.randint(0, 2)):
        per = rng.choice(["model", "global", "key"])
        table = {"use": "concurrency", "name": f"cc{len(out)}", "per": per}
        if per == "model" and rng.random() < 0.6:
            table["limits"] = {"tier-test": rng.choice([1, 2, 3])}
            if rng.random() < 0.5:
                table["limit"] = 2
        else:
            table["limit"] = rng.choice([1, 2, 4])
        if rng.random() < 0.2:
            table["mode"] = "shadow"
        out.append(table)
    return out


def _counters(side) -> tuple:
    """The store's counters as they count: a bucket or budget past its time is the same as none (when each
    store prunes them depends on when it was last called, which the plan changes for a plan without rows)."""
    store = side.store
    now = store.clock()
    return ({k: v for k, v in store._tat.items() if v > now},
            {k: list(v) for k, v in store._budgets.items() if v[2] > now}, dict(store._slots))


async def _start(side, body: dict, headers: dict, operation: str, audio: bool):
    side.count += 1
    model = validate_chat(body) if operation == "chat" else body["model"]
    ctx = RequestContext(f"req_{side.count}", operation, side.router.resolve(model), body, False)
    ctx.span = _Span()
    if audio:
        ctx.op = _Audio()
    ctx.identity = side.chain.authenticate(headers)
    side.chain.begin(ctx, headers)
    return ctx, await side.chain.on_request(ctx)


async def _end(side, ctx, outcomes: list[tuple]) -> None:
    for i, (outcome, usage, events) in enumerate(outcomes):
        attempt = Attempt(i, ctx.route.chain[0])
        attempt.outcome, attempt.usage, attempt.events = outcome, usage, events
        attempt.first_byte = None if outcome == "fell_over" else 1.0
        ctx.attempts.append(attempt)
        if outcome == "answered":
            ctx.answered = attempt
    await side.chain.after(ctx)


def _request(rng: random.Random, auth: bool) -> tuple[dict, dict, str, bool]:
    kind = rng.choice(["chat", "chat", "chat", "responses", "embeddings", "audio"])
    model = rng.choice(["tier-test", "tier-test", "tier-other", "m1"])
    content = "x" * rng.choice([4, 40, 400, 1200]) + rng.choice(["", "é"])
    user = rng.choice(["ann", "bo", "cy"])
    if kind == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": content}], "user": user}
        field = rng.choice([None, "max_tokens", "max_completion_tokens"])
        if field:
            body[field] = rng.choice([5, 40, 400, 5000])
    else:
        body = {"model": model, "input": content, "user": user}
        if kind == "responses" and rng.random() < 0.5:
            body["max_output_tokens"] = rng.choice([5, 40, 400])
    headers = {}
    if auth:
        headers["Authorization"] = "Bearer " + rng.choice([KEY, OTHER_KEY])
    if rng.random() < 0.4:
        headers["x-request-type"] = rng.choice(["chat", "summarization", "weird", "contentGeneration"])
    operation = {"chat": "chat", "responses": "responses"}.get(kind, "embeddings")
    return body, headers, operation, kind == "audio"


def _outcomes(rng: random.Random) -> list[tuple]:
    out = []
    if rng.random() < 0.3:
        out.append(("fell_over", None, 0))  # a first model that failed before any answer: it used nothing
    out.append(rng.choice([("answered", {"total_tokens": rng.randint(0, 500)}, 0),
                           ("answered", {"prompt_tokens": 5, "completion_tokens": 7}, 0),
                           ("answered", None, rng.randint(0, 20)),  # a stream cut short: its estimate
                           ("cancelled", None, rng.randint(0, 9))]))  # its client went away
    return out


async def _run(seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    tables = _policies(rng)
    auth = rng.random() < 0.4
    if rng.random() < 0.2:  # a replaced estimator that answers in floats
        monkeypatch.setattr(estimates, "_estimator", lambda body: estimates.estimate_prompt_tokens(body) * 1.5)
    twins = Twins(tables, t=1_000_000.0 + rng.random() * 100, auth=auth) if _planned(tables) else None
    if twins is None:
        return
    if auth:  # a second key, with its own user and team
        for side in (twins.planned, twins.generic):
            ring = side.chain.keys
            other = type(ring.keys[0])("k2", bytes.fromhex(hash_key(OTHER_KEY)),
                                       type(ring.keys[0].identity)("k2", "dev-2", "red"))
            ring.keys = (*ring.keys, other)
    monkeypatch.setattr(time, "time", lambda: twins.clock.t)
    held = []
    for step in range(40):
        roll = rng.random()
        if roll < 0.15 and held:
            pair = held.pop(rng.randrange(len(held)))
            outcomes = _outcomes(rng)
            await _end(twins.planned, pair[0], outcomes)
            await _end(twins.generic, pair[1], outcomes)
            _same(twins, seed, step)
            continue
        if roll < 0.2:  # time passes: a little, past buckets' refills, to a period's end or just before it
            t = twins.clock.t
            twins.clock.t += rng.choice([0.5, 5, 30, 61, 3600, 86400, 60 - t % 60 - 0.001, 60 - t % 60])
            continue
        body, headers, operation, audio = _request(rng, auth)
        a_ctx, a = await _start(twins.planned, orjson.loads(orjson.dumps(body)), headers, operation, audio)
        b_ctx, b = await _start(twins.generic, orjson.loads(orjson.dumps(body)), headers, operation, audio)
        where = (seed, step, body, headers)
        assert _decision(a) == _decision(b), where
        assert list(a_ctx.policy.headers.items()) == list(b_ctx.policy.headers.items()), where
        assert a_ctx.body == b_ctx.body, where
        _same(twins, seed, step)
        if a.label == "continue" and rng.random() < 0.1:
            hedged = await twins.planned.chain.reserve_hedge(a_ctx)
            assert hedged == await twins.generic.chain.reserve_hedge(b_ctx), where
            _same(twins, seed, step)
        if a.label == "continue" and rng.random() < 0.5:
            held.append((a_ctx, b_ctx))
        else:
            outcomes = _outcomes(rng)
            await _end(twins.planned, a_ctx, outcomes)
            await _end(twins.generic, b_ctx, outcomes)
            _same(twins, seed, step)
    for a_ctx, b_ctx in held:
        await _end(twins.planned, a_ctx, [("answered", {"total_tokens": 17}, 0)])
        await _end(twins.generic, b_ctx, [("answered", {"total_tokens": 17}, 0)])
    _same(twins, seed, "end")
    assert not twins.planned.store._slots


def _planned(tables: list[dict]) -> bool:
    budgets = [i for i, t in enumerate(tables) if t["use"] == "request_budget"]
    return bool(tables) and budgets in ([], [0])


def _same(twins: Twins, seed: int, step) -> None:
    assert _counters(twins.planned) == _counters(twins.generic), (seed, step)
    assert twins.planned.chain.metrics.decisions.fold() == twins.generic.chain.metrics.decisions.fold(), (seed, step)
    assert twins.planned.events == twins.generic.events, (seed, step)


@pytest.mark.parametrize("block", range(6))
async def test_random_mixes_decide_and_count_alike_planned_and_generic(block, monkeypatch):
    for seed in range(block * 60, block * 60 + 60):
        with monkeypatch.context() as patched:
            await _run(seed, patched)
    assert plan_tests.Twins is Twins


async def test_a_request_that_fills_a_budget_and_a_bucket_exactly_is_admitted_by_both():
    """The edges random mixes seldom hit: a reservation equal to what is left fits, one token more does not."""
    twins = Twins([{"use": "token_budget", "per": "global", "tokens": 100},
                   {"use": "rate_limit", "per": "global", "requests_per_minute": 2, "tokens_per_minute": 100}])
    prompt = estimates.estimate(plan_tests.chat(content="abcd"))
    pair, decision = await twins.start(plan_tests.chat(content="abcd", max_completion_tokens=100 - prompt))
    assert decision.label == "continue" and pair[0].policy.headers["x-ratelimit-remaining-tokens"] == "0"
    refused, decision = await twins.start(plan_tests.chat(content="abcd", max_completion_tokens=1))
    assert decision.code == "insufficient_quota"
    await twins.end(pair, {"total_tokens": 50})  # half given back: to the budget and to the bucket
    await twins.end(refused, None)
    pair, decision = await twins.start(plan_tests.chat(content="abcd", max_completion_tokens=50 - prompt))
    assert decision.label == "continue"
    assert twins.planned.store._budgets[pair[0].policy.plan.budgets[0][0]][:2] == [50, 50]
    await twins.end(pair, {"total_tokens": 50})
