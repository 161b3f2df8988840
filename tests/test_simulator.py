"""The simulator over real HTTP: aiohttp's test client, aiohttp's own client, and the SDKs."""

import argparse
import asyncio
import base64
import re
import struct

import aiohttp
import groq
import openai
import orjson
import pytest

from proxy.sim.simulator import (
    SIMULATED_HEADER,
    SimulatorConfig,
    _go_duration,
    add_simulate_arguments,
    build_simulator_app,
    config_from_args,
    start_simulator,
)

MODEL = "openai/gpt-oss-20b"
CHAT = "/openai/v1/chat/completions"
EMBEDDINGS = "/openai/v1/embeddings"
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(s|ms)$")
USAGE_KEYS = [
    "queue_time",
    "prompt_tokens",
    "prompt_time",
    "completion_tokens",
    "completion_time",
    "total_tokens",
    "total_time",
]


def chat_body(content="Hello there, simulator", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(build_simulator_app())


async def make_client(aiohttp_client, **config):
    return await aiohttp_client(build_simulator_app(SimulatorConfig(**config)))


async def read_events(resp):
    """SSE `data:` payloads in order; the [DONE] sentinel stays a string."""
    text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def test_non_stream_shape_usage_and_headers(client):
    resp = await client.post(CHAT, json=chat_body())
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()

    assert body["object"] == "chat.completion"
    assert re.fullmatch(r"chatcmpl-[0-9a-f]+", body["id"])
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["system_fingerprint"] == "fp_sim"
    assert body["usage_breakdown"] is None
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"

    usage = body["usage"]
    assert list(usage) == USAGE_KEYS
    assert usage["prompt_tokens"] == 3 + 4  # three words, four per message
    assert usage["completion_tokens"] == 16  # config default: no max_tokens given
    assert len(choice["message"]["content"].split(" ")) == 16
    assert usage["total_tokens"] == 23
    assert usage["total_time"] == pytest.approx(usage["prompt_time"] + usage["completion_time"])

    assert resp.headers[SIMULATED_HEADER] == "true"
    assert re.fullmatch(r"req_[0-9a-f]+", resp.headers["x-request-id"])
    assert body["x_groq"] == {"id": resp.headers["x-request-id"]}
    assert resp.headers["x-ratelimit-limit-requests"] == "14400"
    assert int(resp.headers["x-ratelimit-remaining-requests"]) < 14400
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 18000 - 23
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert GO_DURATION.match(resp.headers[name]), resp.headers[name]


async def test_remaining_requests_counts_down(client):
    seen = []
    for _ in range(3):
        resp = await client.post(CHAT, json=chat_body())
        seen.append(int(resp.headers["x-ratelimit-remaining-requests"]))
    assert seen == [14399, 14398, 14397]


def test_go_duration_format():
    assert _go_duration(179.56) == "2m59.56s"
    assert _go_duration(7.66) == "7.66s"
    assert _go_duration(120) == "2m0s"
    assert _go_duration(3723.5) == "1h2m3.5s"
    assert _go_duration(0.04) == "40ms"
    assert _go_duration(0) == "0s"


async def test_max_tokens_sets_length_and_finish_reason(client):
    resp = await client.post(CHAT, json=chat_body(max_tokens=5))
    body = await resp.json()
    assert body["usage"]["completion_tokens"] == 5
    assert len(body["choices"][0]["message"]["content"].split(" ")) == 5
    assert body["choices"][0]["finish_reason"] == "length"

    # max_completion_tokens is the newer name and wins over max_tokens.
    resp = await client.post(CHAT, json=chat_body(max_tokens=5, max_completion_tokens=3))
    assert (await resp.json())["usage"]["completion_tokens"] == 3


async def test_text_is_a_function_of_the_messages(client):
    async def content(**body):
        resp = await client.post(CHAT, json=body)
        return (await resp.json())["choices"][0]["message"]["content"]

    first = await content(**chat_body("What is Groq?"))
    # Other fields (model, temperature, /v1 prefix) do not change the text.
    again = await content(**chat_body("What is Groq?", temperature=0.9))
    other = await content(**chat_body("Something else entirely"))
    assert first == again
    assert first != other
    resp = await client.post("/v1/chat/completions", json=chat_body("What is Groq?"))
    assert (await resp.json())["choices"][0]["message"]["content"] == first


async def test_stream_events(client):
    plain = await (await client.post(CHAT, json=chat_body(max_tokens=6))).json()
    resp = await client.post(CHAT, json=chat_body(max_tokens=6, stream=True))
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    assert resp.headers[SIMULATED_HEADER] == "true"
    events = await read_events(resp)

    assert events[-1] == "[DONE]"
    first, *tokens, finish, _done = events
    request_id = resp.headers["x-request-id"]
    assert first["object"] == "chat.completion.chunk"
    assert first["model"] == MODEL
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["x_groq"]["id"] == request_id
    assert isinstance(first["x_groq"]["seed"], int)
    assert len({event["id"] for event in events[:-1]}) == 1

    assert len(tokens) == 6
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == (
        plain["choices"][0]["message"]["content"]
    )

    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    assert finish["x_groq"]["id"] == request_id
    assert finish["x_groq"]["usage"]["completion_tokens"] == 6
    assert list(finish["x_groq"]["usage"]) == USAGE_KEYS
    assert "usage" not in finish  # top-level usage only with include_usage


async def test_stream_include_usage_adds_usage_chunk(client):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    events = await read_events(await client.post(CHAT, json=body))
    *_, finish, usage_chunk, done = events
    assert done == "[DONE]"
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["usage"] == finish["x_groq"]["usage"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == finish["usage"]
    assert usage_chunk["usage"]["completion_tokens"] == 16


async def test_stream_pacing_and_ttft(aiohttp_client):
    client = await make_client(aiohttp_client, ttft_s=0.05, tokens_per_s=100)
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await client.post(CHAT, json=chat_body(max_tokens=6, stream=True))
    events = await read_events(resp)
    # ttft, then five gaps of 10 ms between six tokens.
    assert loop.time() - start >= 0.05 + 0.05 * 0.9
    assert events[-1] == "[DONE]"
    assert len(events) == 1 + 6 + 1 + 1


async def test_plain_answer_takes_the_time_its_tokens_would_stream_in(aiohttp_client):
    # Groq sends nothing of a plain answer until all of it is generated: the simulator likewise answers when
    # the same answer streamed would have sent its last token.
    client = await make_client(aiohttp_client, ttft_s=0.05, tokens_per_s=100)
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await client.post(CHAT, json=chat_body(max_tokens=11))
    body = await resp.json()
    assert loop.time() - start >= 0.05 + 10 / 100
    assert body["usage"]["completion_tokens"] == 11


async def test_unknown_model_404(client):
    resp = await client.post(CHAT, json={**chat_body(), "model": "nope/model"})
    assert resp.status == 404
    assert resp.headers[SIMULATED_HEADER] == "true"
    assert await resp.json() == {
        "error": {
            "message": "The model `nope/model` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS])
async def test_decommissioned_model_400(client, path):
    body = {"model": "llama-3.1-8b-instant", "messages": [{"role": "user", "content": "x"}]}
    resp = await client.post(path, json={**body, "input": "x"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "model_decommissioned"
    assert error["type"] == "invalid_request_error"
    assert "`llama-3.1-8b-instant`" in error["message"]


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS])
async def test_rate_429(aiohttp_client, path):
    client = await make_client(aiohttp_client, rate_429=1.0, retry_after_s=7)
    resp = await client.post(path, json={**chat_body(), "input": "hello"})
    assert resp.status == 429
    assert resp.headers["retry-after"] == "7"
    assert resp.headers[SIMULATED_HEADER] == "true"
    assert "x-ratelimit-remaining-tokens" in resp.headers
    error = (await resp.json())["error"]
    assert error["type"] == "tokens"
    assert error["code"] == "rate_limit_exceeded"
    assert f"`{MODEL}`" in error["message"]


async def test_rate_5xx(aiohttp_client):
    client = await make_client(aiohttp_client, rate_5xx=1.0)
    resp = await client.post(CHAT, json=chat_body(stream=True))
    assert resp.status == 503
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["type"] == "internal_server_error"
    assert "retry-after" not in resp.headers


async def test_faults_are_reproducible_with_a_seed(aiohttp_client):
    async def statuses():
        client = await make_client(aiohttp_client, rate_429=0.3, rate_5xx=0.3, seed=42)
        return [(await client.post(CHAT, json=chat_body())).status for _ in range(30)]

    first = await statuses()
    assert first == await statuses()
    assert {200, 429, 503} == set(first)


async def test_cut_stream_ends_without_done(aiohttp_client):
    # aiohttp's real client: the server must end the body abruptly, not cleanly.
    client = await make_client(aiohttp_client, rate_cut=1.0)
    resp = await client.post(CHAT, json=chat_body(max_tokens=10, stream=True))
    assert resp.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    assert b"[DONE]" not in received
    assert b'"finish_reason":"length"' not in received
    blocks = [b for b in received.split(b"\n\n") if b]
    assert len(blocks) == 1 + 5  # role chunk and half of the tokens
    assert all(orjson.loads(b.removeprefix(b"data: ")) for b in blocks)


@pytest.mark.parametrize("prefix", ["/openai/v1", "/v1"])
async def test_models_list(client, prefix):
    resp = await client.get(f"{prefix}/models")
    assert resp.status == 200
    assert resp.headers[SIMULATED_HEADER] == "true"
    body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(SimulatorConfig().models)
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id[MODEL] == {
        "id": MODEL,
        "object": "model",
        "created": by_id[MODEL]["created"],
        "owned_by": "OpenAI",
        "active": True,
        "context_window": 131072,
    }
    assert by_id["qwen/qwen3.6-27b"]["owned_by"] == "Qwen"
    assert by_id["groq/compound"]["owned_by"] == "Groq"

    one = await client.get(f"{prefix}/models/{MODEL}")
    assert await one.json() == by_id[MODEL]
    missing = await client.get(f"{prefix}/models/llama3-8b-8192")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "model_not_found"


async def test_embeddings_float_and_base64(client):
    body = {"model": "nomic-embed-text", "input": ["one two", "three"]}
    resp = await client.post(EMBEDDINGS, json=body)
    assert resp.status == 200
    assert resp.headers[SIMULATED_HEADER] == "true"
    floats = await resp.json()
    assert floats["object"] == "list"
    assert floats["model"] == "nomic-embed-text"
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in floats["data"])
    vectors = [d["embedding"] for d in floats["data"]]
    assert all(len(v) == 8 and all(-1 <= x < 1 for x in v) for v in vectors)
    assert vectors[0] != vectors[1]

    resp = await client.post(EMBEDDINGS, json={**body, "encoding_format": "base64"})
    encoded = [d["embedding"] for d in (await resp.json())["data"]]
    decoded = [list(struct.unpack("<8f", base64.b64decode(e))) for e in encoded]
    assert decoded == vectors  # same float32 values, both encodings

    # A plain string is one input, embedded like the same string in a list.
    resp = await client.post(EMBEDDINGS, json={**body, "input": "one two"})
    assert [d["embedding"] for d in (await resp.json())["data"]] == [vectors[0]]


@pytest.mark.parametrize(
    "path,raw,param",
    [
        (CHAT, b"{not json", None),
        (CHAT, b"", None),
        (CHAT, b"\xff\xfe", None),
        (CHAT, b"[1, 2]", None),
        (CHAT, orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (CHAT, orjson.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}), "model"),
        (CHAT, orjson.dumps({"model": MODEL}), "messages"),
        (CHAT, orjson.dumps({"model": MODEL, "messages": []}), "messages"),
        (CHAT, orjson.dumps({"model": MODEL, "messages": "hi"}), "messages"),
        (CHAT, orjson.dumps({"model": MODEL, "messages": [{"content": "no role"}]}), "messages.0"),
        (CHAT, orjson.dumps({"model": MODEL, "messages": ["hi"]}), "messages.0"),
        (CHAT, orjson.dumps(chat_body(n=2)), "n"),
        (CHAT, orjson.dumps(chat_body(n=True)), "n"),
        (CHAT, orjson.dumps(chat_body(max_tokens=0)), "max_tokens"),
        (CHAT, orjson.dumps(chat_body(max_tokens="10")), "max_tokens"),
        (CHAT, orjson.dumps(chat_body(max_completion_tokens=10**9)), "max_completion_tokens"),
        (CHAT, orjson.dumps(chat_body(stream="yes")), "stream"),
        (EMBEDDINGS, b"{", None),
        (EMBEDDINGS, orjson.dumps({"model": "nomic-embed-text"}), "input"),
        (EMBEDDINGS, orjson.dumps({"model": "nomic-embed-text", "input": []}), "input"),
        (EMBEDDINGS, orjson.dumps({"model": "nomic-embed-text", "input": [1, 2]}), "input"),
        (EMBEDDINGS, orjson.dumps({"model": "nomic-embed-text", "input": "x", "encoding_format": "hex"}),
         "encoding_format"),
    ],
)
async def test_bad_input_is_a_400_json_error(client, path, raw, param):
    resp = await client.post(path, data=raw, headers={"content-type": "application/json"})
    assert resp.status == 400
    assert resp.content_type == "application/json"
    assert resp.headers[SIMULATED_HEADER] == "true"
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error.get("param") == param  # the field at fault, as Groq names it; none for a body that is not an object
    if param:
        assert error["message"].startswith(f"'{param}' : "), error["message"]
    else:
        assert error["message"] in ("We could not parse the JSON body of your request.",
                                    "The request body must be a JSON object."), error["message"]


async def test_odd_but_valid_input_is_accepted(client):
    messages = [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "two words"}, {"type": "image_url"}]},
        {"role": "assistant", "content": 12},
    ]
    body = {"model": MODEL, "messages": messages, "n": 1, "stream_options": "ignored"}
    resp = await client.post(CHAT, json=body)
    assert resp.status == 200
    assert (await resp.json())["usage"]["prompt_tokens"] == 2 + 3 * 4


async def test_unknown_route_and_method_are_json_errors(client):
    resp = await client.get("/openai/v1/nothing-here")
    assert resp.status == 404
    assert resp.headers[SIMULATED_HEADER] == "true"
    assert (await resp.json())["error"]["code"] == "unknown_url"

    resp = await client.get(CHAT)
    assert resp.status == 405
    assert resp.headers[SIMULATED_HEADER] == "true"
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


def test_cli_arguments_build_the_config():
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8090)
    assert config_from_args(defaults) == SimulatorConfig()

    args = parser.parse_args(
        "--host 0.0.0.0 --port 9000 --ttft-ms 250 --tokens-per-s 80 --completion-tokens 40 "
        "--rate-429 0.1 --rate-5xx 0.05 --rate-cut 0.2 --retry-after 5 --seed 3".split()
    )
    assert (args.host, args.port) == ("0.0.0.0", 9000)
    assert config_from_args(args) == SimulatorConfig(
        ttft_s=0.25,
        tokens_per_s=80,
        completion_tokens=40,
        rate_429=0.1,
        rate_5xx=0.05,
        rate_cut=0.2,
        retry_after_s=5,
        seed=3,
    )

    with pytest.raises(ValueError, match="rate_cut"):
        config_from_args(parser.parse_args(["--rate-cut", "1.5"]))


@pytest.mark.parametrize("field", ["ttft_s", "tokens_per_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_the_config_refuses_delays_and_paces_that_are_not_finite_and_non_negative(field, value):
    """What the embedded simulator and the tests build, checked as the command's flags are."""
    with pytest.raises(ValueError, match=field):
        SimulatorConfig(**{field: value})


async def test_start_simulator_serves_its_base_url():
    runner, base_url = await start_simulator(SimulatorConfig(completion_tokens=4))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/openai/v1", base_url)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url}/models") as resp:
                assert resp.status == 200
                assert (await resp.json())["data"][0]["id"] == MODEL
            async with session.post(f"{base_url}/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 4
    finally:
        await runner.cleanup()


async def test_openai_and_groq_sdks_talk_to_it():
    runner, base_url = await start_simulator(SimulatorConfig(completion_tokens=5))
    try:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="sim", max_retries=0) as sdk:
            completion = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.usage.completion_tokens == 5
            stream = await sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == completion.choices[0].message.content
            assert chunks[-1].usage.total_tokens == completion.usage.total_tokens
            # openai-python asks for base64 by default and decodes it itself.
            embedding = await sdk.embeddings.create(model="nomic-embed-text", input="hi")
            assert len(embedding.data[0].embedding) == 8
            with pytest.raises(openai.NotFoundError) as caught:
                await sdk.chat.completions.create(
                    model="missing", messages=[{"role": "user", "content": "hi"}]
                )
            assert caught.value.code == "model_not_found"

        # The groq SDK takes the bare origin and appends /openai/v1 itself.
        origin = base_url.removesuffix("/openai/v1")
        async with groq.AsyncGroq(base_url=origin, api_key="sim", max_retries=0) as sdk:
            completion = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.choices[0].message.content == text
    finally:
        await runner.cleanup()
