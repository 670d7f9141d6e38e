"""The file sink under what operations do to it, through a real twistd.

Log rotation by the real C{logrotate} binary (both of its modes) while
clients keep sending, and a disk that fills up: a real 1 MiB tmpfs,
mounted by the test (we run as root, as CI does) and unmounted after it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import (
    ServerProcess,
    check_ledger,
    free_port,
    in_ci,
    ledger_from_log,
    ledger_from_scrape,
    scrape_metrics,
    temp_dir,
    unread_bytes,
    wait_until,
)

#: How twistd ends on SIGTERM after a clean stop: it raises the signal again.
STOPPED = -signal.SIGTERM

LINE = re.compile(rb"c(\d+) (\d{8}) x+")
"""A whole line as the test clients send it: client, sequence, padding."""


def line(client: int, number: int, size: int = 100) -> bytes:
    """
    @return: line C{number} of C{client}, C{size} bytes with its LF.
    """
    head = b"c%d %08d " % (client, number)
    return head + b"x" * (size - len(head) - 1) + b"\n"


def needs_root(why: str) -> None:
    """
    Mounting a filesystem or rotating as root needs root: skip on a
    developer's machine without it, fail in CI (which runs as root), where
    a skip would hide the test for good.
    """
    if os.geteuid() == 0:
        return
    if in_ci():
        raise AssertionError(f"CI=true and not root: {why}")
    raise SkipTest(why)


def small_filesystem(case: SynchronousTestCase, size: str = "1m") -> str:
    """
    Mount a fresh tmpfs of C{size} for this test alone, unmounted after it
    (cleanups registered later, such as stopping a server writing there,
    run before).

    @return: its directory.
    """
    needs_root("mounting a tmpfs needs root")
    directory = os.path.join(temp_dir(case), "small")
    os.mkdir(directory)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory], check=True
    )
    case.addCleanup(subprocess.run, ["umount", directory], check=True)
    return directory


def fill(directory: str, leave: int = 0) -> str:
    """
    Fill the filesystem of C{directory} with one file, then give C{leave}
    bytes back (whole pages).

    @return: the filler's path (remove it to free the space).
    """
    filler = os.path.join(directory, "filler")
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    if leave:
        os.truncate(filler, os.path.getsize(filler) - leave)
    return filler


def logrotate() -> str:
    """
    @return: the path of the real logrotate binary (make test installs it).
    """
    found = shutil.which("logrotate") or shutil.which("/usr/sbin/logrotate")
    if found is None:
        raise AssertionError(
            "logrotate is not installed: run make test, or apt-get install logrotate"
        )
    return found


class Sender:
    """
    A client thread that sends numbered lines until told to stop (or until
    C{total}), then closes cleanly.

    @ivar sent: how many lines went out (all of them accepted by the kernel).
    """

    def __init__(self, port: int, client: int, total: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.client = client
        self.total = total
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and (
                self.total is None or self.sent < self.total
            ):
                count = 50 if self.total is None else min(50, self.total - self.sent)
                self.sock.sendall(
                    b"".join(line(self.client, self.sent + n) for n in range(count))
                )
                self.sent += count
        except BaseException as error:  # reported by finish()
            self.error = error
        finally:
            self.sock.close()

    def finish(self, timeout: float = 60.0) -> int:
        """
        Stop sending (a sender with a C{total} sends all of it first),
        close, and @return: how many lines were sent.
        """
        if self.total is None:
            self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"client {self.client} still sending after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.sent


def read_lines(paths: list[Path]) -> list[tuple[Path, bytes]]:
    """
    @return: every line of C{paths}, in that order, with its file; a last
        line without LF is kept as it is (a torn line).
    """
    found: list[tuple[Path, bytes]] = []
    for path in paths:
        data = path.read_bytes()
        pieces = data.split(b"\n")
        if pieces and pieces[-1] == b"":
            pieces.pop()
        found.extend((path, piece) for piece in pieces)
    return found


def sequences(lines: Iterator[bytes] | list[bytes]) -> dict[int, list[int]]:
    """
    @return: each client's line numbers, in the order the lines come.
    @raise AssertionError: for a line that is not whole.
    """
    by_client: dict[int, list[int]] = {}
    for text in lines:
        match = LINE.fullmatch(text)
        if match is None or len(text) != 99:
            raise AssertionError(f"torn or foreign line: {text[:120]!r}")
        by_client.setdefault(int(match.group(1)), []).append(int(match.group(2)))
    return by_client


def rotated_files(log: Path) -> list[Path]:
    """
    @return: C{log.N}, ..., C{log.1}, C{log}: oldest first, as logrotate's
        numbering leaves them.
    """
    numbered = sorted(
        (p for p in log.parent.glob(log.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*numbered, log]


class LogrotateTests(SynchronousTestCase):
    """
    The real logrotate rotates the sink's file three times while two
    clients send lines as fast as they can.
    """

    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.log = Path(self.dir, "lines.log")
        self.server = ServerProcess(self.dir, "--sink", f"file:{self.log}")
        self.addCleanup(self.server.kill)
        self.server.wait_listening()

    def rotate(self, mode: str, postrotate: str = "") -> None:
        """
        Run C{logrotate -f} with a config in the test's directory.
        """
        scripts = (
            f"    postrotate\n        {postrotate}\n    endscript\n"
            if postrotate
            else ""
        )
        conf = Path(self.dir, "logrotate.conf")
        conf.write_text(
            f"{self.log} {{\n    rotate 10\n    {mode}\n    nocompress\n"
            f"    missingok\n{scripts}}}\n"
        )
        state = Path(self.dir, "logrotate.state")
        done = subprocess.run(
            [logrotate(), "-f", "-s", str(state), str(conf)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def rotate_under_load(
        self, mode: str, postrotate: str = ""
    ) -> tuple[list[Path], dict[int, int]]:
        """
        Rotate three times while two clients send, each time once lines
        have reached the live file again; then stop the clients and the
        server.

        @return: the files, oldest first, and how many lines each client sent.
        """
        senders = [Sender(self.server.port, client) for client in (1, 2)]
        try:
            for _ in range(3):
                wait_until(
                    lambda: self.log.exists() and self.log.stat().st_size > 200_000,
                    "lines in the live file",
                    timeout=30,
                )
                self.rotate(mode, postrotate)
            wait_until(
                lambda: self.log.exists() and self.log.stat().st_size > 200_000,
                "lines in the live file after the last rotation",
                timeout=30,
            )
        finally:
            sent = {sender.client: sender.finish() for sender in senders}
        self.assertEqual(self.server.stop(), STOPPED, self.server.log()[-2000:])
        total = sum(sent.values())
        check_ledger(
            self, ledger_from_log(self.server.log()), received=total, delivered=total
        )
        files = rotated_files(self.log)
        self.assertEqual(len(files), 4, files)
        return files, sent

    def assert_exactly_once(self, files: list[Path], sent: dict[int, int]) -> None:
        """
        Every line each client sent is in exactly one file, once, whole,
        and in the order it was sent across the files, oldest first.
        """
        found = sequences(text for _, text in read_lines(files))
        self.assertEqual(sorted(found), sorted(sent))
        for client, count in sent.items():
            self.assertGreater(count, 10_000, "too little load to say anything")
            numbers = found[client]
            self.assertEqual(len(numbers), count, f"client {client}")
            self.assertEqual(numbers, list(range(count)), f"client {client}")
        for path in files:
            self.assertGreater(path.stat().st_size, 0, f"{path} is empty")

    def test_create_with_sighup(self) -> None:
        """
        C{create} (move the file away, create a new one) with a
        C{postrotate} SIGHUP, as logrotate is usually set up: the server
        reopens at once and every line is in exactly one file, once.
        """
        files, sent = self.rotate_under_load(
            "create", postrotate=f"kill -HUP {self.server.pid}"
        )
        self.assert_exactly_once(files, sent)
        self.assertEqual(self.server.log().count("reopened (asked to)"), 3)

    def test_create_without_signal(self) -> None:
        """
        C{create} with no signal at all: the sink notices within a second
        that its path names another file and reopens it; every line is in
        exactly one file, once.
        """
        files, sent = self.rotate_under_load("create")
        self.assert_exactly_once(files, sent)
        self.assertEqual(self.server.log().count("the path names another file"), 3)

    def test_copytruncate(self) -> None:
        """
        C{copytruncate} (copy the file, then empty it in place): lines
        written between logrotate's copy and its truncation (it fsyncs the
        copy in between: milliseconds, thousands of lines under this load)
        would be in neither file; the sink finds the copy, finishes its
        last line if the copy cut it, and writes the rest again at the
        start of the emptied file.  Every line is in exactly one file,
        once, whole, and no hole of zeros is left.
        """
        files, sent = self.rotate_under_load("copytruncate")
        self.assert_exactly_once(files, sent)
        self.assertNotIn(b"\0", self.log.read_bytes())
        self.assertEqual(
            self.server.log().count("truncated under the sink (copytruncate)"), 3
        )


class DiskFullTests(SynchronousTestCase):
    """
    The sink's file on a 1 MiB tmpfs that fills up while clients send.
    """

    def test_full_disk_is_backpressure(self) -> None:
        """
        With the disk full, the server keeps running (no restart spent,
        no exit), pauses its clients once its queue is full, says why
        about every five seconds with the errno and the lines waiting,
        and writes nothing torn; once space is freed it goes on by itself,
        and every line arrives once, whole, in order.
        """
        small = small_filesystem(self)
        filler = fill(small, leave=8192)
        log = Path(small, "lines.log")
        workdir = temp_dir(self)
        metrics = free_port()
        server = ServerProcess(
            workdir,
            "--sink",
            f"file:{log}",
            "--high-watermark",
            "64K",
            "--low-watermark",
            "16K",
            "--max-restarts",
            "1",
            "--metrics",
            f"tcp:{metrics}",
        )
        self.addCleanup(server.kill)
        server.wait_listening()
        total = 5000  # 500 KB: well past the watermark, and fits once freed
        sender = Sender(server.port, client=1, total=total)
        try:
            wait_until(
                lambda: "No space left on device (ENOSPC)" in server.log(),
                "the sink to say the disk is full",
                timeout=30,
            )
            wait_until(
                lambda: sum(unread_bytes(server.port).values()) > 0,
                "the client to be paused (bytes left unread in the kernel)",
                timeout=30,
            )
            # Retried for more than one complaint interval, still running.
            wait_until(
                lambda: server.log().count("cannot write") >= 2,
                "a second report of the full disk",
                timeout=30,
            )
            self.assertIsNone(server.proc.poll(), server.log()[-2000:])
            self.assertNotRegex(server.log(), r"sink \S+ failed")
            held = log.read_bytes()
            self.assertTrue(held == b"" or held.endswith(b"\n"), held[-100:])
            sequences(held.splitlines())  # whole lines only
            self.assertRegex(
                server.log(), r"cannot write: .* \(ENOSPC\); \d+ line\(s\) wait"
            )
            # A scrape while the disk is full: lines wait queued, none lost.
            full = check_ledger(
                self, ledger_from_scrape(scrape_metrics(metrics)), queued=None
            )
            self.assertGreater(full.queued, 0, full)
            self.assertLess(full.delivered, total, full)

            os.remove(filler)
            wait_until(
                lambda: log.read_bytes().count(b"\n") == total,
                "every line in the file once space is back",
                timeout=60,
            )
        finally:
            sent = sender.finish()
        self.assertEqual(sent, total)
        self.assertEqual(server.stop(), STOPPED, server.log()[-2000:])
        self.assertEqual(
            sequences(log.read_bytes().splitlines()), {1: list(range(total))}
        )
        self.assertIn("writing again after", server.log())
        self.assertNotIn("Traceback", server.log())
        check_ledger(
            self, ledger_from_log(server.log()), received=total, delivered=total
        )

    def test_sighup_reopen_failure_keeps_writing(self) -> None:
        """
        A SIGHUP whose reopen fails (the directory is gone: here, replaced
        by a file) is logged, and lines go on to the file already open.
        """
        workdir = temp_dir(self)
        logs = Path(workdir, "logs")
        logs.mkdir()
        log = logs / "lines.log"
        server = ServerProcess(workdir, "--sink", f"file:{log}")
        self.addCleanup(server.kill)
        server.wait_listening()
        sender = Sender(server.port, client=1, total=100)
        self.assertEqual(sender.finish(), 100)
        wait_until(
            lambda: log.exists() and log.read_bytes().count(b"\n") == 100, "100 lines"
        )
        moved = Path(workdir, "moved")
        logs.rename(moved)
        logs.write_text("not a directory")
        os.kill(server.pid, signal.SIGHUP)
        wait_until(
            lambda: "could not reopen" in server.log(), "the reopen failure logged"
        )
        sender = Sender(server.port, client=2, total=100)
        self.assertEqual(sender.finish(), 100)
        self.assertEqual(server.stop(), STOPPED)
        check_ledger(self, ledger_from_log(server.log()), received=200, delivered=200)
        self.assertEqual(
            sequences((moved / "lines.log").read_bytes().splitlines()),
            {1: list(range(100)), 2: list(range(100))},
        )
