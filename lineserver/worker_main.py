"""One worker of C{--workers N}: C{python -m lineserver.worker_main}.

Started by L{lineserver.workers.WorkerProcess}, never by hand:

    python -m lineserver.worker_main --index I --stats-fd 3 --parent-pid P \\
        --inherit FD=PORT=INTERFACE ... -- <the lineserver options>

It runs the same server as a single process would, from the same options
(L{lineserver.tap.make_server}), except that it adopts the listening
sockets its parent bound, writes C{file:PATH} lines to C{PATH.I}, serves
no metrics (the parent sums them), logs to standard error (the parent
re-logs each line), and reports its stats on C{--stats-fd}.  SIGTERM and
SIGINT stop it in order; SIGHUP reloads.  It leaves its parent's process
group (a Ctrl-C reaches the parent, which stops the workers in order) and
asks Linux for a SIGTERM should the parent die first.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.process import ProcessWriter
from twisted.internet.task import LoopingCall
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.workers import REPORT_INTERVAL, GaugeNamingStats, worker_sink_url

log = Logger(namespace="lineserver.worker")

#: prctl(2): the signal sent to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


class StatsReporter(Service):
    """
    Writes the worker's stats as a JSON line every C{interval} seconds, and
    once more, last, when stopped (after the server's ordered stop).
    """

    def __init__(
        self, reactor: Any, stats: GaugeNamingStats, fd: int, interval: float
    ) -> None:
        self.reactor = reactor
        self.stats = stats
        self.fd = fd
        self.interval = interval
        self._writer: ProcessWriter | None = None
        self._loop: LoopingCall | None = None
        self._closed: Deferred[None] | None = None

    @override
    def startService(self) -> None:
        super().startService()
        self._writer = ProcessWriter(self.reactor, self, "stats", self.fd)
        self._loop = LoopingCall(self.send)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def send(self) -> None:
        if self._writer is not None:
            self._writer.write(self.stats.report())

    @override
    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._writer is None:
            return succeed(None)
        self.send()
        self._closed = Deferred()
        self._writer.loseConnection()
        return self._closed

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        self._writer = None
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a lost parent is not noticed
        return


def _log_to_stderr() -> None:
    """
    Log without timestamps to standard error: the parent re-logs each line
    with its own, under its own log settings.
    """
    stream = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace")

    def format_event(event: Any) -> str:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        namespace = event.get("log_namespace", "-")
        level = getattr(event.get("log_level"), "name", "info")
        return f"[{namespace}#{level}] {text}\n"

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(stream, format_event)], redirectStandardIO=False
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lineserver.worker_main")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--stats-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--inherit", action="append", default=[])
    parser.add_argument("options", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.setpgrp()
    _die_with_parent()
    if os.getppid() != args.parent_pid:
        sys.exit("lineserver worker: parent gone before start")
    _log_to_stderr()

    from twisted.internet import reactor

    from lineserver.signals import HangupReload
    from lineserver.tap import Options, make_server

    options = Options()
    rest = args.options[1:] if args.options[:1] == ["--"] else args.options
    options.parseOptions(rest)
    if options["mode"] == "sink":
        options["sink"] = worker_sink_url(options["sink"], args.index)
        if options["spool"] is not None:
            # A spool is one process's: each worker has its own directory.
            options["spool"] = os.path.join(options["spool"], str(args.index))
    options["metrics"] = None
    inherited: dict[tuple[int, str], socket.socket] = {}
    for spec in args.inherit:
        fd, port, interface = spec.split("=", 2)
        inherited[(int(port), interface)] = socket.socket(fileno=int(fd))
    stats = GaugeNamingStats()
    server = make_server(options, reactor, inherited=inherited, stats=stats)
    hangup = HangupReload(reactor, server.reload)
    reporter = StatsReporter(reactor, stats, args.stats_fd, REPORT_INTERVAL)

    async def stop() -> None:
        # The listening ports' last copies are the ones the server adopted:
        # closed by its stop after it took in their backlog.
        for skt in inherited.values():
            skt.close()
        hangup.stopService()
        try:
            await server.stopService()
        finally:
            await reporter.stopService()

    server.privilegedStartService()
    server.startService()
    hangup.startService()
    reporter.startService()
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", lambda: Deferred.fromCoroutine(stop())
    )
    log.info(
        "worker {index} (pid {pid}) serving {n} inherited port(s)",
        index=args.index,
        pid=os.getpid(),
        n=len(inherited),
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
