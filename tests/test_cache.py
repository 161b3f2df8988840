"""The response cache (`use = "cache"`) against a real scripted upstream and real clients: the key, one entry
serving both shapes, the headers and Cache-Control, what is never stored, and budgets and limits on hits."""

from __future__ import annotations

import asyncio

import groq
import openai
import orjson
import pytest

from proxy.sim.testing import USAGE, Behaviour, chat_chunk, completion, sse, status, stream_events
from tests.conftest import config_for, post_chat, until
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)

MESSAGES = [{"role": "user", "content": "Say hello"}]
ASK = {"model": "tier-test", "messages": MESSAGES}


def cache_config(url: str, *, policies: list | None = None, **cache) -> object:
    table = {"use": "cache", **cache}
    return config_for(url, {"tier-test": ["m1", "m2"]}, policies=[*(policies or []), table])


def data_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.startswith(b"data:")]


async def test_a_repeated_plain_request_is_answered_from_the_cache(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    first = await post_chat(base, ASK)
    second = await post_chat(base, ASK)
    assert first[0] == second[0] == 200
    assert first[1]["x-groq-proxy-cache"] == "MISS" and "age" not in first[1]
    assert second[1]["x-groq-proxy-cache"] == "HIT"
    assert int(second[1]["age"]) >= 0
    assert second[2] == first[2]  # the upstream's bytes, as they were
    assert len(scripted.requests) == 1


async def test_a_streamed_hit_replays_the_original_events_and_usage_only_when_asked(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    first = await post_chat(base, {**ASK, "stream": True})
    hit = await post_chat(base, {**ASK, "stream": True})
    with_usage = await post_chat(base, {**ASK, "stream": True, "stream_options": {"include_usage": True}})
    assert len(scripted.requests) == 1
    assert hit[1]["x-groq-proxy-cache"] == "HIT" and hit[1]["Content-Type"].startswith("text/event-stream")
    original = data_events(b"".join(stream_events("m1")))
    assert data_events(first[2]) == original
    assert data_events(hit[2]) == original  # every chunk, byte for byte, then [DONE]
    replay = data_events(with_usage[2])
    assert replay[:-2] == original[:-1] and replay[-1] == b"data: [DONE]"
    usage_chunk = orjson.loads(replay[-2][5:])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == USAGE


async def test_a_plain_request_is_answered_from_a_streamed_entry(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    await post_chat(base, {**ASK, "stream": True})
    status_, headers, body = await post_chat(base, ASK)
    assert headers["x-groq-proxy-cache"] == "HIT"
    answer = orjson.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello there!"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == USAGE
    assert len(scripted.requests) == 1


async def test_a_stream_is_answered_from_a_plain_entry_and_the_clients_read_it(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    await post_chat(base, ASK)
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    assert chunks[-1].usage.total_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len(scripted.requests) == 1


async def test_openai_and_groq_clients_read_a_streamed_hit(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    await post_chat(base, {**ASK, "stream": True})  # stored from a stream
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x") as client:
        raw = await client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES,
                                                                     stream=True)
        assert raw.headers["x-groq-proxy-cache"] == "HIT"
        openai_chunks = [c async for c in raw.parse()]
    async with groq.AsyncGroq(base_url=base, api_key="x") as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True)
        groq_chunks = [c async for c in stream]
    for chunks in (openai_chunks, groq_chunks):
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there!"
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert groq_chunks[-1].x_groq.usage.total_tokens == 10
    assert len(scripted.requests) == 1


async def test_the_key_ignores_stream_user_and_field_order_but_not_sampling(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    await post_chat(base, {"messages": MESSAGES, "model": "tier-test", "temperature": 0.5, "user": "ann"})
    same = await post_chat(base, {"model": "tier-test", "temperature": 0.5, "messages": MESSAGES, "user": "bob",
                                  "stream": True, "stream_options": {"include_usage": False}})
    assert same[1]["x-groq-proxy-cache"] == "HIT"
    other = await post_chat(base, {**ASK, "temperature": 0.7})
    assert other[1]["x-groq-proxy-cache"] == "MISS"
    other_model = await post_chat(base, {**ASK, "model": "m1"})
    assert other_model[1]["x-groq-proxy-cache"] == "MISS"
    assert len(scripted.requests) == 3


async def test_the_tier_params_are_part_of_the_key(upstream, start_proxy):
    scripted, url = upstream
    config = config_for(url, {"tier-test": ["m1"]}, policies=[{"use": "cache"}])
    base = await start_proxy(config)
    await post_chat(base, ASK)
    # the same body with what a tier would merge in (none here) set explicitly to another value: a new answer
    miss = await post_chat(base, {**ASK, "max_tokens": 9})
    assert miss[1]["x-groq-proxy-cache"] == "MISS"


async def test_a_scoped_cache_keeps_each_users_answers_apart(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url, scope="user"))
    await post_chat(base, {**ASK, "user": "ann"})
    assert (await post_chat(base, {**ASK, "user": "ann"}))[1]["x-groq-proxy-cache"] == "HIT"
    assert (await post_chat(base, {**ASK, "user": "bob"}))[1]["x-groq-proxy-cache"] == "MISS"
    assert len(scripted.requests) == 2


@pytest.mark.parametrize("behaviour", [
    status(400, "bad_request"),
    Behaviour("cut", cut_after=2),
    Behaviour("ok", events=[sse(chat_chunk("m1", "Hel")), sse(chat_chunk("m1", None, "content_filter")),
                            b"data: [DONE]\n\n"]),
])
async def test_errors_cut_streams_and_unfinished_answers_are_never_stored(upstream, start_proxy, behaviour):
    scripted, url = upstream
    scripted.behaviours["m1"] = behaviour
    scripted.behaviours["m2"] = behaviour
    base = await start_proxy(cache_config(url))
    for _ in range(2):
        answer = await post_chat(base, {**ASK, "stream": True})
        assert answer[1]["x-groq-proxy-cache"] == "MISS"
    assert len(scripted.requests) >= 2


async def test_a_plain_answer_that_did_not_finish_is_not_stored(upstream, start_proxy):
    scripted, url = upstream
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m1", "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}
    scripted.behaviours["m1"] = Behaviour("ok", body=body)
    base = await start_proxy(cache_config(url))
    await post_chat(base, ASK)
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "MISS"
    assert len(scripted.requests) == 2


async def test_n_above_one_is_bypassed(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    for _ in range(2):
        answer = await post_chat(base, {**ASK, "n": 2})
        assert answer[1]["x-groq-proxy-cache"] == "BYPASS"
    assert len(scripted.requests) == 2


async def test_cache_control_no_cache_no_store_and_max_age(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    no_store = await post_chat(base, ASK, {"Cache-Control": "no-store"})
    assert no_store[1]["x-groq-proxy-cache"] == "BYPASS"
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "MISS"  # no-store stored nothing
    no_cache = await post_chat(base, ASK, {"Cache-Control": "no-cache"})
    assert no_cache[1]["x-groq-proxy-cache"] == "BYPASS"  # not looked up...
    assert len(scripted.requests) == 3
    scripted.behaviours["m1"] = Behaviour("ok", body={**orjson.loads(no_cache[2]), "id": "fresh"})
    await post_chat(base, ASK, {"Cache-Control": "no-cache"})
    hit = await post_chat(base, ASK)
    assert orjson.loads(hit[2])["id"] == "fresh"  # ...and its answer stored
    assert hit[1]["age"] == "0"
    await asyncio.sleep(1.05)  # ages are whole seconds: the entry is now at least one second old
    aged = await post_chat(base, ASK)
    assert int(aged[1]["age"]) >= 1  # not the reply made for the hit of a second ago
    too_old = await post_chat(base, ASK, {"Cache-Control": "max-age=0"})
    assert too_old[1]["x-groq-proxy-cache"] == "MISS"
    young = await post_chat(base, ASK, {"Cache-Control": "max-age=3600"})
    assert young[1]["x-groq-proxy-cache"] == "HIT" and young[1]["age"] == "0"  # the fresh answer max-age=0 got


async def test_deterministic_caches_only_temperature_zero_or_a_seed(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url, cacheable="deterministic"))
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "BYPASS"
    for extra in ({"temperature": 0}, {"seed": 7}):
        await post_chat(base, {**ASK, **extra})
        assert (await post_chat(base, {**ASK, **extra}))[1]["x-groq-proxy-cache"] == "HIT"


@pytest.mark.parametrize("limit_first", [True, False])
async def test_a_hit_counts_for_a_rate_limit_wherever_it_is_listed(upstream, start_proxy, limit_first):
    scripted, url = upstream
    limit = {"use": "rate_limit", "requests_per_minute": 2}
    tables = [limit, {"use": "cache"}] if limit_first else [{"use": "cache"}, limit]
    base = await start_proxy(config_for(url, {"tier-test": ["m1"]}, policies=tables))
    assert (await post_chat(base, ASK))[0] == 200
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "HIT"
    refused = await post_chat(base, ASK)
    assert refused[0] == 429 and refused[1]["x-groq-proxy-cache"] == "HIT"  # the hit was found, then refused
    assert len(scripted.requests) == 1


async def usage_used(base: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/v1/usage") as resp:
            return (await resp.json())["budgets"][0]["used"]


@pytest.mark.parametrize("budget_first", [True, False])
@pytest.mark.parametrize("charge_hits,charged", [(False, 10), (True, 20)])
async def test_hits_charge_budgets_only_with_charge_hits(upstream, start_proxy, charge_hits, charged, budget_first):
    scripted, url = upstream
    budget = {"use": "token_budget", "tokens": 100000, "per": "global"}
    cache = {"use": "cache", "charge_hits": charge_hits}
    tables = [budget, cache] if budget_first else [cache, budget]
    base = await start_proxy(config_for(url, {"tier-test": ["m1"]}, policies=tables))
    await post_chat(base, ASK)
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "HIT"
    assert await usage_used(base) == charged


async def test_a_spent_budget_after_the_cache_does_not_refuse_a_free_hit(upstream, start_proxy):
    scripted, url = upstream
    budget = {"use": "token_budget", "tokens": 1015, "per": "global"}  # one request's reservation (1010) fits
    base = await start_proxy(config_for(url, {"tier-test": ["m1"]}, policies=[{"use": "cache"}, budget]))
    assert (await post_chat(base, ASK))[0] == 200  # 10 used: the next reservation does not fit
    assert (await post_chat(base, {**ASK, "temperature": 0.3}))[0] == 429
    hit = await post_chat(base, ASK)
    assert hit[0] == 200 and hit[1]["x-groq-proxy-cache"] == "HIT"  # a hit reserves and costs nothing here


async def test_embeddings_pass_by_the_cache(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, {"emb": ["e1"]}, policies=[{"use": "cache"}]))
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(base + "/v1/embeddings", json={"model": "emb", "input": "x"}) as resp:
                assert resp.status == 200
                assert resp.headers["x-groq-proxy-cache"] == "BYPASS"
    assert len(scripted.requests) == 2


# --- admin, metrics, traces -----------------------------------------------------------------------------------

ADMIN = "admin-secret-for-tests"


def _admin_config(url: str):
    from proxy.app.config import parse_config

    raw = {"server": {"keepalive_s": 0, "admin_key_env": "CACHE_ADMIN"},
           "providers": {"up": {"base_url": url, "api_key_env": "TEST_UPSTREAM_KEY"}},
           "models": {"tier-test": {"chain": ["up:m1"]}, "tier-other": {"chain": ["up:m2"]}},
           "policies": [{"use": "cache"}]}
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": "sk-test-secret-upstream-key", "CACHE_ADMIN": ADMIN})


async def delete(base: str, query: str = "", key: str | None = ADMIN) -> tuple[int, dict]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.delete(base + "/admin/cache" + query, headers=headers) as resp:
            return resp.status, await resp.json()


async def test_admin_delete_empties_the_cache_by_key_by_model_or_all(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(_admin_config(url))
    first = await post_chat(base, ASK)
    await post_chat(base, {**ASK, "temperature": 0.1})
    await post_chat(base, {**ASK, "model": "tier-other"})
    assert (await delete(base, key=None))[0] == 401
    assert (await delete(base, key="wrong"))[0] == 401
    assert (await delete(base, "?key=nothex"))[0] == 400
    assert await delete(base, f"?key={first[1]['x-groq-proxy-cache-key']}") == (200, {"deleted": 1,
                                                                                       "policies": ["cache"]})
    assert (await post_chat(base, ASK))[1]["x-groq-proxy-cache"] == "MISS"
    assert (await delete(base, "?model=tier-test"))[1]["deleted"] == 2
    assert (await post_chat(base, {**ASK, "model": "tier-other"}))[1]["x-groq-proxy-cache"] == "HIT"
    assert (await delete(base))[1]["deleted"] == 1
    assert (await post_chat(base, {**ASK, "model": "tier-other"}))[1]["x-groq-proxy-cache"] == "MISS"


async def test_admin_delete_is_refused_without_an_admin_key(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    status_, body = await delete(base)
    assert status_ == 403 and body["error"]["code"] == "admin_key_not_configured"


async def test_metrics_count_results_per_virtual_model_and_what_is_held(upstream, start_proxy):
    import aiohttp

    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    await post_chat(base, ASK)
    await post_chat(base, ASK)
    await post_chat(base, ASK, {"Cache-Control": "no-store"})
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_cache_requests_total{virtual_model="tier-test",result="miss"} 1' in text
    assert 'groq_proxy_cache_requests_total{virtual_model="tier-test",result="hit"} 1' in text
    assert 'groq_proxy_cache_requests_total{virtual_model="tier-test",result="bypass"} 1' in text
    assert "groq_proxy_cache_entries 1\n" in text
    held = int(next(line for line in text.splitlines() if line.startswith("groq_proxy_cache_bytes ")).split()[1])
    assert held > 400


async def test_a_hit_is_an_attribute_and_event_of_the_request_span_without_an_attempt_span(upstream, start_proxy,
                                                                                           otlp):
    scripted, url = upstream
    telemetry = {"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05}
    base = await start_proxy(config_for(url, {"tier-test": ["m1"]}, policies=[{"use": "cache"}], telemetry=telemetry))
    miss = await post_chat(base, ASK)
    hit = await post_chat(base, {**ASK, "stream": True})
    server, attempts = await otlp.wait_for_request(miss[1]["x-request-id"], attempts=1)
    assert server.attributes["groq_proxy.cache"] == "MISS" and len(attempts) == 1
    server, attempts = await otlp.wait_for_request(hit[1]["x-request-id"], attempts=0)
    assert server.attributes["groq_proxy.cache"] == "HIT"
    assert attempts == [] and len(otlp.trace(server.trace_id)) == 1
    assert any(e.attributes.get("policy") == "cache" and e.attributes.get("decision") == "respond"
               for e in server.events)


@pytest.mark.parametrize("table,message", [
    ({"scope": "model"}, "policies[0].scope: must be one of global, key, user, team"),
    ({"ttl_s": 0}, "policies[0].ttl_s: must be more than 0"),
    ({"cacheable": "sometimes"}, "policies[0].cacheable: must be one of always, deterministic"),
    ({"coalesce": "yes"}, "policies[0].coalesce: must be true or false"),
    ({"max_entries": 0}, "policies[0].max_entries"),
    ({"ttl": 5}, "policies[0].ttl"),
    ({"coalesce_wait_s": float("inf")}, "policies[0].coalesce_wait_s: must be a finite number of seconds"),
    ({"ttl_s": float("inf")}, "policies[0].ttl_s: must be a finite number of seconds"),
])
def test_a_wrong_cache_option_stops_the_start_naming_the_key(table, message):
    from proxy.app.config import ConfigError

    with pytest.raises(ConfigError) as info:
        config_for("http://127.0.0.1:9/openai/v1", policies=[{"use": "cache", **table}])
    assert message in str(info.value)


async def test_a_shadow_cache_counts_its_hits_but_answers_from_upstream(upstream, start_proxy):
    import aiohttp

    scripted, url = upstream
    base = await start_proxy(cache_config(url, mode="shadow", charge_hits=True))
    await post_chat(base, ASK)
    answer = await post_chat(base, ASK)
    assert len(scripted.requests) == 2  # the shadow hit changed nothing: upstream answered
    assert "x-groq-proxy-cache" not in answer[1] and "age" not in answer[1]
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_cache_requests_total{virtual_model="tier-test",result="hit"} 1' in text
    assert 'groq_proxy_policy_decisions_total{policy="cache",decision="respond",mode="shadow"} 1' in text


async def test_admin_delete_without_a_cache_policy_or_with_its_store_down(upstream, start_proxy):
    from proxy.app.config import parse_config
    from tests.conftest import closed_port_url

    scripted, url = upstream
    down = closed_port_url().replace("http://", "redis://").replace("/openai/v1", "/0")
    for policies, store, expected in (([], None, (404, "cache_not_configured")),
                                      ([{"use": "cache"}], {"backend": "redis", "url": down, "timeout_s": 0.2},
                                       (503, "cache_unavailable"))):
        raw = {"server": {"keepalive_s": 0, "admin_key_env": "CACHE_ADMIN"},
               "providers": {"up": {"base_url": url, "api_key_env": "TEST_UPSTREAM_KEY"}},
               "models": {"tier-test": {"chain": ["up:m1"]}}, "policies": policies, **({"store": store} if store else {})}
        base = await start_proxy(parse_config(raw, env={"TEST_UPSTREAM_KEY": "k", "CACHE_ADMIN": ADMIN}))
        status_, body = await delete(base)
        assert (status_, body["error"]["code"]) == expected
        assert "redis://" not in str(body)


async def test_the_status_page_shows_the_cache(upstream, start_proxy):
    import aiohttp

    scripted, url = upstream
    base = await start_proxy(cache_config(url))
    await post_chat(base, ASK)
    await post_chat(base, ASK)
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/status.json") as resp:
            data = await resp.json()
    stores = data["cache"]["stores"]
    assert stores["cache"]["entries"] == 1 and stores["cache"]["backend"] == "memory" and stores["cache"]["bytes"] > 0


def _logprob(token: str, value: float) -> dict:
    return {"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": []}


LOGPROBS = [_logprob("Hello", -0.1), _logprob(" there", -0.2), _logprob("!", -0.3)]


async def test_logprobs_of_a_streamed_entry_reach_a_plain_hit(upstream, start_proxy):
    """Each chunk's `logprobs.content` is the assembled choice's, in order (they were dropped: `logprobs: null`)."""
    scripted, url = upstream
    events = [sse(chat_chunk("m1", "") | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})]
    for entry in LOGPROBS:
        chunk = chat_chunk("m1", entry["token"])
        chunk["choices"][0]["logprobs"] = {"content": [entry], "refusal": None}
        events.append(sse(chunk))
    events += [sse(chat_chunk("m1", None, "stop", x_groq={"id": "req_test", "usage": USAGE})), b"data: [DONE]\n\n"]
    scripted.behaviours["m1"] = Behaviour("ok", events=events)
    base = await start_proxy(cache_config(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="tier-test", messages=MESSAGES, stream=True, logprobs=True)
        [c async for c in stream]
        raw = await client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES,
                                                                     logprobs=True)
    assert raw.headers["x-groq-proxy-cache"] == "HIT" and len(scripted.requests) == 1
    choice = raw.parse().choices[0]
    assert choice.message.content == "Hello there!"
    assert [lp.model_dump() for lp in choice.logprobs.content] == LOGPROBS


async def test_logprobs_of_a_plain_entry_ride_the_chunks_of_a_streamed_hit(upstream, start_proxy):
    """A plain answer replayed as a stream: one chunk per token, each with its own logprobs entry."""
    scripted, url = upstream
    answer = {**completion("m1"), "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                                                "logprobs": {"content": LOGPROBS}, "finish_reason": "stop"}]}
    scripted.behaviours["m1"] = Behaviour("ok", body=answer)
    base = await start_proxy(cache_config(url))
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        await client.chat.completions.create(model="tier-test", messages=MESSAGES, logprobs=True)
        raw = await client.chat.completions.with_raw_response.create(model="tier-test", messages=MESSAGES,
                                                                     logprobs=True, stream=True)
        chunks = [c async for c in raw.parse()]
    assert raw.headers["x-groq-proxy-cache"] == "HIT" and len(scripted.requests) == 1
    carrying = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert [lp.model_dump() for c in carrying for lp in c.logprobs.content] == LOGPROBS
    assert all(c.delta.content == "".join(lp.token for lp in c.logprobs.content) for c in carrying)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_a_hit_is_one_log_line_a_shadow_hit_also_its_decisions(upstream, start_proxy, proxy_log, mode):
    """A hit's own request line says `cache: HIT`; a `policy_decision` line for it would double the log of a
    busy cache. A shadow hit changes nothing, so its decision line is the only place the log shows it."""
    scripted, url = upstream
    base = await start_proxy(cache_config(url, mode=mode))
    await post_chat(base, ASK)
    proxy_log.clear()
    answer = await post_chat(base, ASK)
    await until(lambda: any(r.getMessage() == "request" for r in proxy_log.records), what="the request line")
    decisions = [r for r in proxy_log.records if r.getMessage() == "policy_decision"]
    if mode == "enforce":
        assert answer[1]["x-groq-proxy-cache"] == "HIT" and decisions == []
    else:
        assert [(r.fields["policy"], r.fields["decision"], r.fields["mode"]) for r in decisions] == [
            ("cache", "respond", "shadow")]


def test_the_proxy_does_not_load_the_redis_client_without_redis():
    """redis-py (and the OpenTelemetry and psutil modules it brings) cost a proxy on the memory store 10 MB of
    resident memory at start when the cache's coalescing across replicas was imported with the policy."""
    import subprocess
    import sys

    code = "import sys, proxy.app.server, proxy.app.cli, policies.cache.policy; print('redis' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "False"
