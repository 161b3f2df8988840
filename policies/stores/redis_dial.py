"""Opening the store's hot-path connection (`policies.stores.resp`) from the store's URL.

The seam between where Redis is and how the store talks to it: `dial(url, timeout_s)` returns a connected,
authenticated `RespConnection` on the right database, and the store calls it again after a connection was
lost. The URL forms are the `[store] url` ones: `redis://[[user]:password@]host[:port][/db]`,
`rediss://...` (TLS, the system's CAs, the host name checked), `unix:///path.sock[?db=N]`. Another way of
finding the server (Sentinel, client certificates) is another function with the same signature, given to
`RedisStore(dial=...)`.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import parse_qs, unquote, urlsplit

from policies.stores.resp import RespConnection


def address(url: str) -> dict:
    """What `dial` needs from the URL: host and port or path, TLS, credentials, database."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
    else:
        db = parts.path.strip("/") or "0"
    return {"scheme": parts.scheme, "host": parts.hostname or "127.0.0.1", "port": parts.port or 6379,
            "path": parts.path, "tls": parts.scheme == "rediss", "db": int(db),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None}


async def connect(where: dict, timeout_s: float, tls: ssl.SSLContext | None = None) -> RespConnection:
    """A connection to `where` (as `address` gives it), authenticated and on its database."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        if where["scheme"] == "unix":
            _, conn = await loop.create_unix_connection(RespConnection, where["path"])
        else:
            if where["tls"] and tls is None:
                tls = ssl.create_default_context()
            _, conn = await loop.create_connection(RespConnection, where["host"], where["port"], ssl=tls,
                                                   server_hostname=where["host"] if tls else None)
        try:
            setup = []
            if where["password"] is not None:
                user = where["username"]
                setup.append(conn.call("AUTH", user, where["password"]) if user else conn.call("AUTH", where["password"]))
            if where["db"]:
                setup.append(conn.call("SELECT", where["db"]))
            for reply in setup:  # sent together, answered in order
                await reply
        except BaseException:
            conn.close()
            raise
    return conn


async def dial(url: str, timeout_s: float) -> RespConnection:
    return await connect(address(url), timeout_s)
