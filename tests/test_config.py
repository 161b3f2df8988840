"""Config validation: every error names the key and says what is wrong; the packaged default is current."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from proxy.app.config import CONFIG_ENV, ConfigError, default_config_text, load_config, parse_config
from proxy.routing.router import Router

SECRET = "gsk_test_SECRET_value_0123456789"
ENV = {"GROQ_KEY": SECRET}

BASE = {
    "server": {"port": 8080},
    "providers": {
        "groq": {"base_url": "http://127.0.0.1:1/openai/v1", "api_key_env": "GROQ_KEY"},
        "local": {"base_url": "http://127.0.0.1:2/v1"},
    },
    "models": {"tier-a": {"chain": ["groq:m1", "local:m2"], "params": {"temperature": 0.2}}},
    "aliases": {"old-model": "groq:m1"},
    "routing": {"cooldown_s": 5},
}

# Current Groq production/preview chat models (wire facts, Nov 2026) and the retired ids.
CURRENT = {"openai/gpt-oss-120b", "openai/gpt-oss-20b", "qwen/qwen3.6-27b", "groq/compound", "groq/compound-mini"}
RETIRED = {
    "llama3-8b-8192": "openai/gpt-oss-20b",
    "llama3-70b-8192": "openai/gpt-oss-120b",
    "mixtral-8x7b-32768": "openai/gpt-oss-120b",
    "gemma-7b-it": "openai/gpt-oss-20b",
    "gemma2-9b-it": "openai/gpt-oss-20b",
    "llama-3.1-8b-instant": "openai/gpt-oss-20b",
    "llama-3.3-70b-versatile": "openai/gpt-oss-120b",
}


def with_change(path: str, value, *, delete: bool = False) -> dict:
    """BASE with one key (dotted path) set or removed."""
    raw = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    if delete:
        del node[last]
    else:
        node[last] = value
    return raw


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=ENV)
    return str(info.value)


def test_the_base_config_parses():
    config = parse_config(BASE, env=ENV)
    assert [t.key for t in config.models["tier-a"].chain] == ["groq:m1", "local:m2"]
    assert config.providers["groq"].api_key == SECRET
    assert config.providers["local"].api_key is None
    assert config.aliases == {"old-model": "groq:m1"}
    assert config.models["tier-a"].params == {"temperature": 0.2}
    assert config.default_provider == "groq"


BAD = [
    # (path, value, key the message starts with, what it says)
    ("colour", "blue", "config.colour", "unknown key"),
    ("server.prot", 8080, "server.prot", "unknown key"),
    ("providers.groq.timeout", 5, "providers.groq.timeout", "unknown key"),
    ("models.tier-a.fallbacks", [], "models.tier-a.fallbacks", "unknown key"),
    ("routing.cooldown", 5, "routing.cooldown", "unknown key"),
    ("server", 5, "server", "must be a table"),
    ("providers", {}, "providers", "at least one provider"),
    ("models", {}, "models", "at least one virtual model"),
    ("models.tier-a", "groq:m1", "models.tier-a", "must be a table"),
    ("models.tier-a.chain", "groq:m1", "models.tier-a.chain", "non-empty list"),
    ("models.tier-a.chain", [], "models.tier-a.chain", "non-empty list"),
    ("models.tier-a.chain", {"groq": "m1"}, "models.tier-a.chain", "non-empty list"),
    ("models.tier-a.chain", ["groq:m1", "m2"], "models.tier-a.chain[1]", "'provider:model'"),
    ("models.tier-a.chain", ["groq:m1", 7], "models.tier-a.chain[1]", "'provider:model'"),
    ("models.tier-a.chain", ["openai:gpt-4o"], "models.tier-a.chain[0]", "unknown provider 'openai'"),
    ("models.tier-a.chain", ["groq:"], "models.tier-a.chain[0]", "empty"),
    ("models.tier-a.params", "fast", "models.tier-a.params", "must be a table"),
    ("models.tier-a.params", {"model": "x"}, "models.tier-a.params.model", "cannot be a default"),
    ("models.tier-a.params", {"messages": []}, "models.tier-a.params.messages", "cannot be a default"),
    ("models.tier-a.params", {"stream": True}, "models.tier-a.params.stream", "cannot be a default"),
    ("models.tier-a.params", {"input": "x"}, "models.tier-a.params.input", "cannot be a default"),
    ("providers.groq", "http://x", "providers.groq", "must be a table"),
    ("providers.groq.api_key", SECRET, "providers.groq.api_key", "never written in the file"),
    ("providers.groq.timeout_s", "60", "providers.groq.timeout_s", "must be a number"),
    ("providers.groq.timeout_s", True, "providers.groq.timeout_s", "must be a number"),
    ("providers.groq.timeout_s", 0, "providers.groq.timeout_s", "at least"),
    ("providers.groq.first_byte_timeout_s", "10", "providers.groq.first_byte_timeout_s", "must be a number"),
    ("providers.groq.connect_timeout_s", [5], "providers.groq.connect_timeout_s", "must be a number"),
    ("providers.groq.base_url", "api.groq.com/openai/v1", "providers.groq.base_url", "http://"),
    ("providers.groq.base_url", "", "providers.groq.base_url", "non-empty string"),
    ("providers.groq.base_url", "http://127.0.0.1:99999/v1", "providers.groq.base_url", "from 0 to 65535"),
    ("providers.groq.base_url", "http://127.0.0.1:port/v1", "providers.groq.base_url", "from 0 to 65535"),
    ("providers.groq.base_url", "https:///openai/v1", "providers.groq.base_url", "has no host"),
    ("telemetry.endpoint", "http://collector:431800", "telemetry.endpoint", "from 0 to 65535"),
    ("providers.groq.api_key_env", 5, "providers.groq.api_key_env", "name of an environment variable"),
    ("server.port", 70000, "server.port", "at most 65535"),
    ("server.port", -1, "server.port", "at least"),
    ("server.port", "8080", "server.port", "must be an integer"),
    ("server.port", 8080.5, "server.port", "must be an integer"),
    ("server.max_body_bytes", 0, "server.max_body_bytes", "at least"),
    ("server.log_level", "loud", "server.log_level", "must be one of"),
    ("server.host", "", "server.host", "non-empty string"),
    ("routing.cooldown_after_failures", 0, "routing.cooldown_after_failures", "at least"),
    ("routing.cooldown_s", "30s", "routing.cooldown_s", "must be a number"),
    ("aliases.old-model", "openai:gpt-4", "aliases.old-model", "unknown provider 'openai'"),
    ("aliases.old-model", "gpt-4", "aliases.old-model", "'provider:model'"),
    ("aliases.old-model", 4, "aliases.old-model", "'provider:model'"),
    ("aliases.tier-a", "groq:m1", "aliases.tier-a", "already a virtual model"),
    ("aliases", ["x"], "aliases", "must be a table"),
]


@pytest.mark.parametrize("path, value, key, says", BAD, ids=[f"{p}={v!r}" for p, v, _, _ in BAD])
def test_errors_name_the_key_and_say_what_is_wrong(path, value, key, says):
    message = config_error(with_change(path, value))
    assert message.startswith(key + ":") or message.startswith(key + " "), message
    assert says in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "path, key",
    [("models.tier-a.chain", "models.tier-a.chain"), ("providers.groq.base_url", "providers.groq.base_url")],
)
def test_required_keys(path, key):
    message = config_error(with_change(path, None, delete=True))
    assert message.startswith(key + ":")


def test_unknown_key_lists_what_is_allowed():
    message = config_error(with_change("providers.groq.api_key_var", "X"))
    assert "api_key_env" in message and "timeout_s" in message


def test_first_byte_timeout_may_not_exceed_the_total():
    message = config_error(with_change("providers.groq", {"base_url": "http://h/v1", "timeout_s": 5,
                                                          "first_byte_timeout_s": 6}))
    assert message.startswith("providers.groq.first_byte_timeout_s:")
    assert "timeout_s" in message and "6" in message and "5" in message


def test_first_byte_timeout_defaults_within_a_short_total():
    config = parse_config(with_change("providers.local.timeout_s", 3), env=ENV)
    assert config.providers["local"].first_byte_timeout_s == 3.0
    assert config.providers["local"].timeout_s == 3.0


def test_an_alias_may_point_at_a_virtual_model():
    config = parse_config(with_change("aliases.fast", "tier-a"), env=ENV)
    route = Router(config).resolve("fast")
    assert route.virtual == "tier-a"
    assert [t.key for t in route.chain] == ["groq:m1", "local:m2"]
    assert route.params == {"temperature": 0.2}


def test_an_empty_key_variable_means_no_key():
    config = parse_config(BASE, env={"GROQ_KEY": ""})
    assert config.providers["groq"].api_key is None


def test_the_api_key_never_shows_in_repr_or_str():
    config = parse_config(BASE, env=ENV)
    assert config.providers["groq"].api_key == SECRET
    for text in (repr(config), str(config), repr(config.providers), repr(config.providers["groq"]),
                 f"{config}", repr(config.with_base_urls("http://127.0.0.1:9/v1"))):
        assert SECRET not in text
    assert "api_key_env='GROQ_KEY'" in repr(config.providers["groq"])


def test_config_is_frozen():
    config = parse_config(BASE, env=ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1
    with pytest.raises(TypeError):
        config.providers["other"] = config.providers["groq"]
    with pytest.raises(TypeError):
        config.models["tier-a"].params["temperature"] = 1.0
    with pytest.raises(TypeError):
        config.aliases["x"] = "groq:m1"


def test_the_key_written_in_the_file_is_not_echoed(tmp_path):
    path = tmp_path / "leak.toml"
    path.write_text(f'[providers.groq]\nbase_url = "http://h/v1"\napi_key = "{SECRET}"\n'
                    '[models.t]\nchain = ["groq:m"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith("providers.groq.api_key:")
    assert SECRET not in str(info.value)


# --- files and the environment ----------------------------------------------------------------------------

TOML = """
[providers.up]
base_url = "http://127.0.0.1:1/v1"
api_key_env = "UP_KEY"

[models.from-file]
chain = ["up:model-x"]
"""


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    config = load_config(path, env={"UP_KEY": SECRET})
    assert config.source == str(path)
    assert list(config.models) == ["from-file"]
    assert config.providers["up"].api_key == SECRET


def test_groq_proxy_config_env_is_honoured(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text(TOML)
    config = load_config(env={CONFIG_ENV: str(path)})
    assert config.source == str(path)
    assert list(config.models) == ["from-file"]


def test_groq_proxy_config_from_the_process_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.toml"
    path.write_text(TOML)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert list(load_config().models) == ["from-file"]


def test_an_explicit_path_beats_the_environment(tmp_path):
    env_path, arg_path = tmp_path / "env.toml", tmp_path / "arg.toml"
    env_path.write_text(TOML)
    arg_path.write_text(TOML.replace("from-file", "from-arg"))
    config = load_config(arg_path, env={CONFIG_ENV: str(env_path)})
    assert list(config.models) == ["from-arg"]


def test_a_missing_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(env={CONFIG_ENV: str(missing)})
    assert str(info.value).startswith("config:")
    assert str(missing) in str(info.value)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[providers.up\nbase_url = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "not valid TOML" in str(info.value)
    assert str(path) in str(info.value)


def test_a_file_error_names_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TOML + '\n[aliases]\n"old" = "nowhere:m"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith("aliases.old:")
    assert "unknown provider 'nowhere'" in str(info.value)


# --- the packaged default ---------------------------------------------------------------------------------


@pytest.fixture
def default():
    return load_config(env={"GROQ_API_KEY": SECRET})


def test_the_default_is_used_without_a_path_or_env(default):
    assert default.source == "<default>"
    assert default_config_text().strip().startswith("#")
    groq = default.providers["groq"]
    assert groq.base_url == "https://api.groq.com/openai/v1"
    assert groq.api_key_env == "GROQ_API_KEY"
    assert groq.api_key == SECRET
    assert default.default_provider == "groq"
    assert groq.first_byte_timeout_s <= groq.timeout_s


def test_the_default_tiers_use_current_groq_models(default):
    for tier in ("tier-fast", "tier-standard", "tier-premium"):
        chain = default.models[tier].chain
        assert len(chain) >= 2, f"{tier} should have a fallback"
        for target in chain:
            assert target.provider == "groq"
            assert target.model in CURRENT, f"{tier}: {target.model} is not a current Groq model"
            assert target.model not in RETIRED
        assert len({t.key for t in chain}) == len(chain), f"{tier} names a model twice"
    assert default.models["tier-fast"].chain[0].model == "openai/gpt-oss-20b"
    assert default.models["tier-premium"].chain[0].model == "openai/gpt-oss-120b"
    for tier in ("tier-fast", "tier-premium"):
        assert default.models[tier].params.get("reasoning_effort") in {"low", "medium", "high"}


def test_the_default_aliases_every_retired_id_to_its_replacement(default):
    router = Router(default)
    for retired, replacement in RETIRED.items():
        assert default.aliases[retired] == f"groq:{replacement}", retired
        route = router.resolve(retired)
        assert [t.key for t in route.chain] == [f"groq:{replacement}"]
        assert route.requested == retired


def test_no_retired_id_is_used_anywhere_as_a_target(default):
    targets = {t.model for t in default.real_targets()}
    targets |= {to.split(":", 1)[1] for to in default.aliases.values() if ":" in to}
    assert not targets & set(RETIRED)


def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it():
    pasted = "gsk-live key with spaces 0123456789"
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": {"g": {"base_url": "http://x", "api_key_env": pasted}},
                      "models": {"m": {"chain": ["g:x"]}}}, env={})
    assert "providers.g.api_key_env" in str(info.value)
    assert pasted not in str(info.value)


@pytest.mark.parametrize("url", ["https://user:hunter2@api.groq.com/openai/v1", "https://:hunter2@x/v1"])
def test_credentials_in_a_base_url_are_refused_without_echoing_them(url):
    message = config_error(with_change("providers.groq.base_url", url))
    assert message.startswith("providers.groq.base_url: must not hold credentials")
    assert "hunter2" not in message


@pytest.mark.parametrize("value", [SECRET + "\n", " " + SECRET, SECRET[:8] + "\t" + SECRET[8:], SECRET + "\x00"])
def test_a_key_with_whitespace_or_control_characters_is_refused_without_echoing_it(value):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE, env={"GROQ_KEY": value})
    message = str(info.value)
    assert message.startswith("providers.groq.api_key_env: the value of $GROQ_KEY holds whitespace"), message
    assert SECRET[:8] not in message and SECRET[8:] not in message


def test_server_table_is_checked_before_providers():
    with pytest.raises(ConfigError, match=r"^server\.bogus"):
        parse_config({"server": {"bogus": 1}}, env={})


# --- the edges of each rule (each test fails if the line that makes the rule is changed) -------------------


@pytest.mark.parametrize("pasted", ["gsk_abc123", "sk_live_abc", "gsk_" + "x" * 30])
def test_a_key_shaped_like_a_variable_name_pasted_into_api_key_env_is_refused(pasted):
    """`gsk_abc123` is a valid variable name: only the key-prefix rule stops it."""
    message = config_error(with_change("providers.groq.api_key_env", pasted))
    assert message.startswith("providers.groq.api_key_env: must be the name of an environment variable")
    assert pasted not in message


def test_a_variable_name_over_40_characters_is_taken_for_a_key():
    assert parse_config(with_change("providers.groq.api_key_env", "A" * 40), env=ENV).providers["groq"].api_key_env
    message = config_error(with_change("providers.groq.api_key_env", "A" * 41))
    assert message.startswith("providers.groq.api_key_env: must be the name") and "A" * 41 not in message


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_every_port_up_to_65535_is_accepted(port):
    assert parse_config(with_change("server.port", port), env=ENV).server.port == port


def test_port_65536_is_refused():
    assert config_error(with_change("server.port", 65536)) == "server.port: must be at most 65535, got 65536"


@pytest.mark.parametrize("values", [(50, 40, 150, 300), (50, 100, 150, 149), (300, 50, 100, 150)])
def test_latency_thresholds_that_fall_are_refused(values):
    table = dict(zip(("excellent", "good", "acceptable", "poor"), values))
    message = config_error(with_change("models.tier-a.latency_ms", table))
    assert message.startswith("models.tier-a.latency_ms: thresholds must rise")


def test_latency_thresholds_that_rise_or_stay_are_accepted():
    table = {"excellent": 100, "good": 100, "acceptable": 150, "poor": 150}
    latency = parse_config(with_change("models.tier-a.latency_ms", table), env=ENV).models["tier-a"].latency
    assert (latency.excellent_ms, latency.good_ms, latency.acceptable_ms, latency.poor_ms) == (100, 100, 150, 150)


# --- consistency between keys, and names that cannot work ---------------------------------------------------


def test_max_cooldown_below_cooldown_is_refused():
    message = config_error(with_change("routing", {"cooldown_s": 60, "max_cooldown_s": 59.5}))
    assert message == "routing.max_cooldown_s: must be at least cooldown_s (59.5 < 60)"


def test_max_cooldown_equal_to_cooldown_and_a_long_cooldown_alone_are_accepted():
    routing = parse_config(with_change("routing", {"cooldown_s": 60, "max_cooldown_s": 60}), env=ENV).routing
    assert (routing.cooldown_s, routing.max_cooldown_s) == (60, 60)
    routing = parse_config(with_change("routing", {"cooldown_s": 600}), env=ENV).routing
    assert (routing.cooldown_s, routing.max_cooldown_s) == (600, 600)  # the 300 s default cap rises to it


def test_connect_timeout_above_the_total_is_refused():
    message = config_error(with_change("providers.groq", {"base_url": "http://h/v1", "timeout_s": 3,
                                                          "connect_timeout_s": 4}))
    assert message == "providers.groq.connect_timeout_s: must not exceed timeout_s (4 > 3)"


def test_connect_timeout_defaults_within_a_short_total():
    provider = parse_config(with_change("providers.local.timeout_s", 2), env=ENV).providers["local"]
    assert (provider.connect_timeout_s, provider.timeout_s) == (2.0, 2.0)
    provider = parse_config(with_change("providers.local.connect_timeout_s", 60), env=ENV).providers["local"]
    assert provider.connect_timeout_s == 60.0  # equal to the default total: allowed


@pytest.mark.parametrize("url", ["http://my host/v1", "http://api.groq.com /v1", "https:// api.groq.com",
                                 "http://host\t/v1", "http://host/v1\n", "http://host/o\x00/v1"])
def test_a_base_url_with_a_space_in_the_host_or_a_control_character_is_refused(url):
    message = config_error(with_change("providers.groq.base_url", url))
    assert message.startswith("providers.groq.base_url: must not hold control characters, nor spaces in the host")


def test_a_space_in_the_path_is_allowed_and_sent_percent_encoded():
    config = parse_config(with_change("providers.groq.base_url", "http://h/my models/v1"), env=ENV)
    assert config.providers["groq"].base_url == "http://h/my models/v1"  # tests/test_upstream_wire.py: %20


@pytest.mark.parametrize("name", ["a:b", "groq:", ":x", " "])
def test_a_provider_name_that_cannot_appear_in_provider_model_is_refused(name):
    raw = copy.deepcopy(BASE)
    raw["providers"][name] = {"base_url": "http://h/v1"}
    message = config_error(raw)
    assert message.startswith(f"providers.{name}: a provider name must be non-empty and hold no ':'")


def test_the_server_limits_default_and_are_checked():
    server = parse_config(BASE, env=ENV).server
    assert (server.request_read_timeout_s, server.max_url_bytes, server.max_header_bytes, server.max_headers) == (
        75.0, 4096, 8190, 100)
    for key, value, says in [("request_read_timeout_s", 0, "at least 0.01"), ("request_read_timeout_s", "30", "number"),
                             ("max_url_bytes", 100, "at least 256"), ("max_header_bytes", 8190.5, "integer"),
                             ("max_headers", 8, "at least 16")]:
        assert config_error(with_change(f"server.{key}", value)).startswith(f"server.{key}: must"), key
        assert says in config_error(with_change(f"server.{key}", value))


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"config: {path} is not UTF-8 text (byte 20 is 0xe9); TOML files are UTF-8"


def test_workers_and_drain_default_and_are_checked():
    server = parse_config(BASE, env=ENV).server
    assert (server.workers, server.drain_s, server.drain_timeout_s) == (1, 5.0, 30.0)
    for key, value, says in [("workers", 0, "at least 1"), ("workers", 2.5, "an integer"), ("workers", True, "an integer"),
                             ("workers", 65, "at most 64"), ("drain_s", -1, "at least 0"), ("drain_s", "5", "a number"),
                             ("drain_timeout_s", float("nan"), "at least 0"),
                             ("drain_timeout_s", float("inf"), "finite"), ("drain_s", float("inf"), "finite")]:
        message = config_error(with_change(f"server.{key}", value))
        assert message.startswith(f"server.{key}: must") and says in message, (key, value, message)
    raw = with_change("server.drain_s", 10)
    raw["server"]["drain_timeout_s"] = 5
    assert config_error(raw) == "server.drain_timeout_s: must be at least server.drain_s (10), got 5"
    raw["server"]["drain_timeout_s"] = 10
    assert parse_config(raw, env=ENV).server.drain_timeout_s == 10.0
