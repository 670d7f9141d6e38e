"""ListenerService: one listening endpoint, supervised and throttled.

A listener that cannot listen (port in use, no permission) says why and
tries again with jittered exponential backoff for as long as it runs: a
busy port is a condition to wait out, not a crash.  A listening port that
dies under us is a crash: the listener reports it to its supervisor.

Reading the listening socket is behind a L{PauseGate}, so the reasons to
stop accepting (connection limit, accept errors, descriptor watermark)
compose: accepting resumes only when none of them holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.accept_guard import AcceptThrottle, GuardedSocket, guard_port
from lineserver.connections import ConnectionRegistry
from lineserver.fdlimits import DEFAULT_RESERVE, FdWatermark
from lineserver.flow import PauseGate
from lineserver.interfaces import ISupervisor
from lineserver.ports import listens_everywhere
from lineserver.protocol import LineFactory
from lineserver.proxy import is_proxy_description, proxy_endpoint
from lineserver.stats import Stats

log = Logger(namespace="lineserver.listener")

#: Retry delays for a port we cannot listen on: from 0.1 s, doubling,
#: jittered, capped at 2 s so that a freed port is taken within 2 s.
DEFAULT_LISTEN_RETRY = backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0)


def describe_listen_error(reason: Failure) -> str:
    """
    @return: the OS's words for why listening failed, without Twisted's
        wrapping ("Address already in use", "Permission denied").
    """
    error = reason.value
    if isinstance(error, CannotListenError) and error.socketError is not None:
        inner = error.socketError
        return getattr(inner, "strerror", None) or str(inner)
    return str(error) or error.__class__.__name__


class _PortFactory(Factory):
    """
    Per-port wrapper: tells the listener when its port stops.
    """

    noisy = False

    def __init__(self, inner: LineFactory, stopped: Callable[[], None]) -> None:
        self.inner = inner
        self._stopped = stopped

    @override
    def buildProtocol(self, addr: Any) -> Protocol | None:
        return self.inner.buildProtocol(addr)

    @override
    def doStop(self) -> None:
        self._stopped()


class ListenerService(Service):
    """
    Listens on one endpoint description, like C{tcp:4040:interface=127.0.0.1}.

    @ivar port: the listening port, or None while not listening.
    @ivar gate: holds the reasons not to accept; None while not listening.
    """

    def __init__(
        self,
        description: str,
        factory: LineFactory,
        registry: ConnectionRegistry[Any],
        reactor: Any,
        retry: Callable[[int], float] = DEFAULT_LISTEN_RETRY,
        stats: Stats | None = None,
        on_listening: Callable[[ListenerService], None] | None = None,
        endpoint: IStreamServerEndpoint | None = None,
        fd_reserve: int = DEFAULT_RESERVE,
    ) -> None:
        """
        @param endpoint: listen on this rather than on what Twisted's parser
            makes of C{description} (a TLS port with our own context).
        @param fd_reserve: descriptors kept free below C{RLIMIT_NOFILE}.
        """
        self.description = description
        self.endpoint = endpoint
        self.fd_reserve = fd_reserve
        self.factory = factory
        self.registry = registry
        self.reactor = reactor
        self.retry = retry
        self.stats = stats if stats is not None else Stats()
        self.on_listening = on_listening
        self.port: IListeningPort | None = None
        self.gate: PauseGate | None = None
        self.attempts = 0
        self._retry_call: IDelayedCall | None = None
        self._listening: Deferred[Any] | None = None
        self._stopping = False
        self._waiters: list[Deferred[IListeningPort]] = []
        self.throttle: AcceptThrottle | None = None
        self.guard: GuardedSocket | None = None
        self.watermark: FdWatermark | None = None

    def when_listening(self) -> Deferred[IListeningPort]:
        """
        @return: a Deferred that fires with the port once listening (at
            once if it is); useful with port 0 and in tests.
        """
        if self.port is not None:
            return succeed(self.port)
        waiter: Deferred[IListeningPort] = Deferred()
        self._waiters.append(waiter)
        return waiter

    @override
    def __repr__(self) -> str:
        return f"<ListenerService {self.description}>"

    @override
    def startService(self) -> None:
        super().startService()
        self._stopping = False
        # Listen only once the reactor runs: twistd installs its signal
        # handlers then, and a client must never reach a server that a
        # SIGTERM would kill without its ordered stop.
        self.reactor.callWhenRunning(self._listen_if_running)

    def _listen_if_running(self) -> None:
        if self.running and not self._stopping:
            self._listen()

    def _listen(self) -> None:
        self._retry_call = None
        self.attempts += 1
        try:
            endpoint = self.endpoint or _endpoint(self.reactor, self.description)
            listening = endpoint.listen(_PortFactory(self.factory, self._port_stopped))
        except Exception:
            listening = Deferred()
            listening.errback(Failure())
        self._listening = listening
        listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self._listening = None
        if self._stopping:
            port.stopListening()
            return
        self.port = port
        self.attempts = 0
        self.gate = PauseGate(
            getattr(port, "stopReading", _nothing),
            getattr(port, "startReading", _nothing),
        )
        self.registry.add_listener_gate(self.gate)
        self.throttle = AcceptThrottle(
            self.reactor, self.gate, self.stats, name=self.description
        )
        #: The accept guard: C{guard.inject(errno, count)} makes the next
        #: accepts fail, for tests and fire drills.
        self.guard = guard_port(port, self.throttle, honour_gate=True)
        # A reserve of 0 leaves descriptor exhaustion to the accept guard.
        self.watermark = (
            FdWatermark.from_limit(
                self.gate, clock=self.reactor, stats=self.stats, reserve=self.fd_reserve
            )
            if self.fd_reserve > 0
            else None
        )
        if self.watermark is not None:
            self.watermark.start()
            self.registry.watchers.append(self.watermark.check)
        address = port.getHost()
        log.info(
            "listening on {endpoint} ({address})",
            endpoint=self.description,
            address=address,
        )
        if listens_everywhere(getattr(address, "host", "-")):
            log.warn(
                "{endpoint} listens on every interface: any host that can "
                "reach this machine can connect",
                endpoint=self.description,
            )
        if self.on_listening is not None:
            self.on_listening(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _listen_failed(self, reason: Failure) -> None:
        self._listening = None
        if self._stopping:
            return
        self.stats.incr("listen.failures")
        delay = self.retry(self.attempts)
        log.error(
            "could not listen on {endpoint}: {reason}; retrying in {delay:.2f}s "
            "(attempt {attempt})",
            endpoint=self.description,
            reason=describe_listen_error(reason),
            delay=delay,
            attempt=self.attempts,
        )
        self._retry_call = self.reactor.callLater(delay, self._listen)

    def _port_stopped(self) -> None:
        if self._stopping or not self.running:
            return
        self._forget_port()
        reason = Failure(RuntimeError(f"port {self.description} stopped listening"))
        log.error("listening port {endpoint} was lost", endpoint=self.description)
        parent = self.parent
        if ISupervisor.providedBy(parent):
            parent.child_failed(self, reason)
        else:
            self._listen()

    def _forget_port(self) -> None:
        # The throttle's timer must not touch a port that has closed.
        if self.throttle is not None:
            self.throttle.stop()
        if self.watermark is not None:
            self.watermark.stop()
            if self.watermark.check in self.registry.watchers:
                self.registry.watchers.remove(self.watermark.check)
        self.throttle = self.watermark = self.guard = None
        if self.gate is not None:
            self.registry.remove_listener_gate(self.gate)
        self.gate = None
        self.port = None

    @override
    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Stop accepting; existing connections are not touched.
        """
        super().stopService()
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._listening is not None:
            self._listening.cancel()
        port = self.port
        if port is not None and self.gate is not None and not self.gate.paused:
            accept_backlog(port)
        self._forget_port()
        if port is None:
            return succeed(None)
        stopped: Deferred[Any] = maybeDeferred(port.stopListening)
        return stopped.addCallback(lambda _: None)


def accept_backlog(port: IListeningPort) -> None:
    """
    Accept the connections waiting in the kernel's backlog, once.

    Closing a listening socket resets every connection still in its
    backlog; a client that connected, sent its lines and closed just
    before a stop would lose them.  One last accept pass makes them
    ordinary connections, which the ordered stop then drains.
    """
    do_read = getattr(port, "doRead", None)
    if do_read is not None:
        do_read()


def _endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    if is_proxy_description(description):
        return proxy_endpoint(reactor, description)
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint


def _nothing() -> None:
    pass
