"""How the Redis store reaches Redis: the URL (plain, TLS, a Unix socket, or a master found through Sentinel),
its credentials, the timeouts and the size of the connection pool.

Kept apart from the store (`policies.stores.redis`, which holds the scripts and the batching) because this is
what production changes and the store does not: the same two scripts run over any of these connections.

URLs:
- `redis://[user:password@]host:6379/0`, `rediss://...` for TLS (the CA and client certificate from
  `store.tls_*`), `unix:///path/redis.sock?db=0`;
- `redis+sentinel://[user:password@]host1:26379,host2:26379/mymaster[/db]` (or `rediss+sentinel://`): the
  sentinels are asked for the master of `mymaster`; the user and password are the Redis servers' (a sentinel's
  own password, if it has one, comes from `store.sentinel_password_env`). After a failover the next connection
  asks the sentinels again, so the store comes back on the promoted replica (and reloads its scripts there on
  NOSCRIPT).

The password never leaves this module except into redis-py: `RedisTarget` keeps it out of its repr, `display`
is what logs and /readyz show, and a URL that does not parse is refused without being echoed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from proxy.app.config import ConfigError

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = {"redis": 6379, "rediss": 6379, "redis+sentinel": 26379, "rediss+sentinel": 26379}


@dataclass(frozen=True)
class RedisTarget:
    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()  # the server, or every sentinel
    path: str | None = None  # unix socket
    db: int = 0
    service: str | None = None  # the Sentinel master name
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")

    @property
    def sentinel(self) -> bool:
        return self.scheme.endswith("+sentinel")

    @property
    def display(self) -> str:
        """The URL without its credentials: what the log and /readyz may show."""
        if self.path is not None:
            return f"unix://{self.path}"
        hosts = ",".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.hosts)
        tail = f"/{self.service}" if self.sentinel else ""
        return f"{self.scheme}://{hosts}{tail}/{self.db}"


@dataclass(frozen=True)
class Connect:
    """The `[store]` keys about connecting, with their defaults."""

    connect_timeout_s: float = 1.0
    timeout_s: float = 1.0
    pool_size: int = 32
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def _host_port(item: str, scheme: str, where: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ConfigError(f"{where}: a host is missing (like {scheme}://host:{DEFAULT_PORT[scheme]})")
    if not port_text:
        return host, DEFAULT_PORT[scheme]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{where}: the port of {host} must be a number from 1 to 65535")
    return host, int(port_text)


def _db(text: str, where: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{where}: the database must be a number (like /0)")
    return int(text)


def parse_url(url: str, where: str = "store.url") -> RedisTarget:
    """The URL, checked; messages name `where` and never repeat the URL (it may hold a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f"{where}: must start with " + ", ".join(f"{s}://" for s in SCHEMES))
    if scheme == "unix":
        parts = urlsplit(url)
        if not parts.path:
            raise ConfigError(f"{where}: unix:// needs the socket's path (unix:///run/redis.sock)")
        options = parse_qs(parts.query, keep_blank_values=True)
        if set(options) - {"db"}:  # `?password=` is redis-py's, not ours: refused rather than ignored and shown
            raise ConfigError(f"{where}: options in the URL are not read (only unix://...?db=N); use the [store] "
                              "keys, and the password in the URL's user part (unix://:password@/run/redis.sock)")
        db = options.get("db", ["0"])[0]
        return RedisTarget("unix", path=parts.path, db=_db(db, where),
                           username=unquote(parts.username) if parts.username else None,
                           password=unquote(parts.password) if parts.password is not None else None)
    netloc, _, path = rest.partition("/")
    path, question, _ = path.partition("?")
    if question or "?" in netloc:
        raise ConfigError(f"{where}: options in the URL are not read; use the [store] keys (timeout_s, tls_ca_file ...)")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist, userinfo = netloc, ""
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host: the one word is the password (AUTH password), as redis-cli reads it
            username, password = None, unquote(user)
        password = password or None
    hosts = tuple(_host_port(h, scheme, where) for h in hostlist.split(",") if h) if hostlist else ()
    if not hosts:
        raise ConfigError(f"{where}: a host is missing (like {scheme}://host:{DEFAULT_PORT[scheme]})")
    segments = [s for s in path.split("/") if s]
    if scheme.endswith("+sentinel"):
        if not segments:
            raise ConfigError(f"{where}: name the master the sentinels watch ({scheme}://host:26379/mymaster)")
        if len(segments) > 2:
            raise ConfigError(f"{where}: after the hosts come the master's name and optionally the database "
                              "(/mymaster/0)")
        return RedisTarget(scheme, hosts, db=_db(segments[1], where) if len(segments) == 2 else 0,
                           service=segments[0], username=username, password=password)
    if len(hosts) > 1:
        raise ConfigError(f"{where}: several hosts only with {scheme}+sentinel://")
    if len(segments) > 1:
        raise ConfigError(f"{where}: the path is the database number alone (like /0)")
    return RedisTarget(scheme, hosts, db=_db(segments[0], where) if segments else 0,
                       username=username, password=password)


def check_tls_files(target: RedisTarget, connect: Connect, where: str = "store") -> None:
    """TLS files name readable files, and only with a TLS URL: checked at start-up."""
    named = {k: getattr(connect, k) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")}
    given = {k: v for k, v in named.items() if v is not None}
    if given and not target.tls:
        first = next(iter(given))
        raise ConfigError(f"{where}.{first}: only with a TLS URL (rediss:// or rediss+sentinel://)")
    if (connect.tls_cert_file is None) != (connect.tls_key_file is None):
        missing = "tls_key_file" if connect.tls_key_file is None else "tls_cert_file"
        raise ConfigError(f"{where}.{missing}: a client certificate needs both tls_cert_file and tls_key_file")
    for key, value in given.items():
        if not Path(value).is_file():
            raise ConfigError(f"{where}.{key}: no such file: {value}")


def _tls_kwargs(connect: Connect) -> dict:
    # The system's CAs unless a CA file is named; the server's name is always checked against its certificate.
    return {"ssl_ca_certs": connect.tls_ca_file, "ssl_certfile": connect.tls_cert_file,
            "ssl_keyfile": connect.tls_key_file, "ssl_cert_reqs": "required", "ssl_check_hostname": True}


def open_pool(target: RedisTarget, connect: Connect):
    """A bounded pool of connections to the server (or to the master the sentinels name).

    Blocking: a burst of requests waits up to `timeout_s` for one of `pool_size` connections instead of
    opening one each, which under load made connects time out. No retries inside redis-py: a failed call
    fails at once and each policy's `on_error` decides. Returns (pool, sentinel or None)."""
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common = {"db": target.db, "username": target.username, "password": target.password,
              "socket_timeout": connect.timeout_s, "socket_connect_timeout": connect.connect_timeout_s,
              "retry": Retry(NoBackoff(), 0)}
    sizing = {"max_connections": connect.pool_size, "timeout": connect.timeout_s}
    tls = _tls_kwargs(connect) if target.tls else {}
    if target.sentinel:
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        class SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
            """Sentinel's master discovery with the blocking pool's bound."""

        sentinel_kwargs = {"socket_timeout": connect.timeout_s, "socket_connect_timeout": connect.connect_timeout_s,
                           "password": connect.sentinel_password, "retry": Retry(NoBackoff(), 0), **tls}
        if target.tls:
            sentinel_kwargs["ssl"] = True
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)
        pool = SentinelBlockingPool(target.service, sentinel, ssl=target.tls, **sizing, **common, **tls)
        return pool, sentinel
    if target.path is not None:
        return BlockingConnectionPool(connection_class=UnixDomainSocketConnection, path=target.path,
                                      **sizing, **common), None
    (host, port), = target.hosts
    cls = SSLConnection if target.tls else Connection
    return BlockingConnectionPool(connection_class=cls, host=host, port=port, **sizing, **common, **tls), None
