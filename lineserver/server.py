"""LineServer: the root of the service tree, and its ordered shutdown.

    LineServer (Supervisor, one_for_one)
    ├── sink        permanent: SinkService around the shared SinkQueue
    ├── listener *  permanent: one ListenerService per endpoint
    └── connections temporary: tracked by the ConnectionRegistry

Start order is sink first, listeners last.  Stopping is sequenced here,
because MultiService would stop every child at once: stop accepting, let
what clients already sent drain into the queue, flush and close the sink,
then close the connections, all within the shutdown timeout.
"""

from __future__ import annotations

import fcntl
import socket
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.connections import ConnectionRegistry, Overflow
from lineserver.fdlimits import DEFAULT_RESERVE
from lineserver.flow import Pause, SinkQueue
from lineserver.handlers import EchoHandlerFactory, SinkHandlerFactory
from lineserver.interfaces import ILineHandlerFactory, ISinkFactory
from lineserver.listener import ListenerService
from lineserver.ports import with_defaults
from lineserver.protocol import LineFactory, LineProtocol, ProtocolSettings
from lineserver.security import Security, SecurityConfig
from lineserver.sink_service import SinkService
from lineserver.stats import Stats
from lineserver.supervisor import ChildSpec, Supervisor

log = Logger(namespace="lineserver.server")

DEFAULT_PORT = "tcp:4040:interface=127.0.0.1"
DRAIN_REASON = Pause.DRAINING

HandlerBuilder = Callable[[SinkQueue], ILineHandlerFactory]
"""
Builds the handler factory, given the sink queue it may feed.
"""

HANDLERS: dict[str, HandlerBuilder] = {
    "echo": lambda queue: EchoHandlerFactory(),
    "sink": SinkHandlerFactory,
}


@dataclass(frozen=True)
class ServerConfig:
    """
    Everything a LineServer needs to know; the twistd options map onto it.

    Sizes are bytes, times are seconds; None means no limit.  C{fd_reserve}
    is how many descriptors below C{RLIMIT_NOFILE} accepting pauses at.
    A port without C{interface=} binds loopback only, and one without
    C{backlog=} gets C{backlog} (L{lineserver.ports.with_defaults}).
    """

    ports: Sequence[str] = (DEFAULT_PORT,)
    settings: ProtocolSettings = field(default_factory=ProtocolSettings)
    max_connections: int | None = None
    max_connections_per_peer: int | None = None
    overflow: Overflow = "wait"
    shutdown_timeout: float = 10.0
    high_watermark: int = 4 << 20
    low_watermark: int = 1 << 20
    max_batch_bytes: int = 1 << 20
    max_restarts: int = 5
    restart_period: float = 10.0
    security: SecurityConfig = field(default_factory=SecurityConfig)
    fd_reserve: int = DEFAULT_RESERVE
    backlog: int = 1024


def pending_input(conn: LineProtocol) -> int:
    """
    @return: bytes the kernel holds for C{conn} that we have not read yet
        (0 if it cannot tell, as for a transport with no socket).
    """
    transport: Any = conn.transport
    for _ in range(4):
        if transport is None:
            return 0
        skt = getattr(transport, "socket", None)
        if isinstance(skt, socket.socket):
            try:
                buf = fcntl.ioctl(skt.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                return 0
            return int.from_bytes(buf, "little")
        transport = getattr(transport, "transport", None)
    return 0


class LineServer(Supervisor):
    """
    The whole server as one service, to run under twistd or to embed.

    @ivar stats: counters and gauges of this server.
    @ivar queue: the sink queue (also in echo mode, where it stays empty).
    @ivar registry: the live connections.
    @ivar factory: the protocol factory every listener shares.
    """

    def __init__(
        self,
        config: ServerConfig,
        reactor: Any,
        handler: HandlerBuilder | str = "sink",
        sink: ISinkFactory | None = None,
        stats: Stats | None = None,
        on_escalate: Callable[[Failure], None] | None = None,
        protocol_class: type[LineProtocol] | None = None,
    ) -> None:
        super().__init__(
            clock=reactor,
            max_restarts=config.max_restarts,
            period=config.restart_period,
            on_escalate=on_escalate,
        )
        build = HANDLERS[handler] if isinstance(handler, str) else handler
        self.config = config
        self.reactor = reactor
        self.stats = stats if stats is not None else Stats()
        self.queue = SinkQueue(config.high_watermark, config.low_watermark)
        self.stats.add_gauge("queue.bytes", lambda: self.queue.buffered)
        self.stats.add_gauge("queue.pauses", lambda: self.queue.pauses)
        self.registry: ConnectionRegistry[LineProtocol] = ConnectionRegistry(
            max_connections=config.max_connections,
            max_per_peer=config.max_connections_per_peer,
            overflow=config.overflow,
            stats=self.stats,
        )
        #: Allow list, tokens and TLS contexts; reading their files here
        #: makes a bad one fail the start, not a connection.
        self.security = Security(config.security)
        self.factory = LineFactory(
            build(self.queue),
            self.registry,
            reactor,
            config.settings,
            self.stats,
            protocol_class,
            policy=self.security.policy(),
        )
        self.sink_factory = sink
        self.stopping: Deferred[None] | None = None
        if sink is not None:
            self.add_child(ChildSpec("sink", self._make_sink_service))
        for index, given in enumerate(config.ports):
            description = with_defaults(given, config.backlog)
            endpoint = self.security.endpoint(reactor, description)
            self.add_child(
                ChildSpec(
                    f"listener {index} {description}",
                    self._listener_maker(description, endpoint),
                )
            )

    @override
    def startService(self) -> None:
        self.security.log_contexts()
        super().startService()

    def _make_sink_service(self) -> SinkService:
        assert self.sink_factory is not None
        return SinkService(
            self.sink_factory, self.queue, self.stats, self.config.max_batch_bytes
        )

    def _listener_maker(
        self, description: str, endpoint: IStreamServerEndpoint | None
    ) -> Callable[[], ListenerService]:
        def make() -> ListenerService:
            return ListenerService(
                description,
                self.factory,
                self.registry,
                self.reactor,
                stats=self.stats,
                endpoint=endpoint,
                fd_reserve=self.config.fd_reserve,
            )

        return make

    def reload(self) -> bool:
        """
        Read certificates, keys, client CAs and auth tokens again, for new
        connections (what SIGHUP does under twistd).  A file that no longer
        loads is logged and what was loaded before stays in use.

        @return: True if every file was reloaded.
        """
        return self.security.reload()

    @property
    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    def when_listening(self) -> Deferred[list[Any]]:
        """
        @return: a Deferred that fires with every listening port, once all
            listeners listen (with C{tcp:0}, read the real port from it).
        """
        waiting = gatherResults(
            [listener.when_listening() for listener in self.listeners]
        )
        return waiting

    def port_numbers(self) -> list[int]:
        """
        @return: the port number of each listening IP listener.
        """
        return [
            listener.port.getHost().port  # type: ignore[attr-defined]
            for listener in self.listeners
            if listener.port is not None
        ]

    @property
    def sink_service(self) -> SinkService | None:
        for service in self:
            if isinstance(service, SinkService):
                return service
        return None

    @override
    def stopService(self) -> Deferred[None]:
        """
        Stop in order: accept nothing, drain, flush the sink, close.
        """
        if self.stopping is None:
            self.stopping = self._stop_in_order()
        return self.stopping

    def _stop_in_order(self) -> Deferred[None]:
        timeout = self.config.shutdown_timeout
        deadline = self.reactor.seconds() + timeout
        log.info(
            "stopping: {n} connection(s), {q} bytes queued; timeout {t}s",
            n=len(self.registry),
            q=self.queue.buffered,
            t=timeout,
        )
        stopped = DeferredList(
            [listener.stopService() for listener in self.listeners],
            consumeErrors=True,
        )
        for waiter in self.registry.stop_accepting():
            waiter.slot_granted()
        stopped.addCallback(lambda _: self._drain_input(deadline))
        stopped.addCallback(lambda _: self._flush_sink(deadline))
        stopped.addCallback(lambda _: self._close_connections(deadline))
        stopped.addCallback(lambda _: super(LineServer, self).stopService())
        return stopped.addCallback(self._stopped)

    def _drain_input(self, deadline: float) -> Deferred[None]:
        """
        Read what clients had sent before the stop, then stop reading them.

        A connection is done once the kernel holds nothing unread for it;
        half the shutdown time at most goes to this, the rest to the sink.
        """
        budget_end = self.reactor.seconds() + (deadline - self.reactor.seconds()) / 2
        done: Deferred[None] = Deferred()

        def check() -> None:
            last = self.reactor.seconds() >= budget_end
            for conn in self.registry:
                if DRAIN_REASON not in conn.gate.reasons and (
                    last or pending_input(conn) == 0
                ):
                    conn.gate.hold(DRAIN_REASON)
            if all(DRAIN_REASON in conn.gate.reasons for conn in self.registry):
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(0.02, now=True).addCallback(lambda _: done.callback(None))
        return done

    def _flush_sink(self, deadline: float) -> Deferred[None]:
        service = self.sink_service
        if service is None:
            return succeed(None)
        flushed = service.stopService()
        remaining = max(0.0, deadline - self.reactor.seconds())

        def too_late(result: object, waited: float) -> object:
            log.error(
                "sink did not flush within {t:.1f}s; {q} bytes still queued",
                t=waited,
                q=self.queue.buffered,
            )
            return None

        flushed.addTimeout(remaining, self.reactor, onTimeoutCancel=too_late)
        flushed.addErrback(lambda reason: log.failure("sink failed to stop", reason))
        return flushed

    def _close_connections(self, deadline: float) -> Deferred[None]:
        for conn in self.registry:
            conn.close()
        empty = self.registry.when_empty()
        remaining = max(0.1, deadline - self.reactor.seconds())

        def abort_rest(result: object, waited: float) -> None:
            for conn in self.registry:
                conn.transport.abortConnection()

        empty.addTimeout(remaining, self.reactor, onTimeoutCancel=abort_rest)
        return empty

    def _stopped(self, _: object) -> None:
        log.info(
            "stopped: {delivered} line(s) delivered, {queued} bytes left queued",
            delivered=self.stats.get("lines.delivered"),
            queued=self.queue.buffered,
        )
