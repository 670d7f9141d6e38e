"""Stop accepting before the descriptor limit, not at it.

Waiting for EMFILE means the limit is reached: then the sink cannot open
its next file and a log rotation fails.  So a listener stops accepting at a
high watermark a reserve below C{RLIMIT_NOFILE}, and starts again at a low
watermark a little under it (hysteresis, so a server at the mark does not
flap on every connection).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lineserver.flow import Pause, PauseGate
from lineserver.stats import Stats

log = Logger(namespace="lineserver.fdlimits")

#: The listener gate's reason while too many descriptors are open.
WATERMARK_REASON = Pause.FD_WATERMARK

#: Descriptors kept free for the sink, log files and the like.
DEFAULT_RESERVE = 64


def fd_watermarks(soft_limit: int, reserve: int = DEFAULT_RESERVE) -> tuple[int, int]:
    """
    The descriptor counts at which to stop and to resume accepting.

    The high mark is C{soft_limit - reserve}, except that the reserve never
    takes more than half the limit (with a tiny limit, clients still get
    half of it) and the mark is at least 1.  The low mark is 5% (at least
    8 descriptors) under the high one, and at least 0.  So for any
    C{soft_limit >= 1}: C{0 <= low < high <= soft_limit}.

    @return: C{(high, low)}.
    @raise ValueError: for a limit under 1 or a negative reserve.
    """
    if soft_limit < 1:
        raise ValueError(f"descriptor limit must be >= 1, got {soft_limit}")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    high = max(soft_limit - reserve, soft_limit // 2, 1)
    low = max(high - max(8, high // 20), 0)
    return high, low


def current_soft_limit() -> int | None:
    """
    @return: this process's soft C{RLIMIT_NOFILE}, or None if unlimited.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return soft


def open_fd_count() -> int:
    """
    @return: how many descriptors this process has open (from
        C{/proc/self/fd}, else C{/dev/fd}), not counting the one used to
        list them.  Costs a directory listing: about 0.6 ms per thousand
        descriptors.
    @raise OSError: if neither directory can be listed.
    """
    last: OSError | None = None
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path)) - 1
        except OSError as error:
            last = error
    assert last is not None
    raise last


#: At most this many poll intervals between two counts, far from the mark.
MAX_POLL_STRETCH = 10.0


class FdWatermark:
    """
    Holds the listener gate's C{fd-watermark} reason while too many
    descriptors are open: from C{high} open ones until at most C{low}.

    Counting descriptors costs a directory listing, so L{check} (called on
    every connection open and close) counts only when the answer could
    have changed: each call moves the count by at most one, so after a
    count of M and K calls there are at most M+K and at least M-K open.
    With a clock it also counts every C{poll_interval} seconds, to see
    descriptors opened or closed by other parts of the process; far from
    the watermark (more than a tenth of it free) less often, up to
    L{MAX_POLL_STRETCH} times the interval in proportion to the room left:
    at 10,000 connections a listing costs milliseconds, and only what
    other parts open (a few files) can change between two counts.

    @ivar last_count: the last real count.
    """

    def __init__(
        self,
        gate: PauseGate,
        high: int,
        low: int,
        count: Callable[[], int] = open_fd_count,
        clock: IReactorTime | None = None,
        poll_interval: float = 1.0,
        stats: Stats | None = None,
    ) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low < high, got {low} and {high}")
        self.gate = gate
        self.high = high
        self.low = low
        self.count = count
        self.clock = clock
        self.poll_interval = poll_interval
        self.stats = stats
        self.paused = False
        self.last_count = 0
        self._calls_since = 0
        self._counted = False
        self._poll: IDelayedCall | None = None

    @classmethod
    def from_limit(
        cls,
        gate: PauseGate,
        reserve: int = DEFAULT_RESERVE,
        clock: IReactorTime | None = None,
        stats: Stats | None = None,
    ) -> FdWatermark | None:
        """
        @return: a watermark from this process's C{RLIMIT_NOFILE}, or None
            if the limit is infinite.
        """
        limit = current_soft_limit()
        if limit is None:
            return None
        high, low = fd_watermarks(limit, reserve)
        return cls(gate, high, low, clock=clock, stats=stats)

    def check(self, force: bool = False) -> bool:
        """
        Call after a descriptor was opened or closed (a connection came or
        went).  Counts (see the class) when needed or when C{force}d.

        @return: whether accepting is paused by the watermark.
        """
        self._calls_since += 1
        if not force and self._counted:
            since = self._calls_since
            if self.paused:
                if self.last_count - since > self.low:
                    return True
            elif self.last_count + since < self.high:
                return False
        return self._measure()

    def _measure(self) -> bool:
        try:
            count = self.count()
        except OSError as error:
            if error.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # Counting needs a descriptor itself; with none left we are
            # at the limit, which is above the watermark.
            count = max(self.high, self.last_count)
        self.last_count = count
        self._calls_since = 0
        self._counted = True
        if not self.paused and count >= self.high:
            self.paused = True
            if self.stats is not None:
                self.stats.incr("accept.fd_watermark.pauses")
            log.warn(
                "{count} descriptors open, at the watermark {high}: pausing "
                "accept until at most {low} are open",
                count=count,
                high=self.high,
                low=self.low,
            )
            self.gate.hold(WATERMARK_REASON)
        elif self.paused and count <= self.low:
            self.paused = False
            log.info(
                "{count} descriptors open, at most {low}: accepting again",
                count=count,
                low=self.low,
            )
            self.gate.release(WATERMARK_REASON)
        return self.paused

    def start(self) -> None:
        """
        Count now, and then every C{poll_interval} seconds (with a clock).
        """
        self._measure()
        if self.clock is not None and self._poll is None:
            self._poll = self.clock.callLater(self.next_poll(), self._tick)

    def next_poll(self) -> float:
        """
        @return: the seconds until the next count: C{poll_interval} within
            a tenth of the high mark (or paused), stretched in proportion
            to the room left beyond that, up to L{MAX_POLL_STRETCH} times.
        """
        tenth = max(1, self.high // 10)
        room = self.high - self.last_count
        if self.paused or room <= tenth:
            return self.poll_interval
        return self.poll_interval * min(MAX_POLL_STRETCH, room / tenth)

    def _tick(self) -> None:
        self._poll = None
        try:
            self._measure()
        finally:
            # A failed count must not end the polling for good.
            if self.clock is not None and self._poll is None:
                self._poll = self.clock.callLater(self.next_poll(), self._tick)

    def stop(self) -> None:
        """
        Stop polling and release the gate's reason.
        """
        poll, self._poll = self._poll, None
        if poll is not None and poll.active():
            poll.cancel()
        self.paused = False
        self.gate.release(WATERMARK_REASON)
