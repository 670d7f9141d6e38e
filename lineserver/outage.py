"""What counts as an outage (wait it out) rather than a crash (a bug).

A sink's destination that is down, full or refusing is an outage: the
work is retried with capped backoff for as long as it takes and never
counts against the restart intensity.  Anything else a sink raises is a
bug, which restarts it and, repeated, ends the process.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.python.failure import Failure

from lineserver.sinks import SinkUnavailable

#: Seconds between two log lines about the same outage.
COMPLAINT_INTERVAL = 5.0

#: The longest wait between two tries during an outage.
MAX_RETRY_DELAY = 5.0


#: What a destination that is down, full or refusing raises: ours, the
#: OS's (C{OSError} covers C{ConnectionError} and C{TimeoutError}), and
#: Twisted's own connection errors, which are not C{OSError}s (a refused,
#: timed-out or failed connect; a connection lost or closed).
OUTAGES: tuple[type[BaseException], ...] = (
    SinkUnavailable,
    OSError,
    ConnectError,
    ConnectionClosed,
    DeferTimeoutError,
)


def is_outage(reason: Failure | BaseException) -> bool:
    """
    @return: whether C{reason} is an outage (one of L{OUTAGES}).
    """
    error = reason.value if isinstance(reason, Failure) else reason
    return isinstance(error, OUTAGES)


def outage_backoff() -> Callable[[int], float]:
    """
    @return: the delay before try C{n} (from 0) during an outage:
        exponential from 0.1s, capped at L{MAX_RETRY_DELAY}, with jitter.
    """
    return backoffPolicy(initialDelay=0.1, maxDelay=MAX_RETRY_DELAY, factor=2.0)
