"""A config file that says only what it changes: read over the built-in defaults (proxy/app/config_defaults.py),
checked as a whole file is, at start-up, by `groq-proxy config` and at a reload; and a file with a UTF-8 BOM."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest

from proxy.app.config import ConfigError, default_config_text, load_config, parse_config
from proxy.app.server import STATE, build_app
from tests.conftest import ADMIN, ADMIN_KEY
from tests.procs import clean_env, run, start_serving

DEFAULT = load_config(None, env={})
DEFAULT_TIERS = list(DEFAULT.models)


def write(tmp_path, text: str, name: str = "partial.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, text: str, env: dict | None = None):
    return load_config(write(tmp_path, text), env=env or {})


def test_a_file_with_only_policies_gets_the_default_routing(tmp_path):
    config = load(tmp_path, '[[policies]]\nuse = "cache"\n')
    assert list(config.providers) == ["groq", "local"]
    assert config.models == DEFAULT.models and config.aliases == DEFAULT.aliases
    assert [p.name for p in config.policies.policies] == ["cache"]
    assert config.server == DEFAULT.server


@pytest.mark.parametrize("text", ['[auth]\nkeys = [{ id = "a", sha256 = "' + "ab" * 32 + '" }]\n',
                                  '[store]\nbackend = "memory"\n', "[server]\nport = 9000\n",
                                  "[routing]\ncooldown_s = 7\n", ""])
def test_a_file_with_one_other_section_gets_the_default_routing(tmp_path, text):
    config = load(tmp_path, text)
    assert list(config.models) == DEFAULT_TIERS and config.aliases == DEFAULT.aliases


def test_server_keys_merge_one_by_one(tmp_path):
    config = load(tmp_path, "[server]\nport = 9000\n")
    assert config.server.port == 9000 and config.server.host == DEFAULT.server.host


def test_tiers_without_providers_are_added_to_the_defaults_by_name(tmp_path):
    config = load(tmp_path, '[models.tier-fast]\nchain = ["groq:openai/gpt-oss-120b"]\n'
                            '[models.tier-mine]\nchain = ["local:llama3"]\n'
                            '[aliases]\n"my-old" = "tier-mine"\n')
    assert list(config.models) == DEFAULT_TIERS + ["tier-mine"]
    fast = config.models["tier-fast"]  # replaced whole: the default's params do not linger
    assert [t.key for t in fast.chain] == ["groq:openai/gpt-oss-120b"] and not fast.params
    assert config.models["tier-premium"] == DEFAULT.models["tier-premium"]
    assert config.aliases == {**DEFAULT.aliases, "my-old": "tier-mine"}


def test_a_name_the_file_gives_replaces_the_default_whether_tier_or_alias(tmp_path):
    config = load(tmp_path, '[aliases]\ntier-fast = "groq:openai/gpt-oss-120b"\n'
                            '[models."llama3-8b-8192"]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    assert "tier-fast" not in config.models and config.aliases["tier-fast"] == "groq:openai/gpt-oss-120b"
    assert "llama3-8b-8192" not in config.aliases and "llama3-8b-8192" in config.models


def test_own_providers_and_models_are_the_whole_routing_as_before(tmp_path):
    """A file valid before this change means what it meant: no default tier, alias or provider is added, and the
    defaults' tiers (which name groq) give no error against the file's providers."""
    text = ('[providers.up]\nbase_url = "http://127.0.0.1:1/v1"\n'
            '[models.tier-a]\nchain = ["up:m1"]\n')
    config = load(tmp_path, text)
    import tomllib

    assert config == parse_config(tomllib.loads(text), env={}, source=config.source)
    assert list(config.providers) == ["up"] and list(config.models) == ["tier-a"] and not config.aliases


def test_own_providers_without_models_keep_the_default_tiers_they_can_serve(tmp_path):
    config = load(tmp_path, '[providers.groq]\nbase_url = "http://127.0.0.1:1/openai/v1"\n'
                            'api_key_envs = ["KEY_A", "KEY_B"]\n', env={"KEY_A": "a" * 20, "KEY_B": "b" * 20})
    assert list(config.providers) == ["groq"] and config.providers["groq"].api_key_envs == ("KEY_A", "KEY_B")
    assert list(config.models) == [t for t in DEFAULT_TIERS if t != "tier-embed"]  # tier-embed is on `local`
    assert config.aliases == DEFAULT.aliases


def test_own_providers_that_serve_no_default_tier_need_models(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[providers.up]\nbase_url = "http://127.0.0.1:1/v1"\n')
    assert str(info.value).startswith("models: at least one virtual model is required")
    assert "groq, local" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('[models.tier-x]\nchain = ["nowhere:m"]\n',
     "models.tier-x.chain[0]: unknown provider 'nowhere' (providers: groq, local)"),
    ('[[policies]]\nuse = "nope"\n', "policies[0].use: 'nope' is neither a built-in policy"),
    ("[server]\nprot = 1\n", "server.prot: unknown key"),
    ("server = 5\n", "server: must be a table"),
    ("models = 5\n", "models: must be a table"),
    ("[providers]\n", "providers: at least one provider is required"),
])
def test_errors_in_a_partial_file_name_its_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(message)


def test_a_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b"[server]\nport = 9001\n")
    assert load_config(path, env={}).server.port == 9001


# --- the command, as a user runs it ----------------------------------------------------------------------


async def test_serve_simulate_with_only_a_cache_policy(tmp_path):
    path = write(tmp_path, '[[policies]]\nuse = "cache"\n')
    proc, base = await start_serving(tmp_path, "serve", "--simulate", "--config", str(path), env=clean_env())
    try:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client", max_retries=0) as client:
            caches = []
            for _ in range(2):
                raw = await client.chat.completions.with_raw_response.create(
                    model="tier-fast", messages=[{"role": "user", "content": "the same question"}])
                caches.append(raw.headers.get("x-groq-proxy-cache"))
            assert caches == ["MISS", "HIT"]
            ids = {m.id async for m in client.models.list()}
        assert set(DEFAULT_TIERS) <= ids
    finally:
        await proc.stop()


async def test_config_command_prints_the_merged_config(tmp_path):
    path = write(tmp_path, '[[policies]]\nuse = "cache"\n[models.tier-mine]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    proc = await run(tmp_path, "config", "config", "--config", str(path),
                     env=clean_env(GROQ_API_KEY="gsk_partial_SECRET_0123456789"))
    assert proc.process.returncode == 0, proc.stderr
    shown = orjson.loads(proc.stdout)
    assert list(shown["models"]) == DEFAULT_TIERS + ["tier-mine"]
    assert list(shown["providers"]) == ["groq", "local"] and shown["policies"]["policies"][0]["name"] == "cache"
    assert shown["providers"]["groq"]["api_key"] == "[masked]" and "SECRET" not in proc.stdout


async def test_config_command_exits_2_naming_the_key(tmp_path):
    path = write(tmp_path, '[models.tier-x]\nchain = ["nowhere:m"]\n')
    proc = await run(tmp_path, "config", "config", "--config", str(path), env=clean_env())
    assert proc.process.returncode == 2
    assert proc.stderr.startswith("groq-proxy: config error: models.tier-x.chain[0]: unknown provider 'nowhere'")


# --- reload ---------------------------------------------------------------------------------------------


async def test_a_reload_to_a_partial_file_and_a_bad_one_after(aiohttp_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_KEY", ADMIN_KEY)
    admin = '[server]\nadmin_key_env = "TEST_ADMIN_KEY"\n'
    path = write(tmp_path, admin + '[providers.groq]\nbase_url = "https://api.groq.com/openai/v1"\n'
                                   '[models.tier-only]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    server = await aiohttp_server(build_app(load_config(path), simulate=True))
    base, state = f"http://127.0.0.1:{server.port}", server.app[STATE]
    assert list(state.config.models) == ["tier-only"]

    async def post(route: str, body=None):
        async with aiohttp.ClientSession() as session:
            async with session.post(base + route, json=body, headers=ADMIN) as resp:
                return resp.status, resp.headers.get("x-groq-proxy-cache"), await resp.json()

    chat = {"model": "tier-fast", "messages": [{"role": "user", "content": "hi"}]}
    path.write_text(admin + '[[policies]]\nuse = "cache"\n')
    status, _, answer = await post("/admin/reload")
    assert status == 200 and answer["generation"] == 2, answer
    assert list(state.config.models) == DEFAULT_TIERS and state.config.simulated
    assert [(await post("/v1/chat/completions", chat))[:2] for _ in range(2)] == [(200, "MISS"), (200, "HIT")]

    path.write_text(admin + '[[policies]]\nuse = "cache"\nttl_s = -1\n')
    status, _, answer = await post("/admin/reload")
    assert status == 400 and answer["error"]["code"] == "config_invalid"
    assert "policies[0].ttl_s" in answer["error"]["message"]
    assert state.generation.number == 2  # the running config stays, its cache too
    assert (await post("/v1/chat/completions", chat))[:2] == (200, "HIT")


# --- a tier that tweaks a built-in one; names the merge left out ---------------------------------------------


def test_a_tier_without_a_chain_changes_the_built_in_tier_of_that_name(tmp_path):
    """`[models.tier-fast]` with only `params` is a change to the built-in tier-fast, not a new tier with no
    chain: it keeps the built-in's chain (and its other keys), its own keys win."""
    config = load(tmp_path, '[models.tier-fast]\nparams = { reasoning_effort = "medium" }\n'
                            '[models.tier-premium]\nlatency_ms = { excellent = 1, good = 2, acceptable = 3, poor = 4 }\n')
    fast, default_fast = config.models["tier-fast"], DEFAULT.models["tier-fast"]
    assert fast.chain == default_fast.chain and dict(fast.params) == {"reasoning_effort": "medium"}
    premium = config.models["tier-premium"]
    assert premium.chain == DEFAULT.models["tier-premium"].chain
    assert premium.params == DEFAULT.models["tier-premium"].params and premium.latency.excellent_ms == 1
    assert list(config.models) == DEFAULT_TIERS


def test_a_tier_without_a_chain_and_no_built_in_of_that_name_still_needs_one(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[models.tier-mine]\nparams = { temperature = 0.1 }\n')
    assert str(info.value).startswith("models.tier-mine.chain: required")


@pytest.mark.parametrize("text, key", [
    ('[routing]\nauto_model = "auto"\n[routing.request_types]\nembed = "tier-embed"\n', "routing.request_types.embed"),
    ('[aliases]\nembed = "tier-embed"\n', "aliases.embed"),
])
def test_an_error_naming_a_built_in_tier_the_merge_left_out_says_why(tmp_path, text, key):
    """A user who names a built-in tier sees it refused as unknown: the message says why it is not there."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[providers.groq]\nbase_url = "https://api.groq.com/openai/v1"\n' + text)
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert message.endswith("(the built-in tier 'tier-embed' is left out: its chain names the provider 'local', "
                            "which [providers] does not give)"), message


def test_an_error_naming_a_built_in_tier_a_whole_routing_does_not_get_says_why(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[providers.groq]\nbase_url = "https://api.groq.com/openai/v1"\n'
                       '[models.tier-mine]\nchain = ["groq:openai/gpt-oss-20b"]\n'
                       '[routing]\nauto_model = "auto"\n[routing.request_types]\ndefault = "tier-fast"\n')
    message = str(info.value)
    assert message.startswith("routing.request_types.default: must name a virtual model (tier-mine)"), message
    assert message.endswith("(the built-in tier 'tier-fast' is not added: a file with both [providers] and "
                            "[models] gives all its tiers)"), message


def test_an_error_about_the_files_own_name_gets_no_note(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[aliases]\nembed = "tier-nope"\n')
    assert str(info.value) == "aliases.embed: must be 'provider:model' (e.g. 'groq:openai/gpt-oss-20b'), got 'tier-nope'"


async def test_config_command_never_shows_a_password_in_a_unix_socket_url(tmp_path):
    """redis-py reads `unix:///path?password=...`; the store read only `db` from the query and ignored the rest,
    so the password was never used, and `groq-proxy config` (and GET /admin/config) printed it."""
    path = write(tmp_path, '[store]\nbackend = "redis"\nurl = "unix:///run/redis.sock?password=SECRETpw0&db=1"\n')
    proc = await run(tmp_path, "config", "config", "--config", str(path), env=clean_env())
    assert "SECRETpw0" not in proc.stdout + proc.stderr
    assert proc.process.returncode == 2
    assert proc.stderr.startswith("groq-proxy: config error: store.url: options in the URL are not read"), proc.stderr


def test_a_provider_without_a_base_url_changes_the_built_in_provider_of_that_name(tmp_path):
    """`[providers.groq] timeout_s = 30` (or a key pool) changes the built-in groq, not a provider with no URL."""
    config = load(tmp_path, '[providers.groq]\ntimeout_s = 30\napi_key_envs = ["KEY_A", "KEY_B"]\n',
                  env={"KEY_A": "a" * 20, "KEY_B": "b" * 20})
    groq, built_in = config.providers["groq"], DEFAULT.providers["groq"]
    assert list(config.providers) == ["groq"]  # the file's [providers] are all the providers, as before
    assert groq.base_url == built_in.base_url and groq.first_byte_timeout_s == built_in.first_byte_timeout_s
    assert groq.timeout_s == 30 and groq.api_key_envs == ("KEY_A", "KEY_B")  # the pool, not the built-in's env too
    config = load(tmp_path, '[providers.groq]\napi_key_env = "MY_GROQ_KEY"\n', env={"MY_GROQ_KEY": "k" * 20})
    assert config.providers["groq"].base_url == built_in.base_url
    assert config.providers["groq"].api_key_env == "MY_GROQ_KEY"


def test_a_provider_with_its_own_base_url_takes_nothing_from_the_built_in(tmp_path):
    """A file's groq at another URL never gets the built-in's GROQ_API_KEY: the key would go to that host."""
    config = load(tmp_path, '[providers.groq]\nbase_url = "http://127.0.0.1:9/v1"\n', env={"GROQ_API_KEY": "g" * 20})
    assert config.providers["groq"].api_key_env is None and not config.providers["groq"].api_keys


async def test_config_command_refuses_what_serve_refuses_with_its_workers(tmp_path):
    """`server.workers = 2` with a policy on the memory store: `serve` exits 2 naming store.backend, so the
    command that shows what `serve` would run says so too rather than printing a config that cannot start."""
    path = write(tmp_path, '[server]\nworkers = 2\n[[policies]]\nuse = "cache"\n')
    proc = await run(tmp_path, "config", "config", "--config", str(path), env=clean_env())
    assert proc.process.returncode == 2, proc.stdout
    assert proc.stderr.startswith("groq-proxy: config error: store.backend: 2 worker processes on the memory store")
    assert proc.stdout == ""


async def test_simulate_with_a_config_file_does_not_say_there_is_no_config(tmp_path):
    """`serve --simulate --config F` warned "No Groq key and no config", which made a user doubt the file was read."""
    path = write(tmp_path, '[[policies]]\nuse = "cache"\n')
    proc, _ = await start_serving(tmp_path, "serve", "--simulate", "--config", str(path),
                                  env=clean_env(GROQ_API_KEY="gsk_" + "k" * 20))
    await proc.stop()
    warnings = [line["message"] for line in proc.log_lines() if line["event"] == "simulated_upstream"]
    assert len(warnings) == 1 and "no config" not in warnings[0].lower(), warnings
    assert "--simulate" in warnings[0]
    models = await run(tmp_path, "models", "models", "--simulate", "--config", str(path), env=clean_env())
    assert models.process.returncode == 0, models.stderr
    assert "no config" not in models.stderr and "--simulate" in models.stderr, models.stderr
