"""Opening the store's hot-path connection (`policies.stores.resp`) where `[store]` says Redis is.

The same target and settings as redis-py's pool (`policies.stores.redis_connect`): the URL parsed into a
`RedisTarget` (a server, a Unix socket, or the master the sentinels name), and `Connect` (connect timeout,
TLS CA and client certificate). With Sentinel, the master is asked of redis-py's `Sentinel` each time the
connection is opened, so after a failover the next connection goes to the promoted replica. Then AUTH (ACL
user and password) and SELECT, sent together. The store calls `dial` again whenever its connection was lost.
"""

from __future__ import annotations

import asyncio
import ssl

from policies.stores.redis_connect import Connect, RedisTarget
from policies.stores.resp import RespConnection


def tls_context(connect: Connect) -> ssl.SSLContext:
    """The system's CAs unless a CA file is named; the server's name is always checked against its certificate
    (as redis-py is told: ssl_cert_reqs required, ssl_check_hostname)."""
    context = ssl.create_default_context(cafile=connect.tls_ca_file)
    if connect.tls_cert_file:
        context.load_cert_chain(connect.tls_cert_file, connect.tls_key_file)
    return context


async def close_all(dialing: asyncio.Task | None, conn: RespConnection | None, client, sentinel) -> None:
    """Ends what a Redis-backed store holds: a dial on its way, the hot connection, redis-py's client with its
    pool, and the sentinels' clients."""
    if dialing is not None:
        dialing.cancel()
        await asyncio.gather(dialing, return_exceptions=True)
    if conn is not None:
        conn.close()
    if client is not None:
        await client.aclose()
        await client.connection_pool.disconnect()
    if sentinel is not None:
        await sentinel.aclose()


async def dial(target: RedisTarget, connect: Connect, sentinel=None) -> RespConnection:
    """A connection to the server, authenticated and on its database, within `connect_timeout_s`."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect.connect_timeout_s):
        if target.path is not None:
            _, conn = await loop.create_unix_connection(RespConnection, target.path)
        else:
            if target.sentinel:
                host, port = await sentinel.discover_master(target.service)
            else:
                (host, port), = target.hosts
            tls = tls_context(connect) if target.tls else None
            _, conn = await loop.create_connection(RespConnection, host, port, ssl=tls,
                                                   server_hostname=host if tls else None)
        try:
            setup = []
            if target.password is not None:
                setup.append(conn.call("AUTH", target.username, target.password) if target.username
                             else conn.call("AUTH", target.password))
            if target.db:
                setup.append(conn.call("SELECT", target.db))
            for reply in setup:  # sent together, answered in order
                await reply
        except BaseException:
            conn.close()
            raise
    return conn
