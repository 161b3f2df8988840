"""What a hedge race leaves behind: exactly one attempt answered (the one whose answer the client got, however
close the finish), and budgets that reserved for every attempt in flight and settled to what each produced,
on the memory store and on Redis. The upstream is a raw server that holds its answers until the test lets
them go, so which attempt finishes when is the test's choice, never a timing."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.conftest import attempt_fields, post_chat, read_request, routing_config, until

MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"m1": 40, "m2": 7}  # total tokens each model reports


def answer(model: str) -> bytes:
    body = orjson.dumps({"id": f"id-{model}", "object": "chat.completion", "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {model}"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": USAGE[model] - 5,
                                   "total_tokens": USAGE[model]}})
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


class HeldUpstream:
    """Answers each model only when the test says so; `release(*models)` writes their answers back to back,
    in one go, so that the proxy reads them in the same turn of its event loop."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.StreamWriter] = {}
        self.arrived = asyncio.Event()
        self.closed: set[str] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        model = orjson.loads(request.split(b"\r\n\r\n", 1)[1])["model"]
        self.waiting[model] = writer
        self.arrived.set()
        await reader.read()  # until the proxy closes the connection (a cancelled loser) or the test ends
        self.closed.add(model)

    def release(self, *models: str) -> None:
        for model in models:
            self.waiting[model].write(answer(model))


def hedged_config(port: int, **tables):
    return routing_config(f"http://127.0.0.1:{port}/openai/v1",
                          {"tier-x": {"chain": ["m1", "m2"], "hedge": True, "hedge_after_ms": 20}}, **tables)


@pytest.mark.parametrize("first", ["m1", "m2"])
async def test_racers_finishing_in_the_same_turn_leave_one_answered_attempt_the_clients(first, raw_server,
                                                                                       start_proxy, proxy_log):
    held = HeldUpstream()
    port = await raw_server(held.handle)
    base = await start_proxy(hedged_config(port))
    asked = asyncio.ensure_future(post_chat(base, {"model": "tier-x", "messages": MESSAGES}))
    await until(lambda: len(held.waiting) == 2, what="both racers at the upstream")
    held.release(first, "m2" if first == "m1" else "m1")
    code, headers, raw = await asyncio.wait_for(asked, 10)
    assert code == 200
    got = orjson.loads(raw)["model"]
    fields = {f["target"]: f for f in attempt_fields(proxy_log) if f.get("target") in ("up:m1", "up:m2")}
    outcomes = {target[3:]: f["outcome"] for target, f in fields.items()}
    assert outcomes[got] == "answered" and headers["x-groq-proxy-model"] == got
    other = "m2" if got == "m1" else "m1"
    assert outcomes[other] == "hedge_lost", outcomes


async def usage(base: str, key: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/usage", headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
            return (await resp.json())["budgets"][0]


def budget_tables(store: dict | None, tokens: int) -> dict:
    from policies.identity import hash_key

    tables = {"auth": {"keys": [{"id": "k", "sha256": hash_key("gp-hedge-key")}]},
              "policies": [{"use": "token_budget", "per": "key", "tokens": tokens}]}
    if store is not None:
        tables["store"] = store
    return tables


# A request reserves its prompt's estimate (8 here) plus its completion limit (100): 108 a racer.
BODY = {"model": "tier-x", "messages": MESSAGES, "max_tokens": 100}
AUTH = {"Authorization": "Bearer gp-hedge-key"}


@pytest.fixture(params=["memory", "redis"])
def store_table(request, redis_store_table):
    return None if request.param == "memory" else redis_store_table


async def test_a_budget_reserves_for_both_racers_and_settles_to_what_each_produced(store_table, raw_server,
                                                                                  start_proxy):
    held = HeldUpstream()
    port = await raw_server(held.handle)
    base = await start_proxy(hedged_config(port, **budget_tables(store_table, 10_000)))
    asked = asyncio.ensure_future(post_chat(base, BODY, AUTH))
    await until(lambda: len(held.waiting) == 2, what="both racers at the upstream")
    during = await usage(base, "gp-hedge-key")
    assert during["reserved"] == 2 * 108 and during["used"] == 0  # one reservation per attempt in flight
    held.release("m2")  # the hedge wins; m1 is cancelled before it produced anything
    code, _, raw = await asyncio.wait_for(asked, 10)
    assert code == 200 and orjson.loads(raw)["model"] == "m2"
    after = await usage(base, "gp-hedge-key")
    assert after["reserved"] == 0 and after["used"] == USAGE["m2"]


async def test_a_budget_that_cannot_cover_a_second_attempt_starts_no_hedge(store_table, raw_server, start_proxy,
                                                                          proxy_log):
    held = HeldUpstream()
    port = await raw_server(held.handle)
    base = await start_proxy(hedged_config(port, **budget_tables(store_table, 150)))  # one racer's 108, not two
    asked = asyncio.ensure_future(post_chat(base, BODY, AUTH))
    await until(lambda: "m1" in held.waiting, what="the first attempt at the upstream")
    await until(lambda: any(r.getMessage() == "policy_decision" for r in proxy_log.records),
                what="the budget's refusal of a second attempt")
    assert list(held.waiting) == ["m1"]
    held.release("m1")
    code, _, raw = await asyncio.wait_for(asked, 10)
    assert code == 200 and orjson.loads(raw)["model"] == "m1"
    after = await usage(base, "gp-hedge-key")
    assert after["reserved"] == 0 and after["used"] == USAGE["m1"]
