"""Shared pieces for tests through real loopback sockets."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory

reactor: Any = _reactor


class Client(Protocol):
    """
    A test client: collects what it receives, tells when it is gone.
    """

    def __init__(self) -> None:
        self.received = b""
        self.gone: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._waits: list[tuple[int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        still = []
        for size, waiter in self._waits:
            if len(self.received) >= size:
                waiter.callback(self.received)
            else:
                still.append((size, waiter))
        self._waits = still

    def wait_for(self, size: int, timeout: float = 10.0) -> Deferred[bytes]:
        """
        @return: a Deferred that fires once C{size} bytes have arrived.
        """
        waiter: Deferred[bytes] = Deferred()
        waiter.addTimeout(timeout, reactor)
        self._waits.append((size, waiter))
        self._check()
        return waiter

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.gone.callback(None)


def connect(port: int) -> Deferred[Client]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return endpoint.connect(Factory.forProtocol(Client))  # type: ignore[return-value]


def later(seconds: float, value: Any = None) -> Deferred[Any]:
    waiter: Deferred[Any] = Deferred()
    reactor.callLater(seconds, waiter.callback, value)
    return waiter


@implementer(ISink)
class MemorySink:
    """
    Keeps lines in memory; each write takes C{delay} seconds of reactor
    time (0: synchronous), to play a slow sink.
    """

    def __init__(self, store: list[bytes], delay: float = 0.0) -> None:
        self.store = store
        self.delay = delay
        self.closed = False

    def open(self) -> Deferred[None]:
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        if not self.delay:
            self.store.extend(lines)
            return succeed(None)
        done: Deferred[None] = Deferred()

        def finish() -> None:
            self.store.extend(lines)
            done.callback(None)

        reactor.callLater(self.delay, finish)
        return done

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(ISinkFactory)
class MemorySinkFactory:
    description = "memory:"

    def __init__(self, delay: float = 0.0) -> None:
        self.store: list[bytes] = []
        self.delay = delay
        self.sinks: list[MemorySink] = []

    def __call__(self) -> MemorySink:
        sink = MemorySink(self.store, self.delay)
        self.sinks.append(sink)
        return sink


# -- a real twistd process -------------------------------------------------

TWISTD = Path(sys.executable).parent / "twistd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_connectable(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ServerProcess:
    """
    A real C{twistd -n lineserver} on a loopback port, logging to a file.
    """

    def __init__(
        self,
        cwd: str,
        *args: str,
        port: int | None = None,
        listen: str | None = None,
        nofile: int | None = None,
    ) -> None:
        """
        @param port: the loopback port to listen on (a free one if None).
        @param listen: the C{--port} description instead of plain TCP on
            C{port} (an C{ssl:} or C{haproxy:} one); it must use C{port}.
        @param nofile: a soft C{RLIMIT_NOFILE} for the server process.
        """
        self.port = port or free_port()
        self.log_path = Path(cwd, "server.log")
        description = listen or f"tcp:{self.port}:interface=127.0.0.1"
        self.proc = subprocess.Popen(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                f"--logfile={self.log_path}",
                "lineserver",
                "--port",
                description,
                *args,
            ],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=None if nofile is None else partial(_lower_nofile, nofile),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> ServerProcess:
        wait_connectable(self.port)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def rss_kib(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def descriptors(self) -> tuple[int, int]:
        """
        @return: how many sockets (listening ones included) and how many
            other descriptors the server has open, from one listing.
        """
        sockets = others = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:"):
                sockets += 1
            else:
                others += 1
        return sockets, others

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


def _lower_nofile(limit: int) -> None:
    """
    In the child before exec: lower the soft descriptor limit.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# -- sockets and directories ---------------------------------------------


def reset(sock: socket.socket) -> None:
    """
    Close with an RST instead of a FIN (SO_LINGER on, timeout 0).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """
    Poll C{check} every 20 ms (from a blocking test, not from the reactor).

    @raise AssertionError: naming C{what}, after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def run_threads(targets: list[Callable[[], None]], timeout: float = 20.0) -> None:
    """
    Run each target in a thread; re-raise the first error any of them hit.
    """
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as error:  # reported below, in the test thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise AssertionError(f"client threads still running after {timeout}s")
    if errors:
        raise errors[0]


def temp_dir(case: SynchronousTestCase) -> str:
    """
    A fresh absolute directory, removed after the test (trial's C{mktemp}
    is relative to the working directory, which under pytest is the
    checkout).
    """
    path = tempfile.mkdtemp(prefix="lineserver-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


# -- an embedded server ------------------------------------------------------


def start_server(
    case: TestCase, handler: Any = "sink", sink: Any = None, **config: Any
) -> Deferred[Any]:
    """
    Start a LineServer on a free loopback port, stopped after the test.

    @return: a Deferred that fires with the server once it listens.
    """
    from lineserver.server import LineServer, ServerConfig

    config.setdefault("ports", ["tcp:0:interface=127.0.0.1"])
    server = LineServer(ServerConfig(**config), reactor, handler=handler, sink=sink)
    server.startService()
    case.addCleanup(server.stopService)
    return server.when_listening().addCallback(lambda _: server)


class RecordingGate:
    """
    A PauseGate whose pause and resume calls are recorded.
    """

    def __init__(self) -> None:
        from lineserver.flow import PauseGate

        self.calls: list[str] = []
        self.gate = PauseGate(
            lambda: self.calls.append("pause"), lambda: self.calls.append("resume")
        )
