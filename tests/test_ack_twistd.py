"""--ack through a real C{twistd -n lineserver} and raw loopback sockets."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    TWISTD,
    ServerProcess,
    check_ledger,
    check_scraped_ledger,
    free_port,
    ledger_from_log,
    temp_dir,
    wait_until,
)
from tests.test_file_sink_ops import fill, line, sequences, small_filesystem
from tests.test_metrics_twistd import scrape, value

STOPPED = -signal.SIGTERM


class AckClient:
    """
    A raw-socket client that sends lines and reads the server's C{ACK <n>}
    lines, as a user's client would; every wait is bounded.

    @ivar acks: every ACK number received, in order.
    """

    def __init__(self, port: int | str, client: int = 1) -> None:
        """
        @param port: a loopback TCP port, or a unix socket's path.
        """
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.client = client
        self.sent = 0
        self.acks: list[int] = []
        self.closed = False
        self._buffer = b""

    @property
    def acked(self) -> int:
        return self.acks[-1] if self.acks else 0

    def lines(self, count: int) -> bytes:
        data = b"".join(line(self.client, self.sent + n) for n in range(count))
        self.sent += count
        return data

    def read(self, timeout: float) -> None:
        """
        Take what arrived within C{timeout} seconds (one read at most).
        """
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if readable:
            self._take(self._recv())

    def _recv(self) -> bytes:
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return b""
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
        return chunk

    def _take(self, chunk: bytes) -> None:
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        for text in complete:
            if not text.startswith(b"ACK "):
                raise AssertionError(f"not an ACK line: {text!r}")
            self.acks.append(int(text[4:]))

    def exchange(self, data: bytes, timeout: float = 30.0) -> None:
        """
        Send C{data} while reading ACKs, then read until every line sent
        so far is acknowledged.

        @raise AssertionError: after C{timeout}, or if the server closes.
        """
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view or self.acked < self.sent:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(
                    f"client {self.client}: ACK {self.acked} of {self.sent} "
                    f"({len(view)} bytes unsent, closed: {self.closed}) "
                    f"after {timeout}s"
                )
            writable = [self.sock] if view else []
            readable, ready, _ = select.select(
                [self.sock], writable, [], min(left, 0.1)
            )
            if readable:
                self._take(self._recv())
            if ready:
                with contextlib.suppress(BlockingIOError):
                    view = view[self.sock.send(view[:65536]) :]

    def exchange_for(self, data: bytes, seconds: float) -> None:
        """
        Send C{data} and read ACKs for C{seconds}, whatever they say (the
        server is expected to hold some lines back).
        """
        view = memoryview(data)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.closed:
            writable = [self.sock] if view else []
            readable, ready, _ = select.select(
                [self.sock], writable, [], min(left, 0.1)
            )
            if readable:
                self._take(self._recv())
            if ready:
                with contextlib.suppress(BlockingIOError):
                    view = view[self.sock.send(view[:65536]) :]
        if view:
            raise AssertionError(f"{len(view)} bytes not sent in {seconds}s")

    def close(self) -> None:
        self.sock.close()


def ack_server(
    case: SynchronousTestCase, log: Path, *args: str, fsync: str = "batch"
) -> ServerProcess:
    server = ServerProcess(
        temp_dir(case), "--ack", "--sink", f"file:{log}?fsync={fsync}", *args
    )
    case.addCleanup(server.kill)
    return server.wait_listening()


class AckTwistdTests(SynchronousTestCase):
    def test_every_line_acknowledged_and_written(self) -> None:
        """
        A client sends N lines in bulk and reads ACKs until C{ACK N}: the
        numbers only grow, there are far fewer ACK lines than lines
        (coalesced: one per sink write), and every line is in the file,
        once, in order.
        """
        log = Path(temp_dir(self), "lines.log")
        server = ack_server(self, log)
        client = AckClient(server.port)
        self.addCleanup(client.close)
        total = 20_000
        client.exchange(client.lines(total))
        self.assertEqual(client.acked, total)
        self.assertEqual(client.acks, sorted(client.acks))
        self.assertLess(len(client.acks), total // 10, client.acks[:20])
        self.assertEqual(
            sequences(log.read_bytes().splitlines()), {1: list(range(total))}
        )
        # Nothing more comes once everything is acknowledged.
        client.read(1.0)
        self.assertEqual(client.acked, total)
        self.assertEqual(server.stop(), STOPPED, server.log()[-2000:])

    def test_repeated_while_the_disk_is_full(self) -> None:
        """
        With the sink's disk full (a real tmpfs), lines are not
        acknowledged, and the server repeats the latest ACK every
        C{--ack-interval} so the client knows it is alive; once space is
        freed, the ACK for every line comes, and every line is written.
        """
        small = small_filesystem(self)
        filler = fill(small)
        log = Path(small, "lines.log")
        metrics = free_port()
        server = ack_server(
            self, log, "--ack-interval", "0.3", "--metrics", f"tcp:{metrics}"
        )
        client = AckClient(server.port)
        self.addCleanup(client.close)
        total = 2000
        data = client.lines(total)
        client.sock.setblocking(True)
        client.sock.sendall(data)
        client.sock.setblocking(False)
        deadline = time.monotonic() + 30
        while len(client.acks) < 4 and time.monotonic() < deadline:
            client.read(0.5)
        self.assertGreaterEqual(len(client.acks), 4, server.log()[-2000:])
        self.assertEqual(set(client.acks), {0}, "nothing is durable yet")
        self.assertIn("No space left on device (ENOSPC)", server.log())
        self.assertEqual(log.read_bytes(), b"")
        # A scrape while the disk is full: every line received waits
        # queued, none delivered (none acknowledged), none dropped.
        check_scraped_ledger(self, metrics, total, delivered=0, queued=total)

        os.remove(filler)
        client.exchange(b"")
        self.assertEqual(client.acked, total)
        self.assertEqual(
            sequences(log.read_bytes().splitlines()), {1: list(range(total))}
        )
        self.assertEqual(server.stop(), STOPPED, server.log()[-2000:])
        check_ledger(
            self, ledger_from_log(server.log()), received=total, delivered=total
        )

    def test_a_client_that_does_not_read_its_acks(self) -> None:
        """
        A client that sends and never reads its ACKs is paused (the server
        stops reading it, as it does a client that does not read its
        echoes), while another client is acknowledged as usual; once it
        reads, it resumes and every line of it is acknowledged.

        The deaf client comes over a unix socket: its kernel buffer is a
        fixed couple of hundred KiB, where loopback TCP grows the server's
        send buffer to 4 MiB, and filling that with 10-byte ACKs would take
        minutes.
        """
        directory = temp_dir(self)
        log = Path(directory, "lines.log")
        path = os.path.join(directory, "lines.sock")
        tcp_port, metrics_port = free_port(), free_port()
        # fsync=never: a sink write per read without waiting for the disk,
        # so that ACKs come fast enough to fill the buffers soon.
        server = ServerProcess(
            directory,
            "--ack",
            "--sink",
            f"file:{log}?fsync=never",
            "--port",
            f"tcp:{tcp_port}:interface=127.0.0.1",
            "--metrics",
            f"tcp:{metrics_port}:interface=127.0.0.1",
            listen=f"unix:{path}",
        )
        self.addCleanup(server.kill)
        server.wait_listening(ports=2)
        wait_until(lambda: "serving metrics on" in server.log(), "the metrics port")
        deaf = AckClient(path, client=1)
        self.addCleanup(deaf.close)
        sending = threading.Event()
        sending.set()
        last_sent = [time.monotonic()]
        errors: list[BaseException] = []

        def send_line_by_line() -> None:
            # One small send at a time, paced so that most reach the server
            # in reads of their own: each read is a sink write and an ACK.
            # Blocked (EAGAIN) once the server stops reading this client.
            try:
                while sending.is_set():
                    time.sleep(0.0005)
                    view = memoryview(deaf.lines(1))
                    while view and sending.is_set():
                        try:
                            view = view[deaf.sock.send(view) :]
                            last_sent[0] = time.monotonic()
                        except BlockingIOError:
                            time.sleep(0.01)
                    if view:
                        deaf.sent -= 1  # not sent after all
            except BaseException as error:
                errors.append(error)

        def paused() -> bool:
            samples = scrape(metrics_port)
            return (
                value(samples, "lineserver_connections_paused") >= 1
                and time.monotonic() - last_sent[0] > 1.0
            )

        sender = threading.Thread(target=send_line_by_line, daemon=True)
        sender.start()
        try:
            wait_until(
                paused,
                "the client that does not read its ACKs to be paused "
                "(and its sends to block)",
                timeout=90,
            )
            # Another client is served and acknowledged meanwhile.
            other = AckClient(tcp_port, client=2)
            self.addCleanup(other.close)
            other.exchange(other.lines(1000))
            self.assertEqual(other.acked, 1000)
            self.assertTrue(paused(), "the deaf client stays paused")
        finally:
            sending.clear()
            sender.join(30)
        self.assertEqual(errors, [])
        self.assertFalse(sender.is_alive())
        # Reading now: the paused client resumes, and all of it is acked.
        deaf.exchange(b"", timeout=60)
        self.assertEqual(deaf.acked, deaf.sent)
        self.assertEqual(deaf.acks, sorted(deaf.acks))
        written = sequences(log.read_bytes().splitlines())
        self.assertEqual(written[1], list(range(deaf.sent)))
        self.assertEqual(written[2], list(range(1000)))
        self.assertEqual(server.stop(), STOPPED, server.log()[-2000:])

    def test_ledger_after_sigterm_under_load(self) -> None:
        """
        SIGTERM while four clients send: the stop drains, flushes and
        acknowledges; the ledger logged at the end balances with nothing
        queued, spooled or dropped, the file holds exactly the lines
        delivered, and every acknowledged line is in it.
        """
        log = Path(temp_dir(self), "lines.log")
        server = ack_server(self, log)
        clients = [AckClient(server.port, client=n) for n in range(1, 5)]
        for client in clients:
            self.addCleanup(client.close)
        stop = threading.Event()

        def load(client: AckClient) -> None:
            data = b""
            while not stop.is_set() and not client.closed:
                if not data:
                    data = client.lines(200)
                _, ready, _ = select.select([], [client.sock], [], 0.05)
                if ready:
                    with contextlib.suppress(
                        BlockingIOError, BrokenPipeError, ConnectionResetError
                    ):
                        data = data[client.sock.send(data) :]
                client.read(0)
            client.sent -= len(data.splitlines())  # never sent

        threads = [threading.Thread(target=load, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: all(c.acked > 1000 for c in clients), "load", timeout=60)
            os.kill(server.pid, signal.SIGTERM)
            wait_until(lambda: server.proc.poll() is not None, "the stop", 60)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        self.assertEqual(server.proc.returncode, STOPPED, server.log()[-2000:])
        ledger = ledger_from_log(server.log())
        check_ledger(self, ledger, received=ledger.delivered)
        written = sequences(log.read_bytes().splitlines())
        self.assertEqual(sum(len(n) for n in written.values()), ledger.delivered)
        for client in clients:
            # Each client's lines once and in order; every acked one there.
            self.assertEqual(
                written[client.client], list(range(len(written[client.client])))
            )
            self.assertGreaterEqual(len(written[client.client]), client.acked)


class AckUsageTests(SynchronousTestCase):
    def test_ack_with_echo_is_a_usage_error(self) -> None:
        """
        C{twistd lineserver --ack --mode echo} does not start: echo has no
        sink to acknowledge lines for.
        """
        result = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "lineserver", "--ack", "--mode", "echo"],
            capture_output=True,
            timeout=60,
            cwd=temp_dir(self),
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"--ack: only with --mode sink", result.stdout + result.stderr)
