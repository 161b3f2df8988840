"""Configuration: one TOML file parsed once at start-up into frozen objects.

Every check names the key it is about (`models.tier-fast.chain[1]: ...`) so a typo is caught before the
first request instead of silently disabling a fallback. Unknown keys are errors for the same reason.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from proxy.routing.latency import Thresholds, default_thresholds

CONFIG_ENV = "GROQ_PROXY_CONFIG"
MAX_FILE_BYTES = 200 * 1024 * 1024  # Groq's limit on a batch input file (200 MB)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key it is about."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    max_audio_bytes: int = 25 * 1024 * 1024  # an audio upload held for fall-over (Groq's free-tier file limit)
    max_file_bytes: int = MAX_FILE_BYTES  # the largest upload to /v1/files (Groq's own limit by default)
    keepalive_s: float = 15.0
    log_level: str = "info"
    request_read_timeout_s: float = 75.0
    max_url_bytes: int = 4096
    max_header_bytes: int = 8190
    max_headers: int = 100
    admin_key_env: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    admin_port: int | None = None  # the admin API only on this port (0: any free one), not on `port`
    workers: int = 1  # processes on one port (proxy/app/workers.py)
    drain_s: float = 5.0  # on SIGTERM: /readyz says 503 this long before the listener closes (proxy/app/drain.py)
    drain_timeout_s: float = 30.0  # from SIGTERM: what is still in flight then is ended with an error


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str
    api_key_env: str | None = None
    api_key_envs: tuple[str, ...] = ()  # the key pool: every variable, api_key_env's alone when that is set
    timeout_s: float = 60.0
    first_byte_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    # A body passed on as it arrives that is not an event stream (a file's content) must be whole this long after
    # its request went out: an upstream that drips a byte now and then cannot hold the request for ever.
    body_timeout_s: float = 600.0
    pool_idle_s: float = 15.0  # a kept-alive connection idle longer is not reused (below load balancers' 60 s)
    # Read from the environment at load time; never printed (repr=False) and never written to the file.
    api_key: str | None = field(default=None, repr=False)
    api_keys: tuple[str | None, ...] = field(default=(), repr=False)  # one per api_key_envs entry, same order


_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Target:
    """One real model at one provider: a link of a chain. `params` are the chain entry's own request defaults;
    they are not part of the model's identity (cool-downs, latency and labels are per model)."""

    provider: str
    model: str
    params: Mapping[str, Any] = field(default_factory=lambda: _NO_PARAMS, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"{self.provider}:{self.model}"


@dataclass(frozen=True)
class VirtualModel:
    name: str
    chain: tuple[Target, ...]
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    latency: Thresholds = field(default_factory=lambda: default_thresholds("standard"))
    max_latency_ms: float | None = None  # the tier's default latency target and deadline
    hedge: bool = False
    hedge_after_ms: float | str | None = None  # milliseconds, or "auto": the model's observed p90 time to first token
    max_hedges: int = 1

    @property
    def entry_params(self) -> bool:
        return any(t.params for t in self.chain)


@dataclass(frozen=True)
class RoutingConfig:
    cooldown_after_failures: int = 3
    cooldown_s: float = 30.0
    max_cooldown_s: float = 300.0
    key_rest_s: float = 60.0  # a pool key that answered 401/403, or 429 without retry-after, rests this long
    auto_model: str | None = None
    request_types: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    batch_provider: str | None = None  # where /v1/files and /v1/batches go; None: the first provider


@dataclass(frozen=True)
class TelemetryConfig:
    tracing: bool = False
    traces_url: str = "http://127.0.0.1:4318/v1/traces"
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    service_name: str = "groq-proxy"
    sample_ratio: float = 1.0
    record_content: bool = False
    metrics: bool = True
    export_interval_s: float = 0.1
    parent_based: bool = True  # follow the caller's sampled flag (OTEL_TRACES_SAMPLER=parentbased_*)
    exporter: str = "otlp"  # "otlp": the built-in OTLP/HTTP exporter; "sdk": the OpenTelemetry SDK's exporters
    sdk_exporters: tuple[str, ...] = ()  # with "sdk": the trace exporter entry points OTEL_TRACES_EXPORTER selects


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    providers: Mapping[str, ProviderConfig]
    models: Mapping[str, VirtualModel]
    aliases: Mapping[str, str]
    routing: RoutingConfig
    telemetry: TelemetryConfig = TelemetryConfig()
    source: str = "<default>"
    simulated: bool = False
    policies: Any = None  # policies.config.PoliciesConfig: [auth], [store], [[policies]]

    @property
    def default_provider(self) -> str:
        return next(iter(self.providers))

    def real_targets(self) -> list[Target]:
        """Every real model the chains name, in config order, once each."""
        seen: dict[str, Target] = {}
        for vm in self.models.values():
            for target in vm.chain:
                if target.key not in seen:  # a model named directly gets no chain entry's params
                    seen[target.key] = Target(target.provider, target.model)
        return list(seen.values())

    def with_base_urls(self, base_url: str) -> "Config":
        """The same config with every provider pointed at one URL (the embedded simulator)."""
        providers = {n: replace(p, base_url=base_url) for n, p in self.providers.items()}
        return replace(self, providers=MappingProxyType(providers), simulated=True)


# --- parsing -------------------------------------------------------------------------------------------------

_KNOWN_TOP = {"server", "providers", "models", "aliases", "routing", "telemetry", "auth", "store", "policies"}


def _table(raw: Mapping, key: str, where: str) -> Mapping:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a table, got {type(value).__name__}")
    return value


def _check_keys(raw: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _number(raw: Mapping, key: str, where: str, default: float, *, minimum: float = 0.0, integer: bool = False):
    value = raw.get(key, default)
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}.{key}: must be {kind}, got {value!r}")
    if not value >= minimum:  # `not >=`: NaN compares false to everything, and would pass `value < minimum`
        raise ConfigError(f"{where}.{key}: must be at least {minimum}, got {value!r}")
    return value


def _string(raw: Mapping, key: str, where: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def _env_name(raw: Mapping, key: str, where: str) -> str | None:
    """The name of an environment variable. The value is never echoed: a pasted key must not reach a log."""
    value = raw.get(key)
    if value is None:
        return None
    looks_like_a_key = isinstance(value, str) and (value.startswith(("gsk_", "sk_")) or len(value) > 40)
    if not isinstance(value, str) or not _ENV_NAME.match(value) or looks_like_a_key:
        raise ConfigError(f"{where}.{key}: must be the name of an environment variable (like GROQ_API_KEY), "
                          "not the key itself")
    return value


_SERVER_KEYS = {"host", "port", "max_body_bytes", "max_audio_bytes", "max_file_bytes", "keepalive_s", "log_level",
                "admin_key_env", "request_read_timeout_s", "max_url_bytes", "max_header_bytes", "max_headers",
                "admin_port", "workers", "drain_s", "drain_timeout_s"}
MAX_WORKERS = 64


def _parse_server(raw: Mapping, env: Mapping[str, str]) -> ServerConfig:
    where = "server"
    _check_keys(raw, _SERVER_KEYS, where)
    admin_env = _env_name(raw, "admin_key_env", where)
    if admin_env and not env.get(admin_env):
        raise ConfigError(f"server.admin_key_env: the variable {admin_env} is not set")
    port = _number(raw, "port", where, 8080, integer=True)
    if port > 65535:
        raise ConfigError(f"server.port: must be at most 65535, got {port}")
    admin_port = raw.get("admin_port")
    if admin_port is not None:
        admin_port = _number(raw, "admin_port", where, 0, integer=True)
        if admin_port > 65535:
            raise ConfigError(f"server.admin_port: must be at most 65535, got {admin_port}")
        if admin_env is None:
            raise ConfigError("server.admin_port: the admin API is off without an admin key; set "
                              "server.admin_key_env too")
        if admin_port == port and port != 0:
            raise ConfigError(f"server.admin_port: must differ from server.port ({port}): the admin API is served "
                              "only on its own port")
    level = _string(raw, "log_level", where, "info").lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"server.log_level: must be one of debug, info, warning, error, got {level!r}")
    workers = _number(raw, "workers", where, 1, minimum=1, integer=True)
    if workers > MAX_WORKERS:
        raise ConfigError(f"server.workers: must be at most {MAX_WORKERS}, got {workers}")
    drain_s = float(_number(raw, "drain_s", where, 5.0))
    drain_timeout_s = float(_number(raw, "drain_timeout_s", where, 30.0))
    for key, value in (("drain_s", drain_s), ("drain_timeout_s", drain_timeout_s)):
        if value == float("inf"):  # a process that never exits is what a kill -9 is then needed for
            raise ConfigError(f"server.{key}: must be a finite number of seconds, got inf")
    if drain_timeout_s < drain_s:  # both count from SIGTERM: the listener closes before the last requests are cut
        raise ConfigError(f"server.drain_timeout_s: must be at least server.drain_s ({drain_s:g}), "
                          f"got {drain_timeout_s:g}")
    return ServerConfig(
        host=_string(raw, "host", where, "127.0.0.1"),
        port=port,
        max_body_bytes=_number(raw, "max_body_bytes", where, 10 * 1024 * 1024, minimum=1, integer=True),
        max_audio_bytes=_number(raw, "max_audio_bytes", where, 25 * 1024 * 1024, minimum=1, integer=True),
        max_file_bytes=_number(raw, "max_file_bytes", where, MAX_FILE_BYTES, minimum=1, integer=True),
        keepalive_s=_number(raw, "keepalive_s", where, 15.0),
        log_level=level,
        admin_key_env=admin_env,
        admin_key=env.get(admin_env) if admin_env else None,
        admin_port=admin_port,
        request_read_timeout_s=float(_number(raw, "request_read_timeout_s", where, 75.0, minimum=0.01)),
        # Below these a real client's request would not fit (a long model id in the URL, a large cookie).
        max_url_bytes=_number(raw, "max_url_bytes", where, 4096, minimum=256, integer=True),
        max_header_bytes=_number(raw, "max_header_bytes", where, 8190, minimum=1024, integer=True),
        max_headers=_number(raw, "max_headers", where, 100, minimum=16, integer=True),
        workers=workers,
        drain_s=drain_s,
        drain_timeout_s=drain_timeout_s,
    )


def _parse_provider(name: str, raw: Mapping, env: Mapping[str, str]) -> ProviderConfig:
    where = f"providers.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table")
    if ":" in name or not name.strip():
        raise ConfigError(f"{where}: a provider name must be non-empty and hold no ':' (it separates provider "
                          "and model in 'provider:model')")
    if "api_key" in raw:
        raise ConfigError(f"{where}.api_key: keys are never written in the file; name the variable in api_key_env")
    _check_keys(raw, {"base_url", "api_key_env", "api_key_envs", "timeout_s", "first_byte_timeout_s",
                      "connect_timeout_s", "body_timeout_s", "pool_idle_s"}, where)
    base_url = _string(raw, "base_url", where, None)
    if base_url is None:
        raise ConfigError(f"{where}.base_url: required")
    _check_url(base_url, f"{where}.base_url")
    key_env = _env_name(raw, "api_key_env", where)
    key_envs = _env_names(raw, "api_key_envs", where)
    if key_env and key_envs:
        raise ConfigError(f"{where}.api_key_envs: set api_key_env (one key) or api_key_envs (a pool), not both")
    field_name = "api_key_envs" if key_envs else "api_key_env"
    key_envs = key_envs or ((key_env,) if key_env else ())
    keys = tuple(_api_key(env, name, where, field_name) for name in key_envs)
    timeout = _number(raw, "timeout_s", where, 60.0, minimum=0.001)
    first_byte = _number(raw, "first_byte_timeout_s", where, min(10.0, timeout), minimum=0.001)
    if first_byte > timeout:
        raise ConfigError(f"{where}.first_byte_timeout_s: must not exceed timeout_s ({first_byte} > {timeout})")
    connect = _number(raw, "connect_timeout_s", where, min(5.0, timeout), minimum=0.001)
    if connect > timeout:
        raise ConfigError(f"{where}.connect_timeout_s: must not exceed timeout_s ({connect} > {timeout})")
    body = _number(raw, "body_timeout_s", where, max(600.0, timeout), minimum=0.001)
    if body < timeout:
        raise ConfigError(f"{where}.body_timeout_s: must be at least timeout_s ({body} < {timeout})")
    return ProviderConfig(
        name=name,
        base_url=base_url.rstrip("/"),
        api_key_env=key_env,
        api_key_envs=key_envs,
        timeout_s=float(timeout),
        first_byte_timeout_s=float(first_byte),
        connect_timeout_s=float(connect),
        body_timeout_s=float(body),
        pool_idle_s=float(_number(raw, "pool_idle_s", where, 15.0)),
        api_key=keys[0] if keys else None,
        api_keys=keys,
    )


def _env_names(raw: Mapping, key: str, where: str) -> tuple[str, ...]:
    """A list of environment variable names (a key pool); each checked as `_env_name` checks one."""
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}.{key}: must be a non-empty list of environment variable names")
    names = tuple(_env_name({f"{key}[{i}]": v}, f"{key}[{i}]", where) or "" for i, v in enumerate(value))
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{where}.{key}[{i}]: {name} is listed twice")
    return names


def _api_key(env: Mapping[str, str], key_env: str | None, where: str, field_name: str = "api_key_env") -> str | None:
    """The key from the environment. One with whitespace or control characters (a pasted newline, say) would
    break the Authorization header of every request, so it is refused here, without showing it."""
    key = (env.get(key_env) or None) if key_env else None
    if key is not None and any(c.isspace() or not c.isprintable() for c in key):
        raise ConfigError(f"{where}.{field_name}: the value of ${key_env} holds whitespace or control characters "
                          "(a trailing newline?)")
    return key


def _check_url(url: str, where: str) -> None:
    """An http(s) URL with a host and a valid port, and no credentials in it (they are never shown back)."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: must start with http:// or https://, got {url!r}")
    host = re.split(r"[/?#]", url.split("://", 1)[1], maxsplit=1)[0]
    if any(not c.isprintable() for c in url) or any(c.isspace() for c in host):
        # urlsplit would drop a tab or newline without a word, and no host has a space.
        raise ConfigError(f"{where}: must not hold control characters, nor spaces in the host, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket: `http://[::1/v1`
        raise ConfigError(f"{where}: {exc}, got {url!r}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: must not hold credentials (user:password@); a provider's key is read from "
                          "the variable named by api_key_env, a collector's from OTEL_EXPORTER_OTLP_HEADERS")
    if not parts.hostname:
        raise ConfigError(f"{where}: has no host, got {url!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}: the port must be a number from 0 to 65535, got {url!r}") from None


def parse_target(text: str, providers: Mapping[str, Any], where: str) -> Target:
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{where}: must be 'provider:model' (e.g. 'groq:openai/gpt-oss-20b'), got {text!r}")
    provider, model = text.split(":", 1)
    if provider not in providers:
        raise ConfigError(f"{where}: unknown provider {provider!r} (providers: {', '.join(providers)})")
    if not model:
        raise ConfigError(f"{where}: the model after '{provider}:' is empty")
    if not model.isprintable():  # it becomes the x-groq-proxy-model header, which cannot hold a line break
        raise ConfigError(f"{where}: the model must not hold control characters, got {text!r}")
    return Target(provider, model)


def _params(raw, where: str) -> Mapping[str, Any]:
    """Request defaults: a table of request fields, none of those the request itself must set."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table of request fields")
    for reserved in ("model", "messages", "stream", "input"):
        if reserved in raw:
            raise ConfigError(f"{where}.{reserved}: the request sets this field; it cannot be a default")
    return MappingProxyType(dict(raw)) if raw else _NO_PARAMS


def _chain_entry(entry, providers: Mapping, where: str) -> Target:
    """A chain entry: 'provider:model', or { model = "provider:model", params = {...} }."""
    if isinstance(entry, Mapping):
        _check_keys(entry, {"model", "params"}, where)
        if "model" not in entry:
            raise ConfigError(f"{where}.model: required ('provider:model')")
        target = parse_target(entry["model"], providers, f"{where}.model")
        return replace(target, params=_params(entry.get("params", {}), f"{where}.params"))
    return parse_target(entry, providers, where)


def _parse_model(name: str, raw: Mapping, providers: Mapping) -> VirtualModel:
    where = f"models.{name}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(raw, {"chain", "params", "latency_ms", "max_latency_ms", "hedge", "hedge_after_ms", "max_hedges"},
                where)
    chain = raw.get("chain")
    if not isinstance(chain, list) or not chain:
        raise ConfigError(f"{where}.chain: required, a non-empty list of 'provider:model' or "
                          "{ model = \"provider:model\", params = {...} }")
    targets = tuple(_chain_entry(t, providers, f"{where}.chain[{i}]") for i, t in enumerate(chain))
    params = _params(raw.get("params", {}), f"{where}.params")
    latency = _parse_latency(raw.get("latency_ms"), f"{where}.latency_ms", default_thresholds(name))
    max_latency = raw.get("max_latency_ms")
    if max_latency is not None:
        max_latency = float(_number(raw, "max_latency_ms", where, 0, minimum=1))
    hedge = raw.get("hedge", False)
    if not isinstance(hedge, bool):
        raise ConfigError(f"{where}.hedge: must be true or false, got {hedge!r}")
    hedge_after = raw.get("hedge_after_ms")
    if hedge_after is not None and hedge_after != "auto":
        hedge_after = float(_number(raw, "hedge_after_ms", where, 0, minimum=0))
    return VirtualModel(
        name, targets, params, latency, max_latency_ms=max_latency, hedge=hedge, hedge_after_ms=hedge_after,
        max_hedges=_number(raw, "max_hedges", where, 1, minimum=1, integer=True),
    )


def _parse_latency(raw, where: str, default: Thresholds) -> Thresholds:
    if raw is None:
        return default
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table like {{ excellent = 50, good = 100, acceptable = 150, poor = 300 }}")
    names = ("excellent", "good", "acceptable", "poor")
    _check_keys(raw, set(names), where)
    values = [_number(raw, n, where, getattr(default, f"{n}_ms"), minimum=0) for n in names]
    if values != sorted(values):
        raise ConfigError(f"{where}: thresholds must rise: excellent <= good <= acceptable <= poor, got {values}")
    return Thresholds(*map(float, values))


_SAMPLERS = {"always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
             "parentbased_traceidratio"}


def _parse_telemetry(raw: Mapping, env: Mapping[str, str]) -> TelemetryConfig:
    """The [telemetry] table; where a key is not set, the standard OTEL_* variables apply."""
    where = "telemetry"
    _check_keys(raw, {"enabled", "endpoint", "service_name", "sample_ratio", "record_content", "metrics",
                      "export_interval_s", "exporter"}, where)
    for key in ("enabled", "record_content", "metrics"):
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"{where}.{key}: must be true or false, got {raw[key]!r}")
    exporter = raw.get("exporter", "otlp")
    if exporter not in ("otlp", "sdk"):
        raise ConfigError(f'{where}.exporter: must be "otlp" (the built-in OTLP/HTTP exporter) or "sdk" '
                          f"(the OpenTelemetry SDK's exporters), got {exporter!r}")
    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
        else "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = env.get(variable)
    sdk_exporters: tuple[str, ...] = ()
    if exporter == "sdk":
        if "endpoint" in raw:
            raise ConfigError(f'{where}.endpoint: not used with exporter = "sdk": the SDK\'s exporters read '
                              "OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)")
        from proxy.telemetry.sdk import exporter_names  # the SDK is imported only by those who chose it

        try:
            sdk_exporters = exporter_names(env)
        except ValueError as exc:
            raise ConfigError(f"telemetry: {exc}") from None
    elif protocol and protocol != "http/protobuf":
        raise ConfigError(f"telemetry: {variable}={protocol} is not supported by the built-in "
                          'exporter; use http/protobuf (OTLP/HTTP, port 4318), or set [telemetry] exporter = "sdk" '
                          "for the OpenTelemetry SDK's exporters (grpc included)")
    endpoint = _string(raw, "endpoint", where, None)
    if endpoint is not None:
        url = endpoint.rstrip("/") if endpoint.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        url = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    else:
        url = None
    if url is not None and exporter == "otlp":  # with "sdk" the endpoint is the SDK exporter's to read
        _check_url(url, f"{where}.endpoint")
    sampler = (env.get("OTEL_TRACES_SAMPLER") or "").lower()
    if sampler and sampler not in _SAMPLERS:
        raise ConfigError(f"telemetry: OTEL_TRACES_SAMPLER={sampler} is not one of {', '.join(sorted(_SAMPLERS))}")
    if "sample_ratio" in raw:
        ratio = _number(raw, "sample_ratio", where, 1.0)
    elif sampler.endswith("always_off"):
        ratio = 0.0
    elif sampler.endswith("traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            raise ConfigError("telemetry: OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1") from None
    else:
        ratio = 1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"{where}.sample_ratio: must be between 0 and 1, got {ratio}")
    enabled = raw.get("enabled")
    if enabled is None:
        if exporter == "sdk":  # OTEL_TRACES_EXPORTER=console (say) turns tracing on as an endpoint does; none, off
            chosen = bool(sdk_exporters) and (url is not None or bool(env.get("OTEL_TRACES_EXPORTER")))
        else:
            chosen = url is not None
        enabled = chosen and env.get("OTEL_SDK_DISABLED", "").lower() != "true"
    headers = {}
    variable = "OTEL_EXPORTER_OTLP_TRACES_HEADERS" if env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") \
        else "OTEL_EXPORTER_OTLP_HEADERS"
    for item in (env.get(variable) or "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            k, v = k.strip(), unquote(v.strip())  # percent-encoded, as the W3C baggage format the SDKs read
            if any(ord(c) < 0x20 or c == "\x7f" for c in k + v):  # would split the export's request; never echoed
                raise ConfigError(f"telemetry: {variable}: the header {k[:40]!r} holds a control character")
            headers[k] = v
    return TelemetryConfig(
        tracing=bool(enabled),
        traces_url=url or "http://127.0.0.1:4318/v1/traces",
        headers=MappingProxyType(headers),
        service_name=_string(raw, "service_name", where, None) or env.get("OTEL_SERVICE_NAME") or "groq-proxy",
        sample_ratio=float(ratio),
        record_content=bool(raw.get("record_content", False)),
        metrics=bool(raw.get("metrics", True)),
        # Small, frequent batches: measured under load, a 1 s batch cost the proxy twice the throughput of 0.1 s.
        export_interval_s=float(_number(raw, "export_interval_s", where, 0.1, minimum=0.01)),
        parent_based=not sampler or sampler.startswith("parentbased_") or "sample_ratio" in raw,
        exporter=exporter,
        sdk_exporters=sdk_exporters,
    )


TIER_PREFIX = "tier-"


def _parse_routing(raw: Mapping, models: Mapping[str, VirtualModel],
                   providers: Mapping[str, ProviderConfig]) -> RoutingConfig:
    where = "routing"
    _check_keys(raw, {"cooldown_after_failures", "cooldown_s", "max_cooldown_s", "key_rest_s", "auto_model",
                      "request_types", "batch_provider"}, where)
    batch_provider = _string(raw, "batch_provider", where, None)
    if batch_provider is not None and batch_provider not in providers:
        raise ConfigError(f"{where}.batch_provider: must name a provider ({', '.join(providers)}), "
                          f"got {batch_provider!r}")
    auto = _string(raw, "auto_model", where, None)
    if auto is not None and auto in models:
        raise ConfigError(f"{where}.auto_model: {auto!r} is already a virtual model")
    types_raw = _table(raw, "request_types", f"{where}.request_types")
    if types_raw and auto is None:
        raise ConfigError(f"{where}.request_types: needs auto_model (the name a request uses to let the proxy choose)")
    types = {}
    for kind, tier in types_raw.items():
        if not isinstance(tier, str) or tier not in models:
            raise ConfigError(f"{where}.request_types.{kind}: must name a virtual model "
                              f"({', '.join(models)}), got {tier!r}")
        types[kind] = tier
    cooldown = _number(raw, "cooldown_s", where, 30.0)
    cap = _number(raw, "max_cooldown_s", where, max(300.0, cooldown))
    if cap < cooldown:
        raise ConfigError(f"{where}.max_cooldown_s: must be at least cooldown_s ({cap} < {cooldown})")
    return RoutingConfig(
        cooldown_after_failures=_number(raw, "cooldown_after_failures", where, 3, minimum=1, integer=True),
        cooldown_s=float(cooldown),
        max_cooldown_s=float(cap),
        key_rest_s=float(_number(raw, "key_rest_s", where, 60.0, minimum=0.001)),
        auto_model=auto,
        request_types=MappingProxyType(types),
        batch_provider=batch_provider,
    )


def parse_config(raw: Mapping, *, env: Mapping[str, str] | None = None, source: str = "<string>") -> Config:
    env = os.environ if env is None else env
    _check_keys(raw, _KNOWN_TOP, "config")
    server = _parse_server(_table(raw, "server", "server"), env)
    providers_raw = _table(raw, "providers", "providers")
    if not providers_raw:
        raise ConfigError("providers: at least one provider is required")
    providers = {n: _parse_provider(n, p, env) for n, p in providers_raw.items()}
    models_raw = _table(raw, "models", "models")
    if not models_raw:
        raise ConfigError("models: at least one virtual model is required")
    models = {n: _parse_model(n, m, providers) for n, m in models_raw.items()}
    aliases: dict[str, str] = {}
    for alias, to in _table(raw, "aliases", "aliases").items():
        where = f"aliases.{alias}"
        if alias in models:
            raise ConfigError(f"{where}: the name is already a virtual model")
        if isinstance(to, str) and to in models:
            aliases[alias] = to
        else:
            aliases[alias] = parse_target(to, providers, where).key
    return Config(
        server=server,
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        aliases=MappingProxyType(aliases),
        routing=_parse_routing(_table(raw, "routing", "routing"), models, providers),
        telemetry=_parse_telemetry(_table(raw, "telemetry", "telemetry"), env),
        source=source,
        policies=_parse_policy_tables(raw, env),
    )


def _parse_policy_tables(raw: Mapping, env: Mapping[str, str]):
    from policies.config import parse  # policies build on this module's helpers: imported when needed

    return parse(raw, env)


def default_config_text() -> str:
    return resources.files("proxy.app").joinpath("default_config.toml").read_text()


def load_config(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Loads `path`, else $GROQ_PROXY_CONFIG, else the packaged default. A file is read over the packaged
    default: what it leaves out, the default gives (proxy/app/config_defaults.py)."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    if path is None:
        text, source = default_config_text(), "<default>"
    else:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is dropped, not taken for a TOML key.
            text, source = Path(path).read_text(encoding="utf-8-sig"), str(path)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config: {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                              "TOML files are UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {source} is not valid TOML: {exc}") from None
    if path is None:
        return parse_config(raw, env=env, source=source)
    from proxy.app.config_defaults import explain, over_defaults

    defaults = tomllib.loads(default_config_text())
    try:
        return parse_config(over_defaults(raw, defaults), env=env, source=source)
    except ConfigError as exc:
        raise ConfigError(explain(str(exc), raw, defaults)) from None
