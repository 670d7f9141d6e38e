"""The stdout sink: lines to standard output, non-blocking, with backpressure.

Standard output is written through a Twisted file descriptor, so a slow
reader of the pipe fills its buffer, the descriptor pauses us as a
producer, and the sink's Deferreds fire late: the queue fills and the
connections pause, like any other slow sink.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.process import ProcessWriter
from twisted.python.failure import Failure
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import Scheme, SinkURL


@implementer(ISink, IPushProducer)
class StdoutSink:
    """
    Writes to a file descriptor (1 unless told otherwise).
    """

    def __init__(self, reactor: Any, fd: int = 1) -> None:
        self._reactor = reactor
        self._fd = fd
        self._writer: ProcessWriter | None = None
        self._paused = False
        self._resumed: Deferred[None] | None = None
        self._closed: Deferred[None] | None = None
        self._lost: Failure | None = None

    def open(self) -> Deferred[None]:
        self._writer = ProcessWriter(self._reactor, self, "stdout", self._fd)
        self._writer.registerProducer(self, True)
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        if self._lost is not None or self._writer is None:
            raise OSError(f"standard output is closed: {self._lost}")
        if lines:
            self._writer.write(b"\n".join(lines) + b"\n")
        if not self._paused:
            return succeed(None)
        self._resumed = Deferred()
        return self._resumed

    def close(self) -> Deferred[None]:
        if self._writer is None or self._lost is not None:
            return succeed(None)
        self._closed = Deferred()
        self._writer.unregisterProducer()
        self._writer.loseConnection()
        return self._closed

    # IPushProducer, as seen by the descriptor writing standard output.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        pass

    # What ProcessWriter reports to its owner.

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        self._lost = reason
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.errback(reason)
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)


@implementer(ISinkFactory)
class StdoutSinkFactory:
    description = "stdout:"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __call__(self) -> StdoutSink:
        return StdoutSink(self._reactor)


def _stdout_factory(url: SinkURL, reactor: Any) -> ISinkFactory:
    return StdoutSinkFactory(reactor)


#: C{stdout:}, which takes no options.
stdout_scheme = Scheme(_stdout_factory)
