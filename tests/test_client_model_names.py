"""Model names a client makes up: they never become metric labels or memory, and a provider's 404 about one goes
back to the client as the provider's answer.

3,000 requests name random `provider:model` ids that the upstream answers in four ways (an answer, 404
`model_not_found`, 429 with retry-after, 503); the number of /metrics series and the per-model tables stay
where a few requests put them.
"""

from __future__ import annotations

import asyncio
import random
import re

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.app.server import STATE, build_app
from proxy.routing.cooldown import MAX_TRACKED
from proxy.sim.testing import ChatUpstream, completion, stream_events
from tests.conftest import config_for
from tests.test_fallback import MESSAGES, attempt_lines, call, chat

KINDS = ("ok", "gone", "busy", "down")


class ByPrefix(ChatUpstream):
    """Answers by the model name's prefix: ok-*, gone-* (404 model_not_found), busy-* (429, retry-after 30),
    down-* (503)."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = body["model"]
        kind = model.partition("-")[0]
        if kind == "gone":
            error = {"error": {"message": f"The model `{model}` does not exist or you do not have access to it.",
                               "type": "invalid_request_error", "code": "model_not_found"}}
            return web.json_response(error, status=404)
        if kind == "retired":
            error = {"error": {"message": f"The model `{model}` has been decommissioned.",
                               "type": "invalid_request_error", "code": "model_decommissioned"}}
            return web.json_response(error, status=400)
        if kind == "busy":
            return web.json_response({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, status=429,
                                     headers={"retry-after": "30"})
        if kind == "down":
            return web.json_response({"error": {"message": "over capacity"}}, status=503)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"".join(stream_events(model)))
            await resp.write_eof()
            return resp
        return web.Response(body=orjson.dumps(completion(model)), content_type="application/json")


def series(metrics_text: str) -> set[str]:
    """The series of a scrape: each sample line's name and labels."""
    return {line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")}


async def test_made_up_model_names_grow_neither_metrics_nor_memory(aiohttp_server):
    upstream = await aiohttp_server(ByPrefix().app())
    app = build_app(config_for(f"http://127.0.0.1:{upstream.port}/openai/v1", {"tier-test": ["ok-configured"]}))
    base = f"http://127.0.0.1:{(await aiohttp_server(app)).port}"
    state = app[STATE]
    rng = random.Random(7)
    statuses: dict[str, set[int]] = {kind: set() for kind in KINDS}

    async with aiohttp.ClientSession() as session:
        async def one(kind: str, stream: bool) -> None:
            body = chat(f"up:{kind}-{rng.getrandbits(64):x}", stream=stream)
            async with session.post(base + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                statuses[kind].add(resp.status)

        async def scrape() -> set[str]:
            async with session.get(base + "/metrics") as resp:
                return series(await resp.text())

        for kind in KINDS:  # one of each kind, streamed and not: every label set there is to make
            await one(kind, False)
            await one(kind, True)
        await one("ok", False)
        before = await scrape()
        sizes = [len(metric.values) for metric in state.observer.metrics.all]
        for start in range(0, 3000, 50):
            await asyncio.gather(*(one(KINDS[i % 4], i % 5 == 0) for i in range(start, start + 50)))
        after = await scrape()

    # A latency category is a fixed set (an answer slowed by a loaded machine may add one): not the client's input.
    new = {s for s in after - before if not re.fullmatch(
        r'groq_proxy_latency_category_total\{virtual_model="other",category="(excellent|good|acceptable|poor|critical)"\}', s)}
    assert not new and before <= after, sorted(new or before - after)[:5]
    assert not [s for s in after if re.search(r"(ok|gone|busy|down)-(?!configured)", s)]  # no client's name
    assert 'groq_proxy_requests_total{virtual_model="other",model="other",status="200"}' in after
    observer = state.observer
    grown = [len(metric.values) for metric in observer.metrics.all]
    assert grown == [size + (len(after - before) if metric is observer.metrics.category else 0)
                     for size, metric in zip(sizes, observer.metrics.all)]
    # Per-model state: cool-downs bounded (750 made-up models each said 429 and 503), observed latency by label.
    cooldowns = state.pipeline.cooldowns
    assert 0 < len(cooldowns._failures) <= MAX_TRACKED and 0 < len(cooldowns._until) <= MAX_TRACKED
    assert set(observer.rolling._samples) <= {("other", "other")}
    # The status page's rolling counts: rows for the config's names only, every made-up name in `other`.
    assert observer.recent_requests.names() == ["tier-test", "invalid", "other"]
    assert observer.recent_attempts.names() == ["up:ok-configured", "other"]
    assert statuses == {"ok": {200}, "gone": {404}, "busy": {429}, "down": {502}}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model,status,code", [("gone-made-up", 404, "model_not_found"),
                                               ("retired-old", 400, "model_decommissioned")])
async def test_provider_answer_about_a_model_the_client_named_goes_back_to_it(model, status, code, stream,
                                                                              aiohttp_server, start_proxy, proxy_log):
    upstream = await aiohttp_server(ByPrefix().app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{upstream.port}/openai/v1"))

    r = await call(base, chat(f"up:{model}", stream=stream))

    assert r.status == status, r.body
    error = r.json()["error"]
    assert error["code"] == code and model in error["message"]  # the provider's own answer
    assert "x-should-retry" not in r.headers
    (line,) = attempt_lines(proxy_log)
    assert (line["target"], line["outcome"], line["status"]) == (f"up:{model}", "passed_back", status)


async def test_provider_404_reaches_the_openai_client_as_not_found(aiohttp_server, start_proxy):
    upstream = await aiohttp_server(ByPrefix().app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{upstream.port}/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="up:gone-made-up", messages=MESSAGES)
    assert info.value.code == "model_not_found"


async def test_a_chain_whose_every_model_is_gone_still_falls_over(aiohttp_server, start_proxy, proxy_log):
    # In a virtual model the 404 is the operator's stale config: the next model may answer, and when none
    # does the client gets the all-models-failed answer (and the operator its alert).
    upstream = await aiohttp_server(ByPrefix().app())
    config = config_for(f"http://127.0.0.1:{upstream.port}/openai/v1", {"tier-test": ["gone-a", "gone-b"]})
    base = await start_proxy(config)
    r = await call(base, chat("tier-test"))
    assert r.status == 502 and r.json()["error"]["code"] == "all_models_failed"
    assert [(x["outcome"], x["reason"]) for x in attempt_lines(proxy_log)] == [
        ("fell_over", "model_not_found"), ("fell_over", "model_not_found")]
