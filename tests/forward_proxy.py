"""A real forward proxy for the tests, as a raw asyncio server: `CONNECT host:port` tunnels (for https origins)
and absolute-form requests (`POST http://host:port/path HTTP/1.1`, for http origins), with Basic
authentication when it is given credentials. Names in `hosts` resolve here, in the proxy, as a corporate proxy
resolves names its clients cannot: a test origin named `api.groq.test` is reachable only through it.
"""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import urlsplit


class ForwardProxy:
    def __init__(self, credentials: tuple[str, str] | None = None, hosts: dict[str, str] | None = None) -> None:
        self.expected = None
        if credentials is not None:
            self.expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        self.hosts = hosts or {}
        self.connections = 0
        self.ended = 0  # connections whose handling is over (their upstream side closed)
        self.connects: list[str] = []  # CONNECT targets, in order
        self.request_lines: list[str] = []  # absolute-form request lines, in order
        self.authorizations: list[str | None] = []  # the Proxy-Authorization of each CONNECT or request

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Task] = []
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head[:-4].decode("latin-1").split("\r\n")
                method, target, version = line.split(" ")
                headers = [f.partition(":") for f in fields]
                auth = next((v.strip() for n, _, v in headers if n.lower() == "proxy-authorization"), None)
                self.authorizations.append(auth)
                if self.expected is not None and auth != self.expected:
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                 b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    return
                if method == "CONNECT":
                    self.connects.append(target)
                    host, _, port = target.rpartition(":")
                    up_reader, upstream = await asyncio.open_connection(self._resolve(host), int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                    await asyncio.gather(_pump(reader, upstream), _pump(up_reader, writer))
                    return
                # Absolute form: the request goes on in origin form, without what was meant for the proxy.
                self.request_lines.append(line)
                url = urlsplit(target)
                if upstream is None:
                    up_reader, upstream = await asyncio.open_connection(self._resolve(url.hostname), url.port or 80)
                    pumps.append(asyncio.create_task(_pump(up_reader, writer)))
                length = next((int(v) for n, _, v in headers if n.lower() == "content-length"), 0)
                body = await reader.readexactly(length)
                kept = "".join(f"{n}:{v}\r\n" for n, _, v in headers if n.lower() != "proxy-authorization")
                upstream.write(f"{method} {url.path or '/'}{'?' + url.query if url.query else ''} {version}\r\n"
                               f"{kept}\r\n".encode("latin-1") + body)
                await upstream.drain()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if upstream is not None:
                upstream.close()
                try:
                    await upstream.wait_closed()
                except ConnectionError:
                    pass
            self.ended += 1

    def _resolve(self, host: str) -> str:
        return self.hosts.get(host, host)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies bytes one way until that side ends, then ends the other."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
