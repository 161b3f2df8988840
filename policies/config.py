"""The `[auth]`, `[store]` and `[[policies]]` tables, parsed once at start-up into frozen objects.

Policies are built here, from their tables, so a wrong option stops the start with a message that names it;
the store (a connection) is opened by the app when it starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from policies.base import Policy
from policies.identity import Identity, KeyRing, ProxyKey
from policies.registry import BUILTINS, build, resolve
from policies.schema import check_keys, choice, count, seconds
from policies.stores.redis_connect import Connect, check_tls_files, parse_url
from proxy.app.config import ConfigError, _env_name, _string

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMON = {"use", "name", "mode", "on_error"}


@dataclass(frozen=True)
class StoreConfig:
    backend: str = "memory"
    url: str | None = field(default=None, repr=False)  # may hold a password: never printed
    timeout_s: float = 1.0
    lease_s: float = 30.0
    prefix: str = "gp:"
    connect: Connect = Connect()  # connect_timeout_s, timeout_s, pool_size, tls_*, the sentinels' password


@dataclass(frozen=True)
class PoliciesConfig:
    keys: KeyRing | None = None
    store: StoreConfig = StoreConfig()
    policies: tuple[Policy, ...] = ()

    @property
    def request_types(self) -> frozenset[str]:
        """The request types the config names: the only values a metric label may take (others: `other`)."""
        types = {"default"}
        for p in self.policies:
            types.update(getattr(p, "types", ()))
        return frozenset(types)

    @property
    def uses_store(self) -> bool:
        return any(p.uses_store for p in self.policies)


def parse_auth(raw) -> KeyRing | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("auth: must be a table")
    check_keys(raw, {"keys"}, "auth")
    keys_raw = raw.get("keys", [])
    if not isinstance(keys_raw, list) or not keys_raw:
        raise ConfigError("auth.keys: [auth] needs at least one [[auth.keys]] (id, sha256); `groq-proxy keys new` "
                          "makes one")
    keys, seen, digests = [], set(), set()
    for i, k in enumerate(keys_raw):
        where = f"auth.keys[{i}]"
        if not isinstance(k, Mapping):
            raise ConfigError(f"{where}: must be a table")
        if "key" in k:
            raise ConfigError(f"{where}.key: keys are never written in the file; put their sha256 (`groq-proxy keys "
                              "hash`)")
        check_keys(k, {"id", "sha256", "user", "team"}, where)
        key_id = _string(k, "id", where, None)
        if key_id is None:
            raise ConfigError(f"{where}.id: required (what logs, metrics and the usage API call this key)")
        if key_id in seen:
            raise ConfigError(f"{where}.id: {key_id!r} is used by another key")
        digest = k.get("sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise ConfigError(f"{where}.sha256: must be 64 hex digits, the SHA-256 of the key (`groq-proxy keys hash`)")
        if digest.lower() in digests:
            raise ConfigError(f"{where}.sha256: the same key as another entry")
        seen.add(key_id)
        digests.add(digest.lower())
        identity = Identity(key_id, _string(k, "user", where, None), _string(k, "team", where, None))
        keys.append(ProxyKey(key_id, bytes.fromhex(digest), identity))
    return KeyRing(tuple(keys))


_STORE_KEYS = {"backend", "url", "url_env", "timeout_s", "connect_timeout_s", "pool_size", "lease_s", "prefix",
               "tls_ca_file", "tls_cert_file", "tls_key_file", "sentinel_password_env"}


def parse_store(raw, env: Mapping[str, str] | None = None) -> StoreConfig:
    if raw is None:
        return StoreConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError("store: must be a table")
    env = {} if env is None else env
    check_keys(raw, _STORE_KEYS, "store")
    backend = choice(raw, "backend", "store", ("memory", "redis"), "memory")
    url = _string(raw, "url", "store", None)
    url_env = _env_name(raw, "url_env", "store")
    if url is not None and url_env:
        raise ConfigError("store.url_env: set url or url_env, not both")
    where = "store.url"
    if url_env:
        where = "store.url_env"
        url = env.get(url_env) or None
        if url is None and backend == "redis":
            raise ConfigError(f"store.url_env: the variable {url_env} is not set")
    if backend == "redis":
        if url is None:
            raise ConfigError("store.url: required with backend = \"redis\" (like redis://127.0.0.1:6379/0), or "
                              "url_env naming a variable that holds it")
        target = parse_url(url, where)
    elif url is not None or url_env:
        raise ConfigError(f"{where}: only with backend = \"redis\"")
    lease = seconds(raw, "lease_s", "store", 30.0)
    if lease < 3:
        raise ConfigError(f"store.lease_s: must be at least 3 (a slot's lease is renewed every third), got {lease}")
    timeout = seconds(raw, "timeout_s", "store", 1.0)
    if timeout <= 0:
        raise ConfigError("store.timeout_s: must be more than 0")
    connect_timeout = seconds(raw, "connect_timeout_s", "store", timeout)
    if connect_timeout <= 0:
        raise ConfigError("store.connect_timeout_s: must be more than 0")
    pool_size = count(raw, "pool_size", "store", 32)
    if pool_size > 1024:
        raise ConfigError(f"store.pool_size: at most 1024 connections a process, got {pool_size}")
    sentinel_env = _env_name(raw, "sentinel_password_env", "store")
    sentinel_password = env.get(sentinel_env) or None if sentinel_env else None
    if sentinel_env and sentinel_password is None:
        raise ConfigError(f"store.sentinel_password_env: the variable {sentinel_env} is not set")
    connect = Connect(connect_timeout, timeout, pool_size, _string(raw, "tls_ca_file", "store", None),
                      _string(raw, "tls_cert_file", "store", None), _string(raw, "tls_key_file", "store", None),
                      sentinel_password)
    if backend == "redis":
        check_tls_files(target, connect)
        if sentinel_env and not target.sentinel:
            raise ConfigError("store.sentinel_password_env: only with a redis+sentinel:// URL")
    else:
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "sentinel_password_env"):
            if key in raw:
                raise ConfigError(f"store.{key}: only with backend = \"redis\"")
    return StoreConfig(backend, url, timeout, lease, _string(raw, "prefix", "store", "gp:"), connect)


def parse_policies(raw) -> tuple[Policy, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("policies: must be an array of tables ([[policies]])")
    built, names = [], set()
    for i, table in enumerate(raw):
        where = f"policies[{i}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: must be a table")
        use = table.get("use")
        if not isinstance(use, str) or not use:
            raise ConfigError(f"{where}.use: required: a built-in ({', '.join(BUILTINS)}) or \"package.module:Class\"")
        name = _string(table, "name", where, None) or (use if use in BUILTINS else use.rpartition(":")[2])
        if name in names:
            raise ConfigError(f"{where}.name: another policy is called {name!r}; give this one its own `name` "
                              "(it names its counters, metrics and spans)")
        names.add(name)
        mode = choice(table, "mode", where, ("enforce", "shadow"), "enforce")
        on_error = choice(table, "on_error", where, ("open", "closed"), "open")
        options = {k: v for k, v in table.items() if k not in _COMMON}
        policy = build(resolve(use, where), options, where)
        policy.name, policy.mode, policy.on_error = name, mode, on_error
        built.append(policy)
    return tuple(built)


def parse(raw: Mapping, env: Mapping[str, str] | None = None) -> PoliciesConfig:
    config = PoliciesConfig(parse_auth(raw.get("auth")), parse_store(raw.get("store"), env),
                            parse_policies(raw.get("policies")))
    return config


def check_workers(config: PoliciesConfig, workers: int) -> None:
    """Several processes on the memory store would each keep their own counters, multiplying every limit by
    the number of processes, and with [auth] their own owners of files and batches, so a file made through one
    process would be missing in the next: refused (`server.workers`, `serve --workers`; proxy/app/workers.py)."""
    if workers > 1 and config.uses_store and config.store.backend == "memory":
        raise ConfigError(f"store.backend: {workers} worker processes on the memory store would each enforce the "
                          "limits on their own (and keep their own cache); use backend = \"redis\"")
    if workers > 1 and config.keys is not None and config.store.backend == "memory":  # files and batches' owners
        raise ConfigError(f"store.backend: {workers} worker processes on the memory store would each keep their own "
                          "record of which proxy key owns each file and batch; use backend = \"redis\"")
