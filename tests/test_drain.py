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
from tests.slow_streams import STREAMS, body, budget, events, streams_through_proxy


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
    # Spans are exported every hour: only the flush at exit can bring them to the receiver.
    telemetry = f'[telemetry]\nendpoint = "{otlp.url}"\nexport_interval_s = 3600\n'
    async with streams_through_proxy(tmp_path, redis_store_table, {"drain_s": 4, "drain_timeout_s": 120},
                                     tokens_per_s=25, max_tokens=150, telemetry=telemetry) as running:  # 6 s each
        proxy, base = running.proxy, running.base
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
        bodies = await asyncio.wait_for(asyncio.gather(*running.streams), 120)
        assert await proxy.wait(60) == 0
    used = grace_usage
    for raw in bodies:
        assert raw.endswith(b"data: [DONE]\n\n")
        last = orjson.loads(events(raw)[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        used += last["x_groq"]["usage"]["total_tokens"]
    done = next(line for line in proxy.log_lines() if line["event"] == "drain_done")
    assert done["cut"] == 0
    # No settlement lost: every reservation came back, and what is charged is what the upstream reported.
    state = await budget(start_proxy, running.config)
    assert (state["reserved"], state["used"]) == (0, used)
    # The spans still queued at exit were flushed: one server span per request.
    servers = [s for s in otlp.spans if s.kind == KIND_SERVER]
    assert len(servers) == STREAMS + 1


async def test_streams_still_running_at_drain_timeout_end_with_the_error_event_and_settle(
        tmp_path, redis_store_table, start_proxy):
    async with streams_through_proxy(tmp_path, redis_store_table, {"drain_s": 0, "drain_timeout_s": 1},
                                     tokens_per_s=10, max_tokens=LONG) as running:
        proxy, base, session = running.proxy, running.base, running.session
        plain_body = {**body(STREAMS, LONG), "stream": False}  # a plain answer comes whole, after 30 s
        plain = asyncio.create_task(session.post(base + "/v1/chat/completions", json=plain_body))
        # Every request is admitted and holds its reservation (the plain one is waiting on the upstream).
        reserved = sum(estimate(body(i, LONG)) + LONG for i in range(STREAMS)) + estimate(plain_body) + LONG
        await until_reserved(session, base, reserved)
        proxy.process.send_signal(signal.SIGTERM)
        bodies = await asyncio.wait_for(asyncio.gather(*running.streams), 60)
        plain_response = await asyncio.wait_for(plain, 60)
        assert plain_response.status == 503
        assert (await plain_response.json())["error"]["code"] == "shutting_down"
        assert await proxy.wait(60) == 0
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
    state = await budget(start_proxy, running.config)
    assert (state["reserved"], state["used"]) == (0, used)
    assert prompt > 0


async def test_a_second_signal_cuts_the_drain_short(tmp_path, redis_store_table):
    async with streams_through_proxy(tmp_path, redis_store_table, {"drain_s": 600, "drain_timeout_s": 600},
                                     tokens_per_s=10, max_tokens=LONG) as running:
        proxy = running.proxy
        proxy.process.send_signal(signal.SIGINT)
        await proxy.wait_for_log(lambda line: line["event"] == "drain_started")
        proxy.process.send_signal(signal.SIGINT)
        bodies = await asyncio.wait_for(asyncio.gather(*running.streams), 60)
        assert await proxy.wait(60) == 0
    assert all(orjson.loads(events(raw)[-1])["error"]["code"] == "shutting_down" for raw in bodies)




async def serve_simulated(tmp_path, drain_s: float, drain_timeout_s: float):
    """`groq-proxy serve --simulate` with these drain times; returns it, a raw connection to it and one whole
    chat request's bytes."""
    path = tmp_path / "proxy.toml"
    path.write_text(f'[server]\ndrain_s = {drain_s}\ndrain_timeout_s = {drain_timeout_s}\n[providers.groq]\n'
                    'base_url = "http://127.0.0.1:9/openai/v1"\napi_key_env = "GROQ_KEY"\n'
                    '[models.tier-fast]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    proxy, base = await start_serving(tmp_path, "proxy", "--simulate", "--config", str(path),
                                      env=clean_env(GROQ_KEY="gsk_test_not_a_real_key"))
    try:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
    except BaseException:
        await proxy.stop()
        raise
    payload = orjson.dumps({"model": "tier-fast", "messages": [{"role": "user", "content": "hi"}]})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return proxy, base, reader, writer, request


async def test_an_upload_in_progress_at_sigterm_is_waited_for_up_to_drain_timeout_s(tmp_path):
    """A request whose body is still arriving at the SIGTERM (a large prompt, an audio upload) is in flight as
    much as a stream: before, the drain waited only for requests already past their body, so it was cut with no
    answer CUT_GRACE_S after the listener closed, though server.drain_timeout_s was far off."""
    from proxy.app.drain import CUT_GRACE_S

    proxy, _, reader, writer, request = await serve_simulated(tmp_path, 0, 600)
    try:
        writer.write(request[:-10])
        await writer.drain()
        await asyncio.sleep(1.0)  # the proxy reads the head and waits for the rest of the body
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_for_log(lambda line: line["event"] == "drain_listener_closed")
        await asyncio.sleep(CUT_GRACE_S + 1)  # longer than the cut's grace, far within drain_timeout_s
        writer.write(request[-10:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b'"chat.completion"' in answer
        assert await proxy.wait(60) == 0
    finally:
        writer.close()
        await proxy.stop()


async def test_a_keep_alive_connection_is_served_during_drain_s_and_closed_after(tmp_path):
    """The load balancer may still send on a connection it holds while `/readyz` says 503: served for
    server.drain_s; once the listener closes, that idle connection is closed (the second SIGTERM ends the grace)."""
    proxy, base, reader, writer, request = await serve_simulated(tmp_path, 600, 600)

    async def answer() -> bytes:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        return head + await asyncio.wait_for(reader.readexactly(length), 30)

    try:
        writer.write(request)
        assert (await answer()).startswith(b"HTTP/1.1 200 ")
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_for_log(lambda line: line["event"] == "drain_started")
        assert await readyz(base) == 503
        writer.write(request)  # the same kept-alive connection, within drain_s
        assert (await answer()).startswith(b"HTTP/1.1 200 ")
        proxy.process.send_signal(signal.SIGTERM)  # the grace ends now
        await proxy.wait_for_log(lambda line: line["event"] == "drain_listener_closed")
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the proxy
        assert await proxy.wait(60) == 0
    finally:
        writer.close()
        await proxy.stop()
