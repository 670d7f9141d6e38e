"""The file sink's options through a real twistd.

Whether and how often the server fsyncs is seen from outside, as an
operator would check it: the real C{strace} attached to the running
twistd counts its fsync calls (make test installs strace).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    TWISTD,
    ServerProcess,
    check_ledger,
    ledger_from_log,
    temp_dir,
    wait_until,
)
from tests.test_file_sink_ops import STOPPED, Sender, line, sequences


def last_line(output: str) -> str:
    lines = [text for text in output.splitlines() if text.strip()]
    return lines[-1] if lines else ""


class FsyncTrace:
    """
    The real strace, attached to a running process, recording its fsync
    calls (every thread's) until the process exits.
    """

    def __init__(self, pid: int, directory: str) -> None:
        strace = shutil.which("strace")
        if strace is None:
            raise AssertionError("strace is not installed: run make test")
        self.out = Path(directory, "fsync.trace")
        self.proc = subprocess.Popen(
            [
                strace,
                "-f",
                "-ttt",
                "-e",
                "trace=fsync,fdatasync",
                "-o",
                str(self.out),
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        # strace says "Process N attached" once it traces: from then on,
        # no fsync escapes it.
        first = self.proc.stderr.readline()
        if "attached" not in first:
            self.proc.kill()
            raise AssertionError(f"strace could not attach: {first}")

    def times(self) -> list[float]:
        """
        @return: when each fsync call began (seconds since the epoch).
            strace buffers its output: read this once it has ended.
        """
        text = self.out.read_text() if self.out.exists() else ""
        pattern = r"^\d+\s+(\d+\.\d+) f(?:data)?sync\(\d+(?:\)|\s*<unfinished)"
        return [float(t) for t in re.findall(pattern, text, re.MULTILINE)]

    def wait(self) -> None:
        """
        Wait for strace to end (it ends with the traced process).
        """
        self.proc.wait(30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class FsyncModeTests(SynchronousTestCase):
    """
    Each C{fsync} mode does what it says, counted by strace.
    """

    def start(self, url: str) -> tuple[ServerProcess, FsyncTrace, Path]:
        directory = temp_dir(self)
        server = ServerProcess(directory, "--sink", url)
        self.addCleanup(server.kill)
        server.wait_listening()
        return server, FsyncTrace(server.pid, directory), Path(directory, "lines.log")

    @staticmethod
    def has_lines(log: Path, count: int) -> bool:
        return log.exists() and log.read_bytes().count(b"\n") == count

    def send_batches(self, server: ServerProcess, log: Path, batches: int) -> None:
        """
        Send C{batches} batches of 10 lines, each once the last is in the
        file, so that each is its own batch for the sink.
        """
        for number in range(batches):
            sender = Sender(server.port, client=number, total=10)
            self.assertEqual(sender.finish(), 10)
            wait_until(
                partial(self.has_lines, log, 10 * (number + 1)),
                f"batch {number} in the file",
            )

    def test_never(self) -> None:
        """
        C{fsync=never} (the default, and the old C{fsync=0}): no fsync while
        running, whatever is written; one on the clean stop.
        """
        for url in (
            "file:lines.log",
            "file:lines.log?fsync=never",
            "file:lines.log?fsync=0",
        ):
            server, trace, log = self.start(url)
            self.send_batches(server, log, 5)
            self.assertEqual(server.stop(), STOPPED)
            trace.wait()
            self.assertEqual(len(trace.times()), 1, url)

    def test_batch(self) -> None:
        """
        C{fsync=batch} (and the old C{fsync=1}): every batch is fsynced
        before the next is taken, so five batches seen in the file one
        after the other cost at least five fsyncs by then.
        """
        for url in ("file:lines.log?fsync=batch", "file:lines.log?fsync=1"):
            server, trace, log = self.start(url)
            self.send_batches(server, log, 5)
            self.assertEqual(server.stop(), STOPPED)
            trace.wait()
            self.assertGreaterEqual(len(trace.times()), 5 + 1, url)

    def test_interval(self) -> None:
        """
        C{fsync=interval&fsync_interval=0.5}: under continuous load (many
        batches a second), at most one fsync every half second, and at
        least one; every line arrives.
        """
        server, trace, log = self.start(
            "file:lines.log?fsync=interval&fsync_interval=0.5"
        )
        sender = Sender(server.port, client=1)
        wait_until(lambda: log.exists() and log.stat().st_size > 0, "lines in the file")
        started = time.time()
        wait_until(
            lambda: log.stat().st_size > 15_000_000, "15 MB of lines", timeout=90
        )
        sent = sender.finish()
        wait_until(
            lambda: log.read_bytes().count(b"\n") == sent, "every line in the file"
        )
        ended = time.time()
        self.assertEqual(server.stop(), STOPPED)
        check_ledger(self, ledger_from_log(server.log()), received=sent, delivered=sent)
        trace.wait()
        self.assertEqual(
            sequences(log.read_bytes().splitlines()), {1: list(range(sent))}
        )
        # Thousands of batches, a handful of fsyncs: one at most every
        # half second while the load lasted (the one on close comes after).
        during = [t for t in trace.times() if started <= t <= ended]
        self.assertGreater(sent, 150_000)
        self.assertGreaterEqual(len(during), 1)
        self.assertLessEqual(
            len(during), (ended - started) / 0.5 + 2, f"{during} in {ended - started}s"
        )


class FsyncUsageTests(SynchronousTestCase):
    """
    A wrong fsync option stops twistd with a usage error naming it, and
    creates no file.
    """

    def test_refused(self) -> None:
        """
        Unknown values and a misplaced C{fsync_interval} are usage errors
        (status 1, the last line names the option), and nothing is created.
        """
        directory = temp_dir(self)
        interval = "file:lines.log?fsync=interval&fsync_interval="
        cases = {
            "file:lines.log?fsync=sometimes": "fsync must be never, batch or interval",
            interval + "0": "fsync_interval must be",
            interval + "soon": "fsync_interval must be",
            "file:lines.log?fsync_interval=2": (
                "fsync_interval is only used with fsync=interval"
            ),
        }
        for url, reason in cases.items():
            done = subprocess.run(
                [
                    str(TWISTD),
                    "-n",
                    "--pidfile=",
                    "lineserver",
                    "--port",
                    "tcp:0",
                    "--sink",
                    url,
                ],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=60,
            )
            output = done.stdout + done.stderr
            self.assertEqual(done.returncode, 1, output)
            self.assertIn("--sink:", last_line(output), url)
            self.assertIn(reason, last_line(output), url)
            self.assertNotIn("Traceback", output)
            self.assertEqual(os.listdir(directory), [], url)

    def test_interval_accepted(self) -> None:
        """
        C{fsync=interval&fsync_interval=2} starts, and its lines arrive.
        """
        directory = temp_dir(self)
        server = ServerProcess(
            directory, "--sink", "file:lines.log?fsync=interval&fsync_interval=2"
        )
        self.addCleanup(server.kill)
        server.wait_listening()
        self.assertEqual(Sender(server.port, client=3, total=100).finish(), 100)
        log = Path(directory, "lines.log")
        wait_until(
            lambda: log.exists() and log.read_bytes().count(b"\n") == 100, "lines"
        )
        self.assertEqual(server.stop(), STOPPED)
        self.assertEqual(log.read_bytes(), b"".join(line(3, n) for n in range(100)))
        check_ledger(self, ledger_from_log(server.log()), received=100, delivered=100)
