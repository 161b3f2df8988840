"""A lean RESP client for the store's hot path: one connection, commands pipelined, replies matched in order.

Why not redis-py here: its asyncio client spent 50-85 us of CPU per EVALSHA on this machine (stream reader,
command layer, RESP3 parser in Python, a pooled connection taken and given back per call), as much as the
proxy's own work on a request. This protocol costs a few microseconds a call: `data_received` gets the bytes
from the event loop, a reply is parsed where it lies, and the oldest waiting future gets it. Commands sent
while others are on their way go out at once (pipelining): the replies come back in the order sent.

Only what the store's script calls need: commands out, and replies in (simple strings, errors, integers,
bulk strings, arrays; RESP3's null, double, boolean, map and set too, for a server that speaks it). How the
connection is opened (address, TLS, credentials, database) is not this module's business: `open` takes a
transport made elsewhere (`policies.stores.redis_dial`).
"""

from __future__ import annotations

import asyncio
from collections import deque


class ReplyError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`): the server answered; the connection is fine."""

    @property
    def noscript(self) -> bool:
        return self.args[0].startswith("NOSCRIPT")


class ConnectionLost(ConnectionError):
    """The connection closed, or was closed, with this call's reply still owed."""


def encode(*args: bytes | str | int | float) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


_INCOMPLETE = object()


def parse(buf: bytes | bytearray, pos: int):
    """(reply, position after it), or (_INCOMPLETE, pos) when the buffer does not hold all of it yet."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    line = buf[pos + 1:end]
    pos = end + 2
    if kind == 36:  # $ bulk string
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind in (42, 37, 126):  # * array, % map, ~ set
        n = int(line)
        if n < 0:
            return None, pos
        if kind == 37:
            n *= 2
        items = []
        for _ in range(n):
            item, pos = parse(buf, pos)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, pos
    if kind == 43:  # + simple string
        return bytes(line), pos
    if kind == 58:  # : integer
        return int(line), pos
    if kind == 45:  # - error
        return ReplyError(bytes(line).decode(errors="replace")), pos
    if kind == 95:  # _ null
        return None, pos
    if kind == 44:  # , double
        return float(line), pos
    if kind == 35:  # # boolean
        return line == b"t", pos
    raise ConnectionLost(f"unexpected reply type {chr(kind)!r}")


class RespConnection(asyncio.Protocol):
    """One connection to Redis. `call(*args)` sends a command and returns the future of its reply (an error
    reply is set as a `ReplyError` exception). Any number may be on their way; replies are matched in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiting: deque[asyncio.Future] = deque()
        self._loop = asyncio.get_running_loop()
        # A subscriber's connection (SUBSCRIBE): what arrives with no call waiting is a message, given to this.
        self.on_push = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            data = buf
        waiting = self._waiting
        pos, size = 0, len(data)
        try:
            while pos < size:
                reply, end = parse(data, pos)
                if reply is _INCOMPLETE:
                    break
                pos = end
                if not waiting:
                    if self.on_push is None:
                        raise ConnectionLost("a reply nobody asked for")
                    self.on_push(reply)
                    continue
                future = waiting.popleft()
                if future.done():  # its caller gave up (a timeout): the reply is read and dropped
                    continue
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (ConnectionLost, ValueError) as exc:  # out of step with the server: nothing after can be trusted
            self.close(ConnectionLost(str(exc)))
            return
        if pos == size:
            buf.clear()
        elif data is buf:
            del buf[:pos]
        else:
            buf += data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost("redis closed the connection" if exc is None else f"connection lost: {exc}"))

    # --- calls ----------------------------------------------------------------------------------------------

    def call(self, *args) -> asyncio.Future:
        return self.send(encode(*args))

    def send(self, command: bytes) -> asyncio.Future:
        """An encoded command (`encode`): its reply's future."""
        future = self._loop.create_future()
        if self.closed:
            future.set_exception(ConnectionLost("the connection is closed"))
            return future
        self._waiting.append(future)
        self.transport.write(command)
        return future

    def close(self, exc: Exception | None = None) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._fail(exc or ConnectionLost("the connection was closed"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiting = self._waiting
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_exception(exc)
