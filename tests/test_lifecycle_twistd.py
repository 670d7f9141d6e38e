"""Starting and stopping a real C{twistd -n lineserver} process.

A sink that cannot open is a startup error before any port listens; a port
below 1024 is bound before twistd drops privileges (C{--uid}/C{--gid}) and
served after.  Clients are plain blocking sockets; every wait is bounded.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import grp
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import (
    TWISTD,
    ServerProcess,
    free_port,
    in_ci,
    read_to_eof,
    temp_dir,
    wait_connectable,
    wait_until,
)

SIGTERM = -signal.SIGTERM
UNOPENABLE = "/proc/version"


class ConnectProbe:
    """
    Tries to connect to a loopback port over and over, in a thread, until
    stopped; counts the attempts and any connection that was made.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempts = 0
        self.connected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ConnectProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.attempts += 1
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            except OSError:
                pass
            else:
                self.connected += 1
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class SinkCannotOpenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def test_exits_before_listening(self) -> None:
        """
        C{--sink file:/proc/version} passes the option checks (its
        directory exists) but cannot be opened for appending, even by root.
        The server logs "could not open sink <url>: <reason>" and exits with
        a non-zero status within seconds, and its port never accepted a
        connection, though a client tried all along.
        """
        try:
            with open(UNOPENABLE, "ab"):
                pass
        except OSError as error:
            reason = error.strerror
        else:
            self.fail(f"{UNOPENABLE} opens for appending here: pick another sink")
        port = free_port()
        probe = ConnectProbe(port).start()
        self.addCleanup(probe.stop)
        started = time.monotonic()
        server = ServerProcess(self.dir, "--sink", f"file:{UNOPENABLE}", port=port)
        self.addCleanup(server.kill)
        status = server.proc.wait(timeout=15)
        took = time.monotonic() - started
        probe.stop()
        log = server.log()
        self.assertEqual(status, 69, log[-3000:])  # EX_UNAVAILABLE
        self.assertLess(took, 10)
        self.assertIn("lineserver gives up: the server could not start", log)
        self.assertIn(f"could not open sink file:{UNOPENABLE}: {reason}", log)
        self.assertNotIn("listening on", log)
        self.assertNotIn("restarting child sink", log)
        self.assertGreater(probe.attempts, 10)
        self.assertEqual(probe.connected, 0)


def free_privileged_port() -> int:
    """
    @return: a loopback port below 1024 that nothing listens on.
    """
    for port in range(1023, 899, -1):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    raise AssertionError("no free port between 900 and 1023")


def unprivileged_ids() -> tuple[str, str, int, int]:
    """
    @return: the user C{nobody} and its group (C{nogroup}, or C{nobody}
        where that is its name), by name and number.
    """
    user = pwd.getpwnam("nobody")
    for name in ("nogroup", "nobody"):
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        return user.pw_name, group.gr_name, user.pw_uid, group.gr_gid
    raise AssertionError("neither group nogroup nor nobody exists")


def ids_of(pid: int) -> tuple[list[int], list[int]]:
    """
    @return: the real, effective, saved and filesystem uids and gids of
        a process.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            fields[key] = [int(x) for x in value.split()]
    return fields["Uid"], fields["Gid"]


class PrivilegedPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            # CI runs as root: there a missing root would hide the test for good.
            why = "binding a port below 1024 and --uid need root"
            if in_ci():
                raise AssertionError(f"CI=true and not root: {why}")
            raise SkipTest(why)
        self.dir = temp_dir(self)
        # The directory is twistd's working directory after it drops root.
        os.chmod(self.dir, 0o755)

    def test_low_port_served_after_dropping_privileges(self) -> None:
        """
        C{twistd --uid nobody --gid nogroup lineserver --port tcp:<p>} with
        p below 1024: the port is bound before privileges are dropped, the
        echo works, and the process runs as that user and group.
        """
        user, group, uid, gid = unprivileged_ids()
        port = free_privileged_port()
        log_path = Path(self.dir, "server.log")
        proc = subprocess.Popen(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                f"--logfile={log_path}",
                "--uid",
                user,
                "--gid",
                group,
                "lineserver",
                "--mode",
                "echo",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def log() -> str:
            return log_path.read_text() if log_path.exists() else ""

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(kill)
        wait_connectable(port)
        with socket.create_connection(("127.0.0.1", port), 10) as sock:
            sock.sendall(b"served by nobody\n")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_to_eof(sock), b"served by nobody\n")
        uids, gids = ids_of(proc.pid)
        self.assertEqual(uids, [uid] * 4)
        self.assertEqual(gids, [gid] * 4)
        self.assertIn(f"listening on tcp:{port}", log())
        self.assertNotIn("could not listen", log())
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(15), SIGTERM, log()[-3000:])
        wait_until(lambda: "stopped:" in log(), "the stop's last line", timeout=5)
        self.assertNotIn("Traceback", log())
