"""The accept guard: resource errors on accept pause accepting, never spin."""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from typing_extensions import override

from lineserver.accept_guard import (
    RESOURCE_ERRORS,
    THROTTLE_REASON,
    AcceptThrottle,
    GuardedSocket,
    guard_port,
)
from lineserver.flow import Pause, PauseGate
from lineserver.stats import Stats
from tests.support import (
    Client,
    RecordingGate,
    accept_queue,
    connect,
    later,
    reactor,
)

ROOT = Path(__file__).resolve().parent.parent


def make_throttle(
    report_every: float = 5.0,
) -> tuple[AcceptThrottle, Clock, RecordingGate, Stats]:
    clock = Clock()
    gate = RecordingGate()
    stats = Stats()
    throttle = AcceptThrottle(clock, gate.gate, stats, report_every=report_every)
    return throttle, clock, gate, stats


def failure_reports(events: Sequence[Any]) -> list[str]:
    return [
        formatEvent(event)
        for event in events
        if formatEvent(event).startswith("accept failed")
    ]


class AcceptThrottleTests(SynchronousTestCase):
    def test_pause_then_try_again(self) -> None:
        """
        An error holds the gate's accept-errors reason for the initial
        interval, then releases it so the port tries again.
        """
        throttle, clock, gate, _stats = make_throttle()
        throttle.on_error(errno.ENFILE)
        self.assertEqual(gate.gate.reasons, {THROTTLE_REASON})
        self.assertTrue(throttle.pausing)
        clock.advance(0.049)
        self.assertTrue(gate.gate.paused)
        clock.advance(0.001)
        self.assertFalse(gate.gate.paused)
        self.assertFalse(throttle.pausing)
        self.assertEqual(gate.calls, ["pause", "resume"])

    def test_backoff_doubles_to_cap(self) -> None:
        """
        While errors persist each pause is twice the last, up to the cap.
        """
        throttle, clock, gate, _stats = make_throttle()
        pauses = []
        for _ in range(7):
            throttle.on_error(errno.EMFILE)
            [retry] = clock.getDelayedCalls()
            pause = retry.getTime() - clock.seconds()
            pauses.append(round(pause, 9))
            clock.advance(pause)
            self.assertFalse(gate.gate.paused)
        self.assertEqual(pauses, [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5])

    def test_success_resets(self) -> None:
        """
        A successful accept makes the next error pause for the initial
        interval again, and logs that accepting works again.
        """
        throttle, clock, _gate, _stats = make_throttle()
        for _ in range(4):
            throttle.on_error(errno.EMFILE)
            clock.advance(1)
        self.assertEqual(throttle.delay, 0.5)
        with capturedLogs() as events:
            throttle.on_success()
            throttle.on_success()
        self.assertEqual(throttle.delay, 0.05)
        self.assertEqual(len(events), 1)
        self.assertIn("accepting again after 4 failed accepts", formatEvent(events[0]))

    def test_log_rate_limited(self) -> None:
        """
        Stuck for 20 s at the cap (about 40 failures), the throttle logs
        once at the start and then once per report interval, each line
        with the number of failures since the one before.
        """
        throttle, clock, _gate, _stats = make_throttle(report_every=5.0)
        with capturedLogs() as events:
            for _ in range(44):
                throttle.on_error(errno.EMFILE)
                clock.advance(throttle.delay)
        reports = failure_reports(events)
        self.assertLessEqual(len(reports), 5)
        self.assertGreaterEqual(len(reports), 4)
        self.assertEqual(
            reports[0],
            "accept failed with EMFILE (1 times since last report); "
            "pausing accept for 0.05 s",
        )
        counts = [int(line.split("(")[1].split()[0]) for line in reports]
        self.assertGreater(counts[1], 5)
        self.assertEqual(sum(counts), throttle.failures - throttle._unreported)
        self.assertTrue(all(event["log_level"] == LogLevel.warn for event in events))

    def test_log_every_pause(self) -> None:
        """
        With a report interval of 0 every pause is logged (once per
        backoff interval), and no more.
        """
        throttle, clock, _gate, _stats = make_throttle(report_every=0.0)
        with capturedLogs() as events:
            for _ in range(3):
                throttle.on_error(errno.ENOBUFS)
                throttle.on_error(errno.ENOBUFS)
                clock.advance(throttle.delay)
        reports = failure_reports(events)
        self.assertEqual(len(reports), 3)
        self.assertIn(
            "(2 times since last report); pausing accept for 0.10 s", reports[1]
        )

    def test_stats(self) -> None:
        """
        Every failure counts in accept.errors.<ERRNO>.
        """
        throttle, clock, _gate, stats = make_throttle()
        for code in (errno.EMFILE, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            throttle.on_error(code)
            clock.advance(1)
        self.assertEqual(stats.get("accept.errors.EMFILE"), 2)
        self.assertEqual(stats.get("accept.errors.ENFILE"), 1)
        self.assertEqual(stats.get("accept.errors.ENOMEM"), 1)
        self.assertEqual(throttle.failures, 4)

    def test_error_while_pausing_only_counts(self) -> None:
        """
        An error while already pausing (an accept forced through, as at
        stop) counts but neither extends the pause nor grows the backoff.
        """
        throttle, clock, gate, stats = make_throttle()
        throttle.on_error(errno.EMFILE)
        throttle.on_error(errno.EMFILE)
        self.assertEqual(throttle.delay, 0.1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(stats.get("accept.errors.EMFILE"), 2)
        clock.advance(0.05)
        self.assertFalse(gate.gate.paused)

    def test_other_reasons_kept(self) -> None:
        """
        The throttle releases only its own reason: a connection limit held
        meanwhile keeps the port paused.
        """
        throttle, clock, gate, _stats = make_throttle()
        throttle.on_error(errno.EMFILE)
        gate.gate.hold(Pause.CONNECTION_LIMIT)
        clock.advance(1)
        self.assertEqual(gate.gate.reasons, {Pause.CONNECTION_LIMIT})
        self.assertEqual(gate.calls, ["pause"])

    def test_stop(self) -> None:
        """
        Stopping cancels the pending retry and releases the reason.
        """
        throttle, clock, gate, _stats = make_throttle()
        throttle.on_error(errno.EMFILE)
        throttle.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(gate.gate.paused)
        self.assertFalse(throttle.pausing)
        throttle.stop()
        self.assertEqual(gate.calls, ["pause", "resume"])

    def test_invalid(self) -> None:
        """
        The initial interval must be positive and at most the cap.
        """
        gate = RecordingGate().gate
        self.assertRaises(ValueError, AcceptThrottle, Clock(), gate, None, 0.0, 0.5)
        self.assertRaises(ValueError, AcceptThrottle, Clock(), gate, None, 1.0, 0.5)


class FakeSocket:
    """
    A listening socket whose accept() returns or raises what the test says.
    """

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.accepts = 0

    def accept(self) -> Any:
        self.accepts += 1
        result = self.results.pop(0) if self.results else OSError(errno.EAGAIN, "")
        if isinstance(result, OSError):
            raise result
        return result

    def fileno(self) -> int:
        return 42


class GuardedSocketTests(SynchronousTestCase):
    @override
    def setUp(self) -> None:
        self.throttle, self.clock, self.gate, self.stats = make_throttle()
        self.fake = FakeSocket()
        self.guarded = GuardedSocket(self.fake, self.throttle)

    def test_delegates(self) -> None:
        """
        Everything but accept goes to the real socket.
        """
        self.assertEqual(self.guarded.fileno(), 42)
        self.assertIs(self.guarded.wrapped, self.fake)
        self.assertIs(self.guarded.results, self.fake.results)

    def test_success(self) -> None:
        """
        A successful accept is returned as is, and resets the backoff.
        """
        self.throttle.on_error(errno.EMFILE)
        self.clock.advance(1)
        self.fake.results.append(("client", ("127.0.0.1", 1)))
        self.assertEqual(self.guarded.accept(), ("client", ("127.0.0.1", 1)))
        self.assertEqual(self.throttle.delay, self.throttle.initial)

    def test_resource_error_becomes_eagain(self) -> None:
        """
        EMFILE, ENFILE, ENOBUFS and ENOMEM from the real accept reach the
        throttle and come out as EAGAIN, which Twisted takes quietly.
        """
        for code in sorted(RESOURCE_ERRORS):
            self.fake.results.append(OSError(code, os.strerror(code)))
            error = self.assertRaises(OSError, self.guarded.accept)
            self.assertEqual(error.errno, errno.EAGAIN)
            self.assertIsInstance(error.__cause__, OSError)
            self.assertEqual(error.__cause__.errno, code)  # type: ignore[union-attr]
            self.assertTrue(self.gate.gate.paused)
            self.clock.advance(1)
        self.assertEqual(self.throttle.failures, 4)
        self.assertEqual(self.stats.get("accept.errors.ENOBUFS"), 1)

    def test_other_errors_pass(self) -> None:
        """
        Errors about one client (ECONNABORTED) or nothing to accept (EAGAIN)
        pass through untouched, for Twisted to handle.
        """
        for code in (errno.ECONNABORTED, errno.EAGAIN):
            self.fake.results.append(OSError(code, ""))
            error = self.assertRaises(OSError, self.guarded.accept)
            self.assertEqual(error.errno, code)
        self.assertEqual(self.throttle.failures, 0)
        self.assertFalse(self.gate.gate.paused)

    def test_inject(self) -> None:
        """
        An injected fault fails the next N accepts without calling the real
        accept; then accepting works again.
        """
        self.guarded.inject(errno.ENFILE, 2)
        self.fake.results.append(("client", ()))
        for _ in range(2):
            error = self.assertRaises(OSError, self.guarded.accept)
            self.assertEqual(error.errno, errno.EAGAIN)
            self.clock.advance(1)
        self.assertEqual(self.fake.accepts, 0)
        self.assertEqual(self.stats.get("accept.errors.ENFILE"), 2)
        self.assertEqual(self.guarded.injected, 0)
        self.assertEqual(self.guarded.accept(), ("client", ()))

    def test_inject_other_errno(self) -> None:
        """
        An injected errno that is not a resource error is raised as itself
        (Twisted's own handling then applies) and does not throttle.
        """
        self.guarded.inject(errno.ECONNABORTED, 1)
        error = self.assertRaises(OSError, self.guarded.accept)
        self.assertEqual(error.errno, errno.ECONNABORTED)
        self.assertFalse(self.gate.gate.paused)

    def test_inject_clear(self) -> None:
        """
        Injecting a count of 0 clears a fault; a negative count is an error.
        """
        self.guarded.inject(errno.ENFILE, 100)
        self.guarded.inject(errno.ENFILE, 0)
        self.fake.results.append(("client", ()))
        self.assertEqual(self.guarded.accept(), ("client", ()))
        self.assertRaises(ValueError, self.guarded.inject, errno.ENFILE, -1)

    def test_honour_gate(self) -> None:
        """
        With honour_gate, a paused gate (any reason) ends an accept batch
        without calling the real accept; without it, accept goes on.
        """
        honouring = GuardedSocket(self.fake, self.throttle, honour_gate=True)
        self.gate.gate.hold(Pause.CONNECTION_LIMIT)
        error = self.assertRaises(OSError, honouring.accept)
        self.assertEqual(error.errno, errno.EAGAIN)
        self.assertEqual(self.fake.accepts, 0)
        self.fake.results.append(("client", ()))
        self.assertEqual(self.guarded.accept(), ("client", ()))
        self.gate.gate.release(Pause.CONNECTION_LIMIT)
        self.fake.results.append(("other", ()))
        self.assertEqual(honouring.accept(), ("other", ()))


class GuardPortTests(SynchronousTestCase):
    def test_installs(self) -> None:
        """
        guard_port replaces the port's socket by a guard of it, once.
        """
        throttle = make_throttle()[0]
        port = type("Port", (), {})()
        fake = FakeSocket()
        port.socket = fake
        guard = guard_port(port, throttle)
        assert guard is not None
        self.assertIs(port.socket, guard)
        self.assertIs(guard.wrapped, fake)
        self.assertIs(guard_port(port, throttle), guard)

    def test_no_socket(self) -> None:
        """
        A port without a socket (not listening) is left alone.
        """
        throttle = make_throttle()[0]
        self.assertIsNone(guard_port(object(), throttle))


class Echo(Protocol):
    @override
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class CountingFactory(Factory):
    protocol = Echo
    noisy = False

    def __init__(self) -> None:
        self.built = 0

    @override
    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.built += 1
        protocol = Echo()
        protocol.factory = self
        return protocol


class RealPortTests(TestCase):
    """
    A guarded Twisted port on loopback, with injected accept faults.
    """

    def listen_guarded(self, port: Any) -> tuple[GuardedSocket, Stats]:
        self.addCleanup(port.stopListening)
        gate = PauseGate(port.stopReading, port.startReading)
        stats = Stats()
        throttle = AcceptThrottle(reactor, gate, stats)
        self.addCleanup(throttle.stop)
        guard = guard_port(port, throttle)
        assert guard is not None
        return guard, stats

    @inlineCallbacks
    def test_fault_pauses_without_spinning(self) -> Generator[Deferred[Any], Any, None]:
        """
        While accept() fails with ENFILE for a second: the process does not
        spin (well under 0.3 s of CPU; an unguarded port spins at ~1 s),
        the waiting client is not accepted and not dropped, and an existing
        connection keeps being echoed.  Once the fault clears, the waiting
        client is accepted by itself within a second.
        """
        factory = CountingFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        guard, stats = self.listen_guarded(port)
        number = port.getHost().port

        first: Client = yield connect(number)
        self.addCleanup(transport(first).abortConnection)
        transport(first).write(b"a0\n")
        yield first.wait_for(3)

        guard.inject(errno.ENFILE, 10**6)
        waiting: Client = yield connect(number)
        self.addCleanup(transport(waiting).abortConnection)
        transport(waiting).write(b"waiting\n")

        cpu_start = time.process_time()
        expected = 3
        for index in range(1, 11):
            line = f"a{index}\n".encode()
            transport(first).write(line)
            expected += len(line)
            yield first.wait_for(expected, timeout=5)
            yield later(0.1)
        cpu = time.process_time() - cpu_start

        self.assertLess(cpu, 0.3)
        self.assertEqual(factory.built, 1)
        self.assertEqual(waiting.received, b"")
        self.assertIsNone(waiting.reason)
        failures = stats.get("accept.errors.ENFILE")
        self.assertGreaterEqual(failures, 3)
        self.assertLess(failures, 30)

        guard.inject(errno.ENFILE, 0)
        cleared = time.monotonic()
        yield waiting.wait_for(len(b"waiting\n"), timeout=20)
        took = time.monotonic() - cleared
        self.assertLess(took, 1.0, f"accepted {took:.2f} s after the fault cleared")
        self.assertEqual(factory.built, 2)

    @inlineCallbacks
    def test_unix_port(self) -> Generator[Deferred[Any], Any, None]:
        """
        A UNIX socket port is guarded the same way: an injected EMFILE
        pauses accepting, and the client is served after the pause.
        """
        factory = CountingFactory()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "s")
        port = reactor.listenUNIX(path, factory)
        guard, stats = self.listen_guarded(port)
        guard.inject(errno.EMFILE, 1)
        endpoint = UNIXClientEndpoint(reactor, path)
        client: Client = yield endpoint.connect(Factory.forProtocol(Client))
        self.addCleanup(transport(client).abortConnection)
        transport(client).write(b"hello\n")
        yield client.wait_for(6, timeout=5)
        self.assertEqual(stats.get("accept.errors.EMFILE"), 1)
        self.assertEqual(factory.built, 1)


class RealEmfileTests(SynchronousTestCase):
    """
    A guarded echo server in a subprocess with RLIMIT_NOFILE at 64.
    """

    limit = 64

    def start_server(self) -> tuple[subprocess.Popen[bytes], int]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fd_exhaustion_server", str(self.limit)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self.stop_server, proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        self.assertTrue(ready, "the server did not print its port in 30 s")
        line = proc.stdout.readline()
        self.assertTrue(line.strip().isdigit(), line)
        return proc, int(line)

    def stop_server(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def connect(self, port: int, clients: list[socket.socket]) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        clients.append(sock)
        return sock

    def receive(self, sock: socket.socket, size: int, timeout: float) -> bytes:
        """
        @return: up to C{size} bytes, as many as arrive within C{timeout}
            seconds (fewer if the time runs out or the peer closes).
        """
        received = b""
        deadline = time.monotonic() + timeout
        while len(received) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(size - len(received))
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        return received

    def echoes(self, sock: socket.socket, data: bytes, timeout: float) -> bool:
        """
        @return: whether C{data} comes back within C{timeout} seconds.
        """
        sock.sendall(data)
        return self.receive(sock, len(data), timeout) == data

    def echo_latency(self, sock: socket.socket, data: bytes) -> float:
        """
        Wait (up to 20 s) for C{data} to come back.

        @return: the seconds it took.
        """
        started = time.monotonic()
        received = self.receive(sock, len(data), 20.0)
        self.assertEqual(received, data)
        return time.monotonic() - started

    def served_or_stuck(
        self, proc: subprocess.Popen[bytes], port: int, sock: socket.socket, line: bytes
    ) -> bool:
        """
        Send C{line} from a client that just connected: is it served
        (echoed), or stuck in the kernel's accept queue with the server
        at its descriptor limit (nothing else could free one)?
        """
        sock.sendall(line)
        received = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            received += self.receive(sock, len(line) - len(received), 0.05)
            if received == line:
                return True
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            if fds >= self.limit and accept_queue(port) == 1:
                return False
        raise AssertionError(f"neither served nor stuck after 20 s: {received!r}")

    def test_real_emfile(self) -> None:
        """
        Out of descriptors for real: the client past the limit waits in the
        backlog (not dropped), an existing connection is still echoed, the
        server uses under 5% CPU while stuck, and once some clients leave
        the waiting client and a new one are served within a second.
        """
        proc, port = self.start_server()
        clients: list[socket.socket] = []
        self.addCleanup(close_all, clients)

        stuck = None
        for index in range(self.limit + 5):
            sock = self.connect(port, clients)
            if not self.served_or_stuck(proc, port, sock, f"c{index}\n".encode()):
                stuck = sock
                break
        self.assertIsNotNone(stuck, "never ran out of descriptors")
        assert stuck is not None
        served = clients[:-1]
        self.assertGreater(len(served), 20)

        cpu_start = cpu_seconds(proc.pid)
        wall_start = time.monotonic()
        for index in range(10):
            self.assertTrue(self.echoes(served[0], f"alive{index}\n".encode(), 2.0))
            time.sleep(0.2)
        cpu = cpu_seconds(proc.pid) - cpu_start
        wall = time.monotonic() - wall_start
        self.assertLess(cpu / wall, 0.05, f"{cpu:.2f} s CPU in {wall:.2f} s")

        for sock in served[-5:]:
            sock.close()
        freed = time.monotonic()
        waiting_line = f"c{len(served)}\n".encode()
        self.echo_latency(stuck, waiting_line)
        took = time.monotonic() - freed
        self.assertLess(took, 1.0, f"waiting client served {took:.2f} s after")
        new = self.connect(port, clients)
        new.sendall(b"new\n")
        took = self.echo_latency(new, b"new\n")
        self.assertLess(took, 1.0, f"new client served after {took:.2f} s")
        self.assertTrue(self.echoes(served[0], b"still\n", 10.0))

        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        reports = [line for line in log.splitlines() if "accept failed with" in line]
        self.assertGreaterEqual(len(reports), 1, log)
        self.assertLessEqual(len(reports), 3, log)
        self.assertIn("accept failed with EMFILE", reports[0])
        self.assertIn("accepting again on echo after", log)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def transport(client: Client) -> Any:
    """
    @return: a connected client's transport (a TCP or UNIX connection).
    """
    assert client.transport is not None
    return client.transport


def cpu_seconds(pid: int) -> float:
    """
    @return: user plus system CPU time of process C{pid}, from /proc.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
