"""Shared pieces for tests through real loopback sockets."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
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
        env: dict[str, str] | None = None,
    ) -> None:
        """
        @param port: the loopback port to listen on (a free one if None).
        @param listen: the C{--port} description instead of plain TCP on
            C{port} (an C{ssl:} or C{haproxy:} one); it must use C{port}.
        @param nofile: a soft C{RLIMIT_NOFILE} for the server process.
        @param env: variables to set in the server's environment (on top
            of this process's), like C{PYTHONPATH} for a sink plugin.
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
            env=None if env is None else {**os.environ, **env},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> ServerProcess:
        wait_connectable(self.port)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_listening(self, ports: int = 1, timeout: float = 15.0) -> ServerProcess:
        """
        Wait until the server logged "listening on" for C{ports} ports,
        without connecting to it (a probe would take a connection slot).
        The listeners listen from the running reactor, so by then twistd's
        signal handlers are installed too.

        @raise AssertionError: with the server's output, if it exits first.
        """

        def listening() -> bool:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate(timeout=5)
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n"
                    f"{out.decode(errors='replace')[-2000:]}\n"
                    f"{err.decode(errors='replace')[-2000:]}\n{self.log()[-2000:]}"
                )
            return self.log().count("listening on ") >= ports

        wait_until(listening, f"{ports} listening port(s)", timeout=timeout)
        return self

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


# -- blocking clients that see what a client sees ------------------------------


class Peer:
    """
    A blocking loopback client whose every read is bounded.

    @ivar received: every byte the server sent so far.
    @ivar end: how the server ended the connection (C{"eof"}, C{"reset"}),
        or None while it is open.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", send: bytes = b"") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.received = b""
        self.end: str | None = None
        if send:
            self.send(send)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _read(self, timeout: float) -> None:
        """
        Take what arrives within C{timeout} seconds (at most one read).
        """
        if self.end is not None:
            return
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not readable:
            return
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            self.end = "reset"
            return
        if chunk:
            self.received += chunk
        else:
            self.end = "eof"

    def read_until(self, done: Callable[[], bool], timeout: float) -> float | None:
        """
        Read until C{done()} or C{timeout}.

        @return: the seconds it took, or None on timeout.
        """
        started = time.monotonic()
        deadline = started + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.end is not None:
                # Nothing more will come: let done() have its last say.
                return None if not done() else time.monotonic() - started
            self._read(min(left, 0.05))
        return time.monotonic() - started

    def expect(self, data: bytes, timeout: float = 10.0) -> float:
        """
        Wait until C{received} is C{data}, and say how long it took.

        @raise AssertionError: naming what arrived instead.
        """
        took = self.read_until(
            lambda: len(self.received) >= len(data) or self.end is not None,
            timeout,
        )
        if took is None or self.received != data:
            raise AssertionError(
                f"expected {data[:200]!r}, got {self.received[:200]!r} "
                f"(end: {self.end}) within {timeout}s"
            )
        return took

    def silent_for(self, seconds: float) -> bytes:
        """
        Read for C{seconds}; @return: what arrived meanwhile (the test
        asserts it is nothing, and that the connection stayed open).
        """
        before = len(self.received)
        self.read_until(lambda: False, seconds)
        return self.received[before:]

    def wait_closed(self, timeout: float = 10.0) -> float:
        """
        Read until the server ends the connection.

        @return: the seconds it took.
        @raise AssertionError: if it is still open after C{timeout}.
        """
        took = self.read_until(lambda: self.end is not None, timeout)
        if took is None:
            raise AssertionError(
                f"still open after {timeout}s; received {self.received[:200]!r}"
            )
        return took


def proxy_v1(source: str, source_port: int, port: int) -> bytes:
    """
    A PROXY protocol v1 header as HAProxy sends it to a backend on
    loopback port C{port} (C{::1} for an IPv6 source, else 127.0.0.1).
    """
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {source_port} {port}\r\n".encode()


def listening_addresses(port: int) -> set[str]:
    """
    @return: the local addresses of the sockets listening on TCP C{port},
        from the kernel's own tables (/proc/net/tcp and tcp6).
    """
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] != "0A" or int(hex_port, 16) != port:
                    continue  # not LISTEN, or another port
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little) order.
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                found.add(str(ipaddress.ip_address(b"".join(words))))
    return found


def completed_handshakes(
    port: int, attempts: int, wait: float = 1.5, host: str = "127.0.0.1"
) -> tuple[int, list[socket.socket]]:
    """
    Start C{attempts} non-blocking connects one after the other, and wait
    up to C{wait} seconds for them: how many did the kernel complete?

    With nobody accepting, Linux completes a handshake while the listening
    socket's accept queue holds at most its backlog (C{backlog + 1}
    connections in all) and drops the SYNs of the others, which retry and
    are dropped again.

    @return: the number completed, and every socket (the caller closes
        them, once it no longer needs them held).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(attempts):
            sock = socket.socket(family)
            socks.append(sock)
            sock.setblocking(False)
            sock.connect_ex((host, port))
        pending = list(socks)
        completed = 0
        deadline = time.monotonic() + wait
        while pending and (left := deadline - time.monotonic()) > 0:
            _, writable, _ = select.select([], pending, [], min(left, 0.1))
            for sock in writable:
                pending.remove(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    completed += 1
        return completed, socks
    except BaseException:
        for sock in socks:
            sock.close()
        raise


def handshakes_for_backlog(backlog: int) -> range:
    """
    How many connects Linux completes for a listening socket with this
    C{backlog} that nobody accepts from: C{backlog + 1} (its queue is full
    only once it holds more than the backlog).  One more is tolerated: a
    SYN answered while the queue still had room, whose final ACK the
    kernel then drops for the full queue, looks completed to its client.
    """
    return range(backlog + 1, backlog + 3)


# -- IPv6 -------------------------------------------------------------------


def ipv6_loopback_error() -> str | None:
    """
    @return: None if a socket can listen and connect on ::1, else why not.
    """
    try:
        with socket.socket(socket.AF_INET6) as listener:
            listener.bind(("::1", 0))
            listener.listen()
            socket.create_connection(
                ("::1", listener.getsockname()[1]), timeout=2
            ).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def in_ci() -> bool:
    """
    Are we in CI (C{CI=true}, as GitHub Actions, GitLab and most others
    set it), where a test that cannot run is a failure, not a skip?
    """
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def without_ipv6(why: str) -> NoReturn:
    """
    The machine has no IPv6 loopback: skip on a developer's machine, fail
    in CI, where a missing IPv6 would otherwise hide the IPv6 cases for
    good.

    @raise SkipTest: outside CI.
    @raise AssertionError: in CI.
    """
    if in_ci():
        raise AssertionError(f"CI=true and no IPv6 loopback: {why}")
    raise SkipTest(why)


# -- waiting from the reactor -------------------------------------------------


def eventually(
    check: Callable[[], bool], what: str, timeout: float = 10.0
) -> Deferred[None]:
    """
    Poll C{check} every 20 ms from the running reactor (for a
    L{TestCase} that yields): the reactor-side L{wait_until}.

    @return: a Deferred that fires once C{check()} is true, or fails with
        an AssertionError naming C{what} after C{timeout} seconds.
    """

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await later(0.02)

    return Deferred.fromCoroutine(poll())


def unread_bytes(port: int, count_empty: bool = False) -> dict[str, int]:
    """
    Bytes the kernel holds for a server that it has not read yet, from
    the kernel's own table (/proc/net/tcp and tcp6): the receive queue of
    every established connection whose local port is C{port}.

    @param count_empty: include connections with nothing unread.
    @return: the unread bytes by the client's address (C{ADDR:PORT} in
        hex, as the kernel prints it).
    """
    found: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                local_port = int(fields[1].partition(":")[2], 16)
                if fields[3] != "01" or local_port != port:
                    continue  # not ESTABLISHED, or not the server's side
                unread = int(fields[4].partition(":")[2], 16)
                if unread or count_empty:
                    found[fields[2]] = unread
    return found


def accept_queue(port: int) -> int:
    """
    @return: how many connections wait in the kernel's accept queue of
        the socket listening on TCP C{port} (handshake done, not yet
        accepted by the server), from /proc/net/tcp and tcp6.
    """
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                local_port = int(fields[1].partition(":")[2], 16)
                if fields[3] == "0A" and local_port == port:
                    # For a listening socket the kernel prints its accept
                    # queue's length as the receive queue.
                    waiting += int(fields[4].partition(":")[2], 16)
    return waiting


# -- the loss ledger, read as an operator reads it -------------------------

#: The last line of every stop's log (docs/operations.md, "Logs").
LEDGER_LINE = re.compile(
    r"ledger: (?P<received>\d+) line\(s\) received = (?P<delivered>\d+) delivered"
    r" \+ (?P<queued>\d+) queued \+ (?P<spooled>\d+) spooled \+ (?P<dropped>\d+)"
    r" dropped(?: \((?P<reasons>[^)]*)\))?"
    r"(?:; spool: (?P<recovered>\d+) line\(s\) recovered at start"
    r" \((?P<waiting>\d+) still waiting\), (?P<in_spool>\d+) line\(s\) in it)?"
)

#: A scrape: each sample's value by (name, labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class Ledger:
    """
    The loss ledger in lines: received = delivered + queued + spooled +
    dropped (by reason, spelt as C{lineserver_lines_dropped_total}'s
    C{reason} label: C{handler-failed}, C{shutdown-timeout}, ...).

    @ivar recovered: lines found in the spool at start (a previous
        process's), outside this ledger; None where not reported.
    @ivar waiting: those of them not yet at the sink.
    @ivar in_spool: every line the spool holds now.
    """

    received: int
    delivered: int
    queued: int
    spooled: int
    dropped: Mapping[str, int] = field(default_factory=dict)
    recovered: int | None = None
    waiting: int | None = None
    in_spool: int | None = None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def balanced(self) -> bool:
        return self.received == (
            self.delivered + self.queued + self.spooled + self.dropped_total
        )


def ledger_from_log(text: str) -> Ledger:
    """
    @return: the ledger of the last C{ledger:} line in a server's log.
    @raise AssertionError: with the log's end, if there is none.
    """
    found = list(LEDGER_LINE.finditer(text))
    if not found:
        raise AssertionError(f"no ledger line in the log:\n{text[-3000:]}")
    last = found[-1]
    dropped: dict[str, int] = {}
    for part in (last["reasons"] or "").split(", "):
        if part:
            reason, count = part.rsplit(": ", 1)
            dropped[reason.replace("_", "-")] = int(count)
    total = int(last["dropped"])
    assert sum(dropped.values()) == total, last[0]

    def optional(name: str) -> int | None:
        return None if last[name] is None else int(last[name])

    return Ledger(
        received=int(last["received"]),
        delivered=int(last["delivered"]),
        queued=int(last["queued"]),
        spooled=int(last["spooled"]),
        dropped=dropped,
        recovered=optional("recovered"),
        waiting=optional("waiting"),
        in_spool=optional("in_spool"),
    )


def scrape_metrics(port: int, timeout: float = 10.0) -> Samples:
    """
    GET C{/metrics} on a loopback port, parsed as Prometheus would.

    @raise OSError: if nothing answers there.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def ledger_from_scrape(samples: Samples, worker: str | None = None) -> Ledger:
    """
    @param worker: read that worker's own series (C{lineserver_worker_*}
        with C{worker=...}, in a C{--workers} parent's scrape) instead of
        the process's (or the parent's sums).
    @return: the ledger in a scrape.
    """
    prefix = "lineserver_" if worker is None else "lineserver_worker_"
    labels: dict[str, str] = {} if worker is None else {"worker": worker}

    def read(name: str, **more: str) -> int:
        value = samples.get((prefix + name, frozenset({**labels, **more}.items())))
        return 0 if value is None else int(value)

    dropped: dict[str, int] = {}
    for (name, sample_labels), value in samples.items():
        found = dict(sample_labels)
        mine = all(found.get(k) == v for k, v in labels.items())
        if name == prefix + "lines_dropped_total" and mine and value:
            dropped[found["reason"]] = int(value)
    has_spool = (prefix + "spool_lines", frozenset(labels.items())) in samples
    return Ledger(
        received=read("lines_received_total"),
        delivered=read("lines_delivered_total"),
        queued=read("lines_queued"),
        spooled=read("lines_spooled"),
        dropped=dropped,
        recovered=read("spool_recovered_lines_total") if has_spool else None,
        waiting=read("spool_recovered_lines_waiting") if has_spool else None,
        in_spool=read("spool_lines") if has_spool else None,
    )


#: C{check_ledger}'s default: no line dropped, for any reason.
NOTHING_DROPPED: Mapping[str, int] = MappingProxyType({})


def check_scraped_ledger(
    case: SynchronousTestCase, metrics: int, received: int, **expected: Any
) -> Ledger:
    """
    Wait until a scrape of the metrics port C{metrics} shows C{received}
    lines received, then L{check_ledger} a fresh scrape with C{expected}.
    """
    wait_until(
        lambda: ledger_from_scrape(scrape_metrics(metrics)).received == received,
        f"{received} line(s) received in a scrape",
    )
    return check_ledger(
        case, ledger_from_scrape(scrape_metrics(metrics)), received=received, **expected
    )


def check_ledger(
    case: SynchronousTestCase,
    ledger: Ledger,
    *,
    received: int | None = None,
    delivered: int | None = None,
    queued: int | None = 0,
    spooled: int | None = 0,
    dropped: Mapping[str, int] | None = NOTHING_DROPPED,
    recovered: int | None = None,
    waiting: int | None = None,
) -> Ledger:
    """
    Assert that C{ledger} balances, and has the figures given: by default
    nothing queued, spooled or dropped (what a clean stop promises); pass
    None to leave a figure unchecked, C{dropped} by reason for what a
    scenario loses by design (by default, nothing).

    @return: C{ledger}, for more checks.
    """
    case.assertTrue(ledger.balanced, f"the ledger does not balance: {ledger}")
    expected = {
        "received": received,
        "delivered": delivered,
        "queued": queued,
        "spooled": spooled,
        "recovered": recovered,
        "waiting": waiting,
    }
    for name, value in expected.items():
        if value is not None:
            case.assertEqual(getattr(ledger, name), value, f"{name} in {ledger}")
    if dropped is not None:
        case.assertEqual(dict(ledger.dropped), dict(dropped), f"dropped in {ledger}")
    return ledger
