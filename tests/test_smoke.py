import aiohttp

from proxy.sim.testing import status
from tests.conftest import config_for


async def test_falls_over_to_the_next_model_and_says_which_answered(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/chat/completions",
                          json={"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}) as r:
            body = await r.json()
            assert r.status == 200
            assert r.headers["x-groq-proxy-model"] == "m2"
            assert r.headers["x-groq-proxy-attempts"] == "2"
    assert body["choices"][0]["message"]["content"] == "Hello there!"
    assert scripted.models_sent() == ["m1", "m2"]
    assert scripted.requests[0]["headers"]["Authorization"] == "Bearer sk-test-secret-upstream-key"
