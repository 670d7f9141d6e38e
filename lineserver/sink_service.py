"""SinkService: the permanent child that moves lines from the queue to a sink.

The queue outlives the service: if the sink fails, the supervisor builds a
fresh SinkService with a fresh sink around the same queue, and the batch
that failed is put back at the front, so no accepted line is lost to a
sink crash (a sink that failed half-way through a batch may see that batch
again: at least once, never zero times).

A stop flushes what is queued, then closes the sink.  The stop's Deferred
can be cancelled (a deadline): the service then gives the sink up, writes
nothing more, and closes it once the batch in flight, if any, has ended;
L{SinkService.unwritten} says what was left.

A sink that provides L{IPipelinedSink} may have several batches in flight
(the file sink group-committing them under one fsync); if one fails, it and
every batch sent after it are given back, in order (a sink that lets a
later batch succeed after an earlier one failed would see it again: at
least once, as after any crash).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.flow import Batch, SinkQueue
from lineserver.interfaces import ISink, ISinkFactory, ISupervisor
from lineserver.outage import is_outage
from lineserver.sinks import IImmediateSink, IPipelinedSink, IReopenable, ISpooled
from lineserver.stats import Stats

log = Logger(namespace="lineserver.sink")

#: Stats gauges of a sink with a disk spool, by the sink attribute each
#: reads (L{lineserver.sinks.spooling.SpoolingSink}): what the spool holds
#: besides this process's ledger (lines a previous process left there).
SPOOL_GAUGES = {
    "spool.recovered_lines": "recovered_lines",
    "spool.recovered_waiting": "recovered_waiting",
    "spool.lines": "lines_in_spool",
    "spool.bytes": "disk_bytes",
}


class SinkFailed(Exception):
    """
    The sink could not open or could not take a batch.
    """


def describe_failure(reason: Failure) -> str:
    """
    @return: the OS's words for an C{OSError} ("Permission denied"),
        the exception's text otherwise.
    """
    error = reason.value
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def queued_lines(queue: SinkQueue) -> int:
    """
    @return: how many lines C{queue} holds (not counting a batch in
        flight).
    """
    return queue.waiting_lines


@dataclass(eq=False)
class _Batch:
    """
    A batch handed to the sink and not yet confirmed.

    @ivar settled: given back to the queue, or given up (its outcome no
        longer counts).
    """

    taken: Batch
    settled: bool = False
    #: When it was handed to the sink (L{SinkService.timer}).
    started: float = 0.0

    @property
    def lines(self) -> list[bytes]:
        return self.taken.lines


def max_in_flight(sink: ISink | None) -> int:
    """
    @return: how many batches C{sink} may have in flight: 1, unless it
        provides L{IPipelinedSink}.
    """
    if sink is not None and IPipelinedSink.providedBy(sink):
        return max(1, int(sink.max_in_flight))
    return 1


class SinkService(Service):
    """
    Pumps batches from a L{SinkQueue} into an L{ISink}, one batch in flight.

    @ivar sink: the current sink, or None before C{startService}.
    @ivar failure: why the sink failed (to open or to write), or None.
    """

    def __init__(
        self,
        sink_factory: ISinkFactory,
        queue: SinkQueue,
        stats: Stats | None = None,
        max_batch_bytes: int = 1 << 20,
        on_written: Callable[[float, int], object] | None = None,
        timer: Callable[[], float] = time.monotonic,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param on_written: called with the seconds from a batch's hand-over
            to its confirmation, and its lines, for each confirmed batch
            (the sink write latency metric).
        @param clock: with a clock, lines put while the sink is idle are
            pumped once per reactor iteration (C{callLater(0)}), so that the
            reads of one iteration make one batch; without one, at once, at
            each put.
        """
        self._clock = clock
        self._soon: IDelayedCall | None = None
        self.on_written = on_written
        self.timer = timer
        self.sink_factory = sink_factory
        self.queue = queue
        self.stats = stats if stats is not None else Stats()
        self.max_batch_bytes = max_batch_bytes
        self.sink: ISink | None = None
        self.failure: Failure | None = None
        self._opening = False
        self._open = False
        self._failed = False
        self._flight: deque[_Batch] = deque()
        #: Batches the open sink may have in flight (L{max_in_flight}).
        self._window = 1
        #: The open sink's C{write_now} (L{IImmediateSink}), or None.
        self._write_now: Callable[[list[bytes]], bool] | None = None
        self._pumping = False
        self._abandoned = False
        self._idle: list[Deferred[None]] = []
        self._open_waiters: list[Deferred[None]] = []
        self._closing: Deferred[None] | None = None
        #: Log an outage (L{is_outage}) at debug level only: set by a
        #: supervisor that reports outages itself, at most every few seconds.
        self.quiet_outages = False
        #: The sink last closed: its figures are still read after the stop
        #: (the ledger is logged once the sink is closed).
        self._closed_sink: ISink | None = None
        # The ledger's view of this incarnation's sink (the newest service
        # registers last): delivered = confirmed - still spooled.
        self.stats.add_gauge("lines.spooled", lambda: self.spooled_lines)
        self.stats.add_gauge(
            "lines.delivered",
            lambda: self.stats.get("lines.confirmed") - self.spooled_lines,
        )

    def _spool_gauges(self) -> None:
        """
        A sink with a disk spool (L{ISpooled}): its figures outside the
        ledger (L{SPOOL_GAUGES}) become gauges, from its first open on.
        """
        sink = self.sink
        if sink is None or not ISpooled.providedBy(sink):
            return
        for name, attribute in SPOOL_GAUGES.items():
            self.stats.add_gauge(name, partial(self._spool_figure, attribute))

    def _spool_figure(self, attribute: str) -> int:
        """
        The spooling sink's C{attribute}, as it is now (or as its close
        left it).
        """
        sink = self._figures_from
        if sink is not None and ISpooled.providedBy(sink):
            return int(getattr(sink, attribute, 0))
        return 0

    @property
    def _figures_from(self) -> ISink | None:
        return self.sink if self.sink is not None else self._closed_sink

    @property
    def spooled_lines(self) -> int:
        """
        Lines the sink confirmed that are still in its spool (L{ISpooled}),
        not yet at its destination; 0 for a sink without a spool.  Once the
        sink is closed, as its close left it (a value read before could be
        stale: the spool goes on changing until it is closed).
        """
        sink = self._figures_from
        if sink is not None and ISpooled.providedBy(sink):
            return int(sink.spooled_lines)
        return 0

    @property
    def _writing(self) -> bool:
        return bool(self._flight)

    @override
    def startService(self) -> None:
        super().startService()
        self._opening = True
        try:
            self.sink = self.sink_factory()
            opened = maybeDeferred(self.sink.open)
        except Exception:
            opened = fail()
        opened.addCallbacks(self._opened, self._open_failed)

    def when_open(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once the sink is open, or fails with
            the reason it could not open (or L{SinkFailed} if the service
            stopped first).
        """
        if self._open:
            return succeed(None)
        if self.failure is not None:
            return fail(self.failure)
        waiter: Deferred[None] = Deferred()
        self._open_waiters.append(waiter)
        return waiter

    def _opened(self, _: object) -> None:
        self._opening = False
        if self._abandoned:
            self._close()
            return
        log.info("sink {sink} open", sink=self.sink_factory.description)
        self._spool_gauges()
        self._window = max_in_flight(self.sink)
        self._write_now = (
            self.sink.write_now if IImmediateSink.providedBy(self.sink) else None
        )
        self._open = True
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._pump()

    def _open_failed(self, reason: Failure) -> None:
        self._opening = False
        self._crash(reason, opening=True)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            window = self._window
            write_now = self._write_now
            while self._open and len(self._flight) < window and not self._failed:
                taken = self.queue.take(self.max_batch_bytes)
                if not taken.lines:
                    self.queue.when_ready(
                        self._pump if self._clock is None else self._pump_soon
                    )
                    self._notify_idle()
                    return
                if write_now is not None and not self._flight:
                    started = self.timer()
                    if write_now(taken.lines):
                        self._confirm(taken, started)
                        continue
                batch = _Batch(taken, started=self.timer())
                self._flight.append(batch)
                assert self.sink is not None
                written = maybeDeferred(self.sink.write, taken.lines)
                written.addCallbacks(
                    self._written,
                    self._write_failed,
                    callbackArgs=(batch,),
                    errbackArgs=(batch,),
                )
        finally:
            self._pumping = False

    def _pump_soon(self) -> None:
        """
        Lines arrived while the sink was idle: pump them, and whatever else
        this reactor iteration reads, in the next one.
        """
        if self._soon is None and self._clock is not None:
            self._soon = self._clock.callLater(0, self._pump_now)

    def _pump_now(self) -> None:
        self._soon = None
        self._pump()

    def _written(self, _: object, batch: _Batch) -> None:
        """
        The one place where a batch's write completes: it leaves the queue
        (its owners are acknowledged) and is counted as confirmed.
        """
        if batch.settled:
            self._ended_settled(batch)
            return
        self._flight.remove(batch)
        self._confirm(batch.taken, batch.started)
        if self._abandoned:
            if not self._writing:
                self._close()
            return
        self._pump()

    def _confirm(self, taken: Batch, started: float) -> None:
        lines = len(taken.lines)
        self.stats.incr("lines.confirmed", lines)
        self.queue.confirm_batch(taken)
        if self.on_written is not None:
            self.on_written(self.timer() - started, lines)

    def _ended_settled(self, batch: _Batch) -> None:
        """
        A batch given back or given up has ended its write.
        """
        if batch in self._flight:
            self._flight.remove(batch)
            if self._abandoned and not self._writing:
                self._close()

    def _write_failed(self, reason: Failure, batch: _Batch) -> None:
        if batch.settled:
            self._ended_settled(batch)
            return
        # This batch and those sent after it go back, the last first, so
        # that the queue's front keeps their order.  Those sent before it
        # may still succeed (a batch waiting for its fsync); one that fails
        # later goes back in front of these, where it belongs.
        index = self._flight.index(batch)
        for given in reversed(list(self._flight)[index:]):
            given.settled = True
            self.queue.give_back_batch(given.taken)
            self._flight.pop()
        self._crash(reason, opening=False)
        if self._abandoned:
            self._close()

    def _crash(self, reason: Failure, opening: bool) -> None:
        if self._failed:
            return
        self._failed = True
        self._open = False
        self.failure = reason
        self.stats.incr("sink.failures")
        if self.quiet_outages and is_outage(reason):
            # An outage: the supervisor says so, at most every few seconds.
            log.debug(
                "sink {sink} is down: {reason}",
                sink=self.sink_factory.description,
                reason=describe_failure(reason),
            )
        elif opening:
            log.failure(
                "could not open sink {sink}: {reason}",
                reason,
                sink=self.sink_factory.description,
                reason=describe_failure(reason),
            )
        else:
            log.failure(
                "sink {sink} failed: {reason}; its lines stay queued",
                reason,
                sink=self.sink_factory.description,
                reason=describe_failure(reason),
            )
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.errback(reason)
        self._notify_idle()
        parent = self.parent
        if ISupervisor.providedBy(parent):
            parent.child_failed(self, reason)

    def _notify_idle(self) -> None:
        if self._opening or self._writing or (self.queue and not self._failed):
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
        if self._failed or (not self._opening and not self._writing and not self.queue):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def reopen(self) -> Deferred[None]:
        """
        Ask the sink to reopen what it writes to (SIGHUP, after a log
        rotation), if it is open and can (L{IReopenable}); a failure is
        logged, and the sink goes on as it was.

        @return: a Deferred that fires when that is done (never fails).
        """
        sink = self.sink
        if not self._open or not IReopenable.providedBy(sink):
            return succeed(None)
        reopened = maybeDeferred(sink.reopen)

        def failed(reason: Failure) -> None:
            log.failure(
                "sink {sink} could not reopen: {reason}; it goes on as it was",
                reason,
                sink=self.sink_factory.description,
                reason=describe_failure(reason),
            )

        return reopened.addCallbacks(lambda _: None, failed)

    def unwritten(self) -> tuple[int, int]:
        """
        @return: lines and bytes accepted for this sink and not confirmed
            written: those queued and the batch in flight.
        """
        return self.queue.buffered_lines, self.queue.buffered

    def drop_unwritten(self, reason: str) -> int:
        """
        Give up every line queued or in flight (the server stops without
        them), counting them as C{lines.dropped.<reason>} so that the
        ledger still balances.  A batch in flight that the sink confirms
        later stays counted as dropped.

        @return: how many lines were dropped.
        """
        for batch in self._flight:
            batch.settled = True
        dropped = self.queue.drop_all()
        if dropped:
            self.stats.incr(f"lines.dropped.{reason}", dropped)
        return dropped

    @override
    def stopService(self) -> Deferred[None]:
        """
        Write out what is queued, then close the sink.

        Cancelling the Deferred gives the sink up: nothing more is written,
        and the sink is closed once the write in flight, if any, has ended.
        """
        super().stopService()
        if self._closing is not None:
            return self._closing
        self._closing = Deferred(canceller=self._abandon)
        done = self.flushed()
        done.addCallback(lambda _: self._close())
        done.addBoth(self._stop_ended)
        return self._closing

    def _stop_ended(self, _: object) -> None:
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.errback(SinkFailed("stopped before the sink opened"))
        if self._closing is not None and not self._closing.called:
            self._closing.callback(None)

    def _abandon(self, _: Deferred[None]) -> None:
        log.debug("giving up sink {sink}", sink=self.sink_factory.description)
        self._abandoned = True
        self._open = False
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.errback(SinkFailed("given up before the sink opened"))
        if not self._opening and not self._writing:
            self._close()

    def _close(self) -> Deferred[Any]:
        self._open = False
        sink, self.sink = self.sink, None
        if sink is not None:
            self._closed_sink = sink
        if sink is None:
            return succeed(None)
        closed = maybeDeferred(sink.close)

        def report(result: object) -> None:
            if ISpooled.providedBy(sink):
                # What stays in the spool, for the ledger the stop logs
                # once the sink is gone (no gauge may have read it yet).
                self._spooled = int(sink.spooled_lines)
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
