"""The endpoints besides chat: models list, embeddings, health; and how model names route (aliases, real
models named directly, params of virtual models)."""

from __future__ import annotations

import aiohttp
import groq
import openai
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.app.config import parse_config
from proxy.app.server import build_app, readyz
from proxy.sim.testing import status
from tests.conftest import config_for

PREFIXES = ["/v1", "/openai/v1"]
MESSAGES = [{"role": "user", "content": "hi"}]
UP_KEY, ALT_KEY = "sk-up-key-0001", "sk-alt-key-0002"


async def post(url: str, body: dict):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as resp:
            return resp.status, resp.headers, orjson.loads(await resp.read())


async def get(url: str):
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return resp.status, resp.headers, orjson.loads(await resp.read())


def two_providers(url: str, **extra):
    """Providers `up` (the default: listed first) and `alt`, both served by the scripted upstream."""
    raw = {
        "server": {"keepalive_s": 0},
        "providers": {
            "up": {"base_url": url, "api_key_env": "UP_KEY"},
            "alt": {"base_url": url, "api_key_env": "ALT_KEY"},
        },
        "models": {
            "tier-a": {"chain": ["up:m1", "alt:m1", "alt:m2"]},
            "tier-b": {"chain": ["alt:m2", "up:m3"]},
        },
        **extra,
    }
    return parse_config(raw, env={"UP_KEY": UP_KEY, "ALT_KEY": ALT_KEY})


def provider_of(request: dict) -> str:
    return {f"Bearer {UP_KEY}": "up", f"Bearer {ALT_KEY}": "alt"}[request["headers"]["Authorization"]]


# --- /models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_models_list_is_openai_shaped_with_virtual_and_real_models(upstream, start_proxy, prefix):
    scripted, url = upstream
    base = await start_proxy(two_providers(url))
    code, headers, body = await get(base + prefix + "/models")
    assert code == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["object"] == "list"
    for entry in body["data"]:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int) and entry["created"] > 0
        assert isinstance(entry["owned_by"], str) and entry["owned_by"]
    ids = [m["id"] for m in body["data"]]
    # Virtual models, then each real model once: bare for the default provider, provider:model otherwise.
    assert ids == ["tier-a", "tier-b", "m1", "alt:m1", "alt:m2", "m3"]
    owners = {m["id"]: m["owned_by"] for m in body["data"]}
    assert owners["m1"] == "up" and owners["alt:m2"] == "alt"
    assert scripted.requests == []


async def test_every_listed_model_id_can_be_requested(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(two_providers(url))
    _, _, listing = await get(base + "/v1/models")
    for entry in listing["data"]:
        code, _, body = await post(base + "/v1/chat/completions", {"model": entry["id"], "messages": MESSAGES})
        assert code == 200, (entry["id"], body)
    assert len(scripted.requests) == len(listing["data"])


async def test_models_list_through_the_sdks(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config_for(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        ids = [m.id async for m in client.models.list()]
    async with groq.AsyncGroq(base_url=base, api_key="x") as client:
        groq_ids = [m.id for m in (await client.models.list()).data]
    assert ids == groq_ids == ["tier-test", "m1", "m2", "m3"]


# --- embeddings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_embeddings_fall_over_like_chat(upstream, start_proxy, prefix):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    scripted.behaviours["m2"] = status(429, "rate_limit_exceeded")
    base = await start_proxy(config_for(url))
    code, headers, body = await post(base + prefix + "/embeddings", {"model": "tier-test", "input": ["a", "b"]})
    assert code == 200, body
    assert headers["x-groq-proxy-model"] == "m3"
    assert headers["x-groq-proxy-attempts"] == "3"
    assert headers["x-request-id"].startswith("req_")
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["model"] == "m3"
    assert scripted.models_sent() == ["m1", "m2", "m3"]
    assert {r["path"] for r in scripted.requests} == {"/openai/v1/embeddings"}
    assert all(r["body"]["input"] == ["a", "b"] for r in scripted.requests)


async def test_embeddings_all_failed_is_one_error_listing_each_attempt(upstream, start_proxy):
    scripted, url = upstream
    for m in ("m1", "m2", "m3"):
        scripted.behaviours[m] = status(500)
    base = await start_proxy(config_for(url))
    code, headers, body = await post(base + "/v1/embeddings", {"model": "tier-test", "input": "a"})
    assert code == 502
    assert body["error"]["code"] == "all_models_failed"
    assert headers["x-should-retry"] == "false"
    for key in ("up:m1", "up:m2", "up:m3"):
        assert key in body["error"]["message"]


async def test_embeddings_request_error_goes_back_unchanged(upstream, start_proxy):
    """A 400 about the request itself is the client's: no fall-over, the upstream's body as it was."""
    scripted, url = upstream
    scripted.behaviours["m1"] = status(400, "invalid_dimensions", message="dimensions not supported")
    base = await start_proxy(config_for(url))
    code, _, body = await post(base + "/v1/embeddings", {"model": "tier-test", "input": "a", "dimensions": 3})
    assert code == 400
    assert body["error"]["code"] == "invalid_dimensions"
    assert scripted.models_sent() == ["m1"]


async def test_embeddings_with_the_openai_client_through_the_simulator(start_proxy):
    config = config_for("http://127.0.0.1:9/openai/v1", {"tier-embed": ["nomic-embed-text"]})
    base = await start_proxy(config, simulate=True)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        raw = await client.embeddings.with_raw_response.create(model="tier-embed", input="hello world")
    result = raw.parse()
    assert raw.headers["x-groq-proxy-simulated"] == "true"
    assert raw.headers["x-groq-proxy-model"] == "nomic-embed-text"
    assert len(result.data) == 1 and len(result.data[0].embedding) == 8
    assert all(-1.0 <= v < 1.0 for v in result.data[0].embedding)
    assert result.usage.total_tokens == 2


async def test_embeddings_with_the_groq_client_through_the_simulator(start_proxy):
    config = config_for("http://127.0.0.1:9/openai/v1", {"tier-embed": ["nomic-embed-text"]})
    base = await start_proxy(config, simulate=True)
    async with groq.AsyncGroq(base_url=base, api_key="x") as client:
        result = await client.embeddings.create(model="tier-embed", input=["a", "b", "c"])
    assert [d.index for d in result.data] == [0, 1, 2]


# --- routing by name --------------------------------------------------------------------------------------


async def test_a_retired_id_routes_to_its_replacement(upstream, start_proxy):
    scripted, url = upstream
    config = config_for(url, aliases={"llama3-8b-8192": "up:m2", "llama-3.3-70b-versatile": "up:m-new"})
    base = await start_proxy(config)
    code, headers, body = await post(base + "/v1/chat/completions", {"model": "llama3-8b-8192", "messages": MESSAGES})
    assert code == 200
    assert headers["x-groq-proxy-model"] == "m2"
    code, headers, _ = await post(
        base + "/openai/v1/chat/completions", {"model": "llama-3.3-70b-versatile", "messages": MESSAGES}
    )
    assert code == 200
    assert headers["x-groq-proxy-model"] == "m-new"
    assert scripted.models_sent() == ["m2", "m-new"]


async def test_an_alias_of_a_retired_id_does_not_fall_over_to_other_models(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m2"] = status(503)
    base = await start_proxy(config_for(url, aliases={"llama3-8b-8192": "up:m2"}))
    code, _, body = await post(base + "/v1/chat/completions", {"model": "llama3-8b-8192", "messages": MESSAGES})
    assert code == 502
    assert "llama3-8b-8192" in body["error"]["message"]
    assert scripted.models_sent() == ["m2"]


async def test_an_alias_of_a_virtual_model_gets_its_chain_and_params(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    config = parse_config(
        {
            "server": {"keepalive_s": 0},
            "providers": {"up": {"base_url": url}},
            "models": {"tier-test": {"chain": ["up:m1", "up:m2"], "params": {"temperature": 0.3}}},
            "aliases": {"gpt-4o": "tier-test"},
        },
        env={},
    )
    base = await start_proxy(config)
    code, headers, _ = await post(base + "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
    assert code == 200
    assert headers["x-groq-proxy-model"] == "m2"
    assert scripted.models_sent() == ["m1", "m2"]
    assert all(r["body"]["temperature"] == 0.3 for r in scripted.requests)


@pytest.mark.parametrize("name", ["up:m2", "m2"])
async def test_a_real_model_named_directly_routes_to_that_model_only(upstream, start_proxy, name):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    code, headers, _ = await post(base + "/v1/chat/completions", {"model": name, "messages": MESSAGES})
    assert code == 200
    assert headers["x-groq-proxy-model"] == "m2"
    assert headers["x-groq-proxy-attempts"] == "1"

    scripted.behaviours["m2"] = status(503)
    code, headers, body = await post(base + "/v1/chat/completions", {"model": name, "messages": MESSAGES})
    assert code == 502
    assert body["error"]["code"] == "all_models_failed"
    assert scripted.models_sent() == ["m2", "m2"]


async def test_a_real_model_of_another_provider_is_named_with_its_provider(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(two_providers(url))
    code, headers, _ = await post(base + "/v1/chat/completions", {"model": "alt:m1", "messages": MESSAGES})
    assert code == 200
    assert headers["x-groq-proxy-provider"] == "alt"
    code, headers, _ = await post(base + "/v1/chat/completions", {"model": "m1", "messages": MESSAGES})
    assert code == 200
    assert headers["x-groq-proxy-provider"] == "up"
    assert [provider_of(r) for r in scripted.requests] == ["alt", "up"]
    assert scripted.models_sent() == ["m1", "m1"]
    # `m2` is only served by the non-default provider: a bare name does not reach it.
    code, _, body = await post(base + "/v1/chat/completions", {"model": "m2", "messages": MESSAGES})
    assert code == 404 and body["error"]["code"] == "model_not_found"
    assert "alt:m2" in body["error"]["message"]


async def test_an_explicit_provider_model_outside_the_chains_is_tried(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    code, headers, _ = await post(base + "/v1/chat/completions", {"model": "up:m-unlisted", "messages": MESSAGES})
    assert code == 200
    assert headers["x-groq-proxy-model"] == "m-unlisted"
    scripted.behaviours["m-gone"] = status(404, "model_not_found")
    code, _, body = await post(base + "/v1/chat/completions", {"model": "up:m-gone", "messages": MESSAGES})
    assert code == 404  # the provider's answer about the model the client named, passed back
    assert body["error"]["code"] == "model_not_found"
    assert scripted.models_sent() == ["m-unlisted", "m-gone"]


# --- params of virtual models -----------------------------------------------------------------------------


def params_config(url: str):
    return parse_config(
        {
            "server": {"keepalive_s": 0},
            "providers": {"up": {"base_url": url}},
            "models": {
                "tier-p": {
                    "chain": ["up:m1", "up:m2"],
                    "params": {"temperature": 0.1, "reasoning_effort": "low", "max_tokens": 50, "stop": ["END"]},
                },
                "tier-plain": {"chain": ["up:m1"]},
            },
        },
        env={},
    )


async def test_params_fill_in_what_the_client_did_not_set(upstream, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(params_config(url))
    code, _, _ = await post(base + "/v1/chat/completions", {"model": "tier-p", "messages": MESSAGES})
    assert code == 200
    assert scripted.models_sent() == ["m1", "m2"]
    for request in scripted.requests:  # every attempt of the chain gets them
        body = request["body"]
        assert body["temperature"] == 0.1
        assert body["reasoning_effort"] == "low"
        assert body["max_tokens"] == 50
        assert body["stop"] == ["END"]
        assert body["messages"] == MESSAGES


async def test_params_never_override_what_the_client_set(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(params_config(url))
    client_body = {
        "model": "tier-p", "messages": MESSAGES, "temperature": 0.9, "reasoning_effort": "high", "stop": None,
    }
    code, _, _ = await post(base + "/v1/chat/completions", client_body)
    assert code == 200
    sent = scripted.requests[0]["body"]
    assert sent["temperature"] == 0.9
    assert sent["reasoning_effort"] == "high"
    assert sent["stop"] is None  # set (to null) by the client: not a gap to fill
    assert sent["max_tokens"] == 50


async def test_params_stay_with_their_model(upstream, start_proxy):
    """A later request, to another virtual model or a real model, does not inherit them."""
    scripted, url = upstream
    base = await start_proxy(params_config(url))
    await post(base + "/v1/chat/completions", {"model": "tier-p", "messages": MESSAGES})
    for name in ("tier-plain", "m1", "up:m1"):
        code, _, _ = await post(base + "/v1/chat/completions", {"model": name, "messages": MESSAGES})
        assert code == 200
    assert "temperature" in scripted.requests[0]["body"]
    for request in scripted.requests[1:]:
        assert not {"temperature", "reasoning_effort", "max_tokens", "stop"} & set(request["body"])


async def test_params_with_the_openai_client_stream(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(params_config(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        stream = await client.chat.completions.create(model="tier-p", messages=MESSAGES, stream=True, max_tokens=9)
        async with stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "Hello there!"
    sent = scripted.requests[0]["body"]
    assert sent["max_tokens"] == 9 and sent["temperature"] == 0.1 and sent["stream"] is True


# --- health -----------------------------------------------------------------------------------------------


async def test_healthz_and_readyz_once_started(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config_for(url))
    code, _, body = await get(base + "/healthz")
    assert (code, body) == (200, {"status": "ok"})
    code, _, body = await get(base + "/readyz")
    assert (code, body) == (200, {"status": "ready"})


async def test_readyz_is_503_before_start_up(upstream):
    _, url = upstream
    app = build_app(config_for(url))
    response = await readyz(make_mocked_request("GET", "/readyz", app=app))
    assert response.status == 503
    assert orjson.loads(response.body) == {"status": "starting"}


async def test_health_in_simulated_mode(start_proxy):
    base = await start_proxy(config_for("http://127.0.0.1:9/openai/v1"), simulate=True)
    code, _, body = await get(base + "/readyz")
    assert (code, body) == (200, {"status": "ready"})


async def test_retrieve_one_model_by_id_including_ids_with_a_slash(aiohttp_server, start_proxy):
    from proxy.sim.testing import ScriptedUpstream
    from tests.conftest import config_for

    up = await aiohttp_server(ScriptedUpstream().app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{up.port}/openai/v1", {"tier-x": ["org/model-a"]}))
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models/tier-x", "/openai/v1/models/org/model-a"):
            async with s.get(base + path) as r:
                assert r.status == 200
                entry = await r.json()
                assert entry["object"] == "model" and path.endswith(entry["id"])
        async with s.get(base + "/v1/models/nope/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
        async with s.head(base + "/v1/models") as r:
            assert r.status == 200
        async with s.post(base + "/healthz") as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"


# --- x-request-id on every response -------------------------------------------------------------------------

REQUEST_ID = r"req_[0-9a-f]{24}"

EVERY_KIND_OF_ANSWER = [
    ("GET", "/v1/models", None, 200),
    ("GET", "/openai/v1/models", None, 200),
    ("HEAD", "/v1/models", None, 200),
    ("GET", "/v1/models/tier-test", None, 200),
    ("GET", "/openai/v1/models/m1", None, 200),
    ("GET", "/v1/models/nope", None, 404),
    ("GET", "/healthz", None, 200),
    ("GET", "/readyz", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/nowhere", None, 404),
    ("POST", "/v1/completions", b"{}", 404),
    ("PUT", "/v1/models", b"{}", 405),
    ("POST", "/healthz", b"{}", 405),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/admin/benchmark", b"{}", 403),  # the admin API is off without server.admin_key_env
    ("GET", "/v1/usage", None, 200),
    ("GET", "/admin/usage?user=x", None, 403),
    ("POST", "/admin/reload", b"{}", 403),
    ("POST", "/v1/chat/completions", b"x" * 5000, 413),  # over client_max_size (server.max_body_bytes)
    ("POST", "/v1/chat/completions", b"{}", 400),
    ("POST", "/v1/embeddings", b"x" * 5000, 413),
]


@pytest.mark.parametrize("method, path, data, expected", EVERY_KIND_OF_ANSWER,
                         ids=[f"{m} {p} {s}" for m, p, _, s in EVERY_KIND_OF_ANSWER])
async def test_every_response_carries_a_request_id(upstream, start_proxy, method, path, data, expected):
    """Before: /v1/models, /v1/models/{id}, /healthz, /readyz, /metrics, the 404s, 405s and the admin
    answers had none."""
    import re

    _, url = upstream
    base = await start_proxy(config_for(url, server={"max_body_bytes": 4096}))
    async with aiohttp.ClientSession() as session:
        async with session.request(method, base + path, data=data) as resp:
            await resp.read()
            assert resp.status == expected
            assert re.fullmatch(REQUEST_ID, resp.headers["x-request-id"])


async def test_request_ids_differ_and_a_clients_own_is_not_echoed(upstream, start_proxy):
    """The proxy's id keys its logs and traces, so it is always its own (a client's value could collide, or
    carry anything): the client's `x-request-id` is neither echoed nor trusted."""
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    seen = set()
    async with aiohttp.ClientSession() as session:
        for path, body in (("/v1/models", None), ("/healthz", None), ("/v1/chat/completions",
                                                                      {"model": "tier-test", "messages": MESSAGES})):
            for _ in range(2):
                async with session.request("POST" if body else "GET", base + path, json=body,
                                           headers={"x-request-id": "client-chosen"}) as resp:
                    await resp.read()
                    assert resp.status == 200
                    seen.add(resp.headers["x-request-id"])
    assert len(seen) == 6 and all(rid.startswith("req_") for rid in seen)


async def test_aiohttps_own_400_carries_a_request_id(upstream, start_proxy):
    """A request line aiohttp cannot parse never reaches a handler; its answer is still ours."""
    import asyncio
    import re

    _, url = upstream
    base = await start_proxy(config_for(url))
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ")
    assert re.search(rb"x-request-id: " + REQUEST_ID.encode(), head)
    assert orjson.loads(body)["error"]["code"] == "bad_http_request"


async def test_a_handler_that_raises_is_an_openai_500_with_a_request_id_and_one_log_line(upstream, aiohttp_server,
                                                                                        caplog):
    """A bug outside the chat and embeddings handlers reaches aiohttp's handle_error: the answer is still ours."""
    import logging
    import re

    from proxy.app.server import STATE

    class Broken(list):
        def __iter__(self):
            raise RuntimeError("a bug in the proxy")

    _, url = upstream
    server = await aiohttp_server(build_app(config_for(url)))
    server.app[STATE].models = Broken()
    with caplog.at_level(logging.ERROR, logger="groq_proxy"):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.port}/v1/models/tier-test") as resp:
                body = await resp.json()
                assert resp.status == 500
                request_id = resp.headers["x-request-id"]
    assert re.fullmatch(REQUEST_ID, request_id)
    assert body["error"]["type"] == "server_error" and request_id in body["error"]["message"]
    assert "a bug" not in body["error"]["message"]
    (record,) = [r for r in caplog.records if r.getMessage() == "internal_error"]
    assert record.fields["request_id"] == request_id and record.exc_info[0] is RuntimeError
