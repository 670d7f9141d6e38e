"""A pipelining Redis connection on a Twisted protocol.

Commands go out as soon as they are given, without waiting for replies;
replies come back in order, and each fires its command's Deferred (an
error reply is a L{RedisError} value, not a failure, so that a pipeline
can look at every reply).  When the connection is lost, every command
still waiting fails with L{ConnectionLost}: the caller cannot know whether
Redis ran it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.sinks.redis_resp import Reply, ReplyParser, encode_command


class RedisProtocol(Protocol):
    """
    One connection to one Redis server.

    @ivar closed: a Deferred that fires when the connection is lost
        (C{lost_reason} then says why).
    """

    def __init__(self) -> None:
        self._parser = ReplyParser()
        # Pipelines waiting for replies, oldest first: how many replies
        # each wants, those it has, and its Deferred.
        self._waiting: deque[tuple[int, list[Reply], Deferred[list[Reply]]]] = deque()
        self.closed: Deferred[None] = Deferred()
        self.lost_reason: Failure | None = None
        self.connected_ = False

    @override
    def connectionMade(self) -> None:
        self.connected_ = True

    def send(self, data: bytes, replies: int) -> Deferred[list[Reply]]:
        """
        Write C{data}, already encoded commands, in one write.

        @param replies: how many commands C{data} holds.
        @return: a Deferred that fires with their replies, in order, or
            fails with C{ConnectionLost} if the connection goes first.
        """
        waiter: Deferred[list[Reply]] = Deferred()
        if not self.connected_ or self.transport is None:
            waiter.errback(ConnectionLost("not connected to Redis"))
            return waiter
        self._waiting.append((replies, [], waiter))
        self.transport.write(data)
        return waiter

    def pipeline(
        self, commands: Sequence[Sequence[bytes | str | int]]
    ) -> Deferred[list[Reply]]:
        """
        @return: a Deferred that fires with the replies to C{commands}.
        """
        return self.send(b"".join(encode_command(c) for c in commands), len(commands))

    def command(self, *args: bytes | str | int) -> Deferred[Reply]:
        """
        @return: a Deferred that fires with the reply to one command.
        """
        return self.pipeline([args]).addCallback(lambda replies: replies[0])

    @override
    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except Exception:
            # Not Redis, or a bug: nothing after this can be trusted.
            transport: Any = self.transport
            transport.abortConnection()
            return
        waiting = self._waiting
        for reply in replies:
            if not waiting:
                break
            wanted, got, waiter = waiting[0]
            got.append(reply)
            if len(got) == wanted:
                waiting.popleft()
                waiter.callback(got)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        self.lost_reason = reason
        # Whoever owns this connection hears first that it is gone, so
        # that the failed pipelines below do not pick it again.
        if not self.closed.called:
            self.closed.callback(None)
        waiting, self._waiting = self._waiting, deque()
        for _, _, waiter in waiting:
            waiter.errback(ConnectionLost(f"Redis connection lost: {reason.value}"))

    def close(self) -> None:
        if self.transport is not None and self.connected_:
            self.transport.loseConnection()
