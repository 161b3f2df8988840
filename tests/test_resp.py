"""The store's own RESP connection (policies/stores/resp.py): replies parsed however the bytes are split,
matched to their commands in order, errors as errors, and every waiting call failed when the connection goes."""

from __future__ import annotations

import asyncio

import pytest

from policies.stores.resp import ConnectionLost, ReplyError, RespConnection, encode

REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),  # a bulk string holding CRLF
    (b"$-1\r\n", None),
    (b"*2\r\n*2\r\n:1\r\n:2\r\n$0\r\n\r\n", [[1, 2], b""]),
    (b"*0\r\n", []),
    (b"_\r\n", None),
    (b",1.5\r\n", 1.5),
    (b"#t\r\n", True),
    (b"%1\r\n+k\r\n:7\r\n", [b"k", 7]),
]


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def connected() -> tuple[RespConnection, Transport]:
    conn, transport = RespConnection(), Transport()
    conn.connection_made(transport)
    return conn, transport


def test_encode_is_a_resp_array_of_bulk_strings():
    assert encode("EVALSHA", b"ab", 0, 1.5) == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$3\r\n1.5\r\n"


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7])
async def test_replies_split_anywhere_reach_their_commands_in_order(split):
    conn, transport = connected()
    futures = [conn.call("X", i) for i in range(len(REPLIES))]
    assert transport.written.count(b"*2\r\n$1\r\nX\r\n") == len(REPLIES)  # each sent at once: pipelined
    wire = b"".join(raw for raw, _ in REPLIES)
    for i in range(0, len(wire), split):
        conn.data_received(wire[i:i + split])
    assert [f.result() for f in futures] == [value for _, value in REPLIES]


async def test_an_error_reply_fails_its_call_only():
    conn, _ = connected()
    first, second = conn.call("EVALSHA", "x"), conn.call("PING")
    conn.data_received(b"-NOSCRIPT No matching script.\r\n+PONG\r\n")
    with pytest.raises(ReplyError) as error:
        first.result()
    assert error.value.noscript and second.result() == b"PONG" and not conn.closed


async def test_a_lost_connection_fails_every_call_waiting_and_later_ones():
    conn, _ = connected()
    waiting = [conn.call("PING") for _ in range(3)]
    conn.data_received(b"+PONG\r\n$10\r\nhalf")
    conn.connection_lost(None)
    assert waiting[0].result() == b"PONG"
    for future in waiting[1:]:
        with pytest.raises(ConnectionLost):
            future.result()
    with pytest.raises(ConnectionLost):
        await conn.call("PING")


async def test_garbage_or_an_unasked_reply_closes_the_connection():
    conn, transport = connected()
    waiting = conn.call("PING")
    conn.data_received(b"?what\r\n")
    assert transport.closed and conn.closed
    with pytest.raises(ConnectionLost):
        waiting.result()
    conn, transport = connected()
    conn.data_received(b"+OK\r\n")  # nobody asked
    assert transport.closed


async def test_a_call_given_up_on_has_its_reply_read_and_dropped():
    conn, _ = connected()
    gone, kept = conn.call("A"), conn.call("B")
    gone.cancel()
    conn.data_received(b"+a\r\n+b\r\n")
    assert kept.result() == b"b"
    await asyncio.sleep(0)
