"""The file sink: appends each line, LF-terminated, to a file.

Disk writes block, and a slow disk must not stall the reactor, so writes
run on one private thread, one thread call at a time, so lines keep their
order.  Batches that arrive while one is being written are written
together in the next call.

A thread call costs more than writing a few hundred bytes into the page
cache: with many slow clients every batch is a line or two, and the hop
(two GIL handoffs, a wake-up of the reactor's waker) was most of what the
sink cost per line.  So with C{fsync=never} a small batch (up to
L{INLINE_MAX} bytes) is written on the reactor thread, as long as such
writes stay fast: one that takes over L{INLINE_SLOW} seconds sends every
write to the thread for L{INLINE_BACKOFF} seconds.  A batch written so,
with nothing before it, is confirmed at once (its Deferred has fired when
C{write} returns), so a fleet's line costs no second reactor iteration; a
failure, or a batch that waited, is handled in the next iteration, as a
thread's result would be.  A lock keeps the
writer-side state to one thread at a time (an inline write never waits
for it: it goes to the thread when the lock is busy).

What the sink promises (docs/delivery.md says it for operators):

  - C{fsync=never}: a batch's Deferred fires once the OS has its bytes
    (they survive the process, not a power cut); C{batch}: once they are
    fsynced; C{interval}: once an fsync covering them is done, at most
    one fsync every C{fsync_interval} seconds for every batch written
    meanwhile (group commit).
  - The file is opened with C{O_APPEND}: after C{copytruncate} the next
    line goes to the start of the emptied file, not past a hole.  The
    path is reopened on SIGHUP (L{IReopenable}) and when it names another
    file (checked at most once a second, in the writer thread), so a
    rotation that moves the file away is followed.
  - A write that fails for lack of space or with an I/O error (ENOSPC,
    EDQUOT, EIO) is backpressure, not a crash: the file is cut back to
    the end of its last whole line, the batch is kept and retried with a
    capped backoff, and its Deferred fires only once it is written; the
    queue meanwhile fills and pauses the clients.
"""

from __future__ import annotations

import enum
import errno
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import (
    IImmediateSink,
    IPipelinedSink,
    IReopenable,
    Scheme,
    SinkURL,
    SinkURLError,
)

log = Logger(namespace="lineserver.sink")


class Fsync(enum.Enum):
    """
    When the file sink calls fsync, and so when a batch's Deferred fires.
    """

    #: Written to the OS: survives a crash of the process, not of the machine.
    NEVER = "never"
    #: Each batch fsynced before its Deferred fires.
    BATCH = "batch"
    #: One fsync at most every C{fsync_interval} seconds, for every batch
    #: written since; each batch's Deferred fires after the fsync covering it.
    INTERVAL = "interval"


#: The old boolean spellings of C{fsync} (C{fsync=1}), kept for old configs.
_LEGACY_FSYNC = {
    **dict.fromkeys(("0", "false", "no", "off"), Fsync.NEVER),
    **dict.fromkeys(("1", "true", "yes", "on"), Fsync.BATCH),
}

#: Write errors that are a condition to wait out (space, quota, a disk
#: that may come back), not a reason to give the sink up.
RETRYABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})

#: The largest batch (bytes) written on the reactor thread (fsync=never).
#: Small: a bulk sender's batches (a 64 KiB read's lines) stay on the
#: thread, so reading and writing go on in parallel on two cores; written
#: inline they cut a bulk sink's rate by a third in a before/after run.
INLINE_MAX = 4096

#: An inline write slower than this (seconds) sends writes to the thread...
INLINE_SLOW = 0.005

#: ...for this many seconds.
INLINE_BACKOFF = 1.0

#: Seconds between two checks that the path still names the open file.
PATH_CHECK_INTERVAL = 1.0

#: Bytes of the file's end kept in memory (up to twice this), to write
#: again what a C{copytruncate} cuts off between its copy and its
#: truncation.
TAIL_BYTES = 8 << 20

#: Seconds between two log lines about the same failing write.
COMPLAINT_INTERVAL = 5.0


def retry_policy() -> Any:
    """
    0.1 s doubling to 5 s, with up to 0.1 s of jitter.
    """
    return backoffPolicy(
        initialDelay=0.1, maxDelay=5.0, factor=2.0, jitter=lambda: random.random() / 10
    )


class _Inline(enum.Enum):
    """
    L{FileSink._write_inline}'s answer when the write must go to the thread.
    """

    NOT_NOW = "not now"


_NOT_INLINE = _Inline.NOT_NOW


@dataclass
class _Pending:
    """
    A batch handed to C{write} whose Deferred has not fired yet.
    """

    data: bytes
    lines: int
    done: Deferred[None] = field(default_factory=Deferred)


@dataclass
class _Held:
    """
    Why writes wait: the errno of the first failure and when it began.
    """

    code: int
    since: float
    complained: float


@implementer(ISink, IReopenable, IPipelinedSink, IImmediateSink)
class FileSink:
    """
    Appends lines to C{path}, with the durability C{fsync} asks for.

    @ivar max_in_flight: 64 batches with C{Fsync.INTERVAL} (they wait for
        one fsync together), otherwise 1.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        fsync: Fsync = Fsync.NEVER,
        fsync_interval: float = 1.0,
        clock: Any = None,
    ) -> None:
        """
        @param reactor: runs the writer thread's results.
        @param clock: the time for retries and the fsync interval
            (C{reactor} if None).
        """
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.description = f"file:{path}"
        self.max_in_flight = 64 if fsync is Fsync.INTERVAL else 1
        self._reactor = reactor
        self._clock = reactor if clock is None else clock
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"sink {path}")
        # Held by whichever thread runs writer-side code (see the module).
        self._lock = threading.Lock()
        self._inline_after = 0.0
        self._shutdown_trigger: Any = None
        self._retry = retry_policy()
        # Reactor side.
        self._pending: deque[_Pending] = deque()
        self._writing = False
        self._failures = 0
        self._retry_call: IDelayedCall | None = None
        self._held: _Held | None = None
        self._unsynced: list[Deferred[None]] = []
        self._sync_call: IDelayedCall | None = None
        self._syncing = False
        self._last_sync = float("-inf")
        # Writer-thread side.
        self._fd: int | None = None
        self._identity: tuple[int, int] = (0, 0)
        self._end = 0
        self._tail = bytearray()
        self._tail_start = 0
        self._checked = 0.0
        self._reopen_failure: str | None = None

    def _in_thread(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(
            self._reactor, self._pool, self._locked, function, *args
        )

    def _locked(self, function: Any, *args: Any) -> Any:
        with self._lock:
            return function(*args)

    def _write_inline(self, data: bytes) -> int | Failure | _Inline | None:
        """
        Write C{data} on the reactor thread, if that is cheap now.

        @return: what L{_write} returned or raised (as a L{Failure}), or
            L{_NOT_INLINE} if the write must go to the thread.
        """
        if (
            self.fsync is not Fsync.NEVER
            or len(data) > INLINE_MAX
            or time.monotonic() < self._inline_after
            or not self._lock.acquire(blocking=False)
        ):
            return _NOT_INLINE
        started = time.monotonic()
        try:
            return self._write(data)
        except Exception:
            return Failure()
        finally:
            self._lock.release()
            ended = time.monotonic()
            if ended - started > INLINE_SLOW:
                self._inline_after = ended + INLINE_BACKOFF

    def _log_later(self, level: str, text: str, **fields: Any) -> None:
        """
        Log from the writer thread, through the reactor (log observers
        are not all thread-safe).
        """
        self._reactor.callFromThread(
            getattr(log, level), text, sink=self.description, **fields
        )

    # -- open, reopen, close ------------------------------------------------

    def open(self) -> Deferred[None]:
        self._pool.start()
        # Stop the thread as the reactor stops, even if close never comes
        # (a stop that gave up on a sink waiting for disk space).
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._pool.stop
        )
        return self._in_thread(self._open)

    def _open(self) -> None:
        self._fd = self._open_path()

    def _open_path(self) -> int:
        fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666
        )
        try:
            # As open(path, "ab") does: a file that cannot seek to its end
            # (/proc/version) is no file to append lines to.
            os.lseek(fd, 0, os.SEEK_END)
            status = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._identity = (status.st_dev, status.st_ino)
        self._end = status.st_size
        self._tail = bytearray()
        self._tail_start = status.st_size
        self._checked = time.monotonic()
        return fd

    def reopen(self) -> Deferred[None]:
        """
        Reopen the path (SIGHUP), after every batch handed over so far.
        """
        return self._in_thread(self._reopen, "asked to")

    def _reopen(self, why: str) -> None:
        """
        Open the path anew, then let the old file go (fsynced first, unless
        C{fsync=never}: a batch may still wait for its fsync).  If the path
        cannot be opened, the old file stays in use and the failure is
        raised.
        """
        old = self._fd
        self._fd = self._open_path()
        if old is not None:
            try:
                if self.fsync is not Fsync.NEVER:
                    os.fsync(old)
            finally:
                os.close(old)
        self._log_later("info", "sink {sink} reopened ({why})", why=why)

    def close(self) -> Deferred[None]:
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._sync_call = None
        unsynced, self._unsynced = self._unsynced, []
        closed = self._in_thread(self._close)

        def synced(_: object) -> None:
            for waiter in unsynced:
                waiter.callback(None)

        closed.addCallback(synced)
        closed.addBoth(self._stop_pool)
        return closed

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _stop_pool(self, result: object) -> object:
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._pool.stop()
        return result

    # -- writing (reactor side) ---------------------------------------------

    def write(self, lines: list[bytes]) -> Deferred[None]:
        if not lines:
            return succeed(None)
        data = b"\n".join(lines) + b"\n"
        if not self._pending and not self._writing and self._retry_call is None:
            # Nothing before it: written now if that is cheap, and then
            # confirmed now (fsync=never promises no more than the write).
            result = self._write_inline(data)
            if result is None:
                self._resume()
                return succeed(None)
            if not isinstance(result, _Inline):
                # A failure: handled as a thread's result would be.
                pending = _Pending(data, len(lines))
                self._pending.append(pending)
                self._writing = True
                self._reactor.callLater(0, self._attempted, result, [pending])
                return pending.done
        pending = _Pending(data, len(lines))
        self._pending.append(pending)
        self._next()
        return pending.done

    def write_now(self, lines: list[bytes]) -> bool:
        """
        L{write}'s inline case without a Deferred (L{IImmediateSink}): a
        small batch with nothing before it, written on the reactor thread
        while such writes stay fast.  A write that failed is left to
        L{write}, which tries again and handles the failure.
        """
        if self._pending or self._writing or self._retry_call is not None:
            return False
        result = self._write_inline(b"\n".join(lines) + b"\n")
        if result is None:
            self._resume()
            return True
        return False

    def _next(self) -> None:
        """
        Write every batch waiting, in one thread call, unless a call is
        under way or a retry is due later.
        """
        if self._writing or self._retry_call is not None or not self._pending:
            return
        batch = list(self._pending)
        self._writing = True
        data = b"".join(p.data for p in batch)
        result = self._write_inline(data)
        if not isinstance(result, _Inline):
            self._reactor.callLater(0, self._attempted, result, batch)
            return
        attempt = self._in_thread(self._write, data)
        attempt.addBoth(self._attempted, batch)

    def _attempted(self, result: int | Failure | None, batch: list[_Pending]) -> None:
        self._writing = False
        if isinstance(result, Failure):
            # Not a condition to wait out: fail these batches and those
            # after them (they may not overtake them), so the sink's owner
            # gives them back in order.
            failed = list(self._pending)
            self._pending.clear()
            for pending in failed:
                pending.done.errback(result)
            return
        if result is not None:
            self._hold(result)
            return
        for _ in batch:
            self._pending.popleft()
        self._resume()
        for pending in batch:
            if self.fsync is Fsync.INTERVAL:
                self._unsynced.append(pending.done)
            else:
                pending.done.callback(None)
        if self._unsynced:
            self._schedule_sync()
        self._next()

    def _hold(self, code: int) -> None:
        """
        A write failed for a reason to wait out: retry later, saying so
        at most every L{COMPLAINT_INTERVAL} seconds.
        """
        self._retry_call = self._clock.callLater(self._complain(code), self._retry_now)

    def _complain(self, code: int) -> float:
        """
        Count one more failure to wait out, and say so at most every
        L{COMPLAINT_INTERVAL} seconds.

        @return: the seconds to wait before the next try.
        """
        now = self._clock.seconds()
        delay: float = self._retry(self._failures)
        self._failures += 1
        if self._held is None or now - self._held.complained >= COMPLAINT_INTERVAL:
            held_since = now if self._held is None else self._held.since
            self._held = _Held(code, held_since, now)
            log.warn(
                "sink {sink}: cannot write: {reason} ({code}); {lines} line(s) "
                "wait, retrying every {cap:.0f}s at most; the clients are "
                "paused once the queue is full",
                sink=self.description,
                reason=os.strerror(code),
                code=errno.errorcode.get(code, str(code)),
                lines=sum(p.lines for p in self._pending),
                cap=5.0,
            )
        return delay

    def _retry_now(self) -> None:
        self._retry_call = None
        self._next()

    def _resume(self) -> None:
        self._failures = 0
        if self._held is not None:
            log.info(
                "sink {sink}: writing again after {seconds:.1f}s of {code}",
                sink=self.description,
                seconds=self._clock.seconds() - self._held.since,
                code=errno.errorcode.get(self._held.code, str(self._held.code)),
            )
            self._held = None

    def _schedule_sync(self) -> None:
        if self._sync_call is not None or self._syncing:
            return
        delay = max(0.0, self._last_sync + self.fsync_interval - self._clock.seconds())
        self._sync_call = self._clock.callLater(delay, self._sync)

    def _sync(self) -> None:
        """
        One fsync for every batch written before it started.
        """
        self._sync_call = None
        self._syncing = True
        self._last_sync = self._clock.seconds()
        waiters, self._unsynced = self._unsynced, []
        synced = self._in_thread(self._fsync)

        def fire(result: object) -> None:
            self._syncing = False
            if isinstance(result, Failure) and _retryable(result):
                # The batches stay written; only their fsync is tried again.
                assert isinstance(result.value, OSError)
                self._unsynced[:0] = waiters
                delay = self._complain(result.value.errno or errno.EIO)
                self._sync_call = self._clock.callLater(delay, self._sync)
                return
            if not isinstance(result, Failure):
                self._resume()
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._unsynced:
                self._schedule_sync()

        synced.addBoth(fire)

    # -- writing (writer thread) ----------------------------------------------

    def _fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def _check_path(self) -> None:
        """
        At most once a second: if the path is gone or names another file
        (moved away by a rotation), reopen it.
        """
        now = time.monotonic()
        if now - self._checked < PATH_CHECK_INTERVAL:
            return
        self._checked = now
        try:
            status = os.stat(self.path)
        except OSError as error:
            why = f"the path cannot be read: {error.strerror}"
        else:
            if (status.st_dev, status.st_ino) == self._identity:
                return
            why = "the path names another file"
        try:
            self._reopen(why)
        except OSError as error:
            # Said once, not every second, until a reopen succeeds.
            if error.strerror != self._reopen_failure:
                self._reopen_failure = error.strerror
                self._log_later(
                    "warn",
                    "sink {sink}: could not reopen ({why}): {reason}; "
                    "writing to the file already open",
                    why=why,
                    reason=error.strerror,
                )
        else:
            self._reopen_failure = None

    def _write(self, data: bytes) -> int | None:
        """
        Append C{data}, all of it or nothing: after a failed or partial
        write the file is cut back to where it ended before.

        Where the write landed (the offset after it, C{O_APPEND} having put
        it at the end of the file) tells whether the file shrank since the
        last write, so a write costs two system calls, not a size check
        as well.

        @return: None once written (and fsynced, with C{Fsync.BATCH}), or
            the errno of a failure to wait out.
        @raise OSError: for any other failure.
        """
        self._check_path()
        fd = self._fd
        assert fd is not None, "write before open"
        expected = self._end
        start = expected
        written = 0
        landed = False
        try:
            written = os.write(fd, data)
            if written < len(data):
                view = memoryview(data)
                while written < len(data):
                    written += os.write(fd, view[written:])
            start = os.lseek(fd, 0, os.SEEK_CUR) - len(data)
            landed = True
            if start < expected:
                # The file shrank under the sink (copytruncate), and
                # O_APPEND put this write at the start of the emptied file:
                # take it back, write again what the copy missed, then
                # this write after it; no line twice, none reordered.
                os.ftruncate(fd, start)
                self._truncated(fd, start)
                start = self._end
                _write_all(fd, data)
            if self.fsync is Fsync.BATCH:
                os.fsync(fd)
        except OSError as error:
            if written:
                if not landed:
                    # Where this write began: it may not be where the last
                    # one ended, if the file shrank or grew under the sink.
                    start = os.lseek(fd, 0, os.SEEK_CUR) - written
                self._cut_back(fd, start)
            if error.errno in RETRYABLE_ERRNOS:
                # A shrink not yet mended is noticed again at the retry
                # (which lands below the end remembered).
                self._end = start if landed else max(start, expected)
                return error.errno
            raise
        self._end = start + len(data)
        self._remember(data)
        return None

    def _remember(self, data: bytes) -> None:
        """
        Keep the last L{TAIL_BYTES} (at least) written to this file, to
        write again what a C{copytruncate} cuts off after its copy.
        """
        self._tail += data
        excess = len(self._tail) - TAIL_BYTES
        if excess > TAIL_BYTES:  # trimmed now and then, not on every write
            del self._tail[:excess]
            self._tail_start += excess

    def _truncated(self, fd: int, size: int) -> None:
        """
        The file shrank under the sink: logrotate's C{copytruncate} copied
        it, then emptied it; what was written between its copy and its
        truncation is in neither file.  Find the copy next to the file
        (its end matches what the sink wrote), finish its last line if the
        copy cut it, and write the rest again at the start of the file.
        """
        old_end, tail, tail_start = self._end, self._tail, self._tail_start
        self._end, self._tail, self._tail_start = size, bytearray(), size
        copy = self._find_copy(tail, tail_start, old_end)
        if copy is None:
            self._log_later(
                "warn",
                "sink {sink}: the file shrank from {was} to {now} bytes under "
                "the sink, and no copy of it ending with the sink's last "
                "bytes is next to it; lines written just before the cut may "
                "be lost",
                was=old_end,
                now=size,
            )
            return
        copy_path, copied = copy
        lost = bytes(tail[copied - tail_start : old_end - tail_start])
        finish = b""
        if lost and tail[copied - tail_start - 1] != 0x0A:
            rest_of_line, _, lost = lost.partition(b"\n")
            finish = rest_of_line + b"\n"
        try:
            if finish:
                copy_fd = os.open(copy_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    _write_all(copy_fd, finish)
                finally:
                    os.close(copy_fd)
            _write_all(fd, lost)
        except OSError as error:
            self._log_later(
                "error",
                "sink {sink}: the file was truncated under the sink, and the "
                "{count} byte(s) written after its copy {copy} was taken could "
                "not be written again: {reason}",
                count=len(finish) + len(lost),
                copy=copy_path,
                reason=error.strerror,
            )
            self._end = os.fstat(fd).st_size
            self._tail_start = self._end
            return
        self._end = size + len(lost)
        self._remember(lost)
        self._log_later(
            "info",
            "sink {sink}: the file was truncated under the sink "
            "(copytruncate); {count} byte(s) written after its copy {copy} "
            "was taken are written again ({finish} to end the copy's last line)",
            count=len(finish) + len(lost),
            copy=copy_path,
            finish=len(finish),
        )

    def _find_copy(
        self, tail: bytearray, tail_start: int, old_end: int
    ) -> tuple[str, int] | None:
        """
        @return: the path and size of the newest file next to ours, named
            like a rotation of it, whose last bytes are the bytes the sink
            wrote just before that size; None if there is none.
        """
        directory, name = os.path.split(os.path.abspath(self.path))
        found: list[tuple[float, str, int]] = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name == name or not entry.name.startswith(name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    status = entry.stat(follow_symlinks=False)
                    size = status.st_size
                    if not tail_start < size <= old_end:
                        continue
                    span = min(4096, size - tail_start)
                    with open(entry.path, "rb") as candidate:
                        candidate.seek(size - span)
                        last = candidate.read(span)
                except OSError:
                    continue
                if last == tail[size - span - tail_start : size - tail_start]:
                    found.append((status.st_mtime, entry.path, size))
        if not found:
            return None
        _, path, size = max(found)
        return path, size

    def _cut_back(self, fd: int, size: int) -> None:
        """
        Cut a partial write off, so that no torn line stays in the file
        (and none is written twice when the batch is retried).
        """
        try:
            os.ftruncate(fd, size)
        except OSError as error:
            self._log_later(
                "error",
                "sink {sink}: could not cut a partial write back to {size} "
                "bytes: {reason}; a torn line may remain",
                size=size,
                reason=error.strerror,
            )


def _retryable(reason: Failure) -> bool:
    """
    @return: whether C{reason} is an OS error to wait out.
    """
    error = reason.value
    return isinstance(error, OSError) and error.errno in RETRYABLE_ERRNOS


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.write(fd, view[written:])


@implementer(ISinkFactory)
class FileSinkFactory:
    def __init__(
        self,
        path: str,
        reactor: Any,
        fsync: Fsync = Fsync.NEVER,
        fsync_interval: float = 1.0,
    ) -> None:
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.description = f"file:{path}"
        self._reactor = reactor

    def __call__(self) -> FileSink:
        return FileSink(self.path, self._reactor, self.fsync, self.fsync_interval)


def parse_fsync(text: str) -> Fsync:
    """
    @raise SinkURLError: naming C{fsync} and its values.
    """
    value = text.lower()
    try:
        return Fsync(value)
    except ValueError:
        pass
    if value in _LEGACY_FSYNC:
        return _LEGACY_FSYNC[value]
    raise SinkURLError(
        f"file: fsync must be never, batch or interval (or the old 0 or 1), "
        f"not {text!r}"
    )


def parse_interval(text: str) -> float:
    """
    @raise SinkURLError: naming C{fsync_interval}, unless a positive number.
    """
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise SinkURLError(
            f"file: fsync_interval must be a number of seconds above 0, not {text!r}"
        )
    return seconds


def _file_factory(url: SinkURL, reactor: Any) -> ISinkFactory:
    """
    C{file:PATH}, C{file:PATH?fsync=never|batch|interval&fsync_interval=S}.

    The path is checked, never opened, here: this runs while the command
    line is parsed, which must not create files.  A path that exists and
    is not a regular file's, or a missing directory, would fail the
    sink's first open; saying so now names the option at fault.
    """
    if not url.target:
        raise SinkURLError("file: needs a path, as in file:lines.log")
    fsync = parse_fsync(url.options.get("fsync", Fsync.NEVER.value))
    interval = parse_interval(url.options.get("fsync_interval", "1"))
    if "fsync_interval" in url.options and fsync is not Fsync.INTERVAL:
        raise SinkURLError(
            "file: fsync_interval is only used with fsync=interval "
            f"(fsync is {fsync.value})"
        )
    if os.path.isdir(url.target):
        raise SinkURLError(
            f"file: {url.target!r} is a directory; name a file in it, "
            f"as in file:{os.path.join(url.target, 'lines.log')}"
        )
    directory = os.path.dirname(os.path.abspath(url.target))
    if not os.path.isdir(directory):
        raise SinkURLError(f"file: directory {directory!r} does not exist")
    return FileSinkFactory(url.target, reactor, fsync, interval)


#: C{file:PATH}, with the options C{fsync} and C{fsync_interval}.
file_scheme = Scheme(_file_factory, frozenset({"fsync", "fsync_interval"}))
