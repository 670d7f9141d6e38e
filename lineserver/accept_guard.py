"""Accept throttling: out of descriptors is a state to wait out, not a spin.

Twisted's C{tcp.Port.doRead} handles accept() errors badly for a server
that must keep going.  On EMFILE it frees a reserved descriptor, accepts
every waiting client and closes it at once (dropping clients it could have
served a moment later); on ENFILE, ENOBUFS and ENOMEM it logs and returns
with the listening socket still readable, so a level-triggered reactor
calls it again at once: 100% CPU and a log line per attempt.

L{GuardedSocket} stands in for the listening socket and turns those errors
into "nothing to accept" (EAGAIN), after telling an L{AcceptThrottle},
which stops reading the socket (through the listener's L{PauseGate}) for a
backoff interval that grows while the errors persist, then tries again.
Waiting clients stay in the kernel's backlog and are served once
descriptors free up.  The socket also takes injected faults, so tests and
operators can make accept() fail with a chosen errno without exhausting
the machine.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lineserver.flow import Pause, PauseGate
from lineserver.stats import Stats
from lineserver.twisted_internals import listening_socket, replace_listening_socket

log = Logger(namespace="lineserver.accept")

#: accept() errors that mean "this process or machine is short of a
#: resource", not "this one client went wrong": retrying at once fails again.
RESOURCE_ERRORS: frozenset[int] = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)

#: The listener gate's reason while the throttle holds accepting off.
THROTTLE_REASON = Pause.ACCEPT_ERRORS


def errno_name(code: int) -> str:
    """
    @return: the symbolic name of C{code} (C{"EMFILE"}), or its number.
    """
    return errno.errorcode.get(code, str(code))


class AcceptThrottle:
    """
    Pauses accepting after resource errors, with a capped, doubling backoff.

    Each error holds the gate's C{accept-errors} reason for the current
    interval, then releases it so the port tries again; the next interval
    is twice as long, up to C{cap} (kept under a second, so that accepting
    resumes within a second of descriptors freeing up).  A successful
    accept resets the interval.

    Failures are logged at most once per C{report_every} seconds (the first
    of an episode at once), with the number of failures since the last
    report, so an hour at the limit is a few hundred lines, not millions.

    @ivar failures: accept errors seen in total.
    @ivar delay: the pause the next error will cause.
    """

    def __init__(
        self,
        clock: IReactorTime,
        gate: PauseGate,
        stats: Stats | None = None,
        initial: float = 0.05,
        cap: float = 0.5,
        report_every: float = 5.0,
        name: str = "",
    ) -> None:
        """
        @param report_every: the least time between two failure reports;
            0 logs every pause (once per backoff interval).
        @param name: what the log lines call the listener (its endpoint).
        """
        if not 0 < initial <= cap:
            raise ValueError(f"need 0 < initial <= cap, got {initial} and {cap}")
        self.clock = clock
        self.gate = gate
        self.stats = stats
        self.initial = initial
        self.cap = cap
        self.report_every = report_every
        self.name = name
        self.delay = initial
        self.failures = 0
        self._failing = False
        self._episode_failures = 0
        self._episode_start = 0.0
        self._unreported = 0
        self._last_report: float | None = None
        self._timer: IDelayedCall | None = None

    @property
    def pausing(self) -> bool:
        """
        @return: whether accepting is held off right now.
        """
        return self._timer is not None

    def on_error(self, code: int) -> None:
        """
        accept() failed with resource error C{code}: stop accepting for a
        while.  While already paused (an accept forced through, as at
        stop), the error only counts.
        """
        name = errno_name(code)
        self.failures += 1
        self._unreported += 1
        if self.stats is not None:
            self.stats.incr(f"accept.errors.{name}")
        now = self.clock.seconds()
        if not self._failing:
            self._failing = True
            self._episode_failures = 0
            self._episode_start = now
        self._episode_failures += 1
        if self._timer is not None:
            return
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        if self._last_report is None or now - self._last_report >= self.report_every:
            log.warn(
                "accept failed with {errno} ({count} times since last report); "
                "pausing accept for {delay:.2f} s{where}",
                errno=name,
                count=self._unreported,
                delay=delay,
                where=f" on {self.name}" if self.name else "",
            )
            self._last_report = now
            self._unreported = 0
        self.gate.hold(THROTTLE_REASON)
        self._timer = self.clock.callLater(delay, self._try_again)

    def on_success(self) -> None:
        """
        accept() worked: the next error starts from the initial interval.
        Called for every accepted client, so the usual case is one test.
        """
        if not self._failing:
            return
        self._failing = False
        self.delay = self.initial
        log.info(
            "accepting again{where} after {count} failed accepts over {seconds:.2f} s",
            where=f" on {self.name}" if self.name else "",
            count=self._episode_failures,
            seconds=self.clock.seconds() - self._episode_start,
        )
        self._episode_failures = 0
        self._unreported = 0
        self._last_report = None

    def _try_again(self) -> None:
        self._timer = None
        self.gate.release(THROTTLE_REASON)

    def stop(self) -> None:
        """
        Cancel a pending retry and release the gate's reason (the listener
        is going away, or accepting should resume now).

        Call it before the port stops listening: releasing the last reason
        calls the gate's resume, and C{startReading} on a closed port raises
        C{ValueError} (its descriptor is -1).  A retry timer left to fire
        after the port closed would hit the same error in the reactor.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.gate.release(THROTTLE_REASON)


class GuardedSocket:
    """
    A listening socket's stand-in whose accept() never makes Twisted spin.

    Every attribute but C{accept} goes to the real socket (the port's
    C{fileno} was bound to the real socket when it started listening).

    @ivar injected: how many more accept() calls fail with L{injected_code}.
    """

    def __init__(
        self, sock: Any, throttle: AcceptThrottle, honour_gate: bool = False
    ) -> None:
        """
        @param honour_gate: also report "nothing to accept" while the
            throttle's gate is paused for any reason, so an accept batch
            stops as soon as a limit (connections, descriptors) is reached
            instead of running on to Twisted's batch size.
        """
        self._sock = sock
        self._throttle = throttle
        self._honour_gate = honour_gate
        self.injected = 0
        self.injected_code = 0

    @property
    def wrapped(self) -> Any:
        return self._sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<GuardedSocket {self._sock!r}>"

    def inject(self, code: int, count: int) -> None:
        """
        Make the next C{count} accept() calls fail with errno C{code}
        without calling the real accept (waiting clients stay in the
        backlog).  A count of 0 clears the fault.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.injected_code = code
        self.injected = count

    def accept(self) -> tuple[socket.socket, Any]:
        if self._honour_gate and self._throttle.gate.paused:
            raise _would_block()
        if self.injected:
            self.injected -= 1
            code = self.injected_code
            if code in RESOURCE_ERRORS:
                self._throttle.on_error(code)
                raise _would_block()
            raise OSError(code, os.strerror(code))
        try:
            accepted: tuple[socket.socket, Any] = self._sock.accept()
        except OSError as error:
            if error.errno in RESOURCE_ERRORS:
                self._throttle.on_error(error.errno)
                raise _would_block() from error
            raise
        self._throttle.on_success()
        return accepted


def _would_block() -> OSError:
    """
    @return: the error Twisted's accept loop takes for "no more clients"
        and returns on quietly.
    """
    return OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def guard_port(
    port: Any, throttle: AcceptThrottle, honour_gate: bool = False
) -> GuardedSocket | None:
    """
    Put a L{GuardedSocket} in front of a listening port's socket (a
    C{tcp.Port}, C{unix.Port}, or anything with a C{socket} attribute).
    Guarding a guarded port returns its guard.

    @return: the guard, or None if the port has no socket (not listening,
        or not a socket port; such ports are left alone).
    """
    sock = listening_socket(port)
    if sock is None:
        return None
    if isinstance(sock, GuardedSocket):
        return sock
    guarded = GuardedSocket(sock, throttle, honour_gate)
    replace_listening_socket(port, guarded)
    return guarded
