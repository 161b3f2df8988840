"""Forward proxies from the environment: `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY`.

The start-up catalogue check goes through the groq SDK, which honours these variables; the hot path must go the
same way, or the proxy reports every model present and then fails each request with a DNS error. They are read
as curl and Python's urllib read them: the lower-case name first, then the upper-case one (`http_proxy` for
http origins, `https_proxy` for https ones, `all_proxy` for either when those are unset), an `http://` proxy
URL (a bare `host:port` too; the port defaults to 80), credentials in it sent as `Proxy-Authorization: Basic`.

`NO_PROXY` is read as curl reads it: entries separated by commas or spaces; `*` for every host; a name matches
itself and every name under it, with or without a leading dot (`example.com` and `.example.com` both cover
`api.example.com`); an IP address or a CIDR block matches a host written as an address in it (names are not
looked up); `host:port` matches that port only.

Everything here runs once per origin, when the client makes its pool; nothing here runs per request. The proxy's
credentials live in one pre-built header line, never in a message: errors name the proxy by host and port.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Mapping
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
    """The hosts `NO_PROXY` sends directly."""

    __slots__ = ("everything", "names", "networks")

    def __init__(self, value: str) -> None:
        self.everything = False
        self.names: list[tuple[str, int | None]] = []
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for entry in value.replace(",", " ").split():
            if entry == "*":
                self.everything = True
                continue
            host, port = _split_port(entry)
            if host is None:
                continue
            try:
                self.networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                if "/" not in host:  # `*.example.com` is taken as `.example.com`, as Go and httpx take it
                    self.names.append((host.lower().lstrip("*").strip("."), port))

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().rstrip(".").strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            return any(address in net and p in (None, port) for net, p in self.networks)
        return any((host == name or host.endswith(f".{name}")) and p in (None, port) for name, p in self.names)


def _split_port(entry: str) -> tuple[str | None, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, a bare IPv6 address or CIDR (two colons or more: no port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:
        host, port_text = entry, None
    if port_text is None:
        return host, None
    return (host, int(port_text)) if port_text.isdigit() else (None, None)


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
        if proxy is None or self.no_proxy.matches(host, port):
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
