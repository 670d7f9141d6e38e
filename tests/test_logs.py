"""Structured logs and log rotation: JSON lines from a real twistd (with
C{--logger lineserver.logs.json_logger}) and a real C{twist
--log-format=json}, parsed line by line; the log file moved by a rename
and by the real C{logrotate}, then reopened on SIGUSR1.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lineserver.logs import LOG_FILE_VARIABLE, ReopenableFile, reopen_logs
from tests.support import TWISTD, free_port, read_to_eof, temp_dir, wait_until
from tests.test_file_sink_ops import logrotate

TWIST = Path(sys.executable).parent / "twist"


class ReopenableFileTests(SynchronousTestCase):
    def test_reopen_after_rename(self) -> None:
        """
        Written lines go to the file of that name; once it is renamed and
        reopened (L{reopen_logs}), to a new file of the same name.
        """
        directory = temp_dir(self)
        path = os.path.join(directory, "x.log")
        out = ReopenableFile(path)
        self.addCleanup(out.close)
        out.write("before\n")
        out.flush()
        os.rename(path, path + ".1")
        out.write("still old\n")
        out.flush()
        self.assertIn(path, reopen_logs(extra=list))
        out.write("after\n")
        out.flush()
        self.assertEqual(Path(path + ".1").read_text(), "before\nstill old\n")
        self.assertEqual(Path(path).read_text(), "after\n")

    def test_closed_file_forgotten(self) -> None:
        """
        A closed file is not reopened (nor created again).
        """
        directory = temp_dir(self)
        path = os.path.join(directory, "y.log")
        out = ReopenableFile(path)
        out.close()
        os.unlink(path)
        self.assertNotIn(path, reopen_logs(extra=list))
        self.assertFalse(os.path.exists(path))


def events(path: Path) -> list[dict[str, Any]]:
    """
    @return: every line of C{path} as JSON (an RFC 7464 record separator
        before a line, as C{twist} writes, is dropped); a line that is not
        JSON fails the test.
    """
    return [
        json.loads(line.lstrip("\x1e"))
        for line in path.read_text().splitlines()
        if line.strip("\x1e")
    ]


def close_events(path: Path) -> list[dict[str, Any]]:
    return [
        event
        for event in events(path)
        if event.get("log_namespace") == "lineserver.connection"
    ]


class JSONLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.port = free_port()
        self.log = Path(self.dir, "lineserver.json")

    def run_server(
        self, command: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            command,
            cwd=self.dir,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def stop() -> None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                if proc.stderr is not None:
                    proc.stderr.close()

        self.addCleanup(stop)
        return proc

    def twistd_json(self) -> subprocess.Popen[bytes]:
        """
        C{LINESERVER_LOG_FILE=... twistd -n --logger
        lineserver.logs.json_logger lineserver ...}, once it listens.
        """
        proc = self.run_server(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                "--logger",
                "lineserver.logs.json_logger",
                "lineserver",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
            ],
            {LOG_FILE_VARIABLE: str(self.log)},
        )
        self.wait_listening(proc, self.log)
        return proc

    def wait_listening(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        def listening() -> bool:
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(
                    f"exited with {proc.returncode}: {proc.stderr.read()!r}"
                )
            return log.exists() and '"listening on ' in log.read_text()

        wait_until(listening, "the server listening", timeout=20)

    def client(self, data: bytes) -> int:
        """
        Send C{data}, close, and @return: the client's port.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
            local = int(sock.getsockname()[1])
            sock.shutdown(socket.SHUT_WR)
            read_to_eof(sock)
        return local

    def assert_close_event(self, path: Path, local: int) -> dict[str, Any]:
        wanted = f"127.0.0.1:{local}"
        wait_until(
            lambda: any(e.get("peer") == wanted for e in close_events(path)),
            "the close event",
        )
        (event,) = [e for e in close_events(path) if e.get("peer") == wanted]
        self.assertEqual(event["subject"], None)
        self.assertEqual(event["lines"], 2)
        self.assertEqual(event["bytes"], len(b"alpha\nbeta\n"))
        self.assertEqual(event["reason"], "clean")
        self.assertIsInstance(event["duration"], float)
        self.assertGreaterEqual(event["duration"], 0.0)
        self.assertEqual(event["log_level"]["name"], "info")
        return event

    def test_twistd_json_logger(self) -> None:
        """
        Every line of the log is one JSON object; the connection's close
        event carries C{peer}, C{subject}, C{lines}, C{bytes},
        C{duration} and C{reason} as fields.
        """
        self.twistd_json()
        local = self.client(b"alpha\nbeta\n")
        self.assert_close_event(self.log, local)
        self.assertGreater(len(events(self.log)), 5)

    def test_sigusr1_after_rename(self) -> None:
        """
        The JSON log renamed, SIGUSR1 makes the server write to a new file
        of the same name: the next connection's close event is there, and
        not in the renamed file.
        """
        proc = self.twistd_json()
        first = self.client(b"alpha\nbeta\n")
        self.assert_close_event(self.log, first)
        rotated = Path(self.dir, "lineserver.json.1")
        self.log.rename(rotated)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(self.log.exists, "a new log file")
        second = self.client(b"alpha\nbeta\n")
        self.assert_close_event(self.log, second)
        self.assertEqual(
            [e["peer"] for e in close_events(rotated)], [f"127.0.0.1:{first}"]
        )
        self.assertIsNone(proc.poll())

    def test_real_logrotate(self) -> None:
        """
        The real logrotate, configured as docs/operations.md shows (rename,
        then C{kill -USR1} in C{postrotate}), rotates the JSON log: the old
        lines are in C{.1}, the new ones in the fresh file, none lost.
        """
        proc = self.twistd_json()
        first = self.client(b"alpha\nbeta\n")
        self.assert_close_event(self.log, first)
        config = Path(self.dir, "logrotate.conf")
        config.write_text(
            f"{self.log} {{\n"
            "    rotate 3\n"
            "    missingok\n"
            "    notifempty\n"
            "    postrotate\n"
            f"        kill -USR1 {proc.pid}\n"
            "    endscript\n"
            "}\n"
        )
        os.chmod(config, 0o644)
        done = subprocess.run(
            [
                logrotate(),
                "--force",
                "--state",
                str(Path(self.dir, "state")),
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        rotated = Path(self.dir, "lineserver.json.1")
        self.assertTrue(rotated.exists())
        wait_until(self.log.exists, "a new log file")
        second = self.client(b"alpha\nbeta\n")
        self.assert_close_event(self.log, second)
        self.assertEqual(
            [e["peer"] for e in close_events(rotated)], [f"127.0.0.1:{first}"]
        )

    def test_twistd_logfile_sigusr1_after_rename(self) -> None:
        """
        twistd's own C{--logfile} renamed (as logrotate does), SIGUSR1 makes
        the server write to a new file of the same name, which says what it
        reopened; the renamed file keeps what came before, and is not
        renamed again by twistd's own SIGUSR1 rotation.
        """
        log = Path(self.dir, "twistd.log")
        proc = self.run_server(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                f"--logfile={log}",
                "lineserver",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
            ],
            {},
        )

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}")
            return log.exists() and "listening on tcp:" in log.read_text()

        wait_until(listening, "the server listening", timeout=20)
        first = self.client(b"alpha\nbeta\n")
        wait_until(lambda: f"127.0.0.1:{first}" in log.read_text(), "the first close")
        rotated = Path(self.dir, "twistd.log.rotated")
        log.rename(rotated)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(log.exists, "a new log file", timeout=20)
        wait_until(lambda: str(log) in log.read_text(), "the reopened line")
        self.assertIn("reopened", log.read_text())
        second = self.client(b"alpha\nbeta\n")
        wait_until(lambda: f"127.0.0.1:{second}" in log.read_text(), "the second close")
        self.assertNotIn(f"127.0.0.1:{second}", rotated.read_text())
        self.assertIn(f"127.0.0.1:{first}", rotated.read_text())
        self.assertFalse(Path(self.dir, "twistd.log.1").exists())
        self.assertIsNone(proc.poll())

    def test_twist_log_format_json(self) -> None:
        """
        C{twist --log-format=json --log-file=FILE lineserver ...} runs our
        plugin and writes JSON records (each after an RFC 7464 record
        separator) with the same close event fields.
        """
        log = Path(self.dir, "twist.json")
        proc = self.run_server(
            [
                str(TWIST),
                "--log-format=json",
                f"--log-file={log}",
                "lineserver",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
            ],
            {},
        )
        self.wait_listening(proc, log)
        self.assertTrue(log.read_text().startswith("\x1e{"))
        local = self.client(b"alpha\nbeta\n")
        self.assert_close_event(log, local)
