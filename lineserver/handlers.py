"""Line handlers: what a connection does with its complete lines.

A handler is per connection and is built by a handler factory, so that a
handler that fails can be replaced by a fresh one (as the Elixir sink
recreated its crashed Buffer process) while the connection goes on.
"""

from __future__ import annotations

import time

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from typing_extensions import override
from zope.interface import Interface, implementer

from lineserver.ack import AckCounter, ack_line
from lineserver.flow import IAckOwner, Pause, SinkQueue
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


def tag_origin(connection: IConnection, lines: list[bytes]) -> list[bytes]:
    """
    @return: C{lines} as L{OriginLine}s of C{connection}, received now.
    """
    from lineserver.protocol import describe_address

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


@implementer(IPushProducer)
class _SinkProducer:
    """
    A handler that feeds the sink queue is itself the producer it
    registers there: a full queue pauses its connection for
    C{Pause.SINK}.  (The connection's producer for that reason is made
    only when the queue pauses, which is rare, not kept per connection.)
    """

    __slots__ = ()
    _connection: IConnection

    def pauseProducing(self) -> None:
        self._connection.producer(Pause.SINK).pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._connection.producer(Pause.SINK).resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """
        The queue is gone; the connection closes on its own path.
        """


@implementer(ILineHandler)
class SinkHandler(_SinkProducer):
    """
    Hand every batch of lines to the sink queue, unchanged.

    The handler registers with the queue as its connection's producer, so
    a full queue pauses it.  With C{origin}, each line is an L{OriginLine}.
    """

    __slots__ = ("_connection", "_queue")

    def __new__(
        cls, connection: IConnection, queue: SinkQueue, origin: bool = False
    ) -> SinkHandler:
        # The origin-tagging kind is a subclass: a flag per connection
        # would be one more slot on every handler.
        return object.__new__(_OriginSinkHandler if origin else cls)

    def __init__(
        self, connection: IConnection, queue: SinkQueue, origin: bool = False
    ) -> None:
        self._queue = queue
        self._connection = connection
        queue.register(self)

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        self._queue.put(lines, len(raw))

    def connection_lost(self) -> None:
        self._queue.unregister(self)


class _OriginSinkHandler(SinkHandler):
    """
    L{SinkHandler} for a sink that wants L{OriginLine}s.
    """

    __slots__ = ()

    @override
    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        self._queue.put(tag_origin(self._connection, lines), len(raw))


class IAcknowledging(Interface):
    """
    A handler that acknowledges lines (C{--ack}): a closing connection
    waits for it, so that lines accepted before an C{ERR} or a close get
    their C{ACK} first.
    """

    def acknowledged() -> Deferred[None] | None:
        """
        @return: None if every line handed to the sink is acknowledged,
            else a Deferred that fires once they are (it may never fire:
            the caller bounds the wait).
        """


@implementer(ILineHandler, IAckOwner, IAcknowledging)
class AckSinkHandler(_SinkProducer):
    """
    L{SinkHandler} with acknowledgements: each batch is put with this
    handler as its owner; when the sink confirms a batch, the connection
    is sent one C{ACK <n>} (see L{lineserver.ack}), written like an echo
    reply so that a client that does not read its ACKs is paused
    (C{Pause.OUTPUT}).  While lines wait, the latest ACK is repeated
    C{interval} seconds after the last one.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_connection",
        "_interval",
        "_origin",
        "_queue",
        "_repeat",
        "_waiters",
        "counter",
    )

    def __init__(
        self,
        connection: IConnection,
        queue: SinkQueue,
        clock: IReactorTime,
        interval: float,
        origin: bool = False,
    ) -> None:
        self._connection = connection
        self._origin = origin
        self._queue = queue
        self._clock = clock
        self._interval = interval
        self._repeat: IDelayedCall | None = None
        self._closed = False
        self._waiters: list[Deferred[None]] = []
        self.counter = AckCounter()
        queue.register(self)

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        if self._origin:
            lines = tag_origin(self._connection, lines)
        self.counter.put(len(lines))
        self._queue.put(lines, len(raw), self)
        if self._repeat is None and not self._closed:
            self._repeat = self._clock.callLater(self._interval, self._tick)

    def lines_durable(self, count: int) -> None:
        number = self.counter.durable(count)
        if self._closed:
            return
        if number is not None:
            self._connection.write(ack_line(number))
            if self._repeat is not None and self._repeat.active():
                self._repeat.reset(self._interval)
        if not self.counter.waiting:
            self._settled()

    def _tick(self) -> None:
        self._repeat = None
        number = self.counter.repeat()
        if number is None or self._closed:
            return
        self._connection.write(ack_line(number))
        self._repeat = self._clock.callLater(self._interval, self._tick)

    def _settled(self) -> None:
        repeat, self._repeat = self._repeat, None
        if repeat is not None and repeat.active():
            repeat.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def acknowledged(self) -> Deferred[None] | None:
        if not self.counter.waiting or self._closed:
            return None
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def connection_lost(self) -> None:
        self._closed = True
        self._queue.unregister(self)
        repeat, self._repeat = self._repeat, None
        if repeat is not None and repeat.active():
            repeat.cancel()
        self._waiters = []


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


@implementer(ILineHandlerFactory)
class AckSinkHandlerFactory:
    """
    Builds an L{AckSinkHandler} per connection (C{--ack}), all feeding one
    queue; C{interval} is C{--ack-interval}.
    """

    def __init__(self, queue: SinkQueue, clock: IReactorTime, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"the ACK interval must be positive, got {interval}")
        self.queue = queue
        self.clock = clock
        self.interval = interval
        #: Hand the queue L{OriginLine}s (the sink wants them).
        self.origin = False

    def __call__(self, connection: IConnection) -> ILineHandler:
        return AckSinkHandler(
            connection, self.queue, self.clock, self.interval, self.origin
        )

    @override
    def __repr__(self) -> str:
        return "sink with acknowledgements"
