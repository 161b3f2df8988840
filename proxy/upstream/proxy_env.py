"""Forward proxies from the environment: `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY`.

The start-up catalogue check goes through the groq SDK, which honours these variables; the hot path must go the
same way, or the proxy reports every model present and then fails each request with a DNS error. They are read
as curl and Python's urllib read them: the lower-case name first, then the upper-case one (`http_proxy` for
http origins, `https_proxy` for https ones, `all_proxy` for either when those are unset), an `http://` proxy
URL (a bare `host:port` too; the port defaults to 80), credentials in it sent as `Proxy-Authorization: Basic`.

`NO_PROXY` is read as httpx reads it (the groq SDK of the start-up check is on httpx: the check and the hot path must
agree on which hosts go direct): entries separated by commas; `*` for every host; `example.com` matches itself
and every name under it, `.example.com` only the names under it; `localhost` and an IP address only themselves
(a CIDR block is not a range: httpx takes `10.0.0.0/8` as the address 10.0.0.0); `host:port` that port only,
and an origin on its scheme's default port has none to match (`api.groq.com:443` does not match
`https://api.groq.com`, as in httpx); `https://host` that scheme and that host only. Names are not looked up.
curl differs on a few of these (its `.example.com` covers `example.com`, it reads CIDR blocks); httpx wins.

Everything here runs once per origin, when the client makes its pool; nothing here runs per request. The proxy's
credentials live in one pre-built header line, never in a message: errors name the proxy by host and port.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import unquote, urlsplit

MAX_CONNECT_ANSWER = 16 * 1024  # a proxy's answer to CONNECT longer than this is refused


class ProxyFailed(OSError):
    """The proxy refused or broke the tunnel; an OSError, so the client reports it as a connect failure."""


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """One proxy from the environment. `problem` says why it cannot be used (every connection through it then
    fails with that, instead of going around it)."""

    host: str
    port: int
    shown: str  # how messages name it: `host:port`, or the variable when it names no usable proxy
    header_lines: str = field(default="", repr=False)  # "Proxy-Authorization: Basic ...\r\n" or ""
    problem: str | None = None


def parse_proxy(variable: str, value: str) -> ForwardProxy:
    """The proxy a variable names. Its value is never repeated in a problem: it may hold a password."""
    url = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        return _unusable(variable, f"${variable} is not a proxy URL (a bad port?)")
    if parts.scheme.lower() != "http":
        return _unusable(variable, f"${variable}: {parts.scheme}:// proxies are not supported, only http://")
    if not parts.hostname:
        return _unusable(variable, f"${variable} names no proxy host")
    lines = ""
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        lines = f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode('ascii')}\r\n"
    host = parts.hostname
    return ForwardProxy(host, port, f"[{host}]:{port}" if ":" in host else f"{host}:{port}", lines)


def _unusable(variable: str, problem: str) -> ForwardProxy:
    return ForwardProxy("", 0, f"${variable}", problem=problem)


class NoProxy:
    """The hosts `NO_PROXY` sends directly, read exactly as httpx reads it (`httpx._utils.get_environment_proxies`
    and `URLPattern`): the groq SDK of the start-up catalogue check is on httpx, so both go the same way."""

    __slots__ = ("everything", "rules")

    def __init__(self, value: str) -> None:
        self.everything = False
        # (scheme or "" for any, the host's test, port or None): one per entry
        self.rules: list[tuple[str, Callable[[str], bool], int | None]] = []
        for entry in value.split(","):
            entry = entry.strip()
            if entry == "*":
                self.everything = True
            elif entry:
                rule = _rule(entry)
                if rule is not None:
                    self.rules.append(rule)

    def matches(self, host: str, port: int, tls: bool = True) -> bool:
        if self.everything:
            return True
        scheme = "https" if tls else "http"
        host = host.lower().strip("[]")
        explicit = None if port == (443 if tls else 80) else port  # httpx's URL has no port when it is the default
        return any((not s or s == scheme) and test(host) and p in (None, explicit) for s, test, p in self.rules)


def _rule(entry: str) -> tuple[str, Callable[[str], bool], int | None] | None:
    """One entry as httpx makes it a pattern: `scheme://host[:port]` as written (that scheme only, that host
    only); an IPv4 or IPv6 address (a CIDR block's `/bits` is dropped: its first address only) and `localhost`
    only themselves; any other name itself and the names under it (`example.com`), or only the names under it
    (`.example.com`), with an optional `:port`."""
    address = _address(entry.split("/")[0].strip("[]"))
    if address is not None:
        return "", lambda host: _address(host) == address, None
    if "://" in entry:
        pattern = entry
    elif entry.lower() == "localhost":
        pattern = "all://localhost"
    else:
        pattern = "all://*" + entry
    try:
        parts = urlsplit(pattern)
        port = parts.port
    except ValueError:
        return None  # httpx refuses it too (InvalidURL)
    scheme = "" if parts.scheme.lower() == "all" else parts.scheme.lower()
    name = (parts.hostname or "").lower()
    if not name or name == "*":
        test: Callable[[str], bool] = lambda host: True  # noqa: E731
    elif name.startswith("*."):
        domain = name[1:]  # `.example.com`: the names under it, not itself
        test = lambda host: host.endswith(domain) and len(host) > len(domain)  # noqa: E731
    elif name.startswith("*"):
        domain = name[1:]  # `example.com`: itself and the names under it (not `myexample.com`)
        test = lambda host: host == domain or host.endswith("." + domain)  # noqa: E731
    else:
        test = lambda host: host == name  # noqa: E731
    return scheme, test, port


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str]:
    """The value of `name` (lower case first, as curl and urllib read it) and the name it came from."""
    for variable in (name, name.upper()):
        value = environ.get(variable)
        if value is not None:
            return value.strip(), variable
    return "", name


class ProxyEnv:
    """The proxy settings of one environment, parsed once."""

    __slots__ = ("routes", "no_proxy")

    def __init__(self, environ: Mapping[str, str]) -> None:
        fallback = _variable(environ, "all_proxy")
        self.routes: dict[bool, ForwardProxy | None] = {}  # by "the origin is https"
        for tls, name in ((False, "http_proxy"), (True, "https_proxy")):
            value, variable = _variable(environ, name)
            if not value:
                value, variable = fallback
            self.routes[tls] = parse_proxy(variable, value) if value else None
        self.no_proxy = NoProxy(_variable(environ, "no_proxy")[0])

    def proxy_for(self, host: str, port: int, tls: bool) -> ForwardProxy | None:
        """The proxy to reach `host:port` through, or None to connect directly."""
        proxy = self.routes[tls]
        if proxy is None or self.no_proxy.matches(host, port, tls):
            return None
        return proxy


async def open_tunnel(loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: ForwardProxy, host: str,
                      port: int) -> None:
    """Asks the proxy on the connected `sock` for a tunnel to `host:port` (CONNECT); returns once it is open,
    so TLS with the origin can start on the same socket."""
    if not host.isascii():
        host = host.encode("idna").decode("ascii")  # a UnicodeError for a name IDNA refuses, as getaddrinfo raises
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{proxy.header_lines}\r\n"
    await loop.sock_sendall(sock, request.encode("latin-1"))
    answer = b""
    while b"\r\n\r\n" not in answer:
        if len(answer) > MAX_CONNECT_ANSWER:
            raise ProxyFailed("the proxy's answer to CONNECT has no end")
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise ProxyFailed("the proxy closed the connection instead of answering CONNECT")
        answer += data
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, status = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not status[:3].isdigit():
        raise ProxyFailed(f"the proxy's answer to CONNECT is not HTTP: {status_line[:60]!r}")
    if status[0] != "2":
        raise ProxyFailed(f"the proxy answered CONNECT with {status[:80]!r}")
    if rest:  # the origin speaks only after our TLS hello: these bytes are the proxy's, and make no sense
        raise ProxyFailed("the proxy sent bytes after its answer to CONNECT")
