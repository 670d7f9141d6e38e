"""L{ServerControl}: the control target over one L{lineserver.server.LineServer}."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from lineserver.control.answers import ConnectionInfo, ListenerInfo, ServerInfo
from lineserver.control.dispatch import IControlTarget
from lineserver.protocol import describe_address


@implementer(IControlTarget)
class ServerControl:
    """
    The control target over one L{lineserver.server.LineServer}.

    @ivar exit: ends the process once the server has stopped (twistd:
        C{reactor.stop}, which exits with status 0).
    @ivar reopen: reopens the log files (L{lineserver.logs.reopen_logs}).
    """

    def __init__(
        self,
        server: Any,
        reactor: Any,
        mode: str = "sink",
        exit: Callable[[], object] | None = None,
        reopen: Callable[[], list[str]] | None = None,
        version: str = "",
    ) -> None:
        self.server = server
        self.reactor = reactor
        self.mode = mode
        self.exit = exit if exit is not None else self._stop_reactor
        self.reopen = reopen
        self.version = version
        self._started = time.monotonic()
        self._drain: Deferred[str] | None = None
        self._drain_waiters: list[Deferred[str]] = []

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def info(self) -> ServerInfo:
        server = self.server
        listeners = tuple(
            ListenerInfo(
                str(listener.name),
                describe_address(listener.port.getHost())
                if listener.port is not None
                else None,
                listener.gate is not None and not listener.gate.paused,
            )
            for listener in server.listeners
        )
        extra = {}
        metrics = server.metrics
        if metrics is not None:
            extra["metrics"] = metrics.description
        return ServerInfo(
            pid=os.getpid(),
            version=self.version,
            uptime=time.monotonic() - self._started,
            phase=server.phase.value,
            mode=self.mode,
            listeners_enabled=server.listeners_enabled,
            max_connections=server.registry.max_connections,
            connections=len(server.registry),
            listeners=listeners,
            extra=extra,
        )

    def stats(self) -> dict[str, int]:
        return dict(self.server.stats.snapshot())

    def connections(self) -> list[ConnectionInfo]:
        found = [
            ConnectionInfo(
                id=conn.number,
                peer=describe_address(conn.peer),
                subject=conn.tls_subject,
                age=conn.age,
                lines=conn.session.lines,
                bytes=conn.session.bytes,
                paused=tuple(sorted(reason.value for reason in conn.gate.reasons)),
            )
            for conn in self.server.registry
        ]
        return sorted(found, key=lambda c: c.id)

    def enable_listeners(self, enabled: bool) -> None:
        self.server.enable_listeners(enabled)

    def set_max_connections(self, limit: int | None) -> None:
        self.server.set_max_connections(limit)

    def kill_connection(self, number: int) -> bool:
        return bool(self.server.kill_connection(number))

    def reload(self) -> bool:
        return bool(self.server.reload())

    def reopen_logs(self) -> list[str]:
        return self.reopen() if self.reopen is not None else []

    def drain(self, grace: float) -> Deferred[str]:
        """
        Drain once: a second C{drain} (another operator) waits for the
        first one's end and gets the same summary.
        """
        if self._drain is not None:
            waiter: Deferred[str] = Deferred()
            self._drain_waiters.append(waiter)
            return waiter
        self._drain = self._drain_once(grace)
        self._drain.addBoth(self._drained)
        return self._drain

    def _drained(self, result: Any) -> Any:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return result

    def _drain_once(self, grace: float) -> Deferred[str]:
        server = self.server
        server.enable_listeners(False)
        left: Deferred[None] = server.registry.when_empty()
        if grace > 0:
            left.addTimeout(grace, self.reactor)
        else:
            left.cancel()
        left.addErrback(lambda _: None)

        def stop(_: object) -> Deferred[None]:
            stopped: Deferred[None] = server.stopService()
            return stopped

        def done(_: object) -> str:
            delivered = server.stats.get("lines.delivered")
            # After the answer is written: the reactor flushes it while it
            # shuts down, and the process exits with status 0.
            self.reactor.callLater(0, self.exit)
            return f"drained: {delivered} line(s) delivered; exiting with status 0"

        return left.addCallback(stop).addCallback(done)
