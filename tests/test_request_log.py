"""The one log line per request (`"event": "request"`): every field, for answered, failed, refused and cached
requests, and never a prompt, a completion or a secret unless `telemetry.record_content` is on."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from policies.identity import hash_key
from proxy.sim.testing import Behaviour, status
from proxy.telemetry.logs import JsonFormatter
from tests.conftest import config_for

PROXY_KEY = "gp-request-log-proxy-key"
PROVIDER_KEY = "sk-test-secret-upstream-key"  # config_for's
PROMPT = "PROMPT-CANARY-4711 what is the capital of France"
COMPLETION_WORDS = ("Hello", "there!")  # the scripted upstream's answer: "Hello there!"
AUTH = {"keys": [{"id": "search-app", "sha256": hash_key(PROXY_KEY), "user": "alice", "team": "search"}]}
HEADERS = {"Authorization": f"Bearer {PROXY_KEY}", "x-module": "answers-ui", "x-request-type": "default"}
FIELDS = {"ts", "level", "event", "request_id", "operation", "status", "ms", "cache", "key_id", "user", "team",
          "module", "request_type", "requested", "virtual_model", "model", "stream", "attempts", "input_tokens",
          "output_tokens", "latency_category"}


def body(stream: bool = False, prompt: str = PROMPT, **extra) -> dict:
    return {"model": "tier-test", "messages": [{"role": "user", "content": prompt}], "stream": stream, **extra}


async def post(base: str, payload, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        async with session.post(base + "/v1/chat/completions", data=data,
                                headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            return resp.status, resp.headers, await resp.read()


def request_lines(proxy_log) -> list[dict]:
    """Each request line as the JSON formatter writes it (what a log reader gets)."""
    formatter = JsonFormatter()
    return [orjson.loads(formatter.format(r)) for r in proxy_log.records
            if r.name == "groq_proxy" and r.getMessage() == "request"]


def all_lines(proxy_log) -> str:
    formatter = JsonFormatter()
    return "\n".join(formatter.format(r) for r in proxy_log.records if r.name == "groq_proxy")


async def test_a_request_line_has_every_field_and_no_prompt_completion_or_secret(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(503))  # m1 fails, m2 answers: two attempts sent
    base = await start_proxy(config_for(url, auth=AUTH, routing={"cooldown_after_failures": 100}))
    answers = [await post(base, body(stream=stream), HEADERS) for stream in (False, True)]
    assert [a[0] for a in answers] == [200, 200]
    assert b"Hello" in answers[0][2] and b"Hello" in answers[1][2]  # the completion did come back

    plain, streamed = request_lines(proxy_log)
    for line, (_, headers, _) in zip((plain, streamed), answers):
        assert set(line) == FIELDS | ({"ttft_ms"} if line["stream"] else set())
        assert line["request_id"] == headers["x-request-id"]
        assert (line["level"], line["event"], line["operation"], line["status"]) == ("info", "request", "chat", 200)
        assert (line["key_id"], line["user"], line["team"]) == ("search-app", "alice", "search")
        assert (line["module"], line["request_type"]) == ("answers-ui", "default")
        assert (line["requested"], line["virtual_model"], line["model"]) == ("tier-test", "tier-test", "up:m2")
        assert line["attempts"] == 2 and line["cache"] is None
        assert (line["input_tokens"], line["output_tokens"]) == (7, 3)  # the upstream's usage, stream or not
        assert isinstance(line["ms"], float) and line["latency_category"] in ("excellent", "good", "acceptable",
                                                                             "poor", "critical")
    assert (plain["stream"], streamed["stream"]) == (False, True)
    assert 0 < streamed["ttft_ms"] <= streamed["ms"]

    written = all_lines(proxy_log)
    assert "PROMPT-CANARY-4711" not in written
    assert not any(word in written for word in COMPLETION_WORDS)
    assert PROXY_KEY not in written and PROVIDER_KEY not in written
    assert "input_messages" not in written and "output_messages" not in written


async def test_record_content_puts_prompt_and_completion_on_the_line_but_never_a_key(upstream, start_proxy,
                                                                                     proxy_log):
    _, url = upstream
    base = await start_proxy(config_for(url, auth=AUTH, telemetry={"record_content": True}))
    for stream in (False, True):
        assert (await post(base, body(stream=stream), HEADERS))[0] == 200
    lines = request_lines(proxy_log)
    assert [line["stream"] for line in lines] == [False, True]
    for line in lines:
        [message] = orjson.loads(line["input_messages"])
        assert message == {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
        [output] = orjson.loads(line["output_messages"])
        assert output["parts"] == [{"type": "text", "content": "Hello there!"}] and output["finish_reason"] == "stop"
    written = all_lines(proxy_log)
    assert PROXY_KEY not in written and PROVIDER_KEY not in written


async def test_failed_and_refused_requests_get_their_line_too(upstream, start_proxy, proxy_log):
    scripted, url = upstream
    scripted.behaviours.update(m1=status(503), m2=status(503), m3=Behaviour("cut", cut_after=2))
    base = await start_proxy(config_for(url, routing={"cooldown_after_failures": 100}))
    failed = await post(base, body())  # every model fails: 502, the last attempt's reason
    cut = await post(base, body(stream=True))  # m3's stream breaks after its first events reached the client
    bad = await post(base, b"{not json")
    unknown = await post(base, body(model="no-such-model"))
    assert [r[0] for r in (failed, cut, bad, unknown)] == [502, 200, 400, 404]

    lines = request_lines(proxy_log)
    assert [line["request_id"] for line in lines] == [r[1]["x-request-id"] for r in (failed, cut, bad, unknown)]
    first, second, third, fourth = lines
    assert (first["level"], first["status"], first["model"], first["attempts"]) == ("warning", 502, None, 3)
    # the last attempt's reason: m3's answer was cut
    assert first["reason"] == "upstream_closed" and first["input_tokens"] is None and first["latency_category"] is None
    # the client saw a 200 head, then the error event: the line says how the request really ended
    assert (second["status"], second["model"], second["reason"]) == (502, None, "upstream_closed")
    for line in (third, fourth):  # refused before a model: who and what are unknown, the rest is there
        assert set(line) == {"ts", "level", "event", "request_id", "operation", "status", "ms", "cache"}
    assert (third["status"], fourth["status"]) == (400, 404)
    assert "no-such-model" not in orjson.dumps(fourth).decode()


async def test_user_without_auth_and_a_long_model_name_are_cut_short(upstream, start_proxy, proxy_log):
    _, url = upstream
    base = await start_proxy(config_for(url))
    assert (await post(base, body(user="u" * 500)))[0] == 200
    # a model name over 256 characters is refused (400), and its line carries no more of it than that
    assert (await post(base, body(model="up:" + "m" * 5000)))[0] == 400
    with_user, long_model = request_lines(proxy_log)
    assert with_user["user"] == "u" * 64 and with_user["key_id"] is None and long_model.get("user") is None
    assert long_model["status"] == 400 and len(long_model.get("requested") or "") <= 256


async def test_user_with_policies_but_no_auth_is_cut_short_too(upstream, start_proxy, proxy_log):
    _, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "tests.policy_examples:Recorder"}]))
    assert (await post(base, body(user="v" * 500)))[0] == 200
    [line] = request_lines(proxy_log)
    assert (line["user"], line["key_id"], line["request_type"]) == ("v" * 64, None, "default")


@pytest.mark.parametrize("spelling", ["x-groq-proxy-cache", "X-Groq-Proxy-Cache"])
async def test_the_cache_result_is_the_answers_x_groq_proxy_cache_header(upstream, start_proxy, proxy_log, spelling):
    """However a policy spells the header's name: an answer the proxy writes itself (proxy/pipeline/whole_answer.py)
    keeps its headers in a plain dict, where a lookup is not case-insensitive as in aiohttp's response."""
    scripted, url = upstream
    policy = {"use": "tests.policy_examples:RememberingCache", "header": spelling}
    base = await start_proxy(config_for(url, policies=[policy]))
    miss = await post(base, body())
    hit = await post(base, body())
    assert (miss[1]["x-groq-proxy-cache"], hit[1]["x-groq-proxy-cache"]) == ("MISS", "HIT")
    assert (miss[1].getall("x-groq-proxy-cache"), hit[1].getall("x-groq-proxy-cache")) == (["MISS"], ["HIT"])
    first, second = request_lines(proxy_log)
    assert (first["cache"], first["model"], first["attempts"]) == ("MISS", "up:m1", 1)
    assert (second["cache"], second["model"], second["attempts"], second["status"]) == ("HIT", None, 0, 200)
    assert len(scripted.requests) == 1  # the hit never went upstream


async def test_an_embeddings_request_gets_its_line_without_its_input(upstream, start_proxy, proxy_log):
    _, url = upstream
    base = await start_proxy(config_for(url))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/embeddings", json={"model": "tier-test", "input": PROMPT}) as resp:
            assert resp.status == 200
            request_id = resp.headers["x-request-id"]
    [line] = request_lines(proxy_log)
    assert (line["request_id"], line["operation"], line["model"], line["stream"]) == (request_id, "embeddings",
                                                                                       "up:m1", False)
    assert (line["input_tokens"], line["output_tokens"]) == (4, None)
    assert "PROMPT-CANARY-4711" not in all_lines(proxy_log)


async def test_file_and_batch_requests_get_their_line(aiohttp_server, start_proxy, proxy_log):
    """Files and batches (issue 13) end with the same line: who asked, which operation, the status."""
    from proxy.sim.simulator import build_simulator_app

    sim = await aiohttp_server(build_simulator_app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{sim.port}/openai/v1", auth=AUTH))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {PROXY_KEY}"}) as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", b'{"custom_id": "PROMPT-CANARY-4711"}\n', filename="b.jsonl")
        async with session.post(base + "/v1/files", data=form) as resp:
            assert resp.status == 200
            uploaded = resp.headers["x-request-id"]
        async with session.get(base + "/v1/batches/batch_missing") as resp:
            assert resp.status == 404
            missing = resp.headers["x-request-id"]
    upload, lookup = request_lines(proxy_log)
    assert (upload["request_id"], upload["operation"], upload["status"]) == (uploaded, "files", 200)
    assert (lookup["request_id"], lookup["operation"], lookup["status"]) == (missing, "batches", 404)
    assert (upload["key_id"], upload["user"], upload["model"], upload["attempts"]) == ("search-app", "alice", None, 0)
    assert "PROMPT-CANARY-4711" not in all_lines(proxy_log) and PROXY_KEY not in all_lines(proxy_log)


async def test_a_responses_api_request_gets_its_line_with_its_usage(aiohttp_server, start_proxy, proxy_log):
    from proxy.sim.simulator import build_simulator_app

    sim = await aiohttp_server(build_simulator_app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{sim.port}/openai/v1",
                                        {"tier-test": ["openai/gpt-oss-20b"]}))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses", json={"model": "tier-test", "input": PROMPT}) as resp:
            assert resp.status == 200
            answer = await resp.json()
    [line] = request_lines(proxy_log)
    assert (line["operation"], line["status"], line["model"]) == ("responses", 200, "up:openai/gpt-oss-20b")
    usage = answer["usage"]
    assert (line["input_tokens"], line["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    assert "PROMPT-CANARY-4711" not in all_lines(proxy_log)


# --- the line written as text by the batching writer is the line the dict path writes -------------------------


def test_the_text_line_is_byte_for_byte_the_line_of_the_fields(monkeypatch):
    """log_request writes its line as text, from kept segments, when the log's batching writer is its only
    handler; what it writes must be exactly orjson's JSON of the fields (emit_line), for every kind of request."""
    import io
    import itertools
    import logging
    from types import SimpleNamespace

    from proxy.telemetry import logs, request_log

    class Clock:
        now = 1796032896.8961234

        def time(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(request_log, "time", clock)
    logger = logging.getLogger("groq_proxy")
    saved = (logger.handlers[:], logger.level, logger.propagate, logs._direct)
    stream = io.StringIO()
    handler = logs.BatchingHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    try:
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logs._direct = handler

        def line_of(ctx, **kw) -> tuple[str, str]:
            logs._direct = handler  # the text path
            request_log.log_request(ctx, **kw)
            handler.flush()
            fast = stream.getvalue().splitlines()[-1]
            logs._direct = None  # the dict path: a LogRecord through the formatter
            request_log.log_request(ctx, **kw)
            handler.flush()
            slow = stream.getvalue().splitlines()[-1]
            # A LogRecord's line takes its time from the record: put the fields' own `ts` back in its place.
            slow = '{"ts":' + orjson.dumps(round(clock.now, 3)).decode() + slow[slow.index(","):]
            return fast, slow

        target = SimpleNamespace(key="groq:m-1")
        identities = (None, SimpleNamespace(key="k1", user="alice" * 20, team="search"),
                      SimpleNamespace(key=None, user="anonymous", team=None))
        attempts = ([], [SimpleNamespace(reason="upstream_5xx")], [SimpleNamespace(reason=None)])
        answers = (None, SimpleNamespace(target=target, usage={"prompt_tokens": 12, "completion_tokens": 7},
                                         first_byte=10.25),
                   SimpleNamespace(target=target, usage={"prompt_tokens": 3.0, "completion_tokens": "x"},
                                   first_byte=None),
                   SimpleNamespace(target=target, usage=None, first_byte=10.0))
        count = 0
        for identity, tried, answered, stream_, (status, ms, now) in itertools.product(
                identities, attempts, answers, (False, True),
                ((200, 0.2712345, 1796032896.8961234), (499, 0.0, 1796032896.0), (429, 12345.675, 1796032896.9996),
                 (200, 1e13, 1796032896.1))):
            clock.now = now
            ctx = SimpleNamespace(
                identity=identity, body={"user": "bob"}, answered=answered, route=SimpleNamespace(
                    requested="tier-\"fast\" ü" * 30, virtual="tier-fast"), request_id="req_0123456789abcdef01234567",
                operation="chat", module="ui\n", request_type="default", stream=stream_, sent_attempts=len(tried),
                attempts=tried, started=10.0)
            for cache, category in ((None, None), ("HIT", "fast")):
                fast, slow = line_of(ctx, request_id="req_x", operation="chat", status=status, ms=ms,
                                     category=category, cache=cache, record_content=False)
                assert fast == slow
                count += 1
        assert count == 3 * 3 * 4 * 2 * 4 * 2
    finally:
        logger.handlers[:], logger.level, logger.propagate, logs._direct = saved
