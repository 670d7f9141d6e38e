"""Line handlers: what a connection does with its complete lines.

A handler is per connection and is built by a handler factory, so that a
handler that fails can be replaced by a fresh one (as the Elixir sink
recreated its crashed Buffer process) while the connection goes on.
"""

from __future__ import annotations

import time

from typing_extensions import override
from zope.interface import implementer

from lineserver.flow import Pause, SinkQueue
from lineserver.interfaces import IConnection, ILineHandler, ILineHandlerFactory


class LineFailed(Exception):
    """
    Raised by a handler to say which line of a batch failed.

    The lines before C{index} were handled; the one at C{index} is counted
    as failed; the ones after it are handed to a fresh handler.
    """

    def __init__(self, index: int, reason: BaseException) -> None:
        super().__init__(f"line {index} of the batch failed: {reason!r}")
        self.index = index
        self.reason = reason


@implementer(ILineHandler)
class EchoHandler:
    """
    Write every line back exactly as it came, terminator included.

    The reply is one write of the read's raw bytes; the transport's
    producer registration pauses reading when the client does not read.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: IConnection) -> None:
        self._connection = connection

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        self._connection.write(raw)

    def connection_lost(self) -> None:
        pass


class OriginLine(bytes):
    """
    A line (its bytes unchanged) that also says where and when it came
    from, for a sink that asks (C{wants_origin}: the Redis sinks shard by
    connection and may store the peer and the receive time).

    @ivar connection: the connection's identity, unique in this process.
    @ivar peer: the client's address (behind a proxy, the header's).
    @ivar received: when its read arrived (POSIX seconds).
    """

    connection: str
    peer: str
    received: float


def wants_origin(sink: object) -> bool:
    """
    @return: whether C{sink} (an ISinkFactory) wants L{OriginLine}s.
    """
    return bool(getattr(sink, "wants_origin", False))


@implementer(ILineHandler)
class SinkHandler:
    """
    Hand every batch of lines to the sink queue, unchanged.

    The connection registers with the queue as a producer, so a full queue
    pauses it.  With C{origin}, each line is an L{OriginLine}.
    """

    __slots__ = ("_connection", "_origin", "_producer", "_queue")

    def __init__(
        self, connection: IConnection, queue: SinkQueue, origin: bool = False
    ) -> None:
        self._queue = queue
        self._connection = connection
        self._origin = origin
        self._producer = connection.producer(Pause.SINK)
        queue.register(self._producer)  # type: ignore[arg-type]

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        if self._origin:
            lines = self._tag(lines)
        self._queue.put(lines, len(raw))

    def _tag(self, lines: list[bytes]) -> list[bytes]:
        from lineserver.protocol import describe_address

        connection = self._connection
        identity = str(connection.identity)
        peer = describe_address(connection.peer)
        received = time.time()
        tagged: list[bytes] = []
        for line in lines:
            origin = OriginLine(line)
            origin.connection = identity
            origin.peer = peer
            origin.received = received
            tagged.append(origin)
        return tagged

    def connection_lost(self) -> None:
        self._queue.unregister(self._producer)  # type: ignore[arg-type]


class PerLineHandler:
    """
    A base for handlers that want one call per line, like C{lineReceived}.

    Subclasses implement L{line_received}; a line that raises is reported as
    L{LineFailed} so that only that line is counted as failed.
    """

    def line_received(self, line: bytes) -> None:
        raise NotImplementedError

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        for index, line in enumerate(lines):
            try:
                self.line_received(line)
            except Exception as error:
                raise LineFailed(index, error) from error

    def connection_lost(self) -> None:
        pass


@implementer(ILineHandlerFactory)
class EchoHandlerFactory:
    """
    Builds an L{EchoHandler} per connection (C{--mode echo}).
    """

    def __call__(self, connection: IConnection) -> ILineHandler:
        return EchoHandler(connection)

    @override
    def __repr__(self) -> str:
        return "echo"


@implementer(ILineHandlerFactory)
class SinkHandlerFactory:
    """
    Builds a L{SinkHandler} per connection, all feeding one queue.

    @ivar origin: hand the queue L{OriginLine}s (the sink wants them).
    """

    def __init__(self, queue: SinkQueue, origin: bool = False) -> None:
        self.queue = queue
        self.origin = origin

    def __call__(self, connection: IConnection) -> ILineHandler:
        return SinkHandler(connection, self.queue, self.origin)

    @override
    def __repr__(self) -> str:
        return "sink"
