"""Bad input gets an OpenAI-shaped 4xx from the proxy itself: never a 500, never a traceback, never upstream."""

from __future__ import annotations

import io

import aiohttp
import orjson
import pytest

from tests.conftest import config_for

PREFIXES = ["/v1", "/openai/v1"]
OK_MESSAGES = [{"role": "user", "content": "hi"}]
LIMIT = 2048


def chat(**fields):
    return {"model": "tier-test", "messages": OK_MESSAGES, **fields}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


@pytest.fixture
async def proxy(upstream, start_proxy):
    """(scripted upstream, proxy base URL); the proxy's body limit is LIMIT bytes."""
    scripted, url = upstream
    base = await start_proxy(config_for(url, server={"max_body_bytes": LIMIT}))
    yield scripted, base
    assert scripted.requests == [], "bad input must never reach the upstream"


async def send(url: str, *, method: str = "POST", data=None, json=None, headers=None):
    """(status, headers, raw body) of one request."""
    if json is not None:
        data = orjson.dumps(json)
        headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()


def error_of(status: int, headers, raw: bytes, expected_status: int) -> dict:
    """Asserts the OpenAI error shape and returns the inner error object."""
    assert status == expected_status, raw
    assert headers["Content-Type"].startswith("application/json")
    assert b"Traceback" not in raw
    body = orjson.loads(raw)
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


# --- chat completions ------------------------------------------------------------------------------------

NOT_JSON = [
    pytest.param(b"{not json", "not valid JSON", id="invalid-json"),
    pytest.param(b'{"model": "tier-test", "messages": [', "not valid JSON", id="truncated-json"),
    pytest.param(b'{"temperature": NaN}', "not valid JSON", id="nan-literal"),
    pytest.param(b"\xff\xfe{}", "not valid JSON", id="not-utf8"),
    pytest.param(b"[" * 1100 + b"]" * 900, "not valid JSON", id="nested-too-deep"),
    pytest.param(b"", "empty", id="empty-body"),
    pytest.param(b"[]", "not an array", id="array"),
    pytest.param(b'[{"model": "tier-test"}]', "not an array", id="array-of-object"),
    pytest.param(b'"hello"', "not a string", id="string"),
    pytest.param(b"42", "not a number", id="number"),
    pytest.param(b"null", "not null", id="null"),
    pytest.param(b"true", "not a boolean", id="boolean"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("path", ["/chat/completions", "/embeddings"])
@pytest.mark.parametrize("raw, says", NOT_JSON)
async def test_a_body_that_is_not_a_json_object_is_400(proxy, prefix, path, raw, says):
    _, base = proxy
    error = error_of(*await send(base + prefix + path, data=raw, headers={"Content-Type": "application/json"}), 400)
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"


CHAT_CASES = [
    pytest.param(without(chat(), "model"), "model", "model", id="model-missing"),
    pytest.param(chat(model=None), "model", "model", id="model-null"),
    pytest.param(chat(model=""), "model", "model", id="model-empty"),
    pytest.param(chat(model=7), "model", "not a number", id="model-number"),
    pytest.param(chat(model=["tier-test"]), "model", "not an array", id="model-list"),
    pytest.param(without(chat(), "messages"), "messages", "required", id="messages-missing"),
    pytest.param(chat(messages=[]), "messages", "at least one", id="messages-empty"),
    pytest.param(chat(messages="hi"), "messages", "array", id="messages-string"),
    pytest.param(chat(messages={"role": "user", "content": "hi"}), "messages", "array", id="messages-object"),
    pytest.param(chat(messages=["hi"]), "messages[0]", "object", id="message-string"),
    pytest.param(chat(messages=[OK_MESSAGES[0], None]), "messages[1]", "object", id="message-null"),
    pytest.param(chat(messages=[{"content": "hi"}]), "messages[0].role", "role", id="role-missing"),
    pytest.param(chat(messages=[{"role": 1, "content": "hi"}]), "messages[0].role", "role", id="role-number"),
    pytest.param(chat(messages=[{"role": "", "content": "hi"}]), "messages[0].role", "role", id="role-empty"),
    pytest.param(chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "a number",
                 id="content-number"),
    pytest.param(chat(messages=[{"role": "user", "content": {"text": "hi"}}]), "messages[0].content",
                 "an object", id="content-object"),
    pytest.param(chat(messages=[{"role": "user", "content": True}]), "messages[0].content", "a boolean",
                 id="content-bool"),
    pytest.param(chat(stream="true"), "stream", "boolean", id="stream-string"),
    pytest.param(chat(stream=1), "stream", "boolean", id="stream-number"),
    pytest.param(chat(max_tokens="10"), "max_tokens", "integer", id="max-tokens-string"),
    pytest.param(chat(max_tokens=0), "max_tokens", "at least 1", id="max-tokens-zero"),
    pytest.param(chat(max_tokens=-5), "max_tokens", "at least 1", id="max-tokens-negative"),
    pytest.param(chat(max_tokens=True), "max_tokens", "integer", id="max-tokens-bool"),
    pytest.param(chat(max_tokens=2.5), "max_tokens", "integer", id="max-tokens-float"),
    pytest.param(chat(max_completion_tokens=0), "max_completion_tokens", "at least 1", id="max-completion-zero"),
    pytest.param(chat(temperature="hot"), "temperature", "number", id="temperature-string"),
    pytest.param(chat(temperature=False), "temperature", "number", id="temperature-bool"),
    pytest.param(chat(top_p=[1]), "top_p", "number", id="top-p-list"),
    pytest.param(chat(n="1"), "n", "integer", id="n-string"),
    pytest.param(chat(stream=True, stream_options=True), "stream_options", "object", id="stream-options-bool"),
    pytest.param(chat(tools={"type": "function"}), "tools", "array", id="tools-object"),
    pytest.param(chat(stop=3), "stop", "string", id="stop-number"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("body, param, says", CHAT_CASES)
async def test_bad_chat_fields_are_400_naming_the_field(proxy, prefix, body, param, says):
    _, base = proxy
    error = error_of(*await send(f"{base}{prefix}/chat/completions", json=body), 400)
    assert error["param"] == param
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_a_streamed_bad_request_is_a_plain_json_error_not_a_stream(proxy):
    _, base = proxy
    status, headers, raw = await send(f"{base}/v1/chat/completions", json=chat(stream=True, max_tokens="x"))
    assert error_of(status, headers, raw, 400)["param"] == "max_tokens"
    assert not raw.startswith(b"data:")


async def test_the_error_response_carries_a_request_id(proxy):
    _, base = proxy
    status, headers, raw = await send(f"{base}/v1/chat/completions", json=chat(messages=[]))
    error_of(status, headers, raw, 400)
    assert headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("path", ["/chat/completions", "/embeddings"])
async def test_unknown_model_is_404_naming_the_models_that_exist(proxy, prefix, path):
    _, base = proxy
    body = {"model": "gpt-4o", "messages": OK_MESSAGES, "input": "x"}
    error = error_of(*await send(base + prefix + path, json=body), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-4o" in error["message"]
    for name in ("tier-test", "up:m1", "up:m2", "up:m3"):
        assert name in error["message"]


@pytest.mark.parametrize("model", ["nope:m1", "up:", "tier-test ", "TIER-TEST", "m4"])
async def test_near_misses_of_model_names_are_404(proxy, model):
    """An unknown provider prefix, an empty model after a known one, case and whitespace are not guessed."""
    _, base = proxy
    error = error_of(*await send(f"{base}/v1/chat/completions", json=chat(model=model)), 404)
    assert error["code"] == "model_not_found"
    assert f"`{model}`" in error["message"]


# --- body size --------------------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes."""
    base = orjson.dumps(chat(messages=[{"role": "user", "content": ""}]))
    raw = orjson.dumps(chat(messages=[{"role": "user", "content": "x" * (size - len(base))}]))
    assert len(raw) == size
    return raw


async def _chunks(raw: bytes, size: int = 256):
    for i in range(0, len(raw), size):
        yield raw[i : i + size]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("size", [LIMIT + 1, 8 * 1024 * 1024], ids=["one-byte-over", "8MiB"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_413(proxy, prefix, size, chunked):
    """Answered before the body is read (Content-Length) or as soon as the read passes the limit (chunked)."""
    _, base = proxy
    raw = padded(size)
    data = _chunks(raw, 65536) if chunked else io.BytesIO(raw)
    error = error_of(*await send(f"{base}{prefix}/chat/completions", data=data), 413)
    assert error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_large_embeddings_body_is_413(proxy, chunked):
    _, base = proxy
    raw = orjson.dumps({"model": "tier-test", "input": ["word " * 100] * 10})
    assert len(raw) > LIMIT
    error = error_of(*await send(f"{base}/openai/v1/embeddings", data=_chunks(raw) if chunked else raw), 413)
    assert error["code"] == "request_too_large"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_exactly_at_the_limit_is_accepted(upstream, start_proxy, chunked):
    scripted, url = upstream
    base = await start_proxy(config_for(url, server={"max_body_bytes": LIMIT}))
    raw = padded(LIMIT)
    status, _, body = await send(f"{base}/v1/chat/completions", data=_chunks(raw) if chunked else raw)
    assert status == 200, body
    assert len(scripted.requests) == 1


# --- methods and paths ------------------------------------------------------------------------------------

WRONG_METHODS = [
    ("GET", "/chat/completions", "POST"),
    ("PUT", "/chat/completions", "POST"),
    ("DELETE", "/embeddings", "POST"),
    ("GET", "/embeddings", "POST"),
    ("POST", "/models", "GET"),
    ("DELETE", "/models", "GET"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("method, path, allowed", WRONG_METHODS)
async def test_wrong_method_is_405_with_allow(proxy, prefix, method, path, allowed):
    _, base = proxy
    data = orjson.dumps(chat()) if method != "GET" else None
    status, headers, raw = await send(base + prefix + path, method=method, data=data)
    error = error_of(status, headers, raw, 405)
    assert headers["Allow"] == allowed
    assert error["code"] == "method_not_allowed"
    assert method in error["message"] and allowed in error["message"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/"),
        ("GET", "/v1"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completion"),
        ("POST", "/openai/v1/assistants"),  # /responses is served now (Responses API and audio)
        ("POST", "/v2/chat/completions"),
        ("GET", "/v1/modelz/tier-test"),
        ("POST", "/chat/completions"),
    ],
)
async def test_unknown_path_is_404(proxy, method, path):
    _, base = proxy
    data = orjson.dumps(chat()) if method == "POST" else None
    error = error_of(*await send(base + path, method=method, data=data), 404)
    assert error["code"] == "unknown_url"
    assert path in error["message"]


# --- embeddings -------------------------------------------------------------------------------------------


def emb(**fields):
    return {"model": "tier-test", "input": "hello", **fields}


EMBEDDING_CASES = [
    pytest.param(without(emb(), "input"), "input", id="input-missing"),
    pytest.param(emb(input=None), "input", id="input-null"),
    pytest.param(emb(input=""), "input", id="input-empty-string"),
    pytest.param(emb(input=[]), "input", id="input-empty-list"),
    pytest.param(emb(input=5), "input", id="input-number"),
    pytest.param(emb(input=True), "input", id="input-bool"),
    pytest.param(emb(input={"text": "hi"}), "input", id="input-object"),
    pytest.param(emb(input=["a", 1]), "input", id="input-mixed"),
    pytest.param(emb(input=[None]), "input", id="input-list-of-null"),
    pytest.param(emb(input=[True, False]), "input", id="input-list-of-bools"),
    pytest.param(emb(input=[[]]), "input", id="input-empty-token-array"),
    pytest.param(emb(input=[[1, "a"]]), "input", id="input-token-array-with-string"),
    pytest.param(emb(input=[[True]]), "input", id="input-token-array-of-bools"),
    pytest.param(without(emb(), "model"), "model", id="model-missing"),
    pytest.param(emb(model=3), "model", id="model-number"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("body, param", EMBEDDING_CASES)
async def test_bad_embeddings_input_is_400(proxy, prefix, body, param):
    _, base = proxy
    error = error_of(*await send(f"{base}{prefix}/embeddings", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "value", ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]], ids=["string", "strings", "tokens", "token-arrays"]
)
async def test_good_embeddings_input_shapes_are_accepted(upstream, start_proxy, value):
    """The other side of the 400s above: every documented input shape goes through."""
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    status, _, raw = await send(f"{base}/v1/embeddings", json=emb(input=value))
    assert status == 200, raw
    assert scripted.requests[0]["body"]["input"] == value


# --- never a 500 ------------------------------------------------------------------------------------------

ODD_VALUES = [None, True, False, 0, -1, 1.5, 2**64 - 1, -(2**63), 1e300, "", "x", [], [None], [1, "a"], {}, {"a": 1}]
CHAT_FIELDS = ["model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
               "seed", "stop", "tools", "stream_options"]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return _int(v) or isinstance(v, float)


# Which odd values each field lets through to the upstream: the types the proxy checks (README: "wrong types"
# get a 4xx); what it does not check (ranges, the embeddings' encoding_format) is the upstream's to judge.
ACCEPTED = {
    "model": lambda v: False,  # no odd value names a model: 400, or 404 for "x"
    "messages": lambda v: False,
    "stream": lambda v: v is None or isinstance(v, bool),
    "max_tokens": lambda v: v is None or (_int(v) and v >= 1),
    "max_completion_tokens": lambda v: v is None or (_int(v) and v >= 1),
    "temperature": lambda v: v is None or _number(v),
    "top_p": lambda v: v is None or _number(v),
    "n": lambda v: v is None or _int(v),
    "seed": lambda v: v is None or _int(v),
    "stop": lambda v: v is None or isinstance(v, (str, list)),
    "tools": lambda v: v is None or isinstance(v, list),
    "stream_options": lambda v: v is None or isinstance(v, dict),
    "input": lambda v: v == "x",
    "encoding_format": lambda v: True,
}


async def test_no_odd_value_in_any_field_causes_a_server_error(upstream, start_proxy):
    """Each field set to each odd value: the proxy answers 4xx itself, naming the field, exactly when the value
    has the wrong type; otherwise the request goes upstream (which answers ok here). Never a 5xx."""
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        for path, fields, good in (
            ("/v1/chat/completions", CHAT_FIELDS, chat()),
            ("/openai/v1/embeddings", ["model", "input", "encoding_format"], {"model": "tier-test", "input": "x"}),
        ):
            for field in fields:
                for value in ODD_VALUES:
                    before = len(scripted.requests)
                    async with session.post(base + path, data=orjson.dumps({**good, field: value})) as resp:
                        raw = await resp.read()
                        case = (path, field, value, raw)
                        if not ACCEPTED[field](value):
                            expected = 404 if (field, value) == ("model", "x") else 400
                            error = error_of(resp.status, resp.headers, raw, expected)
                            assert error["param"] == field or error["param"].startswith(field + "["), case
                            assert len(scripted.requests) == before, case
                            continue
                        assert resp.status == 200, case
                        assert len(scripted.requests) == before + 1, case
                        assert scripted.requests[-1]["body"][field] == value, case  # as the client sent it
                        if path.endswith("completions") and value is True and field == "stream":
                            assert raw.rstrip().endswith(b"data: [DONE]"), case
                        else:
                            assert "error" not in orjson.loads(raw), case


# --- nesting depth ----------------------------------------------------------------------------------------


def nested(depth: int, shape: str = "list") -> bytes:
    """A chat body whose deepest value sits `depth` levels down (the body object is level 1)."""
    inner = depth - 1
    value = ("[" * inner + "]" * inner) if shape == "list" else ('{"a":' * (inner - 1) + "{}" + "}" * (inner - 1))
    return b'{"model": "tier-test", "messages": [{"role": "user", "content": "hi"}], "x": ' + value.encode() + b"}"


@pytest.mark.parametrize("shape", ["list", "object"])
@pytest.mark.parametrize("depth", [255, 256, 1023])
async def test_json_nested_past_the_depth_limit_is_400(upstream, start_proxy, depth, shape):
    """Before: 255 levels and more parsed, then failed to serialize upstream: a 500 `internal_error` with a
    traceback."""
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    error = error_of(*await send(f"{base}/v1/chat/completions", data=nested(depth, shape)), 400)
    assert error["code"] == "json_too_deep" and "254 levels" in error["message"]
    assert scripted.requests == []


@pytest.mark.parametrize("shape", ["list", "object"])
async def test_json_nested_exactly_to_the_limit_goes_upstream(upstream, start_proxy, shape):
    scripted, url = upstream
    base = await start_proxy(config_for(url))
    status, _, raw = await send(f"{base}/v1/chat/completions", data=nested(254, shape))
    assert status == 200, raw
    assert len(scripted.requests) == 1


# --- a body that arrives slowly ------------------------------------------------------------------------------


async def test_a_body_that_trickles_in_with_short_gaps_is_read_whole(upstream, start_proxy):
    """server.request_read_timeout_s bounds the gap between two reads, not the whole upload: 40 pieces 50 ms
    apart take twice the timeout and still go through."""
    import asyncio

    scripted, url = upstream
    base = await start_proxy(config_for(url, server={"request_read_timeout_s": 1.0}))
    host, port = base.removeprefix("http://").split(":")
    body = padded(400)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 10):
            writer.write(body[i : i + 10])
            await writer.drain()
            await asyncio.sleep(0.05)
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert scripted.requests[0]["body"]["messages"] == orjson.loads(body)["messages"]
