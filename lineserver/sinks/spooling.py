"""The disk spool as a sink around a sink: clients are not paused by an outage.

L{SpoolingSink} wraps any L{ISink}.  While the spool is empty and the
wrapped sink keeps up, a batch goes straight to it and is confirmed when
it confirms.  When the wrapped sink fails with an outage, or has not
confirmed a batch within C{spool_after} seconds, batches go to the spool
(L{lineserver.spool}) and are confirmed once fsynced there; a replay feeds
them to the wrapped sink in order, and segment files are deleted once it
has confirmed every record in them.  Once spooling starts, every batch
goes through the spool until it has drained, so order is kept.

At open, what the spool holds (after a SIGKILL, say) is replayed before
anything new; a record torn at a segment's end is cut off and logged.  At
C{max_bytes} on disk, writes wait (the queue fills and clients are paused)
until the replay has freed a segment.

The wrapped sink's outages are handled here: it is closed and built anew
from its factory, with capped backoff, forever, with a log line at most
every L{COMPLAINT_INTERVAL} seconds.  Anything else it raises is a bug:
it fails this sink's next write, so the supervisor restarts the whole
sink (and the restart intensity applies), and the spool is replayed by
the next one.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.outage import COMPLAINT_INTERVAL, is_outage, outage_backoff
from lineserver.sinks import IReopenable, ISpooled
from lineserver.spool import HEADER, MAGIC, Record, SegmentStore

log = Logger(namespace="lineserver.spool")

#: Default C{--spool-max}: 4 GiB of segment files.
DEFAULT_MAX_BYTES = 4 << 30

#: Seconds a batch may wait for the wrapped sink before it is spooled.
DEFAULT_SPOOL_AFTER = 1.0

#: Bytes of spooled lines handed to the wrapped sink in one replay batch.
REPLAY_BATCH_BYTES = 1 << 20

#: Seconds the close waits for the wrapped sink's own close.
CLOSE_WAIT = 5.0

InThread = Callable[..., "Deferred[Any]"]


def _segment_size(max_bytes: int) -> int:
    """
    Segments small enough that the cap frees space in steps (a segment is
    deleted only when all of it is delivered), large enough to be few.
    """
    return max(64 << 10, min(64 << 20, max_bytes // 8))


@dataclass(eq=False)
class _Direct:
    """
    A batch handed straight to the wrapped sink.

    @ivar copying: the wrapped sink was too slow: a copy is being spooled.
    @ivar copied: that copy is fsynced, and the batch's Deferred has fired.
    @ivar result: the wrapped sink's outcome, once it came.
    """

    lines: list[bytes]
    done: Deferred[None] = field(default_factory=Deferred)
    timer: IDelayedCall | None = None
    copying: bool = False
    copied: bool = False
    ended: bool = False
    result: object = None


@implementer(ISink, ISpooled, IReopenable)
class SpoolingSink:
    """
    An L{ISink} that spools what its wrapped sink cannot take now.

    @ivar spooled_lines: lines this process confirmed by spooling them and
        the wrapped sink has not confirmed yet (L{ISpooled}).  Lines found
        in the spool at open are not among them: this process never
        received them, so its ledger (received = delivered + queued +
        spooled + dropped) must not count them.
    @ivar recovered_lines: lines found in the spool at open.
    @ivar recovered_waiting: those of them not yet confirmed by the wrapped
        sink (they are replayed first).
    @ivar replayed_lines: lines from the spool the wrapped sink confirmed.
    @ivar damaged_segments: segments whose damaged tail was cut at open.
    @ivar dropped_bytes: bytes cut off them.
    @ivar lost_lines: spooled lines found damaged when read back (the
        disk changed them after they were written); never expected.
    """

    @property
    def lines_in_spool(self) -> int:
        """
        Every line the spool holds for the wrapped sink, from before the
        last open included.
        """
        return self.spooled_lines + self.recovered_waiting

    @property
    def disk_bytes(self) -> int:
        """
        Bytes of the spool's segment files on disk (what C{--spool-max}
        caps).
        """
        return self._disk_bytes

    def __init__(
        self,
        inner: ISinkFactory,
        directory: str,
        clock: Any,
        max_bytes: int = DEFAULT_MAX_BYTES,
        spool_after: float = DEFAULT_SPOOL_AFTER,
        in_thread: InThread | None = None,
        backoff: Callable[[int], float] | None = None,
        segment_bytes: int | None = None,
        previous: SpoolingSink | None = None,
    ) -> None:
        """
        @param clock: timers; also the reactor the spool's thread reports
            to, unless C{in_thread} is given.
        @param in_thread: runs a blocking call and returns a Deferred of
            its result (tests run it synchronously); by default a private
            thread, one call at a time.
        @param previous: the spooling sink this one replaces in the same
            process (the supervisor restarted the sink): what it spooled
            is still this process's, and spooled, not recovered.
        """
        self.inner_factory = inner
        self.directory = directory
        self.description = f"{inner.description} (spool {directory})"
        self.max_bytes = max_bytes
        self.spool_after = spool_after
        self.spooled_lines = 0
        self.recovered_lines = 0
        self.recovered_waiting = 0
        self.replayed_lines = 0
        self.damaged_segments = 0
        self.dropped_bytes = 0
        self.lost_lines = 0
        self._previous = previous
        self._clock = clock
        self._pool: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        self._spill_trigger: Any = None
        self._spilling = False
        self._in_thread = in_thread
        self._backoff = backoff if backoff is not None else outage_backoff()
        self._store = SegmentStore(directory, segment_bytes or _segment_size(max_bytes))
        self._disk_bytes = 0
        #: Spooled records not yet confirmed by the wrapped sink.
        self._records: deque[Record] = deque()
        #: How many of them, from the front, the wrapped sink has now.
        self._sent = 0
        self._appending = 0
        self._waiting: deque[tuple[list[bytes], Deferred[None]]] = deque()
        self._inner: ISink | None = None
        self._inner_open = False
        self._direct: _Direct | None = None
        self._replaying = False
        self._retry: IDelayedCall | None = None
        self._attempt = 0
        self._down_since: float | None = None
        self._complained = float("-inf")
        self._broken: Failure | None = None
        self._closing = False
        self._closed: Deferred[None] | None = None
        self._busy: set[Deferred[Any]] = set()

    # -- ISink --------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """
        Recover the spool, then open the wrapped sink; an outage there
        does not fail the open (lines are spooled meanwhile), a bug does.
        """
        if self._in_thread is None:
            pool = self._pool = ThreadPool(1, 1, name=f"spool {self.directory}")
            pool.start()
            # Stop the thread as the reactor stops, even if close never
            # comes (a stop that gave up on the sink).
            self._shutdown_trigger = self._clock.addSystemEventTrigger(
                "during", "shutdown", pool.stop
            )
            self._spill_trigger = self._clock.addSystemEventTrigger(
                "before", "shutdown", self.spill
            )
            clock = self._clock
            self._in_thread = lambda f, *a: deferToThreadPool(clock, pool, f, *a)
        recovered = self._run(self._store.open)

        def opened(result: Any) -> Deferred[None]:
            self._recovered(result)
            self._disk_bytes = self._store.disk_bytes
            return self._open_inner(first=True)

        def failed(reason: Failure) -> Failure:
            self._stop_pool()
            return reason

        return recovered.addCallback(opened).addErrback(failed)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        """
        Straight to the wrapped sink if it is up and nothing is spooled;
        else into the spool.

        @return: a Deferred that fires once the wrapped sink confirmed
            the batch, or once it is fsynced in the spool.
        """
        if self._broken is not None:
            broken, self._broken = self._broken, None
            return fail(broken)
        if self._inner_open and not self._spooling and self._direct is None:
            return self._write_direct(lines)
        return self._spool(lines)

    def reopen(self) -> Deferred[None]:
        inner = self._inner
        if self._inner_open and IReopenable.providedBy(inner):
            reopened: Deferred[None] = maybeDeferred(inner.reopen)
            return reopened
        return succeed(None)

    def close(self) -> Deferred[None]:
        """
        Let the spool's own writes end, close the wrapped sink (without
        waiting for a write it may be stuck in: that batch is spooled),
        and leave what is spooled for the next start.
        """
        if self._closed is not None:
            return self._closed
        self._closing = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiting, self._waiting = self._waiting, deque()
        for _, done in waiting:
            done.errback(Failure(RuntimeError("the spool closed")))
        self._closed = Deferred.fromCoroutine(self._close())
        return self._closed

    async def _close(self) -> None:
        while self._busy:
            # A failure is reported where it happened.
            with contextlib.suppress(Exception):
                await next(iter(self._busy))
        inner, self._inner = self._inner, None
        self._inner_open = False
        if inner is not None:
            closing: Deferred[Any] = maybeDeferred(inner.close)
            closing.addTimeout(CLOSE_WAIT, self._clock)
            try:
                await closing
            except Exception as error:
                log.warn(
                    "spool: the sink {sink} did not close cleanly: {reason}",
                    sink=self.inner_factory.description,
                    reason=error,
                )
        await self._run(self._store.close)
        self._stop_pool()
        if self.lines_in_spool:
            log.info(
                "spool {dir}: {lines} line(s) stay in the spool; they are sent "
                "to {sink} first at the next start",
                dir=self.directory,
                lines=self.lines_in_spool,
                sink=self.inner_factory.description,
            )

    # -- the spool ----------------------------------------------------------

    @property
    def _spooling(self) -> bool:
        return bool(self._records or self._appending or self._waiting)

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run a blocking spool call off the reactor; close waits for it.
        """
        assert self._in_thread is not None, "the spool is not open"
        running: Deferred[Any] = self._in_thread(function, *args)
        self._busy.add(running)

        def done(result: object) -> object:
            self._busy.discard(running)
            return result

        return running.addBoth(done)

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        for trigger in (self._shutdown_trigger, self._spill_trigger):
            if trigger is not None:
                self._clock.removeSystemEventTrigger(trigger)
        self._shutdown_trigger = self._spill_trigger = None

    def _recovered(self, recovered: Any) -> None:
        for what in recovered.damaged:
            log.warn("spool {dir}: {what}", dir=self.directory, what=what)
        self.damaged_segments = len(recovered.damaged)
        self.dropped_bytes = recovered.dropped_bytes
        self._records.extend(recovered.records)
        lines = sum(record.lines for record in recovered.records)
        previous, self._previous = self._previous, None
        if previous is None:
            self.recovered_lines = self.recovered_waiting = lines
        else:
            # Restarted in this process: only what the previous incarnation
            # had recovered and not replayed is from before (it is first in
            # the spool); the rest this process received, and spooled.
            self.recovered_lines = previous.recovered_lines
            self.recovered_waiting = min(lines, previous.recovered_waiting)
            self.spooled_lines = lines - self.recovered_waiting
        if lines:
            log.info(
                "spool {dir}: {lines} line(s) in {records} record(s) from before "
                "the last stop; they go to {sink} before anything new",
                dir=self.directory,
                lines=lines,
                records=len(recovered.records),
                sink=self.inner_factory.description,
            )

    def spill(self) -> None:
        """
        The process is stopping: from now on the spool takes every batch,
        past C{max_bytes} if need be, so that what is still queued is
        spooled within the shutdown timeout instead of lost.  (Run before
        the reactor shuts down; the stop then flushes the queue here.)
        """
        if self._spilling or self._closing:
            return
        self._spilling = True
        if self._waiting:
            log.warn(
                "spool {dir}: stopping; what is queued is spooled past "
                "--spool-max ({max} bytes)",
                dir=self.directory,
                max=self.max_bytes,
            )
        self._release()

    def _full(self, lines: list[bytes]) -> bool:
        if self._spilling:
            return False
        if not (self._records or self._appending):
            return False  # an empty spool takes any batch, or it would wedge
        size = HEADER.size + sum(len(line) + 1 for line in lines) + len(MAGIC)
        return self._disk_bytes + size > self.max_bytes

    def _spool(self, lines: list[bytes]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if self._waiting or self._full(lines):
            if not self._waiting:
                log.warn(
                    "spool {dir} is full ({size} of {max} bytes); clients are "
                    "paused until {sink} takes spooled lines",
                    dir=self.directory,
                    size=self._disk_bytes,
                    max=self.max_bytes,
                    sink=self.inner_factory.description,
                )
            self._waiting.append((lines, done))
            return done
        self._append(lines, lambda: done.callback(None), done)
        return done

    def _append(
        self, lines: list[bytes], then: Callable[[], None], done: Deferred[None]
    ) -> None:
        """
        Spool C{lines}, then call C{then}; a write error is waited out
        (retried with backoff), a bug fails C{done}.
        """
        self._appending += 1
        appended = self._run(self._store.append, lines)

        def ok(record: Record) -> None:
            self._appending -= 1
            self._disk_bytes = self._store.disk_bytes
            self._records.append(record)
            self.spooled_lines += record.lines
            then()
            self._pump()

        def failed(reason: Failure) -> None:
            self._appending -= 1
            if self._closing or not isinstance(reason.value, OSError):
                done.errback(reason)
                return
            # The spool's own disk is full or failing: wait it out.  The
            # batch is still unconfirmed, so the queue fills behind it.
            self._appending += 1
            delay = self._complain(reason, "cannot write to the spool")

            def again() -> None:
                self._appending -= 1
                if self._closing:
                    done.errback(reason)
                    return
                self._append(lines, then, done)

            self._clock.callLater(delay, again)

        appended.addCallbacks(ok, failed)

    def _release(self) -> None:
        while self._waiting and not self._full(self._waiting[0][0]):
            lines, done = self._waiting.popleft()
            self._append(lines, _firer(done), done)

    # -- straight to the wrapped sink ---------------------------------------

    def _write_direct(self, lines: list[bytes]) -> Deferred[None]:
        assert self._inner is not None
        direct = self._direct = _Direct(lines)
        direct.timer = self._clock.callLater(self.spool_after, self._slow, direct)
        written: Deferred[Any] = maybeDeferred(self._inner.write, lines)
        written.addBoth(self._direct_ended, direct)
        return direct.done

    def _slow(self, direct: _Direct) -> None:
        """
        The wrapped sink has not confirmed a batch in time: spool a copy
        and confirm it from there; the spool now takes every batch.
        """
        direct.timer = None
        direct.copying = True
        log.info(
            "spool {dir}: {sink} has not taken a batch in {seconds}s; spooling",
            dir=self.directory,
            sink=self.inner_factory.description,
            seconds=self.spool_after,
        )

        def copied() -> None:
            direct.copied = True
            # The spool was empty: the copy is its first record, and the
            # wrapped sink has it in hand.
            self._sent = len(self._records)
            direct.done.callback(None)
            if direct.ended:
                self._direct_settle(direct)

        self._append(direct.lines, copied, direct.done)

    def _direct_ended(self, result: object, direct: _Direct) -> None:
        if direct.timer is not None and direct.timer.active():
            direct.timer.cancel()
        direct.timer = None
        direct.ended = True
        direct.result = result
        if direct.copying and not direct.copied:
            return  # settled once the copy is in the spool
        self._direct_settle(direct)

    def _direct_settle(self, direct: _Direct) -> None:
        self._direct = None
        result = direct.result
        if not direct.copying:
            if not isinstance(result, Failure):
                self._up()
                direct.done.callback(None)
            elif is_outage(result):
                self._inner_down(result)
                self._spool(direct.lines).chainDeferred(direct.done)
            else:
                direct.done.errback(result)
        else:
            self._sent_ended(result)
        self._pump()

    # -- replay ---------------------------------------------------------------

    def _pump(self) -> None:
        """
        Hand the wrapped sink the next spooled records, if it is up and
        has nothing in hand.
        """
        if (
            self._closing
            or self._replaying
            or self._direct is not None
            or not self._inner_open
            or self._sent
            or not self._records
        ):
            return
        batch: list[Record] = []
        size = 0
        for record in self._records:
            if batch and size + record.size > REPLAY_BATCH_BYTES:
                break
            batch.append(record)
            size += record.size
        self._sent = len(batch)
        self._replaying = True
        reading = self._run(self._store.read, batch)
        reading.addCallbacks(self._replay, self._unreadable, errbackArgs=(batch,))

    def _replay(self, lines: list[bytes]) -> None:
        inner = self._inner
        if self._closing or inner is None or not self._inner_open:
            self._replaying = False
            self._sent = 0
            return
        written: Deferred[Any] = maybeDeferred(inner.write, lines)

        def ended(result: object) -> None:
            self._replaying = False
            self._sent_ended(result)
            self._pump()

        written.addBoth(ended)

    def _unreadable(self, reason: Failure, batch: list[Record]) -> None:
        """
        Spooled records that no longer read back intact: the disk changed
        them.  They cannot be delivered; count and log them, and go on.
        """
        self._replaying = False
        lines = sum(record.lines for record in batch)
        log.failure(
            "spool {dir}: {lines} spooled line(s) could not be read back and "
            "are lost: {reason}",
            reason,
            dir=self.directory,
            lines=lines,
            reason=reason.getErrorMessage(),
        )
        self.lost_lines += lines
        self._commit()
        self._pump()

    def _sent_ended(self, result: object) -> None:
        """
        The wrapped sink answered for the records it had in hand.
        """
        if not isinstance(result, Failure):
            self.replayed_lines += sum(
                record.lines for record in list(self._records)[: self._sent]
            )
            self._commit()
            return
        self._sent = 0
        if not is_outage(result):
            log.failure(
                "spool {dir}: {sink} failed on spooled lines (a bug in the "
                "sink, not an outage); the sink is restarted",
                result,
                dir=self.directory,
                sink=self.inner_factory.description,
            )
            self._broken = result
        self._inner_down(result)

    def _commit(self) -> None:
        """
        Forget the records the wrapped sink has confirmed, and delete the
        segments that hold nothing else.
        """
        done = [self._records.popleft() for _ in range(self._sent)]
        self._sent = 0
        settled = sum(record.lines for record in done)
        # The spool is replayed in order: what was there at open goes first.
        from_before = min(settled, self.recovered_waiting)
        self.recovered_waiting -= from_before
        self.spooled_lines -= settled - from_before
        ends: dict[int, int] = {}
        for record in done:
            ends[record.segment] = record.end
        live = {record.segment for record in self._records}
        for segment, end in ends.items():
            if segment not in live:
                self._run(self._store.delete, segment, end).addCallback(self._deleted)
        self._up()
        if not self._spooling:
            log.info(
                "spool {dir}: drained; lines go straight to {sink} again",
                dir=self.directory,
                sink=self.inner_factory.description,
            )

    def _up(self) -> None:
        """
        The wrapped sink confirmed a batch: any outage is over.
        """
        if self._down_since is not None:
            log.info(
                "spool {dir}: {sink} is taking lines again after {seconds:.1f}s; "
                "{lines} line(s) left in the spool",
                dir=self.directory,
                sink=self.inner_factory.description,
                seconds=self._clock.seconds() - self._down_since,
                lines=self.lines_in_spool,
            )
            self._down_since = None
        self._attempt = 0

    def _deleted(self, _: object) -> None:
        self._disk_bytes = self._store.disk_bytes
        self._release()

    # -- the wrapped sink's outages ------------------------------------------

    def _open_inner(self, first: bool = False) -> Deferred[None]:
        self._retry = None
        if self._closing:
            return succeed(None)
        inner = self._inner = self.inner_factory()
        opening: Deferred[Any] = maybeDeferred(inner.open)
        result: Deferred[None] = Deferred()

        def opened(_: object) -> None:
            if self._closing or inner is not self._inner:
                return
            self._inner_open = True
            self._pump()

        def failed(reason: Failure) -> Failure | None:
            if first and not is_outage(reason):
                self._inner = None
                self._run(self._store.close).addBoth(lambda _: self._stop_pool())
                return reason
            if not is_outage(reason):
                self._broken = reason
            if inner is self._inner and not self._closing:
                self._inner_down(reason)
            return None

        opening.addCallbacks(opened, failed).chainDeferred(result)
        return result

    def _inner_down(self, reason: Failure) -> None:
        """
        The wrapped sink is down: close it, and build it again later.
        """
        inner, self._inner = self._inner, None
        self._inner_open = False
        if inner is not None:
            closing: Deferred[Any] = maybeDeferred(inner.close)
            closing.addErrback(lambda _: None)
        if self._closing or self._retry is not None:
            return
        if self._down_since is None:
            self._down_since = self._clock.seconds()
        delay = self._complain(reason, "is down")
        self._retry = self._clock.callLater(delay, self._open_inner)

    def _complain(self, reason: Failure, what: str) -> float:
        """
        Say what is wrong at most every L{COMPLAINT_INTERVAL} seconds.

        @return: the seconds to wait before the next try.
        """
        delay: float = self._backoff(self._attempt)
        self._attempt += 1
        now = self._clock.seconds()
        if now - self._complained >= COMPLAINT_INTERVAL:
            self._complained = now
            error = reason.value
            why = (
                error.strerror
                if isinstance(error, OSError) and error.strerror
                else str(error) or type(error).__name__
            )
            log.warn(
                "spool {dir}: {sink} {what}: {reason}; {lines} line(s) wait in "
                "the spool ({size} bytes of {max}); retrying in {delay:.1f}s",
                dir=self.directory,
                sink=self.inner_factory.description,
                what=what,
                reason=why,
                lines=self.lines_in_spool,
                size=self._disk_bytes,
                max=self.max_bytes,
                delay=delay,
            )
        return delay


def _firer(done: Deferred[None]) -> Callable[[], None]:
    return lambda: done.callback(None)


@implementer(ISinkFactory)
class SpoolingSinkFactory:
    """
    Builds a L{SpoolingSink} around a fresh wrapped sink each time.
    """

    def __init__(
        self,
        inner: ISinkFactory,
        directory: str,
        reactor: Any,
        max_bytes: int = DEFAULT_MAX_BYTES,
        spool_after: float = DEFAULT_SPOOL_AFTER,
    ) -> None:
        self.inner = inner
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.spool_after = spool_after
        self.description = inner.description
        self._reactor = reactor
        self._last: SpoolingSink | None = None

    def __call__(self) -> SpoolingSink:
        """
        A new spooling sink; after the first, one that knows its
        predecessor's figures, so that a restart keeps the ledger's
        spooled lines apart from recovered ones.
        """
        sink = self._last = SpoolingSink(
            self.inner,
            self.directory,
            self._reactor,
            max_bytes=self.max_bytes,
            spool_after=self.spool_after,
            previous=self._last,
        )
        return sink
