"""Observed latency per model, as the router sees it, on /metrics (labels: configured models only) and in
GET /v1/models/{id} as extra fields."""

from __future__ import annotations

import aiohttp

from tests.conftest import post_chat, routing_config

MESSAGES = [{"role": "user", "content": "hi"}]


async def get(base: str, path: str):
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path) as resp:
            return resp.status, await resp.read()


async def test_observed_latency_on_metrics_and_the_model_endpoint(upstream, start_proxy):
    import orjson

    scripted, url = upstream
    base = await start_proxy(routing_config(url, {"tier-x": ["m1", "m2"]}))
    for stream in (False, False, False, True, True, True):
        assert (await post_chat(base, {"model": "tier-x", "messages": MESSAGES, "stream": stream}))[0] == 200
    for _ in range(3):  # a client's own provider:model is never a label
        await post_chat(base, {"model": "up:random-model-xyz", "messages": MESSAGES})

    _, text = await get(base, "/metrics")
    lines = [line for line in text.decode().splitlines() if line.startswith("groq_proxy_observed_latency_ms{")]
    labels = {line.split(" ")[0] for line in lines}
    assert labels == {f'groq_proxy_observed_latency_ms{{model="up:m1",kind="{k}",quantile="{q}"}}'
                      for k in ("ttft", "total") for q in ("0.5", "0.9")}
    assert all(float(line.split(" ")[1]) > 0 for line in lines)

    status, raw = await get(base, "/v1/models/tier-x")
    body = orjson.loads(raw)
    assert status == 200 and body["id"] == "tier-x" and body["chain"] == ["up:m1", "up:m2"]
    m1 = body["observed_latency"]["up:m1"]
    assert m1["ttft_samples"] == 3 and m1["total_samples"] == 3 and m1["ttft_p50_ms"] > 0
    assert body["observed_latency"]["up:m2"]["total_samples"] == 0 and body["observed_latency"]["up:m2"]["total_p50_ms"] is None

    status, raw = await get(base, "/v1/models/m1")
    assert status == 200 and orjson.loads(raw)["observed_latency"]["total_samples"] == 3
