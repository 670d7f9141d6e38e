"""RESP, the Redis wire protocol: encoding commands and parsing replies.

Pure code (bytes in, replies out), apart from any socket, so that it is
tested on its own; L{lineserver.sinks.redis_client} is the Twisted glue.
Only what a sink needs: commands are arrays of bulk strings (RESP2), and
replies are simple strings, errors, integers, bulk strings and arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class RedisError:
    """
    An error reply (C{-ERR ...}, C{-MOVED 3999 127.0.0.1:6381}).

    A value, not an exception: a pipelined reply stream carries errors in
    line with the other replies, and the caller decides what each means.
    """

    message: str

    @property
    def code(self) -> str:
        """
        @return: the first word (C{ERR}, C{MOVED}, C{OOM}, C{NOPERM}).
        """
        return self.message.split(" ", 1)[0]


Reply: TypeAlias = "bytes | int | list[Reply] | RedisError | None"
"""
A parsed reply: simple and bulk strings are bytes, nil is None.
"""


class ProtocolError(Exception):
    """
    The server sent bytes that are not RESP.
    """


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """
    @return: C{args} as a RESP array of bulk strings.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = arg
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class ReplyParser:
    """
    Incremental RESP2 reply parser: feed bytes, take complete replies.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Reply]:
        """
        @return: every reply completed by C{data}, in order.
        @raise ProtocolError: for bytes that are not RESP.
        """
        buffer = self._buffer + data if self._buffer else data
        replies: list[Reply] = []
        position = 0
        while True:
            parsed = _parse(buffer, position)
            if parsed is None:
                break
            reply, position = parsed
            replies.append(reply)
        self._buffer = buffer[position:]
        return replies


def _parse(buffer: bytes, position: int) -> tuple[Reply, int] | None:
    end = buffer.find(b"\r\n", position)
    if end < 0:
        return None
    kind = buffer[position : position + 1]
    body = buffer[position + 1 : end]
    after = end + 2
    if kind == b"+":
        return body, after
    if kind == b"-":
        return RedisError(body.decode("utf-8", "replace")), after
    if kind == b":":
        return _integer(body), after
    if kind == b"$":
        size = _integer(body)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return None
        return buffer[after : after + size], after + size + 2
    if kind == b"*":
        count = _integer(body)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            parsed = _parse(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise ProtocolError(f"not a RESP reply: {buffer[position:end][:40]!r}")


def _integer(body: bytes) -> int:
    try:
        return int(body)
    except ValueError:
        raise ProtocolError(f"not a RESP integer: {body[:40]!r}") from None
