"""ListenerService: one listening endpoint, supervised and throttled.

A listener that cannot listen (port in use, no permission) says why and
tries again with jittered exponential backoff for as long as it runs: a
busy port is a condition to wait out, not a crash.  A listening port that
dies under us is a crash: the listener reports it to its supervisor.

Reading the listening socket is behind a L{PauseGate}, so the reasons to
stop accepting (connection limit, accept errors, descriptor watermark)
compose: accepting resumes only when none of them holds.

Binding and listening are two steps.  A TCP port is bound in
C{privilegedStartService}, before twistd drops privileges (C{--uid}), so a
port below 1024 can be had; it starts listening only when the service runs
and the reactor does, so no client reaches a server that is not ready (a
bound socket that does not listen refuses connections).  See L{PortBinder}.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from lineserver.accept_guard import AcceptThrottle, GuardedSocket, guard_port
from lineserver.connections import ConnectionRegistry
from lineserver.fdlimits import DEFAULT_RESERVE, FdWatermark
from lineserver.flow import PauseGate
from lineserver.interfaces import ISupervisor
from lineserver.ports import listens_everywhere
from lineserver.protocol import LineFactory
from lineserver.proxy import is_proxy_description, proxy_endpoint
from lineserver.stats import Stats
from lineserver.transports import keepalive_on_listener
from lineserver.twisted_internals import use_lean_transport

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


class _NotBoundEarly(Exception):
    """
    This kind of endpoint is not bound ahead of listening (only TCP is).
    """


class _BoundOnly:
    """
    What a dry-run C{listenTCP} returns: a port that is bound, not
    listening, and owned by the L{PortBinder}.
    """

    def __init__(self, skt: socket.socket) -> None:
        self.socket = skt


class PortBinder:
    """
    A view of the reactor for endpoints, that lets a TCP port be bound
    early and listen later.

    Inside L{binding}, C{endpoint.listen(factory)} is a dry run: the
    C{listenTCP} it ends in only creates and binds the socket, and keeps it.
    The next real C{listenTCP} for the same port and interface makes that
    socket listen and hands it to the reactor (C{adoptStreamPort}).  Any
    other C{listenTCP} goes to the reactor as usual, so a port bound once,
    lost and listened on again is bound with the privileges the process
    has by then.  Everything else is the reactor's own.

    TCP is what needs privileges (ports below 1024); every endpoint kind we
    build on it (C{tcp:}, C{tcp6:}, C{ssl:}, C{haproxy:}) goes through
    C{listenTCP}.  Other kinds (C{unix:}) are not bound early.
    """

    def __init__(
        self,
        reactor: Any,
        inherited: dict[tuple[int, str], socket.socket] | None = None,
    ) -> None:
        """
        @param inherited: listening sockets by (port, interface) as
            C{listenTCP} is asked for them, bound by another process (a
            worker's parent, L{lineserver.workers}): adopted, never bound.
        """
        self._reactor = reactor
        self._bound: dict[tuple[int, str], socket.socket] = {}
        self._inherited = inherited or {}
        self._backlogs: dict[tuple[int, str], int] = {}
        self._dry_run = False

    def __getattr__(self, name: str) -> Any:
        if self._dry_run and name.startswith(("listen", "adopt")):
            raise _NotBoundEarly(name)
        return getattr(self._reactor, name)

    @contextmanager
    def binding(self) -> Iterator[None]:
        """
        Within this block, listening on a TCP endpoint only binds it.
        """
        self._dry_run = True
        try:
            yield
        finally:
            self._dry_run = False

    def listenTCP(  # noqa: N802 (IReactorTCP's name)
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        key = (port, interface)
        inherited = self._inherited.get(key)
        if inherited is not None:
            if self._dry_run:
                return _BoundOnly(inherited)
            # adoptStreamPort takes its own copy; ours stays for a re-listen.
            return self._reactor.adoptStreamPort(
                inherited.fileno(), inherited.family, factory
            )
        if self._dry_run:
            if key not in self._bound:
                self._bound[key] = _bind(port, interface)
            self._backlogs[key] = backlog
            return _BoundOnly(self._bound[key])
        skt = self._bound.pop(key, None)
        if skt is None:
            return self._reactor.listenTCP(port, factory, backlog, interface)
        try:
            skt.listen(backlog)
            return self._reactor.adoptStreamPort(skt.fileno(), skt.family, factory)
        except OSError as error:
            raise CannotListenError(interface, port, error) from error
        finally:
            # adoptStreamPort made its own copy of the descriptor.
            skt.close()

    @property
    def bound(self) -> int:
        """
        How many sockets are bound and waiting to listen.
        """
        return len(self._bound)

    def hand_over(self) -> dict[tuple[int, str], tuple[socket.socket, int]]:
        """
        Give up the sockets bound early, with the backlog each was to
        listen with, to a caller that listens on them itself (a parent that
        passes them to its workers); the binder forgets them.
        """
        bound, self._bound = self._bound, {}
        return {key: (skt, self._backlogs.get(key, 50)) for key, skt in bound.items()}

    def release(self) -> None:
        """
        Close the sockets bound early that never came to listen.
        """
        bound, self._bound = self._bound, {}
        for skt in bound.values():
            skt.close()


def _bind(port: int, interface: str) -> socket.socket:
    """
    A non-blocking TCP socket bound as Twisted's C{tcp.Port} binds it
    (C{SO_REUSEADDR}), not listening.

    @raise CannotListenError: as C{listenTCP} would.
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    try:
        address = socket.getaddrinfo(
            interface or None,
            port,
            family,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE | socket.AI_NUMERICHOST,
        )[0][4]
        skt = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise CannotListenError(interface, port, error) from error
    try:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        skt.setblocking(False)
        skt.bind(address)
    except OSError as error:
        skt.close()
        raise CannotListenError(interface, port, error) from error
    return skt


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


class SupervisedPort(Service):
    """
    One endpoint, listened on for as long as the service runs.

    The port is bound in C{privilegedStartService} (before twistd drops
    privileges) and listens once the service runs and the reactor does.  A
    port it cannot listen on (in use, no permission) is logged and retried
    with jittered backoff: a condition to wait out, not a crash.  A port
    that dies while listening is a crash, reported to the supervisor.
    Subclasses say what to serve (L{_factory}) and what to do with a port
    that listens or is let go (L{_listened_on}, L{_forget_port}).

    @ivar port: the listening port, or None while not listening.
    @ivar binder: binds the port in C{privilegedStartService}; the
        C{endpoint}, if given, must have been built on it to benefit.
    """

    #: What the log says this port does: "could not listen on ...".
    verb = "listen on"
    #: What the log calls this port: "listening port ... was lost".
    noun = "listening port"

    def __init__(
        self,
        description: str,
        reactor: Any,
        retry: Callable[[int], float] = DEFAULT_LISTEN_RETRY,
        endpoint: IStreamServerEndpoint | None = None,
        binder: PortBinder | None = None,
    ) -> None:
        """
        @param endpoint: listen on this rather than on what Twisted's parser
            makes of C{description} (a TLS port with our own context).
        @param binder: the reactor view C{endpoint} was built on (a new one
            on C{reactor} if None).
        """
        self.description = description
        self.endpoint = endpoint
        self.reactor = reactor
        self.retry = retry
        self.binder = binder if binder is not None else PortBinder(reactor)
        self.port: IListeningPort | None = None
        self.attempts = 0
        self._retry_call: IDelayedCall | None = None
        self._listening: Deferred[Any] | None = None
        self._stopping = False
        self._waiters: list[Deferred[IListeningPort]] = []

    # -- what subclasses say -------------------------------------------------

    def _logger(self) -> Logger:
        """
        @return: where this port logs (a subclass, under its own namespace;
            not a class attribute: a Logger there names itself after the
            class).
        """
        return log

    def _factory(self, stopped: Callable[[], None]) -> IProtocolFactory:
        """
        @param stopped: to call from the factory's C{doStop}, so that a port
            that stops under us is noticed.
        @return: the factory to listen with.
        """
        raise NotImplementedError

    def _listened_on(self, port: IListeningPort) -> None:
        """
        The port listens (L{port} is set): set up what goes with it.
        """

    def _listen_failed_once(self, reason: Failure) -> None:
        """
        Listening failed once (it is retried): count it if you count.
        """

    def _forget_port(self) -> None:
        """
        Let the port go (stopped, or lost); undo what L{_listened_on} did.
        """
        self.port = None

    def _before_close(self, port: IListeningPort) -> None:
        """
        Last words with a port about to stop listening.
        """

    # -- the life of the port ------------------------------------------------

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
        return f"<{type(self).__name__} {self.description}>"

    @override
    def privilegedStartService(self) -> None:
        """
        Bind the port now, while the process may still have the privileges
        a port below 1024 needs; it listens only in L{startService}.  A
        port that cannot be bound now is left to the listen and its retries.
        """
        super().privilegedStartService()
        try:
            with self.binder.binding():
                dry_run = self._endpoint().listen(Factory())
        except Exception:
            dry_run = fail()
        dry_run.addErrback(self._not_bound_early)

    def _not_bound_early(self, reason: Failure) -> None:
        if not reason.check(_NotBoundEarly):
            self._logger().debug(
                "could not bind {endpoint} early: {reason}; binding when listening",
                endpoint=self.description,
                reason=describe_listen_error(reason),
            )

    def _endpoint(self) -> IStreamServerEndpoint:
        return self.endpoint or server_endpoint(self.binder, self.description)

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
            listening = self._endpoint().listen(self._factory(self._port_stopped))
        except Exception:
            listening = fail()
        self._listening = listening
        listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self._listening = None
        if self._stopping:
            port.stopListening()
            return
        self.port = port
        self.attempts = 0
        self._listened_on(port)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _listen_failed(self, reason: Failure) -> None:
        self._listening = None
        if self._stopping:
            return
        self._listen_failed_once(reason)
        delay = self.retry(self.attempts)
        self._logger().error(
            "could not {verb} {endpoint}: {reason}; retrying in {delay:.2f}s "
            "(attempt {attempt})",
            verb=self.verb,
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
        self._logger().error(
            "{noun} {endpoint} was lost", noun=self.noun, endpoint=self.description
        )
        parent = self.parent
        if ISupervisor.providedBy(parent):
            parent.child_failed(self, reason)
        else:
            self._listen()

    @override
    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Stop listening; connections already made are not touched.
        """
        super().stopService()
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._listening is not None:
            self._listening.cancel()
        self.binder.release()
        port = self.port
        if port is not None:
            self._before_close(port)
        self._forget_port()
        if port is None:
            return succeed(None)
        stopped: Deferred[Any] = maybeDeferred(port.stopListening)
        return stopped.addCallback(lambda _: None)


class ListenerService(SupervisedPort):
    """
    Listens on one endpoint description, like C{tcp:4040:interface=127.0.0.1},
    for lines, with its accept throttle, descriptor watermark and the
    registry's connection limit on one gate.

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
        endpoint: IStreamServerEndpoint | None = None,
        fd_reserve: int = DEFAULT_RESERVE,
        binder: PortBinder | None = None,
    ) -> None:
        """
        @param fd_reserve: descriptors kept free below C{RLIMIT_NOFILE}.
        """
        super().__init__(description, reactor, retry, endpoint, binder)
        self.fd_reserve = fd_reserve
        self.factory = factory
        self.registry = registry
        self.stats = stats if stats is not None else Stats()
        self.gate: PauseGate | None = None
        self.throttle: AcceptThrottle | None = None
        self.guard: GuardedSocket | None = None
        self.watermark: FdWatermark | None = None

    @override
    def _factory(self, stopped: Callable[[], None]) -> IProtocolFactory:
        return _PortFactory(self.factory, stopped)

    @override
    def _listened_on(self, port: IListeningPort) -> None:
        keepalive = self.factory.settings.tcp_keepalive
        if keepalive:
            keepalive_on_listener(port, keepalive)
        use_lean_transport(port)
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

    @override
    def _listen_failed_once(self, reason: Failure) -> None:
        self.stats.incr("listen.failures")

    @override
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
        super()._forget_port()

    @override
    def _before_close(self, port: IListeningPort) -> None:
        if self.gate is not None and not self.gate.paused:
            accept_backlog(port)


#: At most this many accept passes when taking in the backlog at a stop.
_BACKLOG_PASSES = 1000


def accept_backlog(port: IListeningPort) -> None:
    """
    Accept the connections waiting in the kernel's backlog, once.

    Closing a listening socket resets every connection still in its
    backlog; a client that connected, sent its lines and closed just
    before a stop would lose them.  One last accept pass makes them
    ordinary connections, which the ordered stop then drains.
    """
    do_read = getattr(port, "doRead", None)
    if do_read is None:
        return
    # One doRead accepts at most as many as the last one did (Twisted
    # scales it to the traffic; after a trickle, one): go on while the
    # socket still holds connections, a bounded number of times.
    poller = select.poll()
    poller.register(port.fileno(), select.POLLIN)  # type: ignore[attr-defined]
    for _ in range(_BACKLOG_PASSES):
        do_read()
        if not poller.poll(0):
            return


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The one way lineserver turns a server endpoint description into an
    endpoint, for line ports, C{--metrics} and C{--control} alike.

    It is Twisted's C{serverFromString}, but for two kinds: a socket
    inherited from systemd (C{systemd:...}) becomes an L{InheritedEndpoint},
    which can listen again after a stop (Twisted's own closes the
    descriptor after the first listen); and C{haproxy:} wraps the endpoint
    this function builds for the rest of the description (so
    C{haproxy:systemd:...} is inherited too) in our header-aware PROXY
    layer.

    @param reactor: the reactor, or the L{PortBinder} in front of it.
    """
    if is_proxy_description(description):
        # The endpoint under the PROXY layer, built here: it may be systemd's.
        inner = description.split(":", 1)[1]
        return proxy_endpoint(reactor, server_endpoint(reactor, inner))
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    if isinstance(endpoint, AdoptedStreamServerEndpoint):
        return InheritedEndpoint(reactor, endpoint.fileno, endpoint.addressFamily)
    return endpoint


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """
    A listening socket inherited from systemd (C{systemd:domain=INET:index=0}),
    listened on as often as asked.

    Twisted's C{AdoptedStreamServerEndpoint} closes the inherited descriptor
    once it has adopted a copy, so a port that stopped (lost, restarted by
    the supervisor, or listening again after a stop) would adopt whatever
    file next took that number.  This one keeps the descriptor for the life
    of the process: each listen adopts a fresh copy of the same socket, and
    while no copy listens, new connections wait in the kernel's queue, as
    they do between two runs of the service.
    """

    def __init__(self, reactor: Any, fileno: int, family: int) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            os.set_blocking(self.fileno, False)
            port: IListeningPort = self.reactor.adoptStreamPort(
                self.fileno, self.family, factory
            )
        except Exception:
            return fail()
        return succeed(port)


def _nothing() -> None:
    pass
