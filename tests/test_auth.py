"""Proxy keys ([auth]) and who is asking: 401s in OpenAI's shape, both headers, the real openai client, the
identity without [auth], and request type, module and key id on the span, the metrics and the log line."""

from __future__ import annotations

import logging
import subprocess
import sys

import aiohttp
import openai
import orjson
import pytest

from policies.identity import Identity, hash_key
from proxy.app.config import ConfigError
from tests.conftest import config_for
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)
from tests.policy_examples import Recorder

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}
KEY = "gp-test-key-for-search-app"
OTHER = "gp-test-key-for-billing"


def auth_table() -> dict:
    return {"keys": [{"id": "search-app", "sha256": hash_key(KEY), "user": "alice", "team": "search"},
                     {"id": "billing", "sha256": hash_key(OTHER)}]}


async def post(base: str, headers: dict, body: dict = BODY):
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()


@pytest.fixture(autouse=True)
def fresh_recorder():
    Recorder.seen = []
    yield


def test_keys_new_prints_a_key_and_the_entry_that_admits_it():
    out = subprocess.run([sys.executable, "-m", "proxy", "keys", "new", "--id", "search-app"], capture_output=True,
                         text=True, check=True)
    key = out.stdout.strip()
    assert key.startswith("gp-") and len(key) > 40
    assert 'id = "search-app"' in out.stderr and f'sha256 = "{hash_key(key)}"' in out.stderr
    hashed = subprocess.run([sys.executable, "-m", "proxy", "keys", "hash"], input=key + "\n", capture_output=True,
                            text=True, check=True)
    assert hashed.stdout.strip() == hash_key(key)
    empty = subprocess.run([sys.executable, "-m", "proxy", "keys", "hash"], input="", capture_output=True, text=True)
    assert empty.returncode == 2 and "stdin" in empty.stderr


async def test_missing_and_wrong_keys_get_401_in_openais_shape(upstream, start_proxy, caplog):
    scripted, url = upstream
    base = await start_proxy(config_for(url, auth=auth_table()))
    for headers in ({}, {"Authorization": "Bearer gp-wrong"}, {"x-api-key": "gp-wrong"}, {"Authorization": KEY}):
        status, _, body = await post(base, headers)
        assert status == 401, headers
        error = orjson.loads(body)["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "gp-wrong" not in error["message"]
    assert scripted.requests == []
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="gp-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="tier-test", messages=BODY["messages"])
    assert info.value.code == "invalid_api_key"
    await client.close()
    assert "gp-wrong" not in caplog.text


async def test_both_headers_admit_and_neither_the_key_nor_the_proxys_headers_go_upstream(upstream, start_proxy,
                                                                                          caplog):
    caplog.set_level(logging.INFO, logger="groq_proxy")
    scripted, url = upstream
    base = await start_proxy(config_for(url, auth=auth_table(), policies=[{"use": "tests.policy_examples:Recorder"}]))
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    answer = await client.chat.completions.create(model="tier-test", messages=BODY["messages"],
                                                  extra_headers={"x-request-type": "chat", "x-module": "sentinel"})
    assert answer.choices[0].message.content
    await client.close()
    status, _, _ = await post(base, {"x-api-key": OTHER})
    assert status == 200
    assert Recorder.seen == [(Identity("search-app", "alice", "search"), "chat", "sentinel", "tier-test"),
                             (Identity("billing", None, None), "default", None, "tier-test")]
    for request in scripted.requests:
        sent = {k.lower(): v for k, v in request["headers"].items()}
        assert not {"x-api-key", "x-request-type", "x-module"} & set(sent)
        assert KEY not in str(sent) and OTHER not in str(sent)
        assert sent["authorization"] == "Bearer sk-test-secret-upstream-key"
    lines = [r for r in caplog.records if r.getMessage() == "attempt"]
    assert [(r.fields["key_id"], r.fields["request_type"], r.fields["module"]) for r in lines] == [
        ("search-app", "chat", "sentinel"), ("billing", "default", None)]
    assert KEY not in caplog.text and OTHER not in caplog.text


async def test_without_auth_identity_is_the_user_field_else_anonymous(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(config_for(url, policies=[{"use": "tests.policy_examples:Recorder"}]))
    assert (await post(base, {}, {**BODY, "user": "bob"}))[0] == 200
    assert (await post(base, {"Authorization": "Bearer anything"}))[0] == 200
    assert [s[0] for s in Recorder.seen] == [Identity(None, "bob", None), Identity(None, "anonymous", None)]


async def test_request_type_module_and_key_on_span_and_metrics(upstream, start_proxy, otlp):
    scripted, url = upstream
    config = config_for(url, auth=auth_table(),
                        policies=[{"use": "request_budget", "types": {"triage": {"prompt": 50}}}],
                        telemetry={"enabled": True, "endpoint": otlp.url, "export_interval_s": 0.05})
    base = await start_proxy(config)
    _, headers, _ = await post(base, {"x-api-key": KEY, "x-request-type": "triage", "x-module": "sentinel"})
    await post(base, {"x-api-key": KEY, "x-request-type": "made-up-by-a-client"})
    server, _ = await otlp.wait_for_request(headers["x-request-id"], 1)
    assert server.attributes["groq_proxy.request_type"] == "triage"
    assert server.attributes["groq_proxy.module"] == "sentinel"
    assert server.attributes["groq_proxy.key_id"] == "search-app"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert 'groq_proxy_key_requests_total{key_id="search-app",request_type="triage"} 1' in text
    assert 'groq_proxy_key_requests_total{key_id="search-app",request_type="other"} 1' in text  # bounded labels
    assert "made-up-by-a-client" not in text and KEY not in text


def test_auth_config_errors_name_the_key():
    url = "http://127.0.0.1:1/v1"
    cases = [
        ({"keys": [{"id": "a", "sha256": "abc"}]}, "auth.keys[0].sha256: must be 64 hex digits"),
        ({"keys": [{"id": "a", "key": KEY}]}, "auth.keys[0].key: keys are never written in the file"),
        ({"keys": [{"sha256": hash_key(KEY)}]}, "auth.keys[0].id: required"),
        ({"keys": []}, "auth.keys: [auth] needs at least one"),
        ({"keys": [{"id": "a", "sha256": hash_key(KEY)}, {"id": "a", "sha256": hash_key(OTHER)}]},
         "auth.keys[1].id: 'a' is used by another key"),
        ({"keys": [{"id": "a", "sha256": hash_key(KEY), "role": "x"}]}, "auth.keys[0].role: unknown key"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as info:
            config_for(url, auth=table)
        assert message in str(info.value), str(info.value)
        assert KEY not in str(info.value)
