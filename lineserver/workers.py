"""C{--workers N}: a parent that binds the ports and supervises N workers.

    WorkerParent (Supervisor, one_for_one)
    ├── worker 0 .. N-1   permanent: WorkerProcess, one lineserver process each
    ├── sighup            SIGHUP passed on to every worker (reload, reopen)
    └── metrics           optional: /metrics with the sums of every worker

The parent binds every listening socket before twistd drops privileges
(C{--uid}, ports below 1024), makes it listen, and hands the same socket
to the workers (C{childFDs}); each worker adopts its socket with
C{adoptStreamPort} (L{lineserver.listener.PortBinder}).  By default
(C{--worker-sockets reuseport}) each worker gets its own C{SO_REUSEPORT}
socket, bound by the parent, and the kernel spreads connections evenly
over them; C{shared} gives every worker the one socket and its one queue
(a dying worker leaves no queue behind, but the spread is uneven).  The
choice is measured and explained in docs/workers.md.

A worker is C{python -m lineserver.worker_main}, the same server as a
single process with the same options (L{lineserver.tap.make_server}).  It
reports its L{Stats} as JSON lines on a pipe (L{WorkerStats} sums them),
its log on another (re-logged here, one line at a time, naming the
worker), and with C{--sink stdout:} its lines on a third, which the parent
writes out whole lines at a time so that two workers' lines never mix.
With C{--sink file:PATH} each worker writes its own C{PATH.<index>}
(L{worker_sink_url}).

The parent is the OTP supervisor of its workers: a worker that exits
unasked is restarted with backoff and counted in the restart intensity
(C{--max-restarts} in C{--restart-period}); too many and the parent stops
with status 70.  SIGTERM and SIGINT stop every worker at once, each with
its own ordered stop (accept nothing, drain, flush, close).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.listener import DEFAULT_LISTEN_RETRY, PortBinder, server_endpoint
from lineserver.logs import reopen_logs
from lineserver.metrics import RESTARTS_PREFIX
from lineserver.ports import port_number, with_defaults
from lineserver.signals import HangupReload, LogReopen
from lineserver.sinks import SinkURL
from lineserver.stats import Stats
from lineserver.supervisor import ChildSpec, Supervisor

log = Logger(namespace="lineserver.workers")

#: The child's descriptors: its log, its stats reports, its stdout lines.
STDOUT_FD = 1
LOG_FD = 2
STATS_FD = 3
#: Listening sockets are the child's descriptors from here on.
FIRST_PORT_FD = 4
#: Seconds between two stats reports of a worker.
REPORT_INTERVAL = 0.5
#: Seconds a worker may take to stop beyond --shutdown-timeout before it
#: is killed.
KILL_GRACE = 5.0
#: How workers share a port (C{--worker-sockets}).
WORKER_SOCKETS = ("reuseport", "shared")
#: Counted (as dropped) when a worker dies: lines it held at its last report.
LOST_WITH_WORKER = "lines.worker_lost"


def cpu_count() -> int:
    """
    @return: the cores this process may run on (its affinity mask, which
        C{taskset} and cgroups narrow), at least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_workers(text: str, ports: Sequence[str]) -> int:
    """
    C{--workers}: a whole number from 1, or C{auto} (one per core).  Workers
    share TCP ports only (C{tcp:}, C{tcp6:}, C{ssl:}, under C{haproxy:} too).

    @raise ValueError: saying what is wrong, for a usage error.
    """
    value = text.strip().lower()
    if value == "auto":
        count = cpu_count()
    elif value.isdigit() and int(value) >= 1:
        count = int(value)
    else:
        raise ValueError(f"expected a number of workers from 1, or auto, got {text!r}")
    if count > 1:
        for description in ports:
            if port_number(description) is None:
                raise ValueError(
                    f"workers share TCP ports only (tcp:, tcp6:, ssl:, haproxy:); "
                    f"--port {description!r} is not one (use --workers 1)"
                )
    return count


def worker_sink_url(url: str, index: int) -> str:
    """
    The sink a worker writes to: C{file:PATH} becomes C{file:PATH.<index>}
    (one file per worker: no two processes append to one file); every other
    sink is shared as it is (stdout lines go through the parent, relays and
    Redis take many writers).
    """
    parsed = SinkURL.parse(url)
    if parsed.scheme != "file":
        return url
    return str(SinkURL(parsed.scheme, f"{parsed.target}.{index}", parsed.options))


# -- pure pieces --------------------------------------------------------------


class WholeLines:
    """
    Cuts a byte stream into whole lines; the unterminated rest waits.
    """

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        """
        @return: the lines completed by C{data}, without their newline.
        """
        data = self.rest + data
        end = data.rfind(b"\n")
        if end < 0:
            self.rest = data
            return []
        self.rest = data[end + 1 :]
        return data[:end].split(b"\n")


class GaugeNamingStats(Stats):
    """
    A worker's L{Stats}, which knows which names are gauges: a dead
    worker's counters stay in the sums, its gauges do not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gauge_names: set[str] = set()

    @override
    def add_gauge(self, name: str, read: Callable[[], int]) -> None:
        self.gauge_names.add(name)
        super().add_gauge(name, read)

    def report(self) -> bytes:
        """
        @return: one JSON line: C{{"pid", "counters", "gauges"}}.
        """
        values = self.snapshot()
        gauges = {k: v for k, v in values.items() if k in self.gauge_names}
        counters = {k: v for k, v in values.items() if k not in self.gauge_names}
        report = {"pid": os.getpid(), "counters": counters, "gauges": gauges}
        return json.dumps(report, separators=(",", ":")).encode() + b"\n"


class WorkerStats:
    """
    The latest report of each worker, and their sums.

    Counters of workers that exited stay in the sums (a counter never goes
    back); their gauges leave.  A worker that exits held, at its last
    report, C{queue.lines} lines the parent cannot know the fate of (none
    after a clean stop, which reports last): they are counted under
    C{lines.worker_lost}, so that the ledger
    C{lines.received = lines.delivered + queue.lines + lines.failed +
    lines.worker_lost} holds for the sums.
    """

    def __init__(self) -> None:
        self._live: dict[int, tuple[int, dict[str, int], dict[str, int]]] = {}
        self._retired: Counter[str] = Counter()

    def update(self, index: int, report: Mapping[str, Any]) -> None:
        self._live[index] = (
            int(report["pid"]),
            {str(k): int(v) for k, v in report["counters"].items()},
            {str(k): int(v) for k, v in report["gauges"].items()},
        )

    def retire(self, index: int) -> None:
        """
        Worker C{index} exited: keep its counters, and count what it still
        held at its last report as lost (after a clean stop, nothing).
        """
        last = self._live.pop(index, None)
        if last is None:
            return
        _, counters, gauges = last
        self._retired.update(counters)
        self._retired[LOST_WITH_WORKER] += gauges.get("queue.lines", 0)

    def per_worker(self) -> dict[int, dict[str, int]]:
        """
        @return: each running worker's last reported values, with its C{pid}.
        """
        return {
            index: {**counters, **gauges, "pid": pid}
            for index, (pid, counters, gauges) in sorted(self._live.items())
        }

    def totals(self) -> dict[str, int]:
        """
        @return: every name summed over the workers (counters of exited
            ones included).
        """
        sums: Counter[str] = Counter(self._retired)
        for _, counters, gauges in self._live.values():
            sums.update(counters)
            sums.update(gauges)
        return dict(sums)


class SummedStats(Stats):
    """
    A L{Stats} whose values are the sums over the workers, plus the
    parent's own (C{workers.running}, C{supervisor.restarts}): what the
    metrics endpoint reads in the parent.
    """

    def __init__(self, workers: WorkerStats) -> None:
        super().__init__()
        self.workers = workers

    @override
    def get(self, name: str) -> int:
        return self.snapshot().get(name, 0)

    @override
    def snapshot(self) -> Mapping[str, int]:
        own = super().snapshot()
        sums = self.workers.totals()
        for name, value in own.items():
            sums[name] = sums.get(name, 0) + value
        # A worker's delivered is a gauge (confirmed less still spooled),
        # which would leave the sums with a dead worker; its parts do not.
        sums["lines.delivered"] = sums.get("lines.confirmed", 0) - sums.get(
            "lines.spooled", 0
        )
        return sums


# -- the parent ---------------------------------------------------------------


class StdoutRelay:
    """
    One writer for the workers' C{stdout:} lines: whole lines only, and the
    workers' pipes paused while standard output is slow.
    """

    def __init__(self, reactor: Any) -> None:
        from lineserver.sinks.stdout import StdoutSink

        self._sink = StdoutSink(reactor)
        self._opened = False
        self._pending: Deferred[None] | None = None
        self._readers: dict[int, Any] = {}

    def attach(self, index: int, reader: Any) -> None:
        if not self._opened:
            self._sink.open()
            self._opened = True
        self._readers[index] = reader
        if self._pending is not None:
            reader.pauseProducing()

    def detach(self, index: int) -> None:
        self._readers.pop(index, None)

    def write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            written = self._sink.write(lines)
        except OSError as error:
            log.error("standard output is closed: {error}", error=error)
            return
        if written.called or self._pending is not None:
            return
        self._pending = written
        for reader in self._readers.values():
            reader.pauseProducing()
        written.addBoth(self._drained)

    def _drained(self, result: object) -> None:
        self._pending = None
        for reader in self._readers.values():
            reader.resumeProducing()

    def close(self) -> Deferred[None]:
        return self._sink.close() if self._opened else succeed(None)


_LOGGED = re.compile(r"^\[([^#\]]*)#(\w+)\] ?(.*)$", re.DOTALL)


class WorkerProcess(Service, ProcessProtocol):
    """
    One worker process, as a supervised child: started when the service
    starts, SIGTERM and a wait when it stops, and reported to the
    supervisor as failed when it exits unasked.
    """

    def __init__(self, parent: WorkerParent, index: int) -> None:
        self.pool = parent
        self.index = index
        self.pid: int | None = None
        self._stopping = False
        self._ended: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None
        self._lines = {fd: WholeLines() for fd in (STDOUT_FD, LOG_FD, STATS_FD)}
        self.exit_status: int | None = None

    @override
    def startService(self) -> None:
        super().startService()
        pool = self.pool
        child_fds: dict[int, int | str] = {
            0: "w",
            STDOUT_FD: "r",
            LOG_FD: "r",
            STATS_FD: "r",
        }
        args = [sys.executable, "-m", "lineserver.worker_main"]
        args += ["--index", str(self.index), "--stats-fd", str(STATS_FD)]
        args += ["--parent-pid", str(os.getpid())]
        for offset, (key, skt) in enumerate(pool.sockets_for(self.index).items()):
            child_fds[FIRST_PORT_FD + offset] = skt.fileno()
            args += ["--inherit", f"{FIRST_PORT_FD + offset}={key[0]}={key[1]}"]
        args += ["--", *pool.arguments]
        try:
            process = pool.reactor.spawnProcess(
                self, sys.executable, args, env=dict(os.environ), childFDs=child_fds
            )
        except OSError as error:
            # After --uid, the interpreter must be that user's to run too.
            raise WorkerExited(
                f"cannot start worker {self.index}: {sys.executable}: "
                f"{error.strerror or error} (as uid {os.getuid()})"
            ) from error
        self.pid = process.pid
        log.info("worker {index} started: pid {pid}", index=self.index, pid=self.pid)

    # ProcessProtocol

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()
        if self.pool.relay is not None:
            reader = getattr(self.transport, "pipes", {}).get(STDOUT_FD)
            if reader is not None:
                self.pool.relay.attach(self.index, reader)

    @override
    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = self._lines.get(childFD)
        if lines is None:
            return
        whole = lines.feed(data)
        if childFD == STATS_FD:
            for line in whole:
                self._report(line)
        elif childFD == STDOUT_FD and self.pool.relay is not None:
            self.pool.relay.write(whole)
        else:
            for line in whole:
                self._relog(line.decode(errors="replace"))

    def _report(self, line: bytes) -> None:
        try:
            self.pool.stats.update(self.index, json.loads(line))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warn(
                "worker {index}: unreadable stats report: {error}",
                index=self.index,
                error=error,
            )

    def _relog(self, text: str) -> None:
        level, namespace = LogLevel.info, "lineserver.worker"
        match = _LOGGED.match(text)
        if match is not None:
            namespace, name, text = match.groups()
            try:
                level = LogLevel.levelWithName(name)
            except Exception:
                level = LogLevel.info
        Logger(namespace=namespace).emit(
            level,
            "worker {index} [{pid}]: {text}",
            index=self.index,
            pid=self.pid,
            text=text,
        )

    @override
    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        signum = getattr(reason.value, "signal", None)
        self.exit_status = code
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        if self.pool.relay is not None:
            self.pool.relay.detach(self.index)
        rest = self._lines[STDOUT_FD].rest
        if rest and self.pool.relay is not None:
            log.warn(
                "worker {index}: {n} bytes of an unfinished stdout line dropped",
                index=self.index,
                n=len(rest),
            )
        self.pool.stats.retire(self.index)
        how = f"status {code}" if signum is None else f"signal {signum}"
        if self._stopping:
            (log.info if code == 0 else log.error)(
                "worker {index} (pid {pid}) stopped: {how}",
                index=self.index,
                pid=self.pid,
                how=how,
            )
            if code != 0:
                self.pool.unclean_stops += 1
        ended, self._ended = self._ended, None
        self.pid = None
        if ended is not None:
            ended.callback(None)
        elif self.running:
            self.pool.child_failed(
                self, Failure(WorkerExited(f"worker {self.index} exited: {how}"))
            )

    # Service

    def reload(self) -> None:
        """
        Pass SIGHUP on: the worker reloads certificates and tokens, and
        reopens its sink.
        """
        self._signal(signal.SIGHUP)

    def _signal(self, signum: int) -> None:
        if self.pid is not None and self.transport is not None:
            try:
                self.transport.signalProcess(signum)
            except Exception as error:  # ProcessExitedAlready and the like
                log.debug("could not signal worker: {error}", error=error)

    @override
    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """
        SIGTERM: the worker does its ordered stop; killed if it takes longer
        than its own shutdown timeout and a grace.
        """
        super().stopService()
        if self.pid is None:
            return succeed(None)
        self._stopping = True
        ended: Deferred[None] = Deferred()
        self._ended = ended
        self._signal(signal.SIGTERM)
        self._kill = self.pool.reactor.callLater(
            self.pool.stop_timeout, self._signal, signal.SIGKILL
        )
        return ended


class WorkerExited(Exception):
    """
    A worker exited without being asked to.
    """


class WorkerParent(Supervisor):
    """
    Binds the ports, starts C{count} workers on them, and supervises them.

    @ivar stats: the workers' reports; L{summed} is a L{Stats} of the sums.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        ports: Sequence[str],
        backlog: int,
        arguments: Sequence[str],
        *,
        max_restarts: int = 5,
        restart_period: float = 10.0,
        shutdown_timeout: float = 10.0,
        stdout: bool = False,
        metrics: str | None = None,
        reuseport: bool = True,
        on_escalate: Callable[[Failure], None] | None = None,
    ) -> None:
        """
        @param ports: the C{--port} descriptions, bound here.
        @param arguments: the lineserver command line each worker runs.
        @param stdout: relay the workers' C{stdout:} lines (whole lines).
        @param metrics: serve the summed stats at C{/metrics} there.
        @param reuseport: one C{SO_REUSEPORT} socket per worker and port,
            rather than one socket all workers share.
        """
        super().__init__(
            clock=reactor,
            max_restarts=max_restarts,
            period=restart_period,
            on_escalate=on_escalate,
        )
        self.reactor = reactor
        self.count = count
        self.ports = [with_defaults(p, backlog) for p in ports]
        self.arguments = list(arguments)
        self.stop_timeout = shutdown_timeout + KILL_GRACE
        self.reuseport = reuseport
        self.stats = WorkerStats()
        self.summed = SummedStats(self.stats)
        self.summed.add_gauge("workers.running", self._running_workers)
        self.summed.add_gauge("supervisor.restarts", lambda: self.restarts)
        self._bound: dict[str, dict[tuple[int, str], list[socket.socket]]] = {}
        self._bind_attempts = 0
        self._bind_retry: IDelayedCall | None = None
        self.relay = StdoutRelay(reactor) if stdout else None
        self.unclean_stops = 0
        for index in range(count):
            name = f"worker {index}"
            self.add_child(ChildSpec(name, self._maker(index)))
            self.summed.add_gauge(RESTARTS_PREFIX + name, self._restarts_of(name))
        self.add_child(ChildSpec("sighup", lambda: HangupReload(reactor, self.reload)))
        # Workers log through the parent: reopening its log is enough.
        self.add_child(ChildSpec("sigusr1", lambda: LogReopen(reactor, reopen_logs)))
        if metrics is not None:
            from lineserver.metrics import MetricsService, metrics_registry

            description = with_defaults(metrics, backlog)
            registry = metrics_registry(self.summed, per_worker=self.stats.per_worker)
            self.add_child(
                ChildSpec(
                    f"metrics {description}",
                    lambda: MetricsService(description, registry, reactor),
                )
            )

    def _restarts_of(self, name: str) -> Callable[[], int]:
        return lambda: self.restarts_by_child[name]

    def _maker(self, index: int) -> Callable[[], IService]:
        return lambda: WorkerProcess(self, index)

    def _running_workers(self) -> int:
        return sum(1 for worker in self.workers() if worker.pid is not None)

    def workers(self) -> Iterator[WorkerProcess]:
        return (s for s in self if isinstance(s, WorkerProcess))

    @override
    def privilegedStartService(self) -> None:
        """
        Bind and listen on every port now, while the process may still
        have the privileges a port below 1024 needs; workers start later.
        """
        self._bind(quiet=True)
        super().privilegedStartService()

    def _bind(self, quiet: bool = False) -> bool:
        """
        Bind the ports not bound yet.

        @return: True once every port is bound and listening.
        """
        for description in self.ports:
            if description in self._bound:
                continue
            try:
                self._bound[description] = bind_port(
                    self.reactor, description, self.count if self.reuseport else 1
                )
            except Exception as error:
                if not quiet:
                    self._bind_attempts += 1
                    delay = DEFAULT_LISTEN_RETRY(self._bind_attempts)
                    log.error(
                        "could not listen on {endpoint}: {reason}; retrying in "
                        "{delay:.2f}s (attempt {attempt}); no worker starts "
                        "before every port listens",
                        endpoint=description,
                        reason=getattr(error, "socketError", None) or error,
                        delay=delay,
                        attempt=self._bind_attempts,
                    )
                    self._bind_retry = self.reactor.callLater(
                        delay, self.start_children
                    )
                return False
            for copies in self._bound[description].values():
                host, number = copies[0].getsockname()[:2]
                log.info(
                    "parent bound {host}:{number} for {count} workers ({how})",
                    host=host,
                    number=number,
                    count=self.count,
                    how="one SO_REUSEPORT socket each"
                    if self.reuseport
                    else "one shared socket",
                )
        return True

    def sockets_for(self, index: int) -> dict[tuple[int, str], socket.socket]:
        """
        The listening sockets worker C{index} adopts, by (port, interface)
        as its C{listenTCP} asks for them: the same for every worker, or
        its own C{SO_REUSEPORT} copy.
        """
        return {
            key: copies[index % len(copies)]
            for bound in self._bound.values()
            for key, copies in bound.items()
        }

    def _all_sockets(self) -> list[socket.socket]:
        return [
            skt
            for bound in self._bound.values()
            for copies in bound.values()
            for skt in copies
        ]

    @override
    def start_children(self) -> None:
        """
        Start the workers once every port listens (retried with backoff
        until then, as a single process retries a busy port).
        """
        self._bind_retry = None
        if not self.running or not self._bind():
            return
        super().start_children()

    @override
    async def stop_children(self) -> None:
        """
        Stop every worker at once (each drains on its own), then the rest.
        """
        names = [str(w.name) for w in self.workers()]
        log.info("stopping {n} worker(s)", n=len(names))
        # No worker is started again: the workers' own copies are the last,
        # so a port stops listening (and refuses) once its workers stop,
        # as a single process's does.
        if self._bind_retry is not None and self._bind_retry.active():
            self._bind_retry.cancel()
        self._bind_retry = None
        for skt in self._all_sockets():
            skt.close()
        self._bound = {}
        await DeferredList([self.stop_child(name) for name in names])
        if self.relay is not None:
            await self.relay.close()
        if self.unclean_stops:
            log.error("{n} worker(s) did not stop cleanly", n=self.unclean_stops)

    def reload(self) -> None:
        """
        SIGHUP every worker.
        """
        log.info("SIGHUP: passing it on to every worker")
        for worker in self.workers():
            worker.reload()


def bind_port(
    reactor: Any, description: str, copies: int = 1
) -> dict[tuple[int, str], list[socket.socket]]:
    """
    Bind and listen on a TCP port as a single process would (the same
    parser, the same (port, interface) keys), for the workers to adopt.

    @param copies: 1 for one socket every worker shares; more for that many
        C{SO_REUSEPORT} sockets on the same address, one per worker.
    @raise CannotListenError: the port cannot be had (in use, no permission).
    """
    binder = PortBinder(reactor)
    endpoint = _plain_endpoint(binder, description)
    failures: list[Failure] = []
    with binder.binding():
        endpoint.listen(Factory()).addErrback(failures.append)
    if failures:
        binder.release()
        failures[0].raiseException()
    sockets: dict[tuple[int, str], list[socket.socket]] = {}
    for key, (skt, backlog) in binder.hand_over().items():
        if copies == 1:
            sockets[key] = [skt]
        else:
            # Port 0 was given a number: the copies take the same one.
            address, family = skt.getsockname(), skt.family
            skt.close()
            sockets[key] = [_reuseport(family, address, key) for _ in range(copies)]
        for each in sockets[key]:
            each.listen(backlog)
    return sockets


def _reuseport(
    family: socket.AddressFamily, address: Any, key: tuple[int, str]
) -> socket.socket:
    skt = socket.socket(family, socket.SOCK_STREAM)
    try:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        skt.setblocking(False)
        skt.bind(address)
    except OSError as error:
        skt.close()
        raise CannotListenError(key[1], key[0], error) from error
    return skt


def _plain_endpoint(binder: PortBinder, description: str) -> Any:
    """
    The endpoint to bind for C{description}: TCP under C{ssl:} (the
    workers do TLS; the parent only binds).
    """
    from lineserver.tls import is_ssl_description, split_ssl_description

    if is_ssl_description(description):
        return server_endpoint(binder, split_ssl_description(description).plain)
    return server_endpoint(binder, description)


def worker_parent(options: Any, reactor: Any) -> WorkerParent:
    """
    The parent service for C{twistd lineserver --workers N} (N > 1).
    """
    from lineserver.tap import EXIT_ESCALATED, exit_after_stop

    escalate = exit_after_stop(reactor, EXIT_ESCALATED, "workers crash too often")
    parent = WorkerParent(
        reactor,
        options["workers"],
        options["ports"],
        options["backlog"],
        options.arguments,
        max_restarts=options["max-restarts"],
        restart_period=options["restart-period"],
        shutdown_timeout=options["shutdown-timeout"],
        stdout=options["mode"] == "sink"
        and str(options["sink"]).lower().startswith("stdout:"),
        metrics=options["metrics"],
        reuseport=options["worker-sockets"] == "reuseport",
        # Workers start before the reactor runs: one may fail that early.
        on_escalate=lambda failure: reactor.callWhenRunning(escalate, failure),
    )
    return parent
