"""An outage is not a crash, and the disk spool, through a real twistd.

The sink's destination fails the way L{tests.test_twistd} makes it fail:
C{lines.log} is a symlink to C{/proc/self/clear_refs}, which opens and
refuses every line with EINVAL; pointing the symlink at a regular file
ends the outage.  The spool's files are read with L{lineserver.spool}'s
own decoder, as an operator's tool would.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from lineserver.spool import MAGIC, SUFFIX, decode
from tests.support import (
    ServerProcess,
    check_ledger,
    free_port,
    ledger_from_log,
    ledger_from_scrape,
    scrape_metrics,
    temp_dir,
    wait_until,
)
from tests.test_ack_twistd import AckClient
from tests.test_file_sink_ops import sequences


def spooled(directory: Path) -> list[bytes]:
    """
    @return: every line in the spool's segment files, in order.
    """
    lines: list[bytes] = []
    if not directory.exists():
        return lines
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        data = path.read_bytes()
        for _, _, got in decode(data, len(MAGIC)).records:
            lines.extend(got)
    return lines


def numbered(prefix: bytes, count: int, width: int = 0) -> list[bytes]:
    """
    Lines C{prefix NNNNNNN}, padded with dots to C{width} bytes; never a
    bare digit (clear_refs would take that one).
    """
    return [(b"%s %07d " % (prefix, n)).ljust(width, b".") for n in range(count)]


class Sender:
    """
    Sends lines on one connection from a thread, so that a test can see
    whether the server keeps reading (or pauses the client).
    """

    def __init__(self, port: int, lines: list[bytes]) -> None:
        self.data = b"".join(line + b"\n" for line in lines)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.settimeout(120)
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        try:
            self.sock.sendall(self.data)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as error:  # reported by finish()
            self.error = error
        self.done.set()

    def finish(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        self.sock.close()
        if self.error is not None:
            raise self.error
        if self.thread.is_alive():
            raise AssertionError("the client could not send everything")


class OutageCase(TestCase):
    def setUp(self) -> None:
        self.dir = Path(temp_dir(self))
        self.link = self.dir / "lines.log"
        self.working = self.dir / "working.log"
        self.spool = self.dir / "spool"

    def break_sink(self) -> None:
        """
        The sink's path leads to a file that refuses every line.
        """
        if self.link.is_symlink():
            self.link.unlink()
        os.symlink("/proc/self/clear_refs", self.link)

    def mend_sink(self) -> None:
        """
        The sink's path leads to a regular file again (atomically).
        """
        os.symlink(self.working, self.dir / "next-link")
        os.replace(self.dir / "next-link", self.link)

    def server(self, *args: str) -> ServerProcess:
        log = self.dir / "server.log"
        if log.exists():
            # Keep the last run's log apart, so that its "listening on"
            # is not taken for this one's.
            log.rename(self.dir / f"server-{time.monotonic_ns()}.log")
        server = ServerProcess(str(self.dir), "--sink", "file:lines.log", *args)
        self.addCleanup(server.kill)
        server.wait_listening()
        return server

    def delivered(self) -> list[bytes]:
        if not self.working.exists():
            return []
        return self.working.read_bytes().splitlines()

    def wait_delivered(self, count: int, timeout: float = 60.0) -> None:
        wait_until(lambda: len(self.delivered()) >= count, f"{count} lines", timeout)

    def assert_alive(self, server: ServerProcess) -> None:
        self.assertIsNone(server.proc.poll(), server.log()[-3000:])


class OutageTests(OutageCase):
    def test_outage_longer_than_the_intensity_window(self) -> None:
        """
        A sink that fails with an OS error for longer than the restart
        intensity window (the defaults: 5 restarts in 10s) does not end
        the process: it says what is wrong and how many lines wait at most
        every 5 seconds, pauses a client that sends more than the queue
        holds, and once the file works again every line arrives once, in
        order.
        """
        self.break_sink()
        server = self.server("--high-watermark", "64K", "--low-watermark", "16K")
        early = numbered(b"early", 100)
        sender = Sender(server.port, early)
        sender.finish()
        wait_until(lambda: "child sink is down" in server.log(), "the outage")
        many = numbered(b"many", 200_000, width=100)
        flood = Sender(server.port, many)
        down_for = 14.0
        deadline = time.monotonic() + down_for
        while time.monotonic() < deadline:
            self.assert_alive(server)
            time.sleep(0.5)
        # The client is paused: 20 MB do not fit in the queue and the
        # sockets' buffers.
        self.assertFalse(flood.done.is_set())
        log = server.log()
        outage_lines = log.count("child sink is down (an outage, not a crash)")
        self.assertGreaterEqual(outage_lines, 2, log[-3000:])
        self.assertLessEqual(outage_lines, down_for / 5 + 2, log[-3000:])
        self.assertIn("Invalid argument", log)
        self.assertIn("line(s) wait in the queue", log)
        self.assertNotIn("restart intensity exceeded", log)
        self.mend_sink()
        flood.finish(timeout=120)
        self.wait_delivered(len(early) + len(many), timeout=120)
        self.assertEqual(self.delivered(), early + many)
        self.assert_alive(server)
        server.stop()
        total = len(early) + len(many)
        check_ledger(
            self, ledger_from_log(server.log()), received=total, delivered=total
        )


STOPPED = -signal.SIGTERM


class StopDuringOutageTests(OutageCase):
    """
    SIGTERM while the sink is down (no spool): the stop does not give the
    queued lines up at once, it tries the sink until C{--shutdown-timeout}.
    """

    def stop_during_outage(self, timeout: str) -> tuple[ServerProcess, list[bytes]]:
        self.break_sink()
        server = self.server("--shutdown-timeout", timeout)
        lines = numbered(b"held", 3000)
        Sender(server.port, lines).finish()
        wait_until(lambda: "child sink is down" in server.log(), "the outage")
        os.kill(server.pid, signal.SIGTERM)
        wait_until(
            lambda: "is down at the stop: 3000 line(s) wait" in server.log(),
            "the stop trying the sink",
        )
        return server, lines

    def test_sink_back_before_the_deadline(self) -> None:
        """
        The destination comes back two seconds into a 30-second stop: every
        line is written, nothing dropped, and the process ends at once.
        """
        server, lines = self.stop_during_outage("30")
        time.sleep(2)
        self.assert_alive(server)
        mended = time.monotonic()
        self.mend_sink()
        self.assertEqual(server.proc.wait(30), STOPPED, server.log()[-3000:])
        self.assertLess(time.monotonic() - mended, 15)
        self.assertEqual(self.delivered(), lines)
        self.assertIn("came back during the stop; every line written", server.log())
        check_ledger(
            self, ledger_from_log(server.log()), received=3000, delivered=3000
        )

    def test_sink_down_past_the_deadline(self) -> None:
        """
        The destination stays down: at C{--shutdown-timeout} the lines are
        given up, counted as dropped (shutdown_timeout) in the ledger, and
        the process ends.
        """
        server, _ = self.stop_during_outage("3")
        self.assertEqual(server.proc.wait(30), STOPPED, server.log()[-3000:])
        log = server.log()
        self.assertIn("was down until the shutdown deadline: 3000 line(s)", log)
        check_ledger(
            self,
            ledger_from_log(log),
            received=3000,
            delivered=0,
            dropped={"shutdown-timeout": 3000},
        )
        self.assertEqual(self.delivered(), [])


class SpoolTests(OutageCase):
    def spooling(self, *args: str) -> ServerProcess:
        return self.server(
            "--spool",
            str(self.spool),
            "--high-watermark",
            "64K",
            "--low-watermark",
            "16K",
            *args,
        )

    def test_spooled_lines_are_acknowledged(self) -> None:
        """
        With --ack, a line is acknowledged once it is in an fsynced spool
        segment: while the sink is down a client gets every ACK, the
        spool holds exactly the acknowledged lines, and they reach the sink
        once it is back.
        """
        self.break_sink()
        server = self.spooling("--ack")
        client = AckClient(server.port, client=0)
        self.addCleanup(client.close)
        client.exchange(client.lines(20_000), timeout=60)
        self.assertEqual(client.acked, 20_000)
        self.assertIn("is down", server.log())
        self.assertEqual(self.delivered(), [])
        self.assertEqual(sequences(spooled(self.spool)), {0: list(range(20_000))})
        self.mend_sink()
        self.wait_delivered(20_000)
        self.assertEqual(sequences(self.delivered()), {0: list(range(20_000))})
        server.stop()
        check_ledger(
            self, ledger_from_log(server.log()), received=20_000, delivered=20_000
        )

    def test_sink_down_spools_without_pausing_then_replays(self) -> None:
        """
        With --spool, a sink that is down does not pause clients: far more
        than the queue holds is accepted and lands in the spool; once the
        sink works again every line reaches it once, in order (lines sent
        meanwhile after the spooled ones), and the spool empties.
        """
        self.break_sink()
        metrics = free_port()
        server = self.spooling("--metrics", f"tcp:{metrics}")
        lines = numbered(b"spooled", 100_000)
        Sender(server.port, lines).finish(timeout=60)
        wait_until(lambda: len(spooled(self.spool)) == len(lines), "the spool")
        self.assertEqual(spooled(self.spool), lines)
        # An operator's scrape during the outage: every line is spooled.
        wait_until(
            lambda: ledger_from_scrape(scrape_metrics(metrics)).spooled == len(lines),
            "the spooled lines in a scrape",
        )
        during = check_ledger(
            self,
            ledger_from_scrape(scrape_metrics(metrics)),
            received=len(lines),
            delivered=0,
            spooled=len(lines),
            recovered=0,
            waiting=0,
        )
        self.assertEqual(during.in_spool, len(lines))
        size = sum(p.stat().st_size for p in self.spool.iterdir())
        self.assertEqual(
            scrape_metrics(metrics)[("lineserver_spool_bytes", frozenset())], size
        )
        self.assertEqual(self.delivered(), [])
        self.assertIn("is down", server.log())
        self.mend_sink()
        later = numbered(b"later", 1000)
        Sender(server.port, later).finish()
        self.wait_delivered(len(lines) + len(later))
        self.assertEqual(self.delivered(), lines + later)
        wait_until(lambda: not list(self.spool.iterdir()), "an empty spool")
        self.assertIn("drained", server.log())
        self.assert_alive(server)
        server.stop()
        total = len(lines) + len(later)
        after = check_ledger(
            self,
            ledger_from_log(server.log()),
            received=total,
            delivered=total,
            recovered=0,
            waiting=0,
        )
        self.assertEqual(after.in_spool, 0)

    def test_sigkill_then_restart_replays_the_spool(self) -> None:
        """
        A server killed with SIGKILL while its spool holds lines, started
        again once the sink works, sends every spooled line to the sink,
        once, in order, before new ones, and empties the spool.
        """
        self.break_sink()
        server = self.spooling()
        lines = numbered(b"before kill", 20_000)
        Sender(server.port, lines).finish()
        wait_until(lambda: len(spooled(self.spool)) == len(lines), "the spool")
        server.proc.kill()
        server.proc.wait(10)
        self.mend_sink()
        again = self.spooling()
        after = numbered(b"after restart", 100)
        Sender(again.port, after).finish()
        self.wait_delivered(len(lines) + len(after))
        self.assertEqual(self.delivered(), lines + after)
        self.assertIn("from before the last stop", again.log())
        wait_until(lambda: not list(self.spool.iterdir()), "an empty spool")
        again.stop()
        # The restarted process received only the new lines; the ones it
        # recovered from the spool are told apart, and all went out.
        restarted = check_ledger(
            self,
            ledger_from_log(again.log()),
            received=len(after),
            delivered=len(after),
            recovered=len(lines),
            waiting=0,
        )
        self.assertEqual(restarted.in_spool, 0)

    def test_torn_tail_is_dropped_and_logged(self) -> None:
        """
        A record torn at the end of the last segment (a SIGKILL or power
        cut mid-append) is cut off and logged at the next start; every
        whole record before it is delivered.
        """
        self.break_sink()
        server = self.spooling()
        for n in range(1, 6):
            Sender(server.port, numbered(b"batch %d" % n, 100)).finish()
            wait_until(
                lambda total=100 * n: len(spooled(self.spool)) == total,  # type: ignore[misc]
                "spooled",
            )
        server.proc.kill()
        server.proc.wait(10)
        last = sorted(self.spool.glob(f"*{SUFFIX}"))[-1]
        os.truncate(last, last.stat().st_size - 3)
        whole = spooled(self.spool)
        self.assertLess(len(whole), 500)
        sent = [line for n in range(1, 6) for line in numbered(b"batch %d" % n, 100)]
        self.assertEqual(whole, sent[: len(whole)])
        self.mend_sink()
        again = self.spooling()
        self.wait_delivered(len(whole))
        wait_until(lambda: not list(self.spool.iterdir()), "an empty spool")
        self.assertEqual(self.delivered(), whole)
        log = again.log()
        self.assertIn("a torn record", log)
        self.assertIn("byte(s) dropped", log)
        again.stop()
        check_ledger(
            self,
            ledger_from_log(again.log()),
            received=0,
            delivered=0,
            recovered=len(whole),
            waiting=0,
        )

    def test_full_spool_pauses_clients(self) -> None:
        """
        At --spool-max the spool takes no more: the client is paused (its
        lines wait in the queue and in the sockets); when the sink works
        again, everything arrives once, in order, and the spool empties.
        """
        self.break_sink()
        server = self.spooling("--spool-max", "256K")
        lines = numbered(b"capped", 200_000, width=100)
        flood = Sender(server.port, lines)
        wait_until(lambda: "is full" in server.log(), "a full spool", timeout=30)
        time.sleep(2)
        self.assertFalse(flood.done.is_set())
        size = sum(p.stat().st_size for p in self.spool.iterdir())
        self.assertLessEqual(size, 256 << 10)
        self.mend_sink()
        flood.finish(timeout=120)
        self.wait_delivered(len(lines), timeout=120)
        self.assertEqual(self.delivered(), lines)
        wait_until(lambda: not list(self.spool.iterdir()), "an empty spool")
        server.stop()
        check_ledger(
            self,
            ledger_from_log(server.log()),
            received=len(lines),
            delivered=len(lines),
            recovered=0,
        )

    def test_sigterm_spills_into_the_spool(self) -> None:
        """
        At SIGTERM with the sink down, what clients sent is spooled (the
        log says how many lines stay there) and delivered by the next
        start.
        """
        self.break_sink()
        server = self.spooling()
        lines = numbered(b"at sigterm", 5000)
        Sender(server.port, lines).finish()
        wait_until(lambda: len(spooled(self.spool)) == len(lines), "the spool")
        server.stop()
        self.assertIn("5000 line(s) stay in the spool", server.log())
        spilled = check_ledger(
            self,
            ledger_from_log(server.log()),
            received=len(lines),
            delivered=0,
            spooled=len(lines),
        )
        self.assertEqual(spilled.in_spool, len(lines))
        self.mend_sink()
        again = self.spooling()
        self.wait_delivered(len(lines))
        self.assertEqual(self.delivered(), lines)
        again.stop()
        check_ledger(
            self,
            ledger_from_log(again.log()),
            received=0,
            recovered=len(lines),
            waiting=0,
        )

    def test_sigterm_with_a_full_spool_spills_past_the_cap(self) -> None:
        """
        At SIGTERM with the sink down and the spool full (the client
        paused), what is queued is spooled past --spool-max rather than
        lost: the next start, with the sink working, delivers every line
        the server had read, in order, and nothing it had not.
        """
        self.break_sink()
        server = self.spooling("--spool-max", "256K")
        lines = numbered(b"spilled", 200_000, width=100)
        flood = Sender(server.port, lines)
        wait_until(lambda: "is full" in server.log(), "a full spool", timeout=30)
        server.stop()
        # The server is gone: the client's send ends (with an error).
        flood.thread.join(30)
        flood.sock.close()
        self.assertIn("stay in the spool", server.log())
        self.assertNotIn("left unwritten", server.log())
        kept = spooled(self.spool)
        self.assertGreater(sum(len(line) + 1 for line in kept), 256 << 10)
        self.assertEqual(kept, lines[: len(kept)])
        # Every line the server read is spooled: nothing dropped.
        check_ledger(
            self,
            ledger_from_log(server.log()),
            received=len(kept),
            delivered=0,
            spooled=len(kept),
        )
        self.mend_sink()
        again = self.spooling()
        self.wait_delivered(len(kept))
        wait_until(lambda: not list(self.spool.iterdir()), "an empty spool")
        self.assertEqual(self.delivered(), kept)
        again.stop()
        check_ledger(
            self,
            ledger_from_log(again.log()),
            received=0,
            recovered=len(kept),
            waiting=0,
        )
