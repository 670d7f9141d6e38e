"""SIGHUP as a service: reload configuration files while running.

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


class HangupReload(Service):
    """
    Calls C{reload} from the reactor on each SIGHUP while running.

    The handler is installed once the reactor runs (twistd installs its
    own handlers then, and would not touch SIGHUP, but one installed
    earlier would fire before the reactor can take the call) and the
    previous one is put back on stop.
    """

    def __init__(
        self, reactor: Any, reload: Callable[[], object], signum: int = signal.SIGHUP
    ) -> None:
        self.reactor = reactor
        self.reload = reload
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
        self.reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading certificates and tokens, reopening the sink")
        try:
            self.reload()
        except Exception:
            log.failure("reload failed")

    @override
    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(self.signum, previous)
            self._installed = False
