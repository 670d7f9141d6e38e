"""LineServer: the root of the service tree, and its ordered shutdown.

    LineServer (Supervisor, one_for_one)
    ├── sink        permanent: SinkService around the shared SinkQueue
    ├── listener *  permanent: one ListenerService per endpoint
    └── connections temporary: tracked by the ConnectionRegistry

The whole life of the server is sequenced here, in one place.  Starting:
the sink opens first, and the listeners listen only once it is open (a sink
that cannot open fails the start, and no client was ever let in).
Stopping, which MultiService would do to every child at once: stop
accepting, let what clients already sent drain into the queue, flush and
close the sink, then close the connections, all within the shutdown
timeout, each child stopped once (the L{Supervisor} sees to that, and
restarts nothing while it stops).  A stopped server can be started again.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    TimeoutError,
    gatherResults,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.connections import ConnectionRegistry, Overflow
from lineserver.fdlimits import DEFAULT_RESERVE
from lineserver.flow import Pause, SinkQueue
from lineserver.handlers import (
    AckSinkHandlerFactory,
    EchoHandlerFactory,
    SinkHandlerFactory,
)
from lineserver.interfaces import ILineHandlerFactory, ISinkFactory
from lineserver.listener import ListenerService, PortBinder
from lineserver.metrics import (
    RESTARTS_PREFIX,
    LatencyHistogram,
    MetricsService,
    metrics_registry,
)
from lineserver.outage import is_outage, outage_backoff
from lineserver.ports import with_defaults
from lineserver.protocol import LineFactory, LineProtocol, ProtocolSettings
from lineserver.security import Security, SecurityConfig
from lineserver.sink_service import (
    SinkFailed,
    SinkService,
    describe_failure,
    queued_lines,
)
from lineserver.sinks import IWantsOrigin
from lineserver.stats import Stats
from lineserver.supervisor import ChildSpec, Supervisor
from lineserver.transports import pending_input

log = Logger(namespace="lineserver.server")

DEFAULT_PORT = "tcp:4040:interface=127.0.0.1"
DRAIN_REASON = Pause.DRAINING
SINK = "sink"

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
    C{metrics}, an endpoint description, serves Prometheus metrics at
    C{/metrics} there (with the same defaults); None serves none.
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
    metrics: str | None = None
    #: C{--ack}: acknowledge each connection's durable lines (sink mode).
    ack: bool = False
    #: C{--ack-interval}: seconds between repeats of a waiting ACK.
    ack_interval: float = 2.0


class Phase(Enum):
    """
    Where a L{LineServer} is in its life; one value, never inferred.
    """

    STOPPED = "stopped"
    #: The sink is opening; no port listens yet.
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class LineServer(Supervisor):
    """
    The whole server as one service, to run under twistd or to embed.

    @ivar stats: counters and gauges of this server.
    @ivar queue: the sink queue (also in echo mode, where it stays empty).
    @ivar registry: the live connections.
    @ivar factory: the protocol factory every listener shares.
    @ivar phase: where the server is in its life.
    @ivar start_failure: why the last start failed (the sink could not
        open), or None.
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
        on_start_failed: Callable[[Failure], None] | None = None,
        inherited: dict[tuple[int, str], socket.socket] | None = None,
    ) -> None:
        """
        @param handler: C{"sink"}, C{"echo"}, or a handler builder.
        @param sink: where lines go; required with the C{"sink"} handler.
        @param on_escalate: called, once the server has stopped, when the
            restart intensity is exceeded.
        @param on_start_failed: called, once the server has stopped, when a
            start fails because the sink could not open; C{on_escalate} if
            not given (either way the server gave up).
        @param inherited: listening sockets bound by a parent process, by
            (port, interface): a worker adopts them (L{lineserver.workers}).
        @raise ValueError: the C{"sink"} handler without a sink.
        """
        build = HANDLERS[handler] if isinstance(handler, str) else handler
        if build is SinkHandlerFactory and sink is None:
            raise ValueError(
                "the sink handler needs a sink: pass sink= an ISinkFactory "
                "(e.g. sink_factory_from_url('file:lines.log', reactor)), "
                "or use handler='echo'"
            )
        super().__init__(
            clock=reactor,
            max_restarts=config.max_restarts,
            period=config.restart_period,
            on_escalate=on_escalate,
        )
        self.config = config
        self.reactor = reactor
        self.stats = stats if stats is not None else Stats()
        self.queue = SinkQueue(config.high_watermark, config.low_watermark)
        self.stats.add_gauge("queue.bytes", lambda: self.queue.buffered)
        self.stats.add_gauge("queue.pauses", lambda: self.queue.pauses)
        self.stats.add_gauge("queue.lines", lambda: self.queue.buffered_lines)
        self.stats.add_gauge("supervisor.restarts", lambda: self.restarts)
        #: Sink write latency, for C{lineserver_sink_write_seconds}.
        self.sink_writes = LatencyHistogram()
        self.registry: ConnectionRegistry[LineProtocol] = ConnectionRegistry(
            max_connections=config.max_connections,
            max_per_peer=config.max_connections_per_peer,
            overflow=config.overflow,
            stats=self.stats,
        )
        self.stats.add_gauge("connections.open", lambda: len(self.registry))
        #: Allow list, tokens and TLS contexts; reading their files here
        #: makes a bad one fail the start, not a connection.
        self.security = Security(config.security)
        handlers = build(self.queue)
        if config.ack:
            if build is not SinkHandlerFactory:
                raise ValueError("ack=True needs the sink handler")
            handlers = AckSinkHandlerFactory(self.queue, reactor, config.ack_interval)
        if IWantsOrigin.providedBy(sink) and isinstance(
            handlers, (SinkHandlerFactory, AckSinkHandlerFactory)
        ):
            handlers.origin = True
        self.factory = LineFactory(
            handlers,
            self.registry,
            reactor,
            config.settings,
            self.stats,
            protocol_class,
            policy=self.security.policy(),
        )
        self.sink_factory = sink
        self.phase = Phase.STOPPED
        self.start_failure: Failure | None = None
        self._on_start_failed = on_start_failed or on_escalate
        if sink is not None:
            # A sink whose destination is down is an outage, not a crash.
            self.add_child(ChildSpec(SINK, self._make_sink_service, outage=is_outage))
        for index, given in enumerate(config.ports):
            description = with_defaults(given, config.backlog)
            # Endpoints are built on a binder, so that they can be bound in
            # privilegedStartService and listen later.
            binder = PortBinder(reactor, inherited)
            endpoint = self.security.endpoint(binder, description)
            self.add_child(
                ChildSpec(
                    f"listener {index} {description}",
                    self._listener_maker(description, endpoint, binder),
                )
            )
        if config.metrics is not None:
            # After the listeners: it starts with them and, stopped last,
            # still answers scrapes while the server drains.
            metrics = with_defaults(config.metrics, config.backlog)
            registry = metrics_registry(self.stats, sink_writes=self.sink_writes)
            self.add_child(
                ChildSpec(
                    f"metrics {metrics}",
                    lambda: MetricsService(metrics, registry, reactor),
                )
            )

    @override
    def add_child(self, spec: ChildSpec) -> IService:
        """
        Supervise a child, and count its restarts under its own name
        (C{supervisor.restarts.<name>}).
        """
        service = super().add_child(spec)
        self.stats.add_gauge(
            RESTARTS_PREFIX + spec.name, lambda: self.restarts_by_child[spec.name]
        )
        return service

    @override
    def startService(self) -> None:
        self.security.log_contexts()
        super().startService()

    @override
    def start_children(self) -> None:
        """
        Open the sink, then start the listeners (and the rest) once it is
        open: a client must never be let in by a server whose sink cannot
        take its lines.  Without a sink, everything starts at once.
        """
        self.start_failure = None
        self.registry.start_accepting()
        if self.sink_factory is None:
            self.phase = Phase.RUNNING
            super().start_children()
            return
        self.phase = Phase.STARTING
        self.start_child(SINK)
        service = self.sink_service
        if service is None:
            self._start_failed(
                Failure(SinkFailed("the sink service could not be built"))
            )
            return
        service.when_open().addCallbacks(
            self._sink_opened,
            self._sink_not_opened,
            callbackArgs=(service,),
            errbackArgs=(service,),
        )

    def _sink_opened(self, _: object, service: SinkService) -> None:
        if self.phase is not Phase.STARTING or service is not self.sink_service:
            return  # stopped meanwhile
        self.phase = Phase.RUNNING
        # From now on the supervisor reports this sink's outages, as it
        # does for every sink it builds later.
        service.quiet_outages = True
        super().start_children()

    def _sink_not_opened(self, reason: Failure, service: SinkService) -> None:
        if self.phase is not Phase.STARTING or service is not self.sink_service:
            return
        self._start_failed(reason)

    def _start_failed(self, reason: Failure) -> None:
        """
        The sink could not open at start: nothing listens yet, so stop
        (the sink service has logged why) and give up.
        """
        self.start_failure = reason
        assert self.sink_factory is not None
        log.critical(
            "cannot start: could not open sink {sink}: {reason}; stopping",
            sink=self.sink_factory.description,
            reason=describe_failure(reason),
        )
        stopped = self.stopService()
        on_start_failed = self._on_start_failed
        if on_start_failed is not None:
            stopped.addCallback(lambda _: on_start_failed(reason))
            stopped.addErrback(lambda f: log.failure("on_start_failed raised", f))

    @override
    def child_failed(self, child: object, reason: object) -> None:
        """
        While starting, a sink that fails fails the start (handled where
        the start waits for it); otherwise supervise as usual.
        """
        if self.phase is Phase.STARTING and child is self.sink_service:
            return
        super().child_failed(child, reason)

    def _make_sink_service(self) -> SinkService:
        assert self.sink_factory is not None
        service = SinkService(
            self.sink_factory,
            self.queue,
            self.stats,
            self.config.max_batch_bytes,
            on_written=self.sink_writes.observe,
            # One batch per reactor iteration: the reads of one iteration
            # share a write (a file sink confirms a small one at once).
            clock=self.reactor,
        )
        # After a good start, the supervisor reports the sink's outages.
        service.quiet_outages = self.phase is Phase.RUNNING
        return service

    @override
    def outage_detail(self, name: str) -> str:
        """
        The sink's outage holds up the queued lines; clients are paused
        once the queue reaches its high watermark.
        """
        if name != SINK:
            return ""
        return (
            f"{queued_lines(self.queue)} line(s) wait in the queue "
            f"({self.queue.buffered} bytes; clients are paused at "
            f"{self.config.high_watermark})"
        )

    def _listener_maker(
        self,
        description: str,
        endpoint: IStreamServerEndpoint | None,
        binder: PortBinder,
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
                binder=binder,
            )

        return make

    def reload(self) -> bool:
        """
        Read certificates, keys, client CAs and auth tokens again, for new
        connections, and ask the sink to reopen its file if it can (what
        SIGHUP does under twistd, as after a log rotation).  A file that no
        longer loads is logged and what was loaded before stays in use.

        @return: True if every certificate and token file was reloaded (the
            sink reopens in the background, and logs how it went).
        """
        reloaded = self.security.reload()
        service = self.sink_service
        if service is not None:
            service.reopen()
        return reloaded

    # -- what the control socket asks (lineserver.control) ------------------

    @property
    def listeners_enabled(self) -> bool:
        return not self.registry.listeners_held

    def enable_listeners(self, enabled: bool) -> None:
        """
        Stop (False) or resume (True) accepting on every port, which stays
        open: new clients wait in the kernel's backlog, as at the limit.
        """
        self.registry.hold_listeners(not enabled)
        log.info(
            "listeners {state} by the control socket",
            state="enabled" if enabled else "disabled",
        )

    def set_max_connections(self, limit: int | None) -> None:
        """
        Change C{--max-connections} while running; waiting clients that a
        higher limit lets in are served at once.
        """
        for waiter in self.registry.set_max_connections(limit):
            waiter.slot_granted()
        log.info("max-connections set to {limit}", limit=limit or "none")

    def kill_connection(self, number: int) -> bool:
        """
        Close connection #C{number} as a stop would: after what it sent is
        delivered, aborted if it does not take its last bytes.

        @return: False if there is no such connection.
        """
        conn = self.registry.find(number)
        if conn is None:
            return False
        log.info("closing {conn} for the control socket", conn=conn.identity)
        conn.close()
        return True

    @property
    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    def _listener_names(self) -> list[str]:
        return [str(listener.name) for listener in self.listeners]

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
    def metrics(self) -> MetricsService | None:
        """
        @return: the service serving C{/metrics}, if C{config.metrics}.
        """
        for service in self:
            if isinstance(service, MetricsService):
                return service
        return None

    @property
    def sink_service(self) -> SinkService | None:
        for service in self:
            if isinstance(service, SinkService):
                return service
        return None

    @override
    async def stop_children(self) -> None:
        """
        Stop in order, within the shutdown timeout: accept nothing, drain,
        flush and close the sink, close the connections.
        """
        self.phase = Phase.STOPPING
        timeout = self.config.shutdown_timeout
        deadline = self.reactor.seconds() + timeout
        log.info(
            "stopping: {n} connection(s), {lines} line(s) ({q} bytes) queued; "
            "timeout {t}s",
            n=len(self.registry),
            lines=self.queue.buffered_lines,
            q=self.queue.buffered,
            t=timeout,
        )
        # Each listener's stop takes in its backlog first, so the registry
        # stops accepting only after: those clients are drained like others.
        listeners = [self.stop_child(name) for name in self._listener_names()]
        for waiter in self.registry.stop_accepting():
            waiter.slot_granted()
        await DeferredList(listeners, consumeErrors=True)
        await self._drain_input(deadline)
        await self._flush_sink(deadline)
        await self._close_connections(deadline)
        self._log_ledger()
        self.phase = Phase.STOPPED
        log.info(
            "stopped: {delivered} line(s) delivered",
            delivered=self.stats.get("lines.delivered"),
        )

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
                    last or pending_input(conn.transport) == 0
                ):
                    conn.gate.hold(DRAIN_REASON)
            if all(DRAIN_REASON in conn.gate.reasons for conn in self.registry):
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(0.02, now=True).addCallback(lambda _: done.callback(None))
        return done

    async def _flush_sink(self, deadline: float) -> None:
        """
        Stop the sink (flush, then close) by the deadline; say how many
        lines were left unwritten if it could not.

        A sink that is down when the stop begins (an outage, its restart
        pending) or goes down during it is not given up at once: fresh
        sinks are tried with the outage backoff until the deadline, as the
        supervisor would have, so that a destination back within
        C{--shutdown-timeout} still gets every line.
        """
        service = self.sink_service
        failure: Failure | None = None
        if service is not None:
            waited = max(0.0, deadline - self.reactor.seconds())
            stopping = self.stop_child(SINK)
            stopping.addTimeout(waited, self.reactor)
            try:
                await stopping
            except TimeoutError:
                self._give_up(service, f"did not flush within {waited:.1f}s")
                return
            except Exception:
                log.failure(
                    "sink {sink} failed to stop", sink=service.sink_factory.description
                )
            if not service.unwritten()[0]:
                return
            failure = service.failure
        elif self.sink_factory is None or not self.queue.buffered_lines:
            return
        assert self.sink_factory is not None
        if failure is None or is_outage(failure):
            retried = await self._flush_with_fresh_sinks(deadline)
            if retried is None:
                return
            service, failure = retried
            if failure is None:
                self._report_unwritten(
                    f"sink {self.sink_factory.description} was down until the "
                    "shutdown deadline",
                    self.queue.buffered_lines,
                )
                self._drop_unwritten(service, "shutdown_timeout")
                return
        why = describe_failure(failure) if failure is not None else "unknown"
        self._report_unwritten(
            f"sink {self.sink_factory.description} failed ({why})",
            self.queue.buffered_lines,
        )
        self._drop_unwritten(service, "sink_failed")

    async def _flush_with_fresh_sinks(
        self, deadline: float
    ) -> tuple[SinkService | None, Failure | None] | None:
        """
        Until C{deadline}, start fresh sinks on the queue and stop each
        (flush, close), waiting the outage backoff between two.

        @return: None once the queue is empty; else the last sink tried and
            the bug that ended it (a crash: no more tries), or None for the
            failure if the deadline came first.
        """
        assert self.sink_factory is not None
        backoff = outage_backoff()
        attempt = 0
        last: SinkService | None = None
        log.warn(
            "sink {sink} is down at the stop: {lines} line(s) wait; trying it "
            "again until the shutdown deadline ({left:.1f}s)",
            sink=self.sink_factory.description,
            lines=self.queue.buffered_lines,
            left=max(0.0, deadline - self.reactor.seconds()),
        )
        while self.queue.buffered_lines:
            left = deadline - self.reactor.seconds()
            if left <= 0:
                return last, None
            last = self._make_sink_service()
            # One warning above says what is going on, not one per try.
            last.quiet_outages = True
            last.startService()
            stopping = last.stopService()
            stopping.addTimeout(left, self.reactor)
            try:
                await stopping
            except TimeoutError:
                return last, None
            failure = last.failure
            if failure is not None and not is_outage(failure):
                return last, failure
            if self.queue.buffered_lines:
                left = max(0.0, deadline - self.reactor.seconds())
                pause = min(backoff(attempt), left)
                attempt += 1
                await deferLater(self.reactor, pause)
        log.info(
            "sink {sink} came back during the stop; every line written",
            sink=self.sink_factory.description,
        )
        return None

    def _give_up(self, service: SinkService, why: str) -> None:
        lines, _ = service.unwritten()
        self._report_unwritten(f"sink {service.sink_factory.description} {why}", lines)
        self._drop_unwritten(service, "shutdown_timeout")

    def _report_unwritten(self, why: str, lines: int) -> None:
        log.error(
            "{why}: {lines} line(s) ({size} bytes) left unwritten",
            why=why,
            lines=lines,
            size=self.queue.buffered,
        )

    def _drop_unwritten(self, service: SinkService | None, reason: str) -> None:
        """
        Lines the stop leaves behind leave the queue as dropped for
        C{reason}, so the ledger (logged at the end of the stop) balances.
        """
        if service is not None:
            service.drop_unwritten(reason)
        else:
            self.stats.incr(f"lines.dropped.{reason}", self.queue.drop_all())

    def _log_ledger(self) -> None:
        """
        The loss ledger in lines, as the stop leaves it:
        received = delivered + queued + spooled + dropped.
        """
        stats = self.stats.snapshot()
        dropped = {
            name.removeprefix("lines.dropped."): count
            for name, count in sorted(stats.items())
            if name.startswith("lines.dropped.") and count
        }
        failed = stats.get("lines.failed", 0)
        if failed:
            dropped["handler_failed"] = failed
        log.info(
            "ledger: {received} line(s) received = {delivered} delivered + "
            "{queued} queued + {spooled} spooled + {dropped} dropped{why}",
            received=stats.get("lines.received", 0),
            delivered=stats.get("lines.delivered", 0),
            queued=stats.get("queue.lines", 0),
            spooled=stats.get("lines.spooled", 0),
            dropped=sum(dropped.values()),
            why=(
                " (" + ", ".join(f"{k}: {v}" for k, v in dropped.items()) + ")"
                if dropped
                else ""
            )
            + _spool_ledger(stats),
        )

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


def _spool_ledger(stats: Mapping[str, int]) -> str:
    """
    With a disk spool, the end of the C{ledger:} line: lines a previous
    process left in the spool are outside this process's ledger (it never
    received them), so they are told apart.
    """
    if "spool.lines" not in stats:
        return ""
    return (
        f"; spool: {stats.get('spool.recovered_lines', 0)} line(s) recovered "
        f"at start ({stats.get('spool.recovered_waiting', 0)} still waiting), "
        f"{stats['spool.lines']} line(s) in it"
    )
