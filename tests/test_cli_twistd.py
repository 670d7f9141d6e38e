"""The command line as a user meets it: a real C{twistd} (and C{twist}).

Usage errors must stop twistd with status 1 and a last line naming the
option, before it goes to the background, listens or touches a file; the
options that take effect (unix socket modes, keepalive, --version) are
seen from outside the process.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import os
import platform
import signal
import socket
import stat
import subprocess
from importlib import metadata
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    TWISTD,
    ServerProcess,
    free_port,
    read_to_eof,
    temp_dir,
    wait_until,
)

TWIST = TWISTD.parent / "twist"


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno != errno.ESRCH
    return True


class CommandLineTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{twistd -n --pidfile= ARGS} in the test's directory, to the end.
        """
        return subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def assert_usage_error(
        self, done: subprocess.CompletedProcess[str], *expected: str
    ) -> None:
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 1, output)
        for text in expected:
            self.assertIn(text, last_line(output))
        self.assertNotIn("Traceback", output)


class SinkUsageErrorTests(CommandLineTestCase):
    def test_sink_mistakes(self) -> None:
        """
        Each C{--sink} mistake that used to be silently ignored (or
        silently lose lines) stops twistd with a usage error naming
        C{--sink}, and leaves the directory as it was: no lines.log, no
        directory made.
        """
        os.mkdir(os.path.join(self.dir, "logs"))
        cases = [
            (["--sink", "null:", "--sink", "file:lines.log"], "given twice"),
            (["--mode", "echo", "--sink", "null:"], "only used in --mode sink"),
            (
                ["--sink", "file:lines.log?fsycn=1"],
                "unknown option 'fsycn' (known: fsync, fsync_interval)",
            ),
            (["--sink", "file:logs"], "'logs' is a directory"),
            (["--sink", "file:missing/lines.log"], "does not exist"),
        ]
        for args, reason in cases:
            done = self.twistd("lineserver", "--port", "tcp:0", *args)
            self.assert_usage_error(done, "--sink:", reason)
            self.assertEqual(os.listdir(self.dir), ["logs"], args)
            self.assertEqual(os.listdir(os.path.join(self.dir, "logs")), [], args)

    def test_stdout_sink_in_daemon_mode(self) -> None:
        """
        Without C{-n}, twistd would go to the background with standard
        output on /dev/null and a stdout sink would throw every line away:
        it refuses in the foreground instead, before writing a pid file or
        a log, or listening.
        """
        pidfile = Path(self.dir, "twistd.pid")
        self.addCleanup(self.end_daemon, pidfile)
        port = free_port()
        done = subprocess.run(
            [
                str(TWISTD),
                f"--pidfile={pidfile}",
                f"--logfile={Path(self.dir, 'server.log')}",
                "lineserver",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--sink",
                "stdout:",
            ],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assert_usage_error(done, "--sink stdout:", "without -n")
        self.assertEqual(os.listdir(self.dir), [])
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    def end_daemon(self, pidfile: Path) -> None:
        """
        Should twistd have gone to the background after all, end that
        daemon (which this test started) by the pid it wrote.
        """
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().strip())
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not alive(pid), "the daemon gone")


class KeepaliveOptionTests(CommandLineTestCase):
    def test_bad_values(self) -> None:
        """
        A negative or non-numeric C{--tcp-keepalive} is a usage error.
        """
        for value in ("-1", "soon", "nan"):
            done = self.twistd("lineserver", "--mode", "echo", "--tcp-keepalive", value)
            self.assert_usage_error(done, "--tcp-keepalive:")

    def test_values_serve(self) -> None:
        """
        With keepalive off (0) or on, the server starts and serves.
        """
        for value in ("0", "45"):
            server = ServerProcess(
                self.dir, "--mode", "echo", "--tcp-keepalive", value
            )
            self.addCleanup(server.kill)
            server.ready()
            with socket.create_connection(("127.0.0.1", server.port), 10) as sock:
                sock.sendall(b"still here\n")
                sock.shutdown(socket.SHUT_WR)
                self.assertEqual(read_to_eof(sock), b"still here\n")
            server.kill()


class UnixSocketModeTests(CommandLineTestCase):
    def test_modes(self) -> None:
        """
        A C{unix:} port without a mode is a socket file only its owner and
        group may connect to (0660: C{--allow} does not judge unix
        clients); a mode given as C{mode=} or by position wins.
        """
        default = os.path.join(self.dir, "default.sock")
        named = os.path.join(self.dir, "named.sock")
        positional = os.path.join(self.dir, "positional.sock")
        server = ServerProcess(
            self.dir,
            "--mode",
            "echo",
            "--port",
            f"unix:{default}",
            "--port",
            f"unix:{named}:mode=600",
            "--port",
            f"unix:{positional}:640",
        )
        self.addCleanup(server.kill)
        server.ready()
        paths = (default, named, positional)
        wait_until(lambda: all(map(os.path.exists, paths)), "the socket files")
        modes = {}
        for path in paths:
            status = os.stat(path)
            self.assertTrue(stat.S_ISSOCK(status.st_mode), path)
            modes[os.path.basename(path)] = stat.S_IMODE(status.st_mode)
        self.assertEqual(
            modes,
            {"default.sock": 0o660, "named.sock": 0o600, "positional.sock": 0o640},
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(default)
            sock.sendall(b"over unix\n")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_to_eof(sock), b"over unix\n")


class VersionTests(CommandLineTestCase):
    def test_version(self) -> None:
        """
        C{twistd lineserver --version} and C{twist lineserver --version}
        print lineserver's own version with Twisted's and Python's, and
        exit 0.
        """
        expected = (
            f"lineserver {metadata.version('lineserver')} "
            f"(Twisted {metadata.version('twisted')}, "
            f"Python {platform.python_version()})"
        )
        for command in (
            [str(TWISTD), "lineserver", "--version"],
            [str(TWIST), "lineserver", "--version"],
        ):
            done = subprocess.run(
                command, cwd=self.dir, capture_output=True, text=True, timeout=60
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.strip(), expected, command)
