"""End to end: a real C{twistd -n lineserver} process over loopback.

The server is a child process (L{tests.support.ServerProcess}); clients are
plain blocking sockets in threads, so the test's own reactor plays no part
in what the server sees.  Every wait is bounded.

A process stopped by SIGTERM ends with return code -15: twistd runs the
ordered shutdown, then re-raises the signal it received (so a shell sees
143 and a supervisor sees "terminated by signal"), see docs/operations.md.

A connectable port does not yet mean twistd handles SIGTERM: twistd starts
the services (and so listens) before C{reactor.run} installs its signal
handlers, and a SIGTERM in that window kills the process at once, without
the ordered stop.  So each test first sees proof that the reactor runs
(an echo reply, or the file sink's "open" log line, which is only written
from the running reactor) before it relies on SIGTERM.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lineserver.tap import EXIT_ESCALATED
from tests import sink_plugins
from tests.support import (
    ServerProcess,
    check_ledger,
    ledger_from_log,
    read_to_eof,
    reset,
    run_threads,
    temp_dir,
    wait_connectable,
    wait_until,
)

CLIENTS = 8
LINES_PER_CLIENT = 3000
RESET_CLIENT = 5
RESET_AFTER = 1700
SIGTERM = -signal.SIGTERM


def line_of(client: int, seq: int) -> bytes:
    """
    A line that names its sender and its place, padded to a typical size.
    """
    return b"client=%d seq=%06d " % (client, seq) + b"p" * 60


class TwistdTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def server(
        self, *args: str, port: int | None = None, cwd: str = ""
    ) -> ServerProcess:
        proc = ServerProcess(cwd or self.dir, *args, port=port)
        self.addCleanup(proc.kill)
        return proc

    def running(self, server: ServerProcess) -> ServerProcess:
        """
        Wait until the file sink's open is logged: that callback comes from
        the sink's thread through the running reactor, after twistd has
        installed its signal handlers.
        """
        server.ready()
        wait_until(lambda: "sink file:lines.log open" in server.log(), "sink open")
        return server

    def file_lines(self, name: str = "lines.log") -> list[bytes]:
        """
        @return: the sink file's lines, after checking it ends with an LF
            (no partial line).
        """
        data = Path(self.dir, name).read_bytes()
        self.assertTrue(data == b"" or data.endswith(b"\n"), data[-100:])
        return data.split(b"\n")[:-1]

    def stop(self, server: ServerProcess, within: float) -> float:
        """
        SIGTERM the server; check it ends by that signal within C{within}
        seconds.  @return: how long it took.
        """
        started = time.monotonic()
        status = server.stop(timeout=within)
        took = time.monotonic() - started
        self.assertEqual(status, SIGTERM, server.log()[-3000:])
        self.assertLess(took, within)
        self.assertNotIn("Traceback", server.log())
        return took


class ConcurrentClientsTests(TwistdTestCase):
    def test_clean_clients_lines_exactly_once(self) -> None:
        """
        Eight clients send 3000 identifiable lines each at the same time;
        one of them resets its connection mid-stream after part of its
        lines and a partial line.  After SIGTERM the process ends by that
        signal in bounded time; every line of every client that closed
        cleanly is in the sink file exactly once, and in its send order; the
        reset client's lines that made it are a prefix of what it sent,
        with no partial line; nothing else is in the file.
        """
        server = self.running(self.server("--sink", "file:lines.log"))

        def clean(client: int) -> Callable[[], None]:
            def send() -> None:
                with socket.create_connection(("127.0.0.1", server.port), 10) as sock:
                    for start in range(0, LINES_PER_CLIENT, 100):
                        chunk = range(start, min(start + 100, LINES_PER_CLIENT))
                        sock.sendall(
                            b"".join(line_of(client, s) + b"\n" for s in chunk)
                        )

            return send

        def resetting() -> None:
            sock = socket.create_connection(("127.0.0.1", server.port), 10)
            for start in range(0, RESET_AFTER, 100):
                chunk = range(start, min(start + 100, RESET_AFTER))
                sock.sendall(b"".join(line_of(RESET_CLIENT, s) + b"\n" for s in chunk))
            sock.sendall(line_of(RESET_CLIENT, RESET_AFTER)[:20])
            reset(sock)

        targets = [
            resetting if client == RESET_CLIENT else clean(client)
            for client in range(CLIENTS)
        ]
        run_threads(targets)
        self.stop(server, within=15)

        lines = self.file_lines()
        counts = Counter(lines)
        for client in range(CLIENTS):
            if client == RESET_CLIENT:
                continue
            sent = [line_of(client, seq) for seq in range(LINES_PER_CLIENT)]
            missing = [x for x in sent if counts[x] == 0]
            twice = [x for x in sent if counts[x] > 1]
            self.assertEqual((missing[:3], len(missing)), ([], 0), f"client {client}")
            self.assertEqual(twice[:3], [], f"client {client}")
            mine = [x for x in lines if x.startswith(b"client=%d " % client)]
            self.assertEqual(mine, sent)
        prefix = b"client=%d " % RESET_CLIENT
        got = [x for x in lines if x.startswith(prefix)]
        self.assertEqual(got, [line_of(RESET_CLIENT, s) for s in range(len(got))])
        self.assertLessEqual(len(got), RESET_AFTER)
        expected = (CLIENTS - 1) * LINES_PER_CLIENT + len(got)
        self.assertEqual(len(lines), expected)
        check_ledger(
            self, ledger_from_log(server.log()), received=expected, delivered=expected
        )


class ListenRetryTests(TwistdTestCase):
    def test_busy_port_then_serves(self) -> None:
        """
        A second server on a port the first holds logs "could not listen
        on", keeps running, and serves as soon as the first exits.
        """
        first = self.server("--mode", "echo").ready()
        with socket.create_connection(("127.0.0.1", first.port), 10) as sock:
            sock.sendall(b"first serves\n")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_to_eof(sock), b"first serves\n")
        other_dir = os.path.join(self.dir, "second")
        os.mkdir(other_dir)
        second = self.server("--mode", "echo", port=first.port, cwd=other_dir)
        wait_until(
            lambda: "could not listen on" in second.log(), "the listen failure log"
        )
        self.assertIn(f"tcp:{first.port}", second.log())
        self.assertIsNone(second.proc.poll())
        self.stop(first, within=15)
        wait_connectable(first.port, timeout=10)
        with socket.create_connection(("127.0.0.1", first.port), 10) as sock:
            sock.sendall(b"second serves\n")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_to_eof(sock), b"second serves\n")
        self.stop(second, within=15)


class EchoTests(TwistdTestCase):
    def test_terminators_round_trip(self) -> None:
        """
        Echo mode replies with each line's own terminator, CRLF or LF, and
        its bytes unchanged.
        """
        server = self.server("--mode", "echo").ready()
        sent = b"crlf line\r\nlf line\n\r\n\n\xff\x00 bytes\r\nlone\rcr\n"
        with socket.create_connection(("127.0.0.1", server.port), 10) as sock:
            sock.sendall(sent)
            sock.settimeout(10)
            received = b""
            while len(received) < len(sent):
                chunk = sock.recv(65536)
                self.assertTrue(chunk, f"closed early after {received!r}")
                received += chunk
        self.assertEqual(received, sent)
        self.stop(server, within=15)


class LineLimitTests(TwistdTestCase):
    def test_too_long(self) -> None:
        """
        A line over --max-line-length gets one "ERR line-too-long" line and
        the connection closes; the lines before it are in the sink file,
        the long one and anything after it are not.
        """
        server = self.server("--max-line-length", "32", "--sink", "file:lines.log")
        server.ready()
        with socket.create_connection(("127.0.0.1", server.port), 10) as sock:
            sock.sendall(b"one\n" + b"x" * 32 + b"\n" + b"y" * 33 + b"\nafter\n")
            reply = read_to_eof(sock)
        self.assertTrue(reply.startswith(b"ERR line-too-long"), reply)
        self.assertEqual(reply.count(b"\n"), 1)
        self.assertTrue(reply.endswith(b"\n"), reply)
        self.stop(server, within=15)
        self.assertEqual(self.file_lines(), [b"one", b"x" * 32])


class ShutdownUnderLoadTests(TwistdTestCase):
    def test_sigterm_while_sending(self) -> None:
        """
        A client sending lines without pause while SIGTERM arrives cannot
        hold the server up: it exits within --shutdown-timeout plus a
        margin, and the file holds that client's lines complete and in
        order, with no partial line.
        """
        server = self.running(
            self.server("--sink", "file:lines.log", "--shutdown-timeout", "2")
        )
        stop = threading.Event()
        sent = [0]

        def flood() -> None:
            sock = socket.create_connection(("127.0.0.1", server.port), 10)
            sock.settimeout(5)
            seq = 0
            deadline = time.monotonic() + 20
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    block = b"".join(b"flood %08d\n" % n for n in range(seq, seq + 50))
                    sock.sendall(block[:-7])  # lines straddle the sends
                    sock.sendall(block[-7:])
                    seq += 50
                    sent[0] = seq
            except OSError:
                pass  # the server closed us: expected
            finally:
                sock.close()

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            log = Path(self.dir, "lines.log")
            wait_until(
                lambda: log.exists() and log.stat().st_size > 100_000,
                "lines reaching the file",
            )
            took = self.stop(server, within=2 + 5)
        finally:
            stop.set()
            thread.join(10)
        self.assertFalse(thread.is_alive())
        lines = self.file_lines()
        self.assertGreater(len(lines), 1000)
        self.assertLessEqual(len(lines), sent[0])
        self.assertEqual(lines, [b"flood %08d" % n for n in range(len(lines))])
        self.assertLess(took, 7)
        # Every line read before the stop is written: none dropped.
        check_ledger(
            self,
            ledger_from_log(server.log()),
            received=len(lines),
            delivered=len(lines),
        )


class SinkSupervisionTests(TwistdTestCase):
    """
    A sink that fails after a good start, provoked cheaply: C{lines.log} is
    a symlink to C{/proc/self/clear_refs}, which opens (so the start
    succeeds) and refuses every line written to it with EINVAL (it takes
    only a digit, and changes nothing otherwise).  Not C{/dev/full}: a full
    disk (ENOSPC) is backpressure the file sink waits out, not a failure
    (L{tests.test_file_sink_ops}).  A sink that cannot open at start is a
    startup error instead (L{tests.test_lifecycle_twistd}).
    """

    def failing_sink_file(self) -> Path:
        """
        @return: the symlink C{lines.log}, pointing at
            C{/proc/self/clear_refs}.
        """
        link = Path(self.dir, "lines.log")
        os.symlink("/proc/self/clear_refs", link)
        return link

    def send(self, server: ServerProcess, lines: list[bytes]) -> None:
        with socket.create_connection(("127.0.0.1", server.port), 10) as sock:
            sock.sendall(b"".join(line + b"\n" for line in lines))

    def test_escalation_exits_70(self) -> None:
        """
        A sink with a bug (it raises on every write: not an outage) exceeds
        the restart intensity (--max-restarts 1 in --restart-period 60):
        the server logs that it gives up and exits on its own, without a
        signal, with status 70 (EX_SOFTWARE,
        L{lineserver.tap.EXIT_ESCALATED}), in bounded time.
        """
        env = sink_plugins.install(self.dir)
        server = ServerProcess(
            self.dir,
            "--sink",
            "buggy:",
            "--max-restarts",
            "1",
            "--restart-period",
            "60",
            env=env,
        )
        self.addCleanup(server.kill)
        server.wait_listening()
        self.send(server, [b"one line"])
        status = server.proc.wait(timeout=15)
        log = server.log()
        self.assertEqual(status, EXIT_ESCALATED, log[-3000:])
        self.assertIn("sink buggy: failed: a bug in the sink, writing 1 line(s)", log)
        self.assertIn("restarting child sink", log)
        self.assertIn("restart intensity exceeded", log)
        self.assertIn("lineserver gives up", log)
        self.assertIn("exiting with status 70", log)
        # The line the sink never took is dropped, and said so.
        check_ledger(
            self,
            ledger_from_log(log),
            received=1,
            delivered=0,
            dropped={"sink-failed": 1},
        )

    def test_sink_recovers_and_delivers_queued_lines(self) -> None:
        """
        Lines sent while the sink fails stay queued; once its path leads to
        a working file, the restarted sink writes them, and the lines sent
        after them, in order, and a SIGTERM then stops the server as usual.
        """
        link = self.failing_sink_file()
        server = self.server("--sink", "file:lines.log", "--max-restarts", "50")
        self.running(server)
        self.send(server, [b"early %03d" % n for n in range(100)])
        wait_until(lambda: "child sink is down" in server.log(), "a sink outage")
        working = Path(self.dir, "working.log")
        os.symlink(working, Path(self.dir, "next-link"))
        os.replace(Path(self.dir, "next-link"), link)
        wait_until(
            lambda: working.exists() and working.read_bytes().count(b"\n") == 100,
            "the queued lines in the file",
            timeout=20,
        )
        self.send(server, [b"late %03d" % n for n in range(100)])
        wait_until(lambda: working.read_bytes().count(b"\n") == 200, "the later lines")
        # Not self.stop: the sink's failures rightly logged tracebacks.
        status = server.stop(timeout=15)
        self.assertEqual(status, SIGTERM, server.log()[-3000:])
        self.assertIn("(an outage, not a crash): Invalid argument", server.log())
        self.assertEqual(
            self.file_lines("working.log"),
            [b"early %03d" % n for n in range(100)]
            + [b"late %03d" % n for n in range(100)],
        )
        check_ledger(self, ledger_from_log(server.log()), received=200, delivered=200)
