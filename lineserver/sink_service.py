"""SinkService: the permanent child that moves lines from the queue to a sink.

The queue outlives the service: if the sink fails, the supervisor builds a
fresh SinkService with a fresh sink around the same queue, and the batch
that failed is put back at the front, so no accepted line is lost to a
sink crash (a sink that failed half-way through a batch may see that batch
again: at least once, never zero times).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.flow import SinkQueue
from lineserver.interfaces import ISink, ISinkFactory, ISupervisor
from lineserver.stats import Stats

log = Logger(namespace="lineserver.sink")


class SinkFailed(Exception):
    """
    The sink could not open or could not take a batch.
    """


class SinkService(Service):
    """
    Pumps batches from a L{SinkQueue} into an L{ISink}, one batch in flight.

    @ivar sink: the current sink, or None before C{startService}.
    """

    def __init__(
        self,
        sink_factory: ISinkFactory,
        queue: SinkQueue,
        stats: Stats | None = None,
        max_batch_bytes: int = 1 << 20,
    ) -> None:
        self.sink_factory = sink_factory
        self.queue = queue
        self.stats = stats if stats is not None else Stats()
        self.max_batch_bytes = max_batch_bytes
        self.sink: ISink | None = None
        self._open = False
        self._failed = False
        self._writing = False
        self._pumping = False
        self._idle: list[Deferred[None]] = []
        self._closing: Deferred[None] | None = None

    @override
    def startService(self) -> None:
        super().startService()
        self.sink = self.sink_factory()
        opened = maybeDeferred(self.sink.open)
        opened.addCallbacks(self._opened, self._crash)

    def _opened(self, _: object) -> None:
        log.info("sink {sink} open", sink=self.sink_factory.description)
        self._open = True
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._open and not self._writing and not self._failed:
                lines, cost = self.queue.take(self.max_batch_bytes)
                if not lines:
                    self.queue.when_ready(self._pump)
                    self._notify_idle()
                    return
                self._writing = True
                assert self.sink is not None
                written = maybeDeferred(self.sink.write, lines)
                written.addCallbacks(
                    self._written,
                    self._write_failed,
                    callbackArgs=(len(lines), cost),
                    errbackArgs=(lines, cost),
                )
        finally:
            self._pumping = False

    def _written(self, _: object, count: int, cost: int) -> None:
        self._writing = False
        self.queue.confirm(cost)
        self.stats.incr("lines.delivered", count)
        self._pump()

    def _write_failed(self, reason: Failure, lines: list[bytes], cost: int) -> None:
        self._writing = False
        self.queue.give_back(lines, cost)
        self._crash(reason)

    def _crash(self, reason: Failure) -> None:
        if self._failed:
            return
        self._failed = True
        self._open = False
        self.stats.incr("sink.failures")
        log.failure(
            "sink {sink} failed; its lines stay queued",
            reason,
            sink=self.sink_factory.description,
        )
        self._notify_idle()
        parent = self.parent
        if ISupervisor.providedBy(parent):
            parent.child_failed(self, reason)

    def _notify_idle(self) -> None:
        if self._writing or (self.queue and not self._failed):
            return
        waiters, self._idle = self._idle, []
        for waiter in waiters:
            waiter.callback(None)

    def flushed(self) -> Deferred[None]:
        """
        @return: a Deferred that fires when the queue is empty and nothing
            is in flight (or at once, if the sink has failed: then what is
            left stays queued for the next incarnation).
        """
        if self._failed or (not self._writing and not self.queue):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    @override
    def stopService(self) -> Deferred[None]:
        """
        Write out what is queued, then close the sink.
        """
        super().stopService()
        if self._closing is not None:
            return self._closing
        done = self.flushed()
        done.addCallback(lambda _: self._close())
        self._closing = done
        return done

    def _close(self) -> Deferred[Any]:
        self._open = False
        sink, self.sink = self.sink, None
        if sink is None:
            return succeed(None)
        closed = maybeDeferred(sink.close)

        def report(result: object) -> None:
            if isinstance(result, Failure):
                log.failure(
                    "sink {sink} failed to close",
                    result,
                    sink=self.sink_factory.description,
                )
            else:
                log.info("sink {sink} closed", sink=self.sink_factory.description)

        closed.addBoth(report)
        return closed
