"""`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` on the hot path (proxy/upstream/proxy_env.py): a CONNECT
tunnel for https origins with TLS to the origin through it, absolute-form requests for http origins, Basic
credentials that never show, and `NO_PROXY` read as curl reads it.

Against real local servers: a forward proxy written as a raw asyncio server (tests/forward_proxy.py), aiohttp
origins (TLS with a trustme CA). The origins are named `*.test`, which no resolver knows: only the proxy can
reach them, so a request that skipped the proxy would fail.
"""

from __future__ import annotations

import base64
import ssl

import pytest
import trustme
from aiohttp import web

from proxy.upstream.http1 import Client, ConnectFailed, ConnectTimeout, Origin
from proxy.upstream.proxy_env import NoProxy, ProxyEnv
from tests.conftest import closed_port_url, config_for, until
from tests.forward_proxy import ForwardProxy
from tests.test_fallback import KEY, attempt_lines, call, chat, content_of
from tests.test_upstream_wire import Recording

USER, PASSWORD = "proxy-user", "pr0xy p@ss:word"  # percent-encoded in the URL; never to be seen again
PROXY_AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRET_URL_PART = "proxy-user:pr0xy%20p%40ss%3Aword"


def proxy_url(port: int, credentials: bool = True) -> str:
    return f"http://{SECRET_URL_PART}@127.0.0.1:{port}" if credentials else f"http://127.0.0.1:{port}"


def assert_no_secret(text: str) -> None:
    for secret in (USER, PASSWORD, SECRET_URL_PART, PROXY_AUTH.split()[1], "pr0xy"):
        assert secret not in text


class Origin_:
    """An aiohttp origin that records each request's Host, whether a Proxy-Authorization reached it, and (for
    TLS) the server name the client asked for."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.proxy_auth_seen = False
        self.server_names: list[str | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.Response:
        self.hosts.append(request.headers["Host"])
        self.proxy_auth_seen |= "Proxy-Authorization" in request.headers
        return web.Response(body=await request.read())

    def tls(self, ca: trustme.CA, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(ctx)
        ctx.sni_callback = lambda sock, server_name, _: self.server_names.append(server_name)
        return ctx


@pytest.fixture
def ca(tmp_path, monkeypatch) -> trustme.CA:
    """A private CA the client trusts through SSL_CERT_FILE, as an operator would set it up."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return ca


async def post(client: Client, origin: Origin, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await client.request(origin, "POST", "/v1/chat", {}, body, 5.0)
    try:
        return response.status, await response.read()
    finally:
        response.release()


@pytest.fixture
async def clients():
    """`clients(environ)` makes a Client reading its proxy variables from `environ`; all are closed after."""
    made: list[Client] = []

    def make(environ: dict[str, str]) -> Client:
        made.append(Client(environ=environ))
        return made[-1]

    yield make
    for c in made:
        await c.close()


# --- https origins: a CONNECT tunnel -------------------------------------------------------------------------


async def test_https_origin_is_reached_through_a_connect_tunnel(ca, aiohttp_server, raw_server, clients):
    origin_app = Origin_()
    server = await aiohttp_server(origin_app.app(), ssl=origin_app.tls(ca, "api.groq.test"))
    proxy = ForwardProxy((USER, PASSWORD), hosts={"api.groq.test": "127.0.0.1"})
    proxy_port = await raw_server(proxy)
    client = clients({"HTTPS_PROXY": proxy_url(proxy_port)})
    origin = Origin.of("https", "api.groq.test", server.port)

    for i in range(3):
        assert await post(client, origin, b'{"n": %d}' % i) == (200, b'{"n": %d}' % i)

    assert proxy.connects == [f"api.groq.test:{server.port}"]  # one tunnel, kept alive for all three
    assert proxy.authorizations == [PROXY_AUTH]
    assert origin_app.server_names == ["api.groq.test"]  # SNI names the origin, not the proxy
    assert origin_app.hosts == [f"api.groq.test:{server.port}"] * 3
    assert not origin_app.proxy_auth_seen  # the credentials stayed with the proxy


async def test_the_origin_certificate_is_checked_through_the_tunnel(ca, aiohttp_server, raw_server, clients):
    origin_app = Origin_()
    server = await aiohttp_server(origin_app.app(), ssl=origin_app.tls(ca, "someone-else.test"))
    proxy_port = await raw_server(ForwardProxy((USER, PASSWORD), hosts={"api.groq.test": "127.0.0.1"}))
    client = clients({"https_proxy": proxy_url(proxy_port)})

    with pytest.raises(ConnectFailed) as failed:
        await post(client, Origin.of("https", "api.groq.test", server.port))

    message = str(failed.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert f"api.groq.test:{server.port} through proxy 127.0.0.1:{proxy_port}" in message
    assert_no_secret(message)


async def test_a_proxy_refusing_the_credentials_is_a_connect_failure_without_them(ca, raw_server, clients):
    proxy = ForwardProxy(("someone", "else"))
    proxy_port = await raw_server(proxy)
    client = clients({"HTTPS_PROXY": proxy_url(proxy_port)})

    with pytest.raises(ConnectFailed, match="407 Proxy Authentication Required") as failed:
        await post(client, Origin.of("https", "api.groq.test", 443))

    assert proxy.authorizations == [PROXY_AUTH]
    assert f"through proxy 127.0.0.1:{proxy_port}" in str(failed.value)
    assert_no_secret(str(failed.value))


async def test_a_proxy_that_cannot_be_reached_is_named_without_its_credentials(clients):
    port = int(closed_port_url().split(":")[2].split("/")[0])
    client = clients({"HTTPS_PROXY": proxy_url(port)})

    with pytest.raises(ConnectFailed) as failed:
        await post(client, Origin.of("https", "api.groq.test", 443))

    assert str(failed.value).startswith(f"cannot connect to api.groq.test:443 through proxy 127.0.0.1:{port}: ")
    assert_no_secret(str(failed.value))


async def test_a_proxy_that_never_answers_connect_is_a_connect_timeout_naming_it(raw_server, clients):
    asked = []

    async def silent(reader, writer):
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()

    port = await raw_server(silent)
    client = clients({"HTTPS_PROXY": proxy_url(port)})
    with pytest.raises(ConnectTimeout, match=f"^no connection to api.groq.test:443 through proxy 127.0.0.1:{port} in "):
        # 1 s: room for the lookup, the connect and the CONNECT on a busy machine; then the silence ends it.
        await client.request(Origin.of("https", "api.groq.test", None), "POST", "/", {}, b"{}", 1.0)
    await until(lambda: asked, what="the proxy reading the CONNECT")  # sent before the client gave up
    assert asked == [b"CONNECT api.groq.test:443 HTTP/1.1\r\nHost: api.groq.test:443\r\n"
                     + f"Proxy-Authorization: {PROXY_AUTH}\r\n\r\n".encode()]


@pytest.mark.parametrize("value, problem", [
    (f"socks5://{SECRET_URL_PART}@127.0.0.1:1080", "$HTTPS_PROXY: socks5:// proxies are not supported"),
    (f"http://{SECRET_URL_PART}@127.0.0.1:99999", "$HTTPS_PROXY is not a proxy URL"),
])
async def test_an_unusable_proxy_fails_every_connection_saying_why(value, problem, clients):
    client = clients({"HTTPS_PROXY": value})
    with pytest.raises(ConnectFailed, match=problem.replace("$", r"\$")) as failed:
        await post(client, Origin.of("https", "api.groq.test", 443))
    assert_no_secret(str(failed.value))
    assert value not in str(failed.value)


# --- http origins: absolute form ---------------------------------------------------------------------------------


async def test_http_origin_is_asked_for_in_absolute_form_with_the_credentials(aiohttp_server, raw_server, clients):
    origin_app = Origin_()
    server = await aiohttp_server(origin_app.app())
    proxy = ForwardProxy((USER, PASSWORD), hosts={"local.test": "127.0.0.1"})
    proxy_port = await raw_server(proxy)
    client = clients({"http_proxy": proxy_url(proxy_port), "HTTPS_PROXY": "http://127.0.0.1:9"})
    origin = Origin.of("http", "local.test", server.port)

    for _ in range(2):
        assert await post(client, origin) == (200, b"{}")

    assert proxy.request_lines == [f"POST http://local.test:{server.port}/v1/chat HTTP/1.1"] * 2
    assert proxy.authorizations == [PROXY_AUTH] * 2  # on every request: the proxy sees each one
    assert proxy.connections == 1  # kept alive
    assert origin_app.hosts == [f"local.test:{server.port}"] * 2
    assert not origin_app.proxy_auth_seen


async def test_lower_case_names_win_and_all_proxy_is_the_fallback(aiohttp_server, raw_server, clients):
    origin_app = Origin_()
    server = await aiohttp_server(origin_app.app())
    proxy = ForwardProxy(hosts={"local.test": "127.0.0.1"})
    proxy_port = await raw_server(proxy)
    closed = closed_port_url().split("/")[2]
    origin = Origin.of("http", "local.test", server.port)

    lower_first = clients({"http_proxy": proxy_url(proxy_port, False), "HTTP_PROXY": f"http://{closed}"})
    assert await post(lower_first, origin) == (200, b"{}")
    fallback = clients({"ALL_PROXY": proxy_url(proxy_port, False), "HTTPS_PROXY": f"http://{closed}"})
    assert await post(fallback, origin) == (200, b"{}")
    assert proxy.connections == 2


# --- NO_PROXY ------------------------------------------------------------------------------------------------------


async def test_no_proxy_hosts_go_direct_and_each_route_has_its_own_pool(aiohttp_server, raw_server, clients):
    origin_app = Origin_()
    server = await aiohttp_server(origin_app.app())
    proxy = ForwardProxy(hosts={"local.test": "127.0.0.1"})
    proxy_port = await raw_server(proxy)
    client = clients({"HTTP_PROXY": proxy_url(proxy_port, False), "NO_PROXY": "example.com, 127.0.0.1"})
    direct, proxied = Origin.of("http", "127.0.0.1", server.port), Origin.of("http", "local.test", server.port)

    for origin in (direct, proxied, direct, proxied):
        assert await post(client, origin) == (200, b"{}")

    assert proxy.request_lines == [f"POST http://local.test:{server.port}/v1/chat HTTP/1.1"] * 2
    assert proxy.connections == 1
    assert client._pools[direct].proxy is None and client._pools[proxied].proxy is not None
    assert len(client._pools[direct].idle) == len(client._pools[proxied].idle) == 1


NO_PROXY_CASES = [
    # NO_PROXY, the origin, sent directly? (what httpx 0.28, the groq SDK's client, decides for each)
    ("*", "https://api.groq.com", True),
    ("example.org,*", "https://api.groq.com", True),
    ("", "https://api.groq.com", False),
    ("groq.com", "https://api.groq.com", True),
    ("groq.com", "https://groq.com", True),
    ("groq.com", "https://notgroq.com", False),
    ("api.groq.com", "https://groq.com", False),
    (".groq.com", "https://api.groq.com", True),
    (".groq.com", "https://groq.com", False),  # curl would send this one direct; httpx does not
    ("*.groq.com", "https://api.groq.com", False),  # no wildcard but a lone `*`
    ("*groq.com", "https://notgroq.com", False),
    ("API.Groq.COM", "https://api.groq.com", True),
    ("groq.com.", "https://api.groq.com", False),
    ("example.org,groq.com", "https://api.groq.com", True),
    (" example.org , groq.com ", "https://api.groq.com", True),
    ("example.org, ,groq.com", "https://api.groq.com", True),
    ("example.org groq.com", "https://api.groq.com", False),  # commas separate, not spaces
    ("groq.com:8443", "https://api.groq.com:8443", True),
    ("groq.com:8443", "https://api.groq.com", False),
    ("groq.com:443", "https://api.groq.com", False),  # the default port is no port to match
    ("groq.com:443", "https://api.groq.com:443", False),
    ("local.test:80", "http://local.test:8080", False),
    ("http://local.test", "http://local.test:8080", True),
    ("http://local.test", "https://local.test", False),
    ("https://groq.com", "https://api.groq.com", False),  # with a scheme: that host only
    ("https://api.groq.com", "https://api.groq.com", True),
    ("10.1.2.3", "http://10.1.2.3", True),
    ("10.1.2.3", "http://10.1.2.4", False),
    ("10.1.2.3:8080", "http://10.1.2.3:8080", True),
    ("10.1.2.3:8080", "http://10.1.2.3:9090", False),
    ("10.0.0.0/8", "http://10.200.0.1", False),  # a CIDR block is its first address only
    ("10.0.0.0/8", "http://10.0.0.0", True),
    ("127.0.0.1", "http://localhost", False),  # names are not looked up
    ("localhost", "http://localhost:11434", True),
    ("localhost", "http://a.localhost", False),
    ("::1", "http://[::1]:8080", True),
    ("::1", "http://[::2]:8080", False),
]


def _httpx_direct(no_proxy: str, url: str) -> bool:
    """What httpx (the groq SDK's client) decides for `url` with this NO_PROXY and a proxy for both schemes."""
    import os

    import httpx

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({"HTTP_PROXY": "http://proxy.corp:3128", "HTTPS_PROXY": "http://proxy.corp:3128",
                       "NO_PROXY": no_proxy})
    try:
        with httpx.Client(trust_env=True) as client:
            return client._transport_for_url(httpx.URL(url)) is client._transport
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("no_proxy, url, direct", NO_PROXY_CASES)
def test_no_proxy_is_read_as_httpx_reads_it(no_proxy, url, direct):
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if tls else 80)
    assert _httpx_direct(no_proxy, url) is direct  # the table is httpx's reading
    assert NoProxy(no_proxy).matches(host, port, tls) is direct
    env = ProxyEnv({"https_proxy": "http://proxy.corp:3128", "http_proxy": "http://proxy.corp:3128",
                    "no_proxy": no_proxy})
    assert (env.proxy_for(host, port, tls) is None) is direct


@pytest.mark.parametrize("no_proxy, host, port, direct", [
    ("[::1]", "::1", 80, True),  # httpx cannot read these two (InvalidURL): the address, as for IPv4
    ("fd00::/8", "fd00::", 443, True),
    ("fd00::/8", "fd12::1", 443, False),
    ("10.0.0.0/99, groq.com", "api.groq.com", 443, True),  # a bad entry is skipped, not the list
])
def test_entries_httpx_refuses_are_read_as_their_address_or_skipped(no_proxy, host, port, direct):
    assert NoProxy(no_proxy).matches(host, port, True) is direct


def test_proxy_urls_are_read_as_clients_read_them():
    env = ProxyEnv({"HTTP_PROXY": "proxy.corp:3128", "HTTPS_PROXY": "http://[fd00::1]"})
    assert (env.routes[False].host, env.routes[False].port) == ("proxy.corp", 3128)
    assert (env.routes[True].host, env.routes[True].port, env.routes[True].shown) == ("fd00::1", 80, "[fd00::1]:80")
    assert env.routes[True].header_lines == ""
    unset = ProxyEnv({"https_proxy": "", "HTTPS_PROXY": "http://proxy.corp:3128"})  # empty lower case: no proxy
    assert unset.routes[True] is None
    secret = ProxyEnv({"HTTPS_PROXY": proxy_url(3128)}).routes[True]
    assert secret.header_lines == f"Proxy-Authorization: {PROXY_AUTH}\r\n"
    assert_no_secret(repr(secret))


# --- through the whole proxy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_the_gateway_reaches_its_provider_through_https_proxy(stream, ca, aiohttp_server, raw_server,
                                                                    start_proxy, monkeypatch, proxy_log):
    up = Recording()
    server = await aiohttp_server(up.app(), ssl=Origin_().tls(ca, "api.groq.test"))
    proxy = ForwardProxy((USER, PASSWORD), hosts={"api.groq.test": "127.0.0.1"})
    proxy_port = await raw_server(proxy)
    monkeypatch.setenv("HTTPS_PROXY", proxy_url(proxy_port))
    monkeypatch.setenv("NO_PROXY", "localhost")
    base = await start_proxy(config_for(f"https://api.groq.test:{server.port}/openai/v1"))

    r = await call(base, chat(stream=stream))

    assert r.status == 200, r.body
    assert content_of(r.body, stream) == "Hello there!"
    assert proxy.connects == [f"api.groq.test:{server.port}"]
    assert up.seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert "Proxy-Authorization" not in up.seen[0]["headers"]


async def test_an_unreachable_proxy_is_a_connect_error_naming_it_without_credentials(start_proxy, monkeypatch,
                                                                                     proxy_log):
    port = int(closed_port_url().split(":")[2].split("/")[0])
    monkeypatch.setenv("HTTPS_PROXY", proxy_url(port))
    base = await start_proxy(config_for("https://api.groq.test/openai/v1", {"tier-test": ["m1"]}))

    r = await call(base, chat())

    assert r.status == 503, r.body  # no model could be reached
    assert f"through proxy 127.0.0.1:{port}" in r.json()["error"]["message"]
    assert attempt_lines(proxy_log)[0]["reason"] == "connect_error"
    logged = "\n".join(str(getattr(rec, "fields", "")) + rec.getMessage() for rec in proxy_log.records)
    for text in (r.body.decode(), logged, str(dict(r.headers))):
        assert_no_secret(text)


@pytest.mark.parametrize("no_proxy", ["", "local.test"])
async def test_the_catalogue_check_of_any_provider_goes_where_requests_go(no_proxy, aiohttp_server, raw_server,
                                                                          monkeypatch):
    """A provider that is not Groq is checked over httpx as well, so the check honours HTTP_PROXY and NO_PROXY
    as the requests do (it went direct whatever the variables said, and reported a model missing that the
    requests reach, or present where they cannot go)."""
    from proxy.admin.catalogue import fetch_catalogue
    from proxy.sim.simulator import build_simulator_app

    server = await aiohttp_server(build_simulator_app())
    proxy = ForwardProxy(hosts={"local.test": "127.0.0.1"})
    environ = {"HTTP_PROXY": proxy_url(await raw_server(proxy), False), "NO_PROXY": no_proxy}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    base_url = f"http://local.test:{server.port}/v1"
    catalogue = await fetch_catalogue("local", base_url, None, timeout_s=10)
    through_proxy = ProxyEnv(environ).proxy_for("local.test", server.port, False) is not None
    assert through_proxy is (no_proxy == "")
    if through_proxy:  # local.test resolves only in the proxy: the check found the models there
        assert catalogue.models and "openai/gpt-oss-20b" in catalogue.models
        assert proxy.request_lines == [f"GET http://local.test:{server.port}/v1/models HTTP/1.1"]
        await until(lambda: proxy.ended == proxy.connections, what="the check's connection to end")
    else:  # direct, as the requests would go: the name does not resolve here
        assert catalogue.models is None and proxy.connections == 0
