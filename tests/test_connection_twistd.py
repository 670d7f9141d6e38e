"""A connection's life seen from outside, through a real C{twistd lineserver}.

Each test starts the server as a user would and observes it as a client
and an operator would: on the wire, in the log, and in the kernel's own
view of the server's sockets.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ServerProcess, read_to_eof, temp_dir, wait_until

#: /proc/net/tcp's "tr" field: which timer a socket has running.
KEEPALIVE_TIMER = 2


def server_timer(port: int, peer_port: int) -> tuple[int, float]:
    """
    @return: the kernel's timer kind and seconds left for the server side
        of the loopback connection between C{port} and C{peer_port}.
    """
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{peer_port:04X}"
    hz = 100  # USER_HZ, what /proc/net/tcp counts its timers in
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            kind, when = fields[5].split(":")
            return int(kind, 16), int(when, 16) / hz
    raise AssertionError(f"no socket {local} -> {remote} in /proc/net/tcp")


def close_lines(server: ServerProcess, peer_port: int) -> list[str]:
    pattern = re.compile(rf"closed #\d+ 127\.0\.0\.1:{peer_port}:")
    return [line for line in server.log().splitlines() if pattern.search(line)]


class ConnectionLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def start(self, *args: str) -> ServerProcess:
        server = ServerProcess(self.dir, "--mode", "echo", *args)
        self.addCleanup(server.kill)
        return server.ready()

    def wait_close_line(self, server: ServerProcess, peer_port: int) -> str:
        wait_until(
            lambda: bool(close_lines(server, peer_port)),
            f"the close log line of port {peer_port}",
        )
        [line] = close_lines(server, peer_port)
        return line

    def test_each_close_is_logged_with_its_reason(self) -> None:
        """
        Every connection's end is one log line naming the peer, the lines
        and bytes it sent, how long it lasted and why it ended: a clean
        close, a reset, a line too long, an idle timeout.
        """
        server = self.start("--idle-timeout", "1", "--max-line-length", "10")

        clean = socket.create_connection(("127.0.0.1", server.port))
        clean.sendall(b"one\ntwo\nthree\n")
        clean.shutdown(socket.SHUT_WR)
        self.assertEqual(read_to_eof(clean), b"one\ntwo\nthree\n")
        clean_port = clean.getsockname()[1]
        clean.close()

        reset = socket.create_connection(("127.0.0.1", server.port))
        reset.sendall(b"a\n")
        self.assertEqual(reset.recv(10), b"a\n")
        reset_port = reset.getsockname()[1]
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()

        long = socket.create_connection(("127.0.0.1", server.port))
        long.sendall(b"ok\n" + b"x" * 20 + b"\n")
        self.assertEqual(read_to_eof(long), b"ok\nERR line-too-long limit 10\n")
        long_port = long.getsockname()[1]
        long.close()

        idle = socket.create_connection(("127.0.0.1", server.port))
        self.assertEqual(read_to_eof(idle), b"ERR idle-timeout\n")
        idle_port = idle.getsockname()[1]
        idle.close()

        line = self.wait_close_line(server, clean_port)
        self.assertRegex(line, r": clean; 3 line\(s\), 14 bytes in \d+\.\d{3}s")
        self.assertIn(
            ": reset; 1 line(s), 2 bytes", self.wait_close_line(server, reset_port)
        )
        self.assertIn(
            ": line-too-long; 1 line(s), 24 bytes",
            self.wait_close_line(server, long_port),
        )
        self.assertIn(
            ": idle-timeout; 0 line(s), 0 bytes",
            self.wait_close_line(server, idle_port),
        )

    def test_quiet_connections(self) -> None:
        """
        C{--quiet-connections} leaves the close lines out (for fleets whose
        clients reconnect often); refusals are still logged.
        """
        server = self.start("--quiet-connections", "--max-connections-per-peer", "1")
        served: list[socket.socket] = []

        def serve_first() -> bool:
            # The readiness probe may hold the peer's one slot for a moment.
            first = socket.create_connection(("127.0.0.1", server.port))
            first.sendall(b"x\n")
            if first.recv(10) == b"x\n":
                served.append(first)
                return True
            first.close()
            return False

        wait_until(serve_first, "the first client served")
        first = served[0]
        second = socket.create_connection(("127.0.0.1", server.port))
        self.assertEqual(read_to_eof(second), b"ERR too-many-connections-from-peer\n")
        second_port = second.getsockname()[1]
        second.close()
        first_port = first.getsockname()[1]
        first.close()
        wait_until(
            lambda: f"127.0.0.1:{second_port}: 1 connections" in server.log(),
            "the refusal log line",
        )
        server.stop()
        self.assertEqual(close_lines(server, first_port), [])
        self.assertEqual(close_lines(server, second_port), [])


class KeepaliveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def idle_timer(self, *args: str) -> tuple[int, float]:
        """
        @return: the kernel's timer on the server side of an idle, served
            connection to a server started with C{args}.
        """
        server = ServerProcess(self.dir, "--mode", "echo", *args)
        self.addCleanup(server.kill)
        server.ready()
        client = socket.create_connection(("127.0.0.1", server.port))
        self.addCleanup(client.close)
        client.sendall(b"hi\n")
        self.assertEqual(client.recv(10), b"hi\n")
        peer_port = client.getsockname()[1]
        timer = server_timer(server.port, peer_port)
        server.stop()
        return timer

    def test_keepalive_on_by_default(self) -> None:
        """
        An accepted socket has TCP keepalive on, probing after 300 s of
        silence by default, so a peer that vanished without a FIN frees its
        descriptor and its slot.
        """
        kind, left = self.idle_timer()
        self.assertEqual(kind, KEEPALIVE_TIMER)
        self.assertGreater(left, 250)
        self.assertLessEqual(left, 300)

    def test_keepalive_seconds(self) -> None:
        """
        C{--tcp-keepalive 30} probes after 30 s; C{--tcp-keepalive 0} turns
        keepalive off (no timer on an idle socket).
        """
        kind, left = self.idle_timer("--tcp-keepalive", "30")
        self.assertEqual(kind, KEEPALIVE_TIMER)
        self.assertLessEqual(left, 30)
        self.assertGreater(left, 20)
        self.dir = temp_dir(self)
        kind, _ = self.idle_timer("--tcp-keepalive", "0")
        self.assertEqual(kind, 0)
