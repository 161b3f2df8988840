"""Files and batches through the proxy (issue 13, items 3-6): the real openai and groq clients against the proxy
in front of the simulator's files and batches, two proxy keys that cannot see each other's objects (the memory
store and the suite's Redis), bad input, the size limit, and what reaches the provider."""

from __future__ import annotations

import io

import aiohttp
import groq
import openai
import orjson
import pytest
from aiohttp import web
from yarl import URL

from policies.identity import hash_key
from proxy.sim.simulator import build_simulator_app
from tests.conftest import config_for
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)

KEY_A = "gp-test-files-key-alpha"
KEY_B = "gp-test-files-key-bravo"
LINES = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": f"question {i}"}]}}
         for i in range(3)]
JSONL = b"".join(orjson.dumps(line) + b"\n" for line in LINES)


def auth() -> dict:
    return {"keys": [{"id": "alpha", "sha256": hash_key(KEY_A)}, {"id": "bravo", "sha256": hash_key(KEY_B)}]}


class Recorder:
    """The simulator, recording every request that reaches it: (method, path, Authorization)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        app = build_simulator_app()

        @web.middleware
        async def record(request: web.Request, handler):
            self.seen.append((request.method, request.path, request.headers.get("Authorization", "")))
            return await handler(request)

        app.middlewares.append(record)
        return app


@pytest.fixture
async def sim(aiohttp_server):
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    return recorder, f"http://127.0.0.1:{server.port}/openai/v1"


def clients(base: str):
    a = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY_B, max_retries=0)
    return a, b


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_two_keys_never_see_each_others_files_or_batches(sim, start_proxy, redis_store_table, backend):
    recorder, url = sim
    tables = {"auth": auth()}
    if backend == "redis":
        tables["store"] = redis_store_table
    base = await start_proxy(config_for(url, **tables))
    a, b = clients(base)

    made = await a.files.create(file=("batch.jsonl", io.BytesIO(JSONL)), purpose="batch")
    assert made.id.startswith("file_") and made.bytes == len(JSONL) and made.filename == "batch.jsonl"
    assert [f.id for f in (await a.files.list()).data] == [made.id]
    assert (await a.files.retrieve(made.id)).id == made.id
    assert await (await a.files.content(made.id)).aread() == JSONL

    b_file = await b.files.create(file=("mine.jsonl", io.BytesIO(JSONL)), purpose="batch")
    assert [f.id for f in (await b.files.list()).data] == [b_file.id]
    assert [f.id for f in (await a.files.list()).data] == [made.id]

    # Another key's id answers exactly as an id that does not exist: 404, never 403.
    before = len(recorder.seen)
    missing = "file_" + "0" * 24
    for call in (lambda i: b.files.retrieve(i), lambda i: b.files.content(i), lambda i: b.files.delete(i)):
        with pytest.raises(openai.NotFoundError) as theirs:
            await call(made.id)
        with pytest.raises(openai.NotFoundError) as nobodys:
            await call(missing)
        assert theirs.value.code == nobodys.value.code == "file_not_found"
        assert theirs.value.message.replace(made.id, "ID") == nobodys.value.message.replace(missing, "ID")
    with pytest.raises(openai.BadRequestError) as info:
        await b.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert info.value.param == "input_file_id" and info.value.code == "file_not_found"
    assert len(recorder.seen) == before  # none of those reached the provider

    batch = await a.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating" and batch.input_file_id == made.id
    with pytest.raises(openai.NotFoundError):
        await b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await b.batches.cancel(batch.id)
    assert [x.id for x in (await b.batches.list()).data] == []

    done = await a.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    assert [x.id for x in (await a.batches.list()).data] == [batch.id]
    # The output file is the batch owner's, and only hers.
    output = await (await a.files.content(done.output_file_id)).aread()
    answers = [orjson.loads(line) for line in output.splitlines()]
    assert [x["custom_id"] for x in answers] == ["req-0", "req-1", "req-2"]
    assert all(x["response"]["body"]["choices"][0]["message"]["content"] for x in answers)
    with pytest.raises(openai.NotFoundError):
        await b.files.content(done.output_file_id)
    assert {f.id for f in (await a.files.list()).data} == {made.id, done.output_file_id}

    second = await a.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert (await a.batches.cancel(second.id)).status == "cancelling"
    assert (await a.batches.retrieve(second.id)).status == "cancelled"

    deleted = await a.files.delete(made.id)
    assert deleted.deleted is True and deleted.id == made.id
    with pytest.raises(openai.NotFoundError):
        await a.files.retrieve(made.id)
    # Every request that reached the provider carried its key, never a proxy key.
    assert {auth_header for _, _, auth_header in recorder.seen} == {"Bearer sk-test-secret-upstream-key"}
    await a.close()
    await b.close()


async def test_groq_sdk_files_and_batches(sim, start_proxy):
    recorder, url = sim
    base = await start_proxy(config_for(url, auth=auth()))
    client = groq.AsyncGroq(base_url=base, api_key=KEY_A, max_retries=0)
    other = groq.AsyncGroq(base_url=base, api_key=KEY_B, max_retries=0)
    made = await client.files.create(file=("batch.jsonl", JSONL), purpose="batch")
    assert made.purpose == "batch" and made.bytes == len(JSONL)
    assert [f.id for f in (await client.files.list()).data] == [made.id]
    assert (await other.files.list()).data == []
    assert (await client.files.info(made.id)).filename == "batch.jsonl"
    assert await (await client.files.content(made.id)).read() == JSONL
    batch = await client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    assert (await client.batches.retrieve(batch.id)).status == "completed"
    assert [x.id for x in (await client.batches.list()).data] == [batch.id]
    assert (await other.batches.list()).data == []
    with pytest.raises(groq.NotFoundError):
        await other.batches.retrieve(batch.id)
    second = await client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
    assert (await client.batches.cancel(second.id)).status == "cancelling"
    assert (await client.files.delete(made.id)).deleted is True
    assert all(path.startswith("/openai/v1/") for _, path, _ in recorder.seen)
    await client.close()
    await other.close()


async def test_without_auth_everything_passes_as_it_is(sim, start_proxy):
    _, url = sim
    base = await start_proxy(config_for(url))
    client = openai.AsyncOpenAI(base_url=base + "/openai/v1", api_key="anything", max_retries=0)
    made = await client.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="batch")
    assert [f.id for f in (await client.files.list()).data] == [made.id]
    batch = await client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    assert (await client.batches.retrieve(batch.id)).output_file_id
    with pytest.raises(openai.NotFoundError):  # the provider's own 404, passed on
        await client.files.retrieve("file_" + "1" * 24)
    await client.close()


async def _post_form(base: str, form: aiohttp.FormData | bytes, headers: dict | None = None, path="/v1/files"):
    async with aiohttp.ClientSession() as session:
        async with session.post(base + path, data=form, headers={"Authorization": f"Bearer {KEY_A}",
                                                                 **(headers or {})}) as resp:
            return resp.status, orjson.loads(await resp.read())


async def test_bad_uploads_get_openai_errors_and_never_reach_the_provider(sim, start_proxy):
    recorder, url = sim
    base = await start_proxy(config_for(url, auth=auth()))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="fine-tune")
    assert info.value.param == "purpose" and info.value.code == "invalid_purpose"

    no_file = aiohttp.FormData(default_to_multipart=True)
    no_file.add_field("purpose", "batch")
    no_file.add_field("other", "x")
    status, body = await _post_form(base, no_file)
    assert status == 400 and body["error"]["param"] == "file" and body["error"]["code"] == "missing_file"

    status, body = await _post_form(base, orjson.dumps({"purpose": "batch"}), {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_content_type"
    assert set(body["error"]) == {"message", "type", "param", "code"}

    # A purpose after the file: the upload has begun, and is cut off before the provider has it whole.
    late = aiohttp.FormData()
    late.add_field("file", JSONL, filename="b.jsonl", content_type="application/jsonl")
    late.add_field("purpose", "assistants")
    status, body = await _post_form(base, late)
    assert status == 400 and body["error"]["param"] == "purpose"
    assert recorder.seen == [("POST", "/openai/v1/files", "Bearer sk-test-secret-upstream-key")]  # began...
    async with aiohttp.ClientSession() as session:  # ...but never whole: the provider has no file
        async with session.get(url + "/files") as resp:
            assert (await resp.json())["data"] == []
    recorder.seen.clear()

    with pytest.raises(openai.NotFoundError) as info:
        await client.files.retrieve("not a file id")
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_" + "2" * 24)
    with pytest.raises(openai.BadRequestError) as info:
        await client.batches.create(input_file_id="", endpoint="/v1/chat/completions", completion_window="24h")
    assert info.value.param == "input_file_id"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/files?limit=0", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "limit"
        async with session.get(base + "/v1/files") as r:  # no proxy key
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        async with session.put(base + "/v1/files", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
            assert r.status == 405 and set(r.headers["Allow"].split(", ")) == {"GET", "POST"}
    assert recorder.seen == []
    await client.close()


async def test_an_upload_over_the_limit_gets_413(sim, start_proxy):
    recorder, url = sim
    base = await start_proxy(config_for(url, auth=auth(), server={"max_file_bytes": 1000}))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:  # with a Content-Length: refused before it is read
        await client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 200_000)), purpose="batch")
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"

    async def chunked():  # without one: refused once the file passes the limit, the provider never has it whole
        form = b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        yield form + b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n"
        for _ in range(4):
            yield b"y" * 600
        yield b"\r\n--XyZ--\r\n"

    status, body = await _post_form(base, chunked(), {"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert status == 413 and body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    assert (await client.files.list()).data == []
    small = await client.files.create(file=("ok.jsonl", io.BytesIO(b"z" * 1000)), purpose="batch")
    assert small.bytes == 1000
    await client.close()


async def test_unknown_paths_answer_404_listing_what_is_served_and_nothing_reaches_the_provider(sim, start_proxy):
    recorder, url = sim
    base = await start_proxy(config_for(url))
    paths = [("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/assistants"), ("GET", "/v1/files/file_1/other"),
             ("POST", "/openai/v1/batches/batch_1/retry"), ("GET", "/openai/v1/vector_stores"), ("GET", "/v2/x"),
             ("DELETE", "/v1/batches/batch_1/cancel/now"), ("POST", "/v1/moderations")]
    async with aiohttp.ClientSession() as session:
        for method, path in paths:
            async with session.request(method, base + path, headers={"Authorization": "Bearer x"}) as resp:
                body = await resp.json()
                assert resp.status == 404, path
                error = body["error"]
                assert error["code"] == "unknown_url" and error["type"] == "invalid_request_error"
                for served in ("POST /v1/chat/completions", "GET /v1/models/{model_id};", "POST, GET /v1/files", "GET, DELETE /v1/files/{file_id}",
                               "GET /v1/files/{file_id}/content", "POST, GET /v1/batches",
                               "POST /v1/batches/{batch_id}/cancel", "under /openai/v1"):
                    assert served in error["message"], (served, error["message"])
    assert recorder.seen == []


async def test_the_batch_provider_and_its_first_key(aiohttp_server, start_proxy):
    from proxy.app.config import ConfigError, parse_config

    first, second = Recorder(), Recorder()
    s1, s2 = await aiohttp_server(first.app()), await aiohttp_server(second.app())
    raw = {"providers": {"main": {"base_url": f"http://127.0.0.1:{s1.port}/openai/v1", "api_key_env": "K0"},
                         "batch": {"base_url": f"http://127.0.0.1:{s2.port}/openai/v1",
                                   "api_key_envs": ["K1", "K2"]}},
           "models": {"tier-test": {"chain": ["main:m1"]}}, "routing": {"batch_provider": "batch"}}
    env = {"K0": "sk-main-key", "K1": "sk-batch-key-one", "K2": "sk-batch-key-two"}
    base = await start_proxy(parse_config(raw, env=env))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        await client.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="batch")
    assert len((await client.files.list()).data) == 3
    assert first.seen == []
    assert {h for _, _, h in second.seen} == {"Bearer sk-batch-key-one"}  # never the pool's second key
    await client.close()
    with pytest.raises(ConfigError, match=r"^routing.batch_provider: must name a provider \(main, batch\)"):
        parse_config({**raw, "routing": {"batch_provider": "nope"}}, env=env)


async def test_request_limits_apply_and_token_budgets_do_not(sim, start_proxy):
    from tests.policy_examples import Recorder as OwnPolicy

    OwnPolicy.seen = []
    _, url = sim
    policies = [{"use": "rate_limit", "per": "key", "requests_per_minute": 3},
                {"use": "token_budget", "per": "key", "tokens": 1, "period": "day"},
                {"use": "tests.policy_examples:Recorder"}]
    base = await start_proxy(config_for(url, auth=auth(), policies=policies))
    a, b = clients(base)
    for _ in range(3):
        await a.files.list()
    with pytest.raises(openai.RateLimitError) as info:
        await a.batches.list()
    assert info.value.code == "rate_limit_exceeded"
    assert (await b.files.list()).data == []  # another key's limit is its own
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    decisions = [line for line in text.splitlines() if line.startswith("groq_proxy_policy_decisions_total{")]
    assert decisions and all('policy="rate_limit"' in line for line in decisions), decisions
    assert OwnPolicy.seen == []  # a policy of one's own is written for chat: not asked about files
    await a.close()
    await b.close()


async def test_a_paging_client_sees_all_of_its_own_and_nothing_else(sim, start_proxy):
    _, url = sim
    base = await start_proxy(config_for(url, auth=auth()))
    a, b = clients(base)
    mine = []
    for i in range(3):  # interleaved: each provider page holds both keys' files
        await b.files.create(file=(f"b{i}.jsonl", io.BytesIO(JSONL)), purpose="batch")
        mine.append((await a.files.create(file=(f"a{i}.jsonl", io.BytesIO(JSONL)), purpose="batch")).id)
    for i in range(4):
        await b.files.create(file=(f"late{i}.jsonl", io.BytesIO(JSONL)), purpose="batch")
    first = await a.files.list(limit=2)
    assert [f.id for f in first.data] == mine[::-1][:2] and first.has_more is True
    assert [f.id async for f in a.files.list(limit=2)] == mine[::-1]  # the pager follows has_more and the last id
    assert [f.id async for f in a.files.list(limit=1)] == mine[::-1]
    assert len([f async for f in b.files.list(limit=3)]) == 7
    await a.close()
    await b.close()


async def test_an_upload_holds_its_concurrency_slot_until_it_is_sent(sim, start_proxy):
    import asyncio

    from tests.conftest import until

    recorder, url = sim
    policies = [{"use": "concurrency", "per": "key", "limit": 1}]
    base = await start_proxy(config_for(url, auth=auth(), policies=policies))
    a, b = clients(base)
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_upload():
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"\r\n\r\n'
        for _ in range(8):  # enough that the multipart reader, which looks one read ahead, passes some on
            yield JSONL * 100
        started.set()
        await release.wait()
        yield b"\r\n--B--\r\n"

    uploading = asyncio.ensure_future(_post_form(base, slow_upload(), {"Content-Type": "multipart/form-data; boundary=B"}))
    await asyncio.wait_for(started.wait(), 30)
    await until(lambda: recorder.seen, 30, "the upload reaching the provider")  # admitted: its slot is held
    with pytest.raises(openai.RateLimitError) as info:  # the limit is one call in flight per key
        await a.files.list()
    assert info.value.code == "concurrency_limit_exceeded"
    assert (await b.files.list()).data == []  # another key has its own slot
    release.set()
    status, body = await asyncio.wait_for(uploading, 30)
    assert status == 200 and body["bytes"] == 800 * len(JSONL)
    assert [f.id for f in (await a.files.list()).data] == [body["id"]]
    await a.close()
    await b.close()


async def test_a_provider_that_is_down_or_refuses_the_key_is_a_502(aiohttp_server, start_proxy):
    from tests.conftest import closed_port_url

    base = await start_proxy(config_for(closed_port_url()))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        await client.files.list()
    assert info.value.status_code == 502 and info.value.code == "upstream_unavailable"
    with pytest.raises(openai.InternalServerError) as info:
        await client.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="batch")
    assert info.value.status_code == 502 and "sk-test-secret-upstream-key" not in str(info.value.body)

    async def refuse(request):
        return web.json_response({"error": {"message": "Invalid API Key", "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(app)
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1"))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:  # not the client's key: never a 401 to the client
        await client.batches.list()
    assert info.value.status_code == 502 and info.value.code == "upstream_auth_failed"
    await client.close()


async def test_spans_and_metrics_name_the_route_never_an_id(sim, start_proxy, otlp):
    _, url = sim
    base = await start_proxy(config_for(url, auth=auth(), telemetry={"enabled": True, "endpoint": otlp.url}))
    a, b = clients(base)
    made = await a.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="batch")
    await a.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        await b.files.retrieve(made.id)
    await otlp.wait_for(lambda r: len([s for s in r.spans if "files" in s.name]) >= 3)
    spans = [s for s in otlp.spans if "files" in s.name]
    assert sorted(s.name for s in spans) == ["GET /v1/files/{file_id}", "GET /v1/files/{file_id}", "POST /v1/files"]
    assert sorted(s.attributes["http.response.status_code"] for s in spans) == [200, 200, 404]
    assert {s.attributes["groq_proxy.key_id"] for s in spans} == {"alpha", "bravo"}
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_requests_total{virtual_model="files",model="none",status="200"} 2' in text
    assert 'groq_proxy_requests_total{virtual_model="files",model="none",status="404"} 1' in text
    assert made.id not in text
    await a.close()
    await b.close()


@pytest.mark.parametrize("body, content_type, code", [
    (b"", "multipart/form-data; boundary=B", None),
    (b"not multipart at all", "multipart/form-data; boundary=B", None),
    (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nno end', "multipart/form-data; boundary=B",
     None),
    (b"x", "multipart/form-data", "invalid_content_type"),
    (b"--B\r\n\r\n\r\n--B--\r\n", "multipart/form-data; boundary=B", "missing_file"),
    (b"--B\r\nContent-Type: multipart/mixed; boundary=C\r\n\r\n--C--\r\n--B--\r\n", "multipart/form-data; boundary=B",
     None),
], ids=["empty", "garbage", "unterminated", "no-boundary", "nameless-part", "nested"])
async def test_broken_multipart_bodies_get_400_and_the_provider_no_file(sim, start_proxy, body, content_type, code):
    recorder, url = sim
    base = await start_proxy(config_for(url))
    status, answer = await _post_form(base, body, {"Content-Type": content_type})
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == "file" and answer["error"]["code"] == code
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/files") as resp:
            assert (await resp.json())["data"] == []


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/files/.."), ("GET", "/v1/files/%2E%2E/content"), ("DELETE", "/v1/files/%2e"),
    ("GET", "/v1/batches/.."), ("POST", "/v1/batches/%2E%2E/cancel"), ("GET", "/openai/v1/files/./content"),
])
async def test_a_dot_segment_id_never_reaches_the_provider(sim, start_proxy, method, path):
    """`..` as an id would make the provider's path `/openai/v1/files/../content`, which any server or
    gateway that resolves dot segments serves as `/openai/v1/content`: another endpoint, with the proxy's key.
    Without [auth] nothing else stands in its way; it is not found."""
    recorder, url = sim
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.request(method, URL(base + path, encoded=True)) as resp:
            body = await resp.json()
    assert recorder.seen == []
    assert resp.status == 404 and body["error"]["code"] in ("file_not_found", "batch_not_found"), body


async def test_head_of_a_files_content_has_no_body(sim, start_proxy):
    """HEAD is served wherever GET is. A HEAD answer with the file's bytes after its head breaks HTTP: the
    client reads them as the start of the next answer on the connection."""
    _, url = sim
    base = await start_proxy(config_for(url))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    made = await client.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="batch")
    await client.close()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:  # one connection
        async with session.head(f"{base}/v1/files/{made.id}/content") as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == str(len(JSONL))
            assert await resp.read() == b""
        async with session.get(f"{base}/v1/files/{made.id}/content") as resp:
            assert resp.status == 200 and await resp.read() == JSONL


async def test_a_providers_busy_or_broken_answer_reaches_the_client_in_openais_shape(aiohttp_server, start_proxy):
    """A 429 keeps its retry-after (the client's one hint of when to come back); an error page that is not
    OpenAI's JSON (a gateway's HTML 503) becomes a 502 in OpenAI's shape, as every other failure of the
    provider is."""
    async def busy(request):
        if request.path.endswith("/batches"):
            return web.json_response({"error": {"message": "Rate limit reached", "type": "requests",
                                                "code": "rate_limit_exceeded"}}, status=429,
                                     headers={"retry-after": "7", "x-ratelimit-remaining-requests": "0"})
        return web.Response(status=503, text="<html><body>503 Service Temporarily Unavailable</body></html>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", busy)
    server = await aiohttp_server(app)
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1"))
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/batches") as resp:
            body = await resp.json()
            assert resp.status == 429 and body["error"]["code"] == "rate_limit_exceeded"
            assert resp.headers["retry-after"] == "7" and resp.headers["x-ratelimit-remaining-requests"] == "0"
        async with session.get(base + "/v1/files") as resp:
            assert resp.status == 502 and resp.content_type == "application/json"
            error = (await resp.json())["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_error" and "503" in error["message"]


async def test_a_file_name_reaches_the_provider_as_the_client_named_it(sim, start_proxy):
    """httpx writes a backslash in a quoted file name as `\\\\` (a quoted-pair), and aiohttp reads it back:
    the proxy, writing the name again, must escape it the same way, or `a\\b.jsonl` becomes `ab.jsonl`."""
    _, url = sim
    base = await start_proxy(config_for(url))
    direct = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    proxied = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    for name in ("a\\b.jsonl", 'say "hi".jsonl', "café \\ x.jsonl"):
        want = (await direct.files.create(file=(name, io.BytesIO(JSONL)), purpose="batch")).filename
        got = (await proxied.files.create(file=(name, io.BytesIO(JSONL)), purpose="batch")).filename
        assert got == want, (name, got, want)
    await direct.close()
    await proxied.close()
