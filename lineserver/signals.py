"""Signals as services: SIGHUP reloads configuration files, SIGUSR1
reopens the log files (for logrotate), while running.

A signal arrives between two bytecodes of whatever the main thread runs;
the handler only asks the reactor to call back from its loop
(C{callFromThread} is the one reactor call that is safe there, and it
wakes the reactor up), so the reload runs like any other event.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger
from typing_extensions import override

log = Logger(namespace="lineserver.signals")

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalAction(Service):
    """
    Calls C{action} from the reactor on each C{signum} while running.

    The handler is installed once the reactor runs (twistd installs its
    own handlers then, and its SIGUSR1 log rotation before: ours replaces
    it; one installed earlier would fire before the reactor can take the
    call) and the previous one is put back on stop.
    """

    #: What the log says when the signal comes.
    message = "{signal}: running {action!r}"

    def __init__(self, reactor: Any, action: Callable[[], object], signum: int) -> None:
        self.reactor = reactor
        self.action = action
        self.signum = signum
        self._previous: _Handler = None
        self._installed = False

    @override
    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running or self._installed:
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self._act)

    def _act(self) -> None:
        log.info(
            self.message,
            signal=signal.Signals(self.signum).name,
            action=self.action,
        )
        try:
            self.action()
        except Exception:
            log.failure("{signal} action failed", signal=self.signum)

    @override
    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(self.signum, previous)
            self._installed = False


class HangupReload(SignalAction):
    """
    SIGHUP: reload certificates and tokens, reopen the sink.
    """

    message = "SIGHUP: reloading certificates and tokens, reopening the sink"

    def __init__(
        self, reactor: Any, reload: Callable[[], object], signum: int = signal.SIGHUP
    ) -> None:
        super().__init__(reactor, reload, signum)

    @property
    def reload(self) -> Callable[[], object]:
        return self.action


class LogReopen(SignalAction):
    """
    SIGUSR1: reopen the log files, after logrotate moved them.
    """

    message = "SIGUSR1: reopening the log files"

    def __init__(
        self,
        reactor: Any,
        reopen: Callable[[], object],
        signum: int = signal.SIGUSR1,
    ) -> None:
        super().__init__(reactor, self._reopen, signum)
        self.reopen = reopen

    def _reopen(self) -> None:
        reopened = self.reopen()
        log.info("reopened {files}", files=reopened)
