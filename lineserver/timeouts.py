"""Per-connection deadlines with no timer churn at high rates.

Resetting a DelayedCall on every read (or line) costs a heap operation
each time.  Instead each deadline keeps one DelayedCall at most and only
records a timestamp on activity; when the call fires it looks at the
timestamp and, if time is left, sleeps again for exactly what is left.
A connection sending a million lines a second costs one timer wake-up per
timeout period.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """
    Calls C{on_expired} once C{timeout} seconds pass from C{since}.

    C{since} moves with L{touch} (idle timeout) or is set and cleared with
    L{begin} and L{clear} (line timeout).  Once expired, the deadline stays
    expired until started again.
    """

    __slots__ = ("_call", "_clock", "_on_expired", "since", "timeout")

    def __init__(
        self, clock: IReactorTime, timeout: float, on_expired: Callable[[], None]
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._on_expired = on_expired
        self._call: IDelayedCall | None = None
        self.since: float | None = None

    @property
    def active(self) -> bool:
        """
        Is a deadline being counted down?
        """
        return self.since is not None

    def touch(self) -> None:
        """
        Count from now again (cheap: no timer is touched).
        """
        self.begin()

    def begin(self) -> None:
        """
        Start counting from now, arming the one timer if it is not armed.
        """
        self.since = self._clock.seconds()
        if self._call is None:
            self._call = self._clock.callLater(self.timeout, self._check)

    def clear(self) -> None:
        """
        Stop counting; the timer, if armed, lapses without firing.
        """
        self.since = None

    def cancel(self) -> None:
        """
        Stop counting and drop the timer (for a connection that is gone).
        """
        self.since = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        since = self.since
        if since is None:
            return
        left = since + self.timeout - self._clock.seconds()
        if left > 0:
            self._call = self._clock.callLater(left, self._check)
            return
        self.since = None
        self._on_expired()
