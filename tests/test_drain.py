"""Graceful drain (proxy/app/drain.py), run as an operator meets it: a real `groq-proxy serve` subprocess in
front of a slow `groq-proxy simulate` subprocess, SIGTERM in the middle of 50 open streams, token_budget
settling on the suite's Redis, spans to a real OTLP receiver that only the exit's flush reaches."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest

from policies.estimate import estimate
from tests.otlp_receiver import KIND_SERVER, otlp  # noqa: F401  (a fixture)
from tests.procs import clean_env, start_serving
from tests.slow_streams import SIM_KEY, STREAMS, body, budget, events, open_streams, start_simulator, write_config


# 300 tokens at 10 a second: 30 s a stream, long past a 1 s drain timeout. (50 streams of up to 300 tokens stay
# under the simulator's 18,000 tokens a minute, which the proxy's rate-limit prediction would enforce.)
LONG = 300


async def until_reserved(session: aiohttp.ClientSession, base: str, tokens: int) -> None:
    """Waits until the token budget holds `tokens` in reservations (every request admitted)."""
    for _ in range(600):
        async with session.get(base + "/v1/usage") as resp:
            if (await resp.json())["budgets"][0]["reserved"] == tokens:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the budget never held {tokens} reserved tokens")


async def readyz(base: str) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(base + "/readyz") as resp:
            return resp.status


async def test_sigterm_during_50_streams_lets_every_one_finish_and_settle(
        tmp_path, redis_store_table, otlp, start_proxy):  # noqa: F811
    sim, sim_url = await start_simulator(tmp_path, tokens_per_s=25)
    # Spans are exported every hour: only the flush at exit can bring them to the receiver.
    telemetry = f'[telemetry]\nendpoint = "{otlp.url}"\nexport_interval_s = 3600\n'
    path = write_config(tmp_path, sim_url, redis_store_table, {"drain_s": 4, "drain_timeout_s": 120}, telemetry)
    proxy = session = None
    try:
        proxy, base = await start_serving(tmp_path, "proxy", "--config", path, env=clean_env(SIM_KEY=SIM_KEY))
        session, streams = await open_streams(base, 150)  # 150 tokens at 25 a second: 6 s each
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_for_log(lambda line: line["event"] == "drain_started")
        # Step 1: not ready at once, while the listener still takes connections for the load balancer's sake.
        assert await readyz(base) == 503
        async with aiohttp.ClientSession() as plain:  # a request that arrives in the grace is still served
            async with plain.post(base + "/v1/chat/completions", json={**body(99, 2), "stream": False}) as resp:
                assert resp.status == 200
                grace_usage = (await resp.json())["usage"]["total_tokens"]
        closed = await proxy.wait_for_log(lambda line: line["event"] == "drain_listener_closed")
        assert closed["in_flight"] > 0  # streams were still running when the listener closed
        with pytest.raises(aiohttp.ClientConnectorError):
            await readyz(base)
        bodies = await asyncio.wait_for(asyncio.gather(*streams), 120)
        assert await proxy.wait(60) == 0
    finally:
        if session is not None:
            await session.close()
        if proxy is not None:
            await proxy.stop()
        await sim.stop()
    used = grace_usage
    for raw in bodies:
        assert raw.endswith(b"data: [DONE]\n\n")
        last = orjson.loads(events(raw)[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        used += last["x_groq"]["usage"]["total_tokens"]
    done = next(line for line in proxy.log_lines() if line["event"] == "drain_done")
    assert done["cut"] == 0
    # No settlement lost: every reservation came back, and what is charged is what the upstream reported.
    state = await budget(start_proxy, path)
    assert (state["reserved"], state["used"]) == (0, used)
    # The spans still queued at exit were flushed: one server span per request.
    servers = [s for s in otlp.spans if s.kind == KIND_SERVER]
    assert len(servers) == STREAMS + 1


async def test_streams_still_running_at_drain_timeout_end_with_the_error_event_and_settle(
        tmp_path, redis_store_table, start_proxy):
    sim, sim_url = await start_simulator(tmp_path, tokens_per_s=10)
    path = write_config(tmp_path, sim_url, redis_store_table, {"drain_s": 0, "drain_timeout_s": 1})
    proxy = session = None
    try:
        proxy, base = await start_serving(tmp_path, "proxy", "--config", path, env=clean_env(SIM_KEY=SIM_KEY))
        session, streams = await open_streams(base, LONG)
        plain_body = {**body(STREAMS, LONG), "stream": False}  # a plain answer comes whole, after 30 s
        plain = asyncio.create_task(session.post(base + "/v1/chat/completions", json=plain_body))
        # Every request is admitted and holds its reservation (the plain one is waiting on the upstream).
        reserved = sum(estimate(body(i, LONG)) + LONG for i in range(STREAMS)) + estimate(plain_body) + LONG
        await until_reserved(session, base, reserved)
        proxy.process.send_signal(signal.SIGTERM)
        bodies = await asyncio.wait_for(asyncio.gather(*streams), 60)
        plain_response = await asyncio.wait_for(plain, 60)
        assert plain_response.status == 503
        assert (await plain_response.json())["error"]["code"] == "shutting_down"
        assert await proxy.wait(60) == 0
    finally:
        if session is not None:
            await session.close()
        if proxy is not None:
            await proxy.stop()
        await sim.stop()
    prompt = 0
    used = estimate(plain_body)  # cut before any answer: its prompt's estimate
    for i, raw in enumerate(bodies):
        got = events(raw)
        assert b"[DONE]" not in raw
        error = orjson.loads(got[-1])["error"]
        assert error["code"] == "shutting_down" and "server.drain_timeout_s (1 s)" in error["message"]
        # A cut stream is charged its prompt's estimate and one token per content event that went out.
        prompt = estimate(body(i, LONG))
        used += prompt + len(got) - 2  # minus the error event and the role chunk
    cut = next(line for line in proxy.log_lines() if line["event"] == "drain_cut")
    assert cut["requests"] == STREAMS + 1
    attempts = [line for line in proxy.log_lines() if line["event"] == "attempt"]
    assert len(attempts) == STREAMS + 1 and {a["reason"] for a in attempts} == {"shutting_down"}
    state = await budget(start_proxy, path)
    assert (state["reserved"], state["used"]) == (0, used)
    assert prompt > 0


async def test_a_second_signal_cuts_the_drain_short(tmp_path, redis_store_table):
    sim, sim_url = await start_simulator(tmp_path, tokens_per_s=10)
    path = write_config(tmp_path, sim_url, redis_store_table, {"drain_s": 600, "drain_timeout_s": 600})
    proxy = session = None
    try:
        proxy, base = await start_serving(tmp_path, "proxy", "--config", path, env=clean_env(SIM_KEY=SIM_KEY))
        session, streams = await open_streams(base, LONG)
        proxy.process.send_signal(signal.SIGINT)
        await proxy.wait_for_log(lambda line: line["event"] == "drain_started")
        proxy.process.send_signal(signal.SIGINT)
        bodies = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert await proxy.wait(60) == 0
    finally:
        if session is not None:
            await session.close()
        if proxy is not None:
            await proxy.stop()
        await sim.stop()
    assert all(orjson.loads(events(raw)[-1])["error"]["code"] == "shutting_down" for raw in bodies)

