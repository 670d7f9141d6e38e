"""C{--control} as an operator meets it: a real twistd, its unix socket, and
C{lineserver-ctl} run as a program, for every command.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import Peer, ServerProcess, read_to_eof, temp_dir, wait_until

CTL = Path(sys.executable).parent / "lineserver-ctl"


class ControlTwistdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.socket = os.path.join(self.dir, "ctl.sock")

    def start(self, *args: str) -> ServerProcess:
        """
        A twistd with C{--control unix:DIR/ctl.sock}, once its line port
        listens and its control socket is there.
        """
        server = ServerProcess(self.dir, "--control", f"unix:{self.socket}", *args)
        self.addCleanup(server.stop)
        server.wait_listening()
        wait_until(lambda: "control socket on" in server.log(), "the control socket")
        return server

    def ctl(
        self, *command: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CTL), "--socket", self.socket, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *command: str) -> str:
        done = self.ctl(*command)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        return done.stdout

    def test_socket_mode_help_and_errors(self) -> None:
        """
        The socket is the owner's alone (mode 600 by default); C{help}
        lists the commands; an unknown command or a bad argument is an
        C{ERR} answer and exit status 1, and the server goes on answering.
        """
        server = self.start("--mode", "echo")
        self.assertEqual(stat.S_IMODE(os.stat(self.socket).st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.socket).st_mode))
        text = self.ok("help")
        for command in ("show connections", "set max-connections N|none", "drain"):
            self.assertIn(command, text)
        for bad, why in [
            (["bogus"], "ERR unknown command 'bogus'"),
            (["set", "max-connections", "lots"], "ERR expected a whole number"),
            (["kill", "connection", "x"], "ERR expected a connection id"),
            (["kill", "connection", "99"], "ERR no connection #99"),
        ]:
            done = self.ctl(*bad)
            self.assertEqual(done.returncode, 1, bad)
            self.assertTrue(done.stdout.startswith(why), done.stdout)
        done = self.ctl("--json", "bogus")
        self.assertEqual(done.returncode, 1)
        self.assertFalse(json.loads(done.stdout)["ok"])
        self.assertIn(f"pid: {server.pid}", self.ok("show info"))
        self.assertIsNone(server.proc.poll())

    def test_socket_left_by_a_killed_server(self) -> None:
        """
        A server killed with SIGKILL leaves its socket file behind; the
        next server with the same C{--control} takes the path over by
        itself (Twisted's C{unix:} endpoint keeps C{PATH.lock}, naming the
        owner's pid, unless C{lockfile=0}) and answers there.
        """
        first = self.start()
        first.kill()
        self.assertTrue(stat.S_ISSOCK(os.stat(self.socket).st_mode))
        second = ServerProcess(temp_dir(self), "--control", f"unix:{self.socket}")
        self.addCleanup(second.stop)
        second.wait_listening()
        wait_until(
            lambda: "control socket on" in second.log(),
            "the control socket taken over",
            timeout=30,
        )
        self.assertIn(f"pid: {second.pid}", self.ok("show info"))

    def test_unreachable_socket(self) -> None:
        """
        No server at the path: exit status 2 and a message on stderr.
        """
        done = self.ctl("show info")
        self.assertEqual(done.returncode, 2)
        self.assertIn("cannot reach", done.stderr)

    def test_show_info_stats_connections_and_kill(self) -> None:
        """
        C{show info} names the process and its port; C{show stats} counts
        the lines a client sent; C{show connections} lists the client (its
        port, lines and bytes), in text and JSON; C{kill connection}
        closes it (after its lines were delivered) and it leaves the list.
        """
        server = self.start()
        info = json.loads(self.ok("--json", "show info"))["result"]
        self.assertEqual(info["pid"], server.pid)
        self.assertEqual(info["phase"], "running")
        self.assertEqual(info["listeners"][0]["address"], f"127.0.0.1:{server.port}")
        self.assertTrue(info["listeners"][0]["accepting"])
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"one\ntwo\nthree\n")
        wait_until(
            lambda: "lines.received 3\n" in self.ok("show stats"), "3 lines received"
        )
        local_port = client.getsockname()[1]
        text = self.ok("show connections")
        self.assertRegex(
            text,
            rf"^#1 peer=127\.0\.0\.1:{local_port} subject=- age=\d+\.\ds "
            r"lines=3 bytes=14 paused=-\n$",
        )
        conns = json.loads(self.ok("--json", "show connections"))["result"]
        self.assertEqual(len(conns), 1)
        self.assertEqual(conns[0]["peer"], f"127.0.0.1:{local_port}")
        self.assertEqual((conns[0]["id"], conns[0]["lines"]), (1, 3))
        self.assertEqual(self.ok("kill", "connection", "#1"), "closing #1\n")
        self.assertEqual(read_to_eof(client), b"")
        wait_until(
            lambda: self.ok("show connections") == "no connections\n",
            "the connection gone",
        )
        self.assertIn("closed #1 ", server.log())
        wait_until(
            lambda: Path(self.dir, "lines.log").read_bytes() == b"one\ntwo\nthree\n",
            "the killed client's lines in the sink",
        )

    def test_disable_and_enable_listener(self) -> None:
        """
        With the listener disabled the port stays open: a client's connect
        succeeds (the kernel's backlog) but it is not served; enabled
        again, it is, and its line is echoed.
        """
        self.start("--mode", "echo")
        self.assertEqual(self.ok("disable", "listener"), "listeners disabled\n")
        self.assertIn("listeners: disabled", self.ok("show info"))
        info = json.loads(self.ok("--json", "show info"))["result"]
        self.assertFalse(info["listeners"][0]["accepting"])
        port = info["listeners"][0]["address"].rsplit(":", 1)[1]
        peer = Peer(int(port), send=b"waiting\n")
        self.addCleanup(peer.close)
        self.assertEqual(peer.silent_for(0.5), b"")
        self.assertEqual(self.ok("show connections"), "no connections\n")
        self.assertEqual(self.ok("enable", "listener"), "listeners enabled\n")
        peer.expect(b"waiting\n")
        self.assertIn("listeners: enabled", self.ok("show info"))

    def test_set_max_connections(self) -> None:
        """
        At C{--max-connections 1} a second client waits; raising the limit
        serves it at once; C{show info} shows the new limit.
        """
        self.start("--mode", "echo", "--max-connections", "1")
        server_port = json.loads(self.ok("--json", "show info"))["result"]
        port = int(server_port["listeners"][0]["address"].rsplit(":", 1)[1])
        first = Peer(port, send=b"first\n")
        self.addCleanup(first.close)
        first.expect(b"first\n")
        second = Peer(port, send=b"second\n")
        self.addCleanup(second.close)
        self.assertEqual(second.silent_for(0.5), b"")
        self.assertEqual(self.ok("set", "max-connections", "2"), "max-connections 2\n")
        second.expect(b"second\n")
        self.assertIn("max-connections: 2", self.ok("show info"))
        self.ok("set", "max-connections", "none")
        self.assertIn("max-connections: none", self.ok("show info"))

    def test_reload_reads_the_token_file(self) -> None:
        """
        C{reload} does what SIGHUP does: it reads the token file again (a
        token added is accepted by new clients); a token file that no
        longer loads is an error answer, and the old tokens stay in use.
        """
        tokens = Path(self.dir, "tokens.txt")
        tokens.write_text("old-token\n")
        server = self.start("--mode", "echo", "--auth-tokens", str(tokens))
        tokens.write_text("old-token\nnew-token\n")
        self.assertEqual(self.ok("reload"), "reloaded\n")
        peer = Peer(server.port, send=b"AUTH new-token\nhello\n")
        self.addCleanup(peer.close)
        peer.expect(b"hello\n")
        tokens.unlink()
        done = self.ctl("reload")
        self.assertEqual(done.returncode, 1)
        self.assertTrue(done.stdout.startswith("ERR reload"), done.stdout)
        again = Peer(server.port, send=b"AUTH new-token\nstill\n")
        self.addCleanup(again.close)
        again.expect(b"still\n")

    def test_reopen_log(self) -> None:
        """
        C{reopen log} reopens twistd's C{--logfile} after it was renamed,
        as logrotate does: later lines go to a new file of that name.
        """
        server = self.start()
        log = Path(self.dir, "server.log")
        rotated = Path(self.dir, "server.log.1")
        log.rename(rotated)
        self.assertEqual(self.ok("reopen", "log"), f"reopened {log}\n")
        self.ok("show stats")
        wait_until(
            lambda: log.exists() and "control: show stats" in log.read_text(),
            "the next line in the new file",
        )
        self.assertIn("control: reopen log", rotated.read_text())
        self.assertNotIn("control: show stats", rotated.read_text())
        self.assertIsNone(server.proc.poll())

    def test_drain(self) -> None:
        """
        C{drain 1}: the listener stops accepting, the client still
        connected is given a second to leave, then the server stops in
        order (its lines are in the sink) and exits with status 0;
        C{lineserver-ctl} returns once the process has ended, with 0.
        """
        server = self.start()
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"".join(b"line %d\n" % i for i in range(100)))
        wait_until(
            lambda: "lines.received 100\n" in self.ok("show stats"),
            "100 lines received",
        )
        started = time.monotonic()
        done = self.ctl("drain", "1")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertEqual(
            done.stdout,
            "draining: 1 connection(s), grace 1s\n"
            "drained: 100 line(s) delivered; exiting with status 0\n",
        )
        self.assertEqual(server.proc.wait(10), 0)
        self.assertEqual(read_to_eof(client), b"")
        written = Path(self.dir, "lines.log").read_bytes()
        self.assertEqual(written.count(b"\n"), 100)
        self.assertFalse(os.path.exists(self.socket))
