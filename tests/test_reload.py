"""Reload (POST /admin/reload; SIGHUP is in tests/test_reload_under_load.py) and the admin API, against the real
proxy app and real local upstreams: the new config takes effect, requests in flight finish on the old one, what
was learned of the upstreams carries over, a bad file is refused with its reason, and GET /admin/config shows
no secret."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from policies.identity import hash_key
from proxy.app.config import ConfigError, load_config, parse_config
from proxy.app.server import STATE, build_app
from proxy.sim.testing import ChatUpstream, ScriptedUpstream, sse, status, stream_events
from tests.conftest import ADMIN, ADMIN_KEY, config_for, until

UPSTREAM_KEY = "sk-test-secret-upstream-key"
ENV = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, "TEST_ADMIN_KEY": ADMIN_KEY}


def toml(url: str, chains: dict[str, list[str]], extra: str = "", server: str = "") -> str:
    """A config file: provider `up` at `url`, one virtual model per chain, the admin key on."""
    models = "".join(f'[models.{name}]\nchain = {orjson.dumps([f"up:{m}" for m in chain]).decode()}\n'
                     for name, chain in chains.items())
    keepalive = "" if "keepalive_s" in server else "keepalive_s = 0\n"
    return (f'[server]\n{keepalive}admin_key_env = "TEST_ADMIN_KEY"\n{server}\n'
            f'[providers.up]\nbase_url = "{url}"\napi_key_env = "TEST_UPSTREAM_KEY"\n\n{models}\n{extra}')


@pytest.fixture
def env(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
async def proxy(aiohttp_server, tmp_path, env):
    """`await proxy(text)`: the proxy on a config file holding `text`; returns (base URL, state, file path)."""

    async def start(text: str):
        path = tmp_path / "proxy.toml"
        path.write_text(text)
        server = await aiohttp_server(build_app(load_config(path)))
        return f"http://127.0.0.1:{server.port}", server.app[STATE], path

    return start


async def call(base: str, method: str, path: str, body=None, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()


def chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def reload(base: str) -> tuple[int, dict]:
    return await call(base, "POST", "/admin/reload", headers=ADMIN)


async def model_ids(base: str) -> list[str]:
    return [m["id"] for m in (await call(base, "GET", "/v1/models"))[1]["data"]]


async def test_a_reload_takes_effect_and_keeps_what_was_learned(upstream, proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base, state, path = await proxy(toml(url, {"tier-test": ["m1", "m2"]}))
    for _ in range(3):  # three failures in a row: m1 cools down (routing.cooldown_after_failures)
        assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    old = state.generation
    first_peer = scripted.requests[-1]["request"].transport.get_extra_info("peername")
    client, series = state.upstreams.client, state.pipeline.routing.observed.series("up:m2", False)
    assert series.count == 3 and state.pipeline.cooldowns.remaining("up:m1") > 0

    path.write_text(toml(url, {"tier-test": ["m1", "m2", "m3"], "tier-new": ["m3"]}))
    code, answer = await reload(base)
    assert code == 200 and answer == {"status": "reloaded", "generation": 2, "source": str(path),
                                      "restart_required": []}
    assert state.generation is not old and state.config.models.keys() == {"tier-test", "tier-new"}
    assert "tier-new" in await model_ids(base)
    del scripted.requests[:]
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-new")))[0] == 200
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    # m1 is still cooling down (no request went to it), m2's observed latency kept its samples and fed on,
    # and the pooled upstream connection was used again rather than a new one opened.
    assert scripted.models_sent() == ["m3", "m2"]
    assert state.pipeline.routing.observed.series("up:m2", False) is series and series.count == 4
    assert state.upstreams.client is client
    assert scripted.requests[-1]["request"].transport.get_extra_info("peername") == first_peer


async def test_a_bad_file_is_refused_with_the_reason_and_the_old_config_stays(upstream, proxy, proxy_log):
    _, url = upstream
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}))
    running = state.generation
    bad = {
        "[models.tier-x]\nchain = [\"nowhere:m1\"]\n": "models.tier-x.chain[0]: unknown provider 'nowhere'",
        "[server\n": "is not valid TOML",
        "[routing]\ncooldown_s = -1\n": "routing.cooldown_s: must be at least 0",
    }
    for extra, reason in bad.items():
        path.write_text(toml(url, {"tier-test": ["m1"]}, extra))
        code, answer = await reload(base)
        assert code == 400, answer
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["code"] == "config_invalid"
        assert reason in error["message"] and "the running config stays" in error["message"]
        assert state.generation is running
    path.unlink()
    code, answer = await reload(base)
    assert code == 400 and "cannot read" in answer["error"]["message"]
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    refused = [r.fields for r in proxy_log.records if r.getMessage() == "config_reload_refused"]
    assert len(refused) == 4 and all(r["trigger"] == "admin" and r["generation"] == 1 for r in refused)


class GatedUpstream(ChatUpstream):
    """Streams its first event, then waits for `go` before the rest: a request held in flight."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.models: list[str] = []

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        model = orjson.loads(await request.read())["model"]
        self.models.append(model)
        events = stream_events(model)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(events[0])
        if model == "slow":
            self.started.set()
            await self.go.wait()
        for event in events[1:]:
            await response.write(event)
        await response.write_eof()
        return response


async def test_a_request_in_flight_finishes_on_the_old_config(aiohttp_server, proxy):
    gated = GatedUpstream()
    url = f"http://127.0.0.1:{(await aiohttp_server(gated.app())).port}/openai/v1"
    rpm = '[[policies]]\nuse = "rate_limit"\nrequests_per_minute = 1000\n'
    base, state, path = await proxy(toml(url, {"tier-test": ["slow"]}, rpm))
    old = state.generation
    old_chain = old.pipeline.policies
    closed = []
    old_chain.policies[0].close = lambda: _record(closed)

    async def stream() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/chat/completions", json=chat("tier-test", True)) as resp:
                assert resp.status == 200
                return await resp.read()

    in_flight = asyncio.create_task(stream())
    await asyncio.wait_for(gated.started.wait(), 10)
    path.write_text(toml(url, {"tier-test": ["fast"]}, rpm))
    assert (await reload(base))[0] == 200
    # New requests run on the new chain at once; the one in flight still holds the old generation.
    assert (await stream()).endswith(b"data: [DONE]\n\n")
    assert gated.models == ["slow", "fast"]
    assert old.active == 1 and closed == []
    assert state.generation.pipeline.policies is not old_chain  # the policies were built again
    gated.go.set()
    body = await asyncio.wait_for(in_flight, 10)
    assert body.endswith(b"data: [DONE]\n\n") and b'"model":"slow"' in body
    await until(lambda: closed == ["closed"], what="the old chain closed once its last request ended")
    # Its store was the same (an unchanged [store]): the new chain still uses it, so it stayed open.
    assert state.generation.pipeline.policies.store is old_chain.store


async def _record(closed: list) -> None:
    closed.append("closed")


async def test_policies_are_rebuilt_and_their_counters_survive(upstream, proxy):
    _, url = upstream
    limit = '[[policies]]\nuse = "rate_limit"\nrequests_per_minute = {rpm}\n'
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}))
    for _ in range(3):  # no policy yet
        assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    path.write_text(toml(url, {"tier-test": ["m1"]}, limit.format(rpm=3)))
    assert (await reload(base))[0] == 200
    for _ in range(2):
        assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    # Another reload keeps the store, so the two requests it counted still count: one left, then 429.
    path.write_text(toml(url, {"tier-test": ["m1"], "tier-other": ["m2"]}, limit.format(rpm=3)))
    assert (await reload(base))[0] == 200
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    code, answer = await call(base, "POST", "/v1/chat/completions", chat("tier-test"))
    assert code == 429 and answer["error"]["code"] == "rate_limit_exceeded"
    # The policy metric families are registered once, however many chains were built.
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    assert text.count("# TYPE groq_proxy_policy_decisions_total ") == 1


async def test_a_changed_redis_store_is_a_new_connection_and_the_counts_survive(upstream, proxy, redis_store_table):
    _, url = upstream
    store = redis_store_table

    def text(timeout_s: float) -> str:
        table = (f'[store]\nbackend = "redis"\nurl = "{store["url"]}"\nprefix = "{store["prefix"]}"\n'
                 f"timeout_s = {timeout_s}\n")
        return toml(url, {"tier-test": ["m1"]}, table + '[[policies]]\nuse = "rate_limit"\nrequests_per_minute = 3\n')

    base, state, path = await proxy(text(1.0))
    old_store = state.pipeline.policies.store
    for _ in range(2):
        assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    path.write_text(text(2.0))
    assert (await reload(base))[0] == 200
    new_store = state.pipeline.policies.store
    assert new_store is not old_store and new_store.backend == "redis"
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 429


async def test_start_up_only_keys_are_named_and_keep_their_running_values(upstream, proxy):
    _, url = upstream
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}))
    path.write_text(toml(url, {"tier-test": ["m1"]}, '[telemetry]\nservice_name = "other"\n',
                         server="port = 9999\nmax_headers = 50\nkeepalive_s = 5\n"))
    code, answer = await reload(base)
    assert code == 200
    assert answer["restart_required"] == ["server.port", "server.max_headers", "telemetry"]
    assert state.config.server.port == 8080 and state.config.server.max_headers == 100
    assert state.config.telemetry.service_name == "groq-proxy"
    assert state.config.server.keepalive_s == 5  # a live key: applied


async def test_a_reload_can_turn_the_admin_key_off(upstream, proxy):
    _, url = upstream
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}))
    path.write_text(toml(url, {"tier-test": ["m1"]}).replace('admin_key_env = "TEST_ADMIN_KEY"\n', ""))
    assert (await reload(base))[0] == 200
    code, answer = await reload(base)
    assert code == 403 and answer["error"]["code"] == "admin_key_not_configured"


async def test_a_config_not_read_from_a_file_cannot_be_reloaded(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config_for(url, server={"admin_key_env": "TEST_ADMIN_KEY"}))
    code, answer = await reload(base)
    assert code == 400 and "not read from a file" in answer["error"]["message"]


async def test_admin_routes_need_the_admin_key(upstream, start_proxy):
    _, url = upstream
    base = await start_proxy(config_for(url, server={"admin_key_env": "TEST_ADMIN_KEY"}))
    for method, path in (("POST", "/admin/reload"), ("GET", "/admin/config"), ("GET", "/admin/usage?user=x"),
                         ("POST", "/admin/benchmark")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_KEY}x"},
                        {"Authorization": "Bearer é"}):
            code, answer = await call(base, method, path, headers=headers)
            assert code == 401 and answer["error"]["code"] == "invalid_api_key", (method, path, headers)
            assert ADMIN_KEY not in orjson.dumps(answer).decode()
    base = await start_proxy(config_for(url))
    for method, path in (("POST", "/admin/reload"), ("GET", "/admin/config")):
        code, answer = await call(base, method, path, headers=ADMIN)
        assert code == 403 and answer["error"]["code"] == "admin_key_not_configured"


REDIS_PASSWORD = "redis-pass-do-not-show"
OTLP_TOKEN = "otlp-token-do-not-show"
PROXY_KEY = "gp-a-proxy-key-do-not-show"


async def test_admin_config_shows_the_running_config_with_every_secret_masked(upstream, start_proxy):
    _, url = upstream
    raw = {
        "server": {"keepalive_s": 0, "admin_key_env": "ADMIN"},
        "providers": {"up": {"base_url": url, "api_key_envs": ["KEY_A", "KEY_B"]},
                      "other": {"base_url": url, "api_key_env": "KEY_C", "timeout_s": 20}},
        "models": {"tier-test": {"chain": ["up:m1", {"model": "other:m2", "params": {"temperature": 0.2}}]}},
        "aliases": {"fast": "tier-test"},
        "auth": {"keys": [{"id": "app", "sha256": hash_key(PROXY_KEY), "user": "alice"}]},
        "store": {"backend": "redis", "url": f"redis+sentinel://robot:{REDIS_PASSWORD}@127.0.0.1:1/mymaster",
                  "sentinel_password_env": "SENTINEL", "timeout_s": 0.2, "connect_timeout_s": 0.2},
        "policies": [{"use": "rate_limit", "per": "key", "requests_per_minute": 10}],
    }
    env = {"ADMIN": ADMIN_KEY, "KEY_A": "sk-pool-a-secret", "KEY_B": "sk-pool-b-secret", "KEY_C": "sk-other-secret",
           "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {OTLP_TOKEN}", "SENTINEL": "sentinel-pass-do-not-show"}
    base = await start_proxy(parse_config(raw, env=env, source="/etc/groq-proxy.toml"))
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/admin/config", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            text = await resp.text()
    for secret in (*env.values(), REDIS_PASSWORD, OTLP_TOKEN, PROXY_KEY):
        assert secret not in text
    view = orjson.loads(text)
    server, up, other = view["server"], view["providers"]["up"], view["providers"]["other"]
    assert server["admin_key"] == "[masked]" and server["admin_key_env"] == "ADMIN" and server["port"] == 8080
    assert up["api_key_envs"] == ["KEY_A", "KEY_B"] and up["api_keys"] == ["[masked]", "[masked]"]
    assert other["api_key"] == "[masked]" and other["timeout_s"] == 20 and other["first_byte_timeout_s"] == 10
    assert view["models"]["tier-test"]["chain"][1] == {"provider": "other", "model": "m2",
                                                        "params": {"temperature": 0.2}}
    assert view["aliases"] == {"fast": "tier-test"} and view["source"] == "/etc/groq-proxy.toml"
    assert view["telemetry"]["headers"] == {"authorization": "[masked]"}
    store = view["policies"]["store"]
    assert store["url"] == "redis+sentinel://robot:[masked]@127.0.0.1:1/mymaster" and store["prefix"] == "gp:"
    assert store["connect"]["sentinel_password"] == "[masked]" and store["connect"]["timeout_s"] == 0.2
    [key] = view["policies"]["keys"]["keys"]
    assert key["id"] == "app" and key["digest"] == hash_key(PROXY_KEY)  # a hash is not a secret
    [policy] = view["policies"]["policies"]
    assert policy["name"] == "rate_limit" and policy["per"] == "key" and policy["rpm"] == 10


async def test_admin_port_serves_the_admin_routes_and_the_public_port_none(upstream, aiohttp_server, env):
    scripted, url = upstream
    config = config_for(url, server={"admin_key_env": "TEST_ADMIN_KEY", "admin_port": 0})
    server = await aiohttp_server(build_app(config))
    public, state = f"http://127.0.0.1:{server.port}", server.app[STATE]
    admin = state.admin_url
    assert admin is not None and admin != public
    for method, path in (("POST", "/admin/reload"), ("GET", "/admin/config"), ("GET", "/admin/usage?user=x"),
                         ("POST", "/admin/benchmark")):
        code, answer = await call(public, method, path, headers=ADMIN)
        assert code == 404 and answer["error"]["code"] == "unknown_url"
    code, view = await call(admin, "GET", "/admin/config", headers=ADMIN)
    assert code == 200 and view["server"]["admin_port"] == 0
    assert (await call(admin, "GET", "/admin/config"))[0] == 401
    assert (await call(admin, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 404
    assert (await call(public, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200


async def test_a_stalled_body_on_the_admin_port_is_a_408(upstream, aiohttp_server):
    """The admin port's app has the public one's limits: a body that stops arriving gets the 408 of
    server.request_read_timeout_s (before: a KeyError, so a 500)."""
    _, url = upstream
    config = config_for(url, server={"admin_key_env": "TEST_ADMIN_KEY", "admin_port": 0,
                                     "request_read_timeout_s": 0.2})
    server = await aiohttp_server(build_app(config))
    port = int(server.app[STATE].admin_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /admin/benchmark HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("server, message", [
    ({"admin_port": 9090}, "server.admin_port: the admin API is off without an admin key"),
    ({"admin_key_env": "A", "admin_port": 8080}, "server.admin_port: must differ from server.port (8080)"),
    ({"admin_key_env": "A", "admin_port": 70000}, "server.admin_port: must be at most 65535"),
    ({"admin_key_env": "A", "admin_port": "9090"}, "server.admin_port: must be an integer"),
    ({"admin_key_env": "A", "admin_port": -1}, "server.admin_port: must be at least 0"),
])
def test_admin_port_is_checked_at_start(server, message):
    raw = {"server": server, "providers": {"up": {"base_url": "http://127.0.0.1:1"}},
           "models": {"t": {"chain": ["up:m"]}}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env={"A": "admin-key-value"})
    assert str(caught.value).startswith(message)


async def test_an_upload_in_flight_keeps_its_generation_open(aiohttp_server, proxy):
    """Files and batches count on the generation too: a reload while an upload streams leaves the old chain
    (and its store, which holds who owns the file) open until the upload has ended."""
    from proxy.sim.simulator import build_simulator_app

    url = f"http://127.0.0.1:{(await aiohttp_server(build_simulator_app())).port}/openai/v1"
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}))
    old = state.generation
    closed = []
    sent, release = asyncio.Event(), asyncio.Event()

    async def body():
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"\r\n\r\n'
        yield b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 100
        sent.set()
        await release.wait()
        yield b"\r\n--B--\r\n"

    async def upload():
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/files", data=body(),
                                    headers={"Content-Type": "multipart/form-data; boundary=B"}) as resp:
                return resp.status, await resp.json()

    uploading = asyncio.create_task(upload())
    await asyncio.wait_for(sent.wait(), 10)
    await until(lambda: old.active == 1, what="the upload counted on its generation")
    reloads = state.reloads
    reloads_close = reloads._close

    async def watched(generation):
        closed.append(generation.number)
        await reloads_close(generation)

    reloads._close = watched
    path.write_text(toml(url, {"tier-test": ["m2"]}))
    assert (await reload(base))[0] == 200
    assert state.generation is not old and old.active == 1 and closed == []
    release.set()
    status, answer = await asyncio.wait_for(uploading, 30)
    assert status == 200 and answer["object"] == "file"
    await until(lambda: closed == [1], what="the old generation closed once the upload ended")


async def test_a_reload_under_the_simulator_keeps_answering_from_it(aiohttp_server, tmp_path, env):
    """`serve --simulate`: the new config's providers point at the embedded simulator too."""
    path = tmp_path / "proxy.toml"
    path.write_text(toml("https://api.groq.com/openai/v1", {"tier-test": ["openai/gpt-oss-20b"]}))
    server = await aiohttp_server(build_app(load_config(path), simulate=True))
    base, state = f"http://127.0.0.1:{server.port}", server.app[STATE]
    simulator = state.config.providers["up"].base_url
    path.write_text(toml("https://api.groq.com/openai/v1", {"tier-new": ["openai/gpt-oss-120b"]}))
    assert (await reload(base))[0] == 200
    assert state.config.providers["up"].base_url == simulator and state.config.simulated
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=chat("tier-new")) as resp:
            assert resp.status == 200 and resp.headers["x-groq-proxy-simulated"] == "true"


@pytest.mark.parametrize("url", ["redis://pw9@127.0.0.1:1/0", "redis+sentinel://p%40ss@127.0.0.1:1/mymaster"])
async def test_admin_config_masks_a_redis_password_given_alone(upstream, start_proxy, url):
    """`redis://secret@host` is a password alone (the store reads it so, as redis-cli does): GET /admin/config
    showed it as it was when it was short (the log redactor skips values under 4 characters) or percent-encoded
    (the redactor knows the decoded password, not the URL's text)."""
    _, url_up = upstream
    raw = {"server": {"keepalive_s": 0, "admin_key_env": "ADMIN"},
           "providers": {"up": {"base_url": url_up, "api_key_env": "KEY"}},
           "models": {"tier-test": {"chain": ["up:m1"]}},
           "store": {"backend": "redis", "url": url, "timeout_s": 0.2, "connect_timeout_s": 0.2},
           "policies": [{"use": "rate_limit", "per": "key", "requests_per_minute": 10}]}
    config = parse_config(raw, env={"ADMIN": ADMIN_KEY, "KEY": UPSTREAM_KEY}, source="/etc/groq-proxy.toml")
    base = await start_proxy(config)
    status_code, view = await call(base, "GET", "/admin/config", headers=ADMIN)
    assert status_code == 200
    shown = view["policies"]["store"]["url"]
    assert "pw9" not in shown and "p%40ss" not in shown and "p@ss" not in shown
    assert shown.startswith(url.split("://")[0] + "://[masked]@127.0.0.1:1/")


@pytest.mark.parametrize("route", ["/v1/usage?user=ann", "/status.json"])
async def test_usage_keeps_its_generation_and_the_store_it_reads(upstream, proxy, redis_store_table, route):
    """GET /v1/usage (and the status page's usage of the global limits) takes the generation once and holds it,
    as a request through the pipeline does. Before, it did not count on its generation: a reload that changed
    [store] closed the old store at once, under the usage read still in flight on it."""
    _, url = upstream
    store = redis_store_table

    def text(timeout_s: float, rpm: int) -> str:
        table = (f'[store]\nbackend = "redis"\nurl = "{store["url"]}"\nprefix = "{store["prefix"]}"\n'
                 f"timeout_s = {timeout_s}\n")
        limit = f'[[policies]]\nuse = "rate_limit"\nname = "{{per}}"\nper = "{{per}}"\nrequests_per_minute = {rpm}\n'
        return toml(url, {"tier-test": ["m1"]}, table + limit.format(per="user") + limit.format(per="global"))

    base, state, path = await proxy(text(1.0, 10))
    for _ in range(2):
        assert (await call(base, "POST", "/v1/chat/completions", {**chat("tier-test"), "user": "ann"}))[0] == 200
    old_store, old = state.pipeline.policies.store, state.generation
    reached, gate, closed = asyncio.Event(), asyncio.Event(), []
    read, close = old_store.read, old_store.close

    async def gated_read(claims):
        reached.set()
        await gate.wait()
        return await read(claims)

    async def watched_close():
        closed.append(old_store)
        await close()

    old_store.read, old_store.close = gated_read, watched_close
    usage = asyncio.ensure_future(call(base, "GET", route))
    try:
        await asyncio.wait_for(reached.wait(), 10)
        path.write_text(text(2.0, 20))
        assert (await reload(base))[0] == 200
        assert state.generation is not old and state.pipeline.policies.store is not old_store
        assert closed == []  # the usage read still runs on the old generation's store
    finally:
        gate.set()
    code, report = await asyncio.wait_for(usage, 10)
    assert code == 200, report
    limits = report["limits"] if route.startswith("/v1/usage") else report["policies"]["limits"]
    assert [(limit["per"], limit["requests"]["limit"], limit["requests"]["used"]) for limit in limits] == \
        ([("user", 10, 2)] if route.startswith("/v1/usage") else []) + [("global", 10, 2)]  # the old generation's
    await until(lambda: closed == [old_store], what="the old store closed once the usage read ended")


async def test_admin_cache_delete_keeps_its_generation_and_the_cache_it_empties(upstream, proxy):
    """DELETE /admin/cache holds the generation it started on, as /v1/usage does. Before, a reload (any: each
    builds the cache policy anew) closed the old cache's store under a delete still in flight on it (on Redis a
    SCAN of many round trips)."""
    _, url = upstream
    cache = '[[policies]]\nuse = "cache"\n'
    base, state, path = await proxy(toml(url, {"tier-test": ["m1"]}, cache))
    assert (await call(base, "POST", "/v1/chat/completions", chat("tier-test")))[0] == 200
    [policy] = state.pipeline.policies.policies
    old_store = policy.store
    reached, gate, closed = asyncio.Event(), asyncio.Event(), []
    delete, close = old_store.delete, old_store.close

    async def gated_delete(**kwargs):
        reached.set()
        await gate.wait()
        return await delete(**kwargs)

    async def watched_close():
        closed.append(old_store)
        await close()

    old_store.delete, old_store.close = gated_delete, watched_close
    emptied = asyncio.ensure_future(call(base, "DELETE", "/admin/cache", headers=ADMIN))
    try:
        await asyncio.wait_for(reached.wait(), 10)
        path.write_text(toml(url, {"tier-test": ["m1"], "tier-new": ["m2"]}, cache))
        assert (await reload(base))[0] == 200
        assert state.pipeline.policies.policies[0].store is not old_store
        assert closed == []  # the delete still runs on the old generation's cache
    finally:
        gate.set()
    assert await asyncio.wait_for(emptied, 10) == (200, {"deleted": 1, "policies": ["cache"]})
    await until(lambda: closed == [old_store], what="the old cache closed once the delete ended")
