"""Every limit option of C{twistd lineserver}, observed on the wire.

Each test starts a real C{twistd -n lineserver} child process with the
option under test (L{tests.support.ServerProcess}) and talks to it through
blocking loopback sockets (L{tests.support.Peer}) whose every read is
bounded.  What is asserted is what a client sees: its lines echoed or not,
an C{ERR} line and a close, how long that took, connects the kernel
completes or not, and the lines that came out of the sink.  So an option
that never reaches the running server, or reaches the wrong setting (the
idle timeout swapped with the line timeout), fails here.

Servers are waited for through their log ("listening on"), never with a
probe connection: a probe would take a connection slot.

Latencies are asserted as observed values with slack for a loaded 2-core
machine; every wait for something that should happen has a generous
timeout of its own, and windows in which something must not happen are
stated as such ("not echoed within 1 s").
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    Peer,
    ServerProcess,
    completed_handshakes,
    free_port,
    handshakes_for_backlog,
    proxy_v1,
    temp_dir,
    wait_until,
)

SIGTERM_STATUS = -signal.SIGTERM
#: How long a client that must not be served is watched.
NOT_SERVED_WINDOW = 1.0
#: Slack on top of a timeout for a loaded machine (the server's timers
#: fire late, this process reads late).
SLACK = 2.0


class LimitsCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(temp_dir(self))
        self.peers: list[Peer] = []
        self.addCleanup(self.close_peers)

    def close_peers(self) -> None:
        for peer in self.peers:
            peer.close()

    def start(
        self, *args: str, listen: str | None = None, name: str = "server"
    ) -> ServerProcess:
        """
        Start a server in C{self.dir/name} and wait until it listens.
        """
        cwd = self.dir / name
        cwd.mkdir()
        port = free_port()
        server = ServerProcess(
            str(cwd),
            *args,
            "--shutdown-timeout",
            "5",
            port=port,
            listen=None if listen is None else listen.format(port=port),
        )
        self.addCleanup(server.kill)
        return server.wait_listening()

    def peer(self, server: ServerProcess, send: bytes = b"") -> Peer:
        peer = Peer(server.port, send=send)
        self.peers.append(peer)
        return peer

    def proxied(self, server: ServerProcess, source: str, send: bytes) -> Peer:
        """
        A client behind a PROXY header from C{source} (a source port of its
        own), sending C{send} after it in the same write.
        """
        header = proxy_v1(source, 40000 + len(self.peers), server.port)
        return self.peer(server, header + send)

    def served(self, server: ServerProcess, name: str) -> Peer:
        """
        A client that is served: its first line is echoed.
        """
        peer = self.peer(server, b"%s-1\n" % name.encode())
        peer.expect(b"%s-1\n" % name.encode())
        return peer

    def stop(self, server: ServerProcess) -> None:
        status = server.stop(timeout=20)
        log = server.log()
        self.assertEqual(status, SIGTERM_STATUS, log[-3000:])
        self.assertNotIn("Traceback", log, log[-3000:])


def run_in_thread(target: Callable[[], None]) -> Callable[[], None]:
    """
    Run C{target} in a thread now.

    @return: a function that joins it (bounded) and re-raises its error.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(60)
        if thread.is_alive():
            raise AssertionError("client thread still running after 60 s")
        if errors:
            raise errors[0]

    return join


# -- --max-connections and --overflow ------------------------------------------


class MaxConnectionsTests(LimitsCase):
    def test_wait_serves_the_next_client_when_one_leaves(self) -> None:
        """
        C{--max-connections 2} (overflow C{wait}, the default): with two
        clients served, a third that connects and sends lines is not
        served (nothing echoed within a second) while the two stay served;
        when one of them leaves, the third is served, and every line it
        sent while waiting comes back, once, in order.
        """
        server = self.start("--mode", "echo", "--max-connections", "2")
        first = self.served(server, "a")
        second = self.served(server, "b")

        third = self.peer(server, b"c-1\nc-2\n")
        self.assertEqual(third.silent_for(NOT_SERVED_WINDOW), b"")
        self.assertIsNone(third.end)
        third.send(b"c-3\n")
        # The two served clients are still served meanwhile.
        second.send(b"b-2\n")
        second.expect(b"b-1\nb-2\n")
        self.assertEqual(third.silent_for(0.2), b"")

        first.close()
        took = third.expect(b"c-1\nc-2\nc-3\n", timeout=10)
        self.assertLess(took, 1.0 + SLACK)
        third.send(b"c-4\n")
        third.expect(b"c-1\nc-2\nc-3\nc-4\n")
        self.stop(server)

    def test_reject_answers_at_once(self) -> None:
        """
        C{--max-connections 2 --overflow reject}: with two clients served,
        a third gets C{ERR too-many-connections} and the close within a
        second of connecting, without sending anything; the two are still
        served, and once one leaves a new client is served, not refused.
        """
        server = self.start(
            "--mode", "echo", "--max-connections", "2", "--overflow", "reject"
        )
        first = self.served(server, "a")
        second = self.served(server, "b")

        started = time.monotonic()
        third = self.peer(server)
        third.read_until(lambda: third.end is not None, 5)
        elapsed = time.monotonic() - started
        self.assertEqual(
            (third.received, third.end),
            (b"ERR too-many-connections\n", "eof"),
            f"what the third client saw in {elapsed:.2f} s after connecting",
        )
        self.assertLess(
            elapsed, 1.0, f"ERR and close came {elapsed:.2f} s after connecting"
        )

        second.send(b"b-2\n")
        second.expect(b"b-1\nb-2\n")
        first.close()
        # A slot is free: the next client is served (allow the server to
        # see the close first: a refusal before it would be correct).
        wait_until(
            lambda: self.served_or_refused(server) == "served",
            "a new client served after one left",
        )
        self.stop(server)

    def served_or_refused(self, server: ServerProcess) -> str:
        peer = self.peer(server, b"d-1\n")
        peer.read_until(lambda: peer.received != b"" or peer.end is not None, 5)
        peer.close()
        if peer.received == b"d-1\n":
            return "served"
        return f"refused: {peer.received!r}"


# -- --max-connections-per-peer, behind a PROXY header ---------------------------


PROXIED = "haproxy:tcp:{port}:interface=127.0.0.1"


class PerPeerTests(LimitsCase):
    def test_one_address_over_its_limit_is_refused(self) -> None:
        """
        C{--max-connections-per-peer 2} on a C{haproxy:} port: two
        connections from 10.1.2.3 are served; a third from 10.1.2.3 gets
        C{ERR too-many-connections-from-peer} and the close, and its line
        is not echoed; meanwhile 10.9.9.9 is served; once one of the two
        leaves, 10.1.2.3 is served again.
        """
        server = self.start(
            "--mode", "echo", "--max-connections-per-peer", "2", listen=PROXIED
        )
        one = self.proxied(server, "10.1.2.3", b"one\n")
        one.expect(b"one\n")
        two = self.proxied(server, "10.1.2.3", b"two\n")
        two.expect(b"two\n")

        three = self.proxied(server, "10.1.2.3", b"three\n")
        took = three.wait_closed(timeout=10)
        self.assertEqual(three.received, b"ERR too-many-connections-from-peer\n")
        self.assertLess(took, 1.0 + SLACK)

        other = self.proxied(server, "10.9.9.9", b"other\n")
        other.expect(b"other\n")
        two.send(b"two-2\n")
        two.expect(b"two\ntwo-2\n")

        one.close()
        wait_until(
            lambda: self.answer(server, "10.1.2.3", b"again\n") == b"again\n",
            "10.1.2.3 served again after one of its connections left",
        )
        self.stop(server)

    def answer(self, server: ServerProcess, source: str, line: bytes) -> bytes:
        peer = self.proxied(server, source, line)
        peer.read_until(
            lambda: len(peer.received) >= len(line) or peer.end is not None, 5
        )
        peer.close()
        return peer.received

    def test_mapped_ipv6_is_the_same_peer(self) -> None:
        """
        C{--max-connections-per-peer 2}: C{PROXY TCP6 ::ffff:10.1.2.3} is
        the IPv4 client 10.1.2.3 (an IPv4-mapped IPv6 address, as a
        dual-stack HAProxy reports it): with two connections from
        C{TCP4 10.1.2.3} served, one from C{::ffff:10.1.2.3} is refused
        with C{ERR too-many-connections-from-peer}, and the other way
        round.
        """
        server = self.start(
            "--mode", "echo", "--max-connections-per-peer", "2", listen=PROXIED
        )
        held = self.assert_one_peer(server, "10.1.2.3", "::ffff:10.1.2.3")
        # And the other way round, on another address.
        held += self.assert_one_peer(server, "::ffff:10.4.5.6", "10.4.5.6")
        self.stop(server)

    def assert_one_peer(
        self, server: ServerProcess, first: str, then: str
    ) -> list[Peer]:
        """
        Two clients from C{first} fill its limit of two, so one from
        C{then}, the same address written the other way, is refused.

        @return: the two clients served (kept open until the stop).
        """
        served = [
            self.proxied(server, first, b"%s-%d\n" % (first.encode(), i))
            for i in range(2)
        ]
        for i, peer in enumerate(served):
            peer.expect(b"%s-%d\n" % (first.encode(), i))
        late = self.proxied(server, then, b"late\n")
        late.read_until(lambda: late.end is not None, 5)
        self.assertEqual(
            (late.received, late.end),
            (b"ERR too-many-connections-from-peer\n", "eof"),
            f"{then} was not counted with {first} (what it saw in 5 s)",
        )
        return served


class ProxyAdmissionTests(LimitsCase):
    def test_slot_decided_when_the_header_comes(self) -> None:
        """
        C{--max-connections 1} on a C{haproxy:} port: a client is judged
        when its PROXY header arrives, not when it connects.  A connection
        that has not sent its header takes no slot: a later client that
        sends its header and a line is served.  When the first one then
        sends its header and a line, it waits (nothing echoed within a
        second), and it is served, with that line, once the other leaves.
        """
        server = self.start("--mode", "echo", "--max-connections", "1", listen=PROXIED)
        early = self.peer(server)
        # The server holds the silent connection before the next comes
        # (the listening socket and this one).
        wait_until(lambda: server.descriptors()[0] >= 2, "the first connection held")
        late = self.proxied(server, "10.0.0.2", b"late-1\n")
        late.expect(b"late-1\n")

        early.send(proxy_v1("10.0.0.1", 41000, server.port) + b"early-1\n")
        self.assertEqual(early.silent_for(NOT_SERVED_WINDOW), b"")
        self.assertIsNone(early.end)
        late.send(b"late-2\n")
        late.expect(b"late-1\nlate-2\n")

        late.close()
        took = early.expect(b"early-1\n", timeout=10)
        self.assertLess(took, 1.0 + SLACK)
        self.stop(server)


# -- --backlog --------------------------------------------------------------------


class BacklogTests(LimitsCase):
    def test_backlog_reaches_the_kernel(self) -> None:
        """
        C{--backlog N}, seen through the kernel: with accepting stopped
        (C{--max-connections 1} and one client served), Linux completes
        the handshakes of N+1 further clients (its accept queue holds N+1;
        one more is tolerated, L{handshakes_for_backlog}) and drops the
        SYNs of the rest.  Two servers, N = 3 and N = 9, so
        the count follows the option and is not a constant.
        """
        for backlog in (3, 9):
            server = self.start(
                "--mode",
                "echo",
                "--max-connections",
                "1",
                "--backlog",
                str(backlog),
                name=f"backlog-{backlog}",
            )
            holder = self.served(server, "holder")
            completed, socks = completed_handshakes(server.port, backlog + 8, wait=1.5)
            try:
                self.assertIn(
                    completed,
                    handshakes_for_backlog(backlog),
                    f"--backlog {backlog}: {completed} handshakes completed",
                )
            finally:
                for sock in socks:
                    sock.close()
            holder.close()
            self.stop(server)


# -- --idle-timeout and --line-timeout ---------------------------------------------

#: The timeout under test; clients trickle a byte every TIMEOUT / 4.
TIMEOUT = 1.6
#: How long the clients that must not be closed keep going.
KEEP_GOING = 2.5 * TIMEOUT


def trickle(
    peer: Peer, byte: bytes, every: float, until: float, sent: list[bytes]
) -> None:
    """
    Send C{byte} once every C{every} seconds until C{until} (a monotonic
    time), adding each to C{sent}: the pacing of a slow client, not a wait
    for the server.
    """
    while time.monotonic() < until:
        peer.send(byte)
        sent.append(byte)
        time.sleep(every)


class TimeoutTests(LimitsCase):
    def test_idle_timeout(self) -> None:
        """
        C{--idle-timeout T}: a client that sends nothing gets
        C{ERR idle-timeout} and the close about T after connecting; a
        client trickling a partial line (a byte every T/4) is not idle and
        is not closed for 2.5 T; its line is echoed when it ends it.
        """
        server = self.start("--mode", "echo", "--idle-timeout", str(TIMEOUT))
        started = time.monotonic()
        silent = self.peer(server)
        slow = self.peer(server)
        sent: list[bytes] = []
        join = run_in_thread(
            lambda: trickle(slow, b"x", TIMEOUT / 4, started + KEEP_GOING, sent)
        )

        silent.wait_closed(timeout=TIMEOUT + 10)
        elapsed = time.monotonic() - started
        self.assertEqual(silent.received, b"ERR idle-timeout\n")
        self.assertGreater(elapsed, TIMEOUT - 0.1)
        self.assertLess(elapsed, TIMEOUT + SLACK)

        join()
        self.assertEqual((slow.received, slow.end), (b"", None))
        slow.send(b"\n")
        slow.expect(b"".join(sent) + b"\n")
        self.assertIsNone(slow.end)
        self.stop(server)

    def test_line_timeout(self) -> None:
        """
        C{--line-timeout T}: a client trickling a partial line (a byte
        every T/4) gets C{ERR line-timeout} and the close about T after its
        first byte; a client that sends a complete line every T/2 (slow,
        but never holding a line open) is not closed for 2.5 T and gets
        every line echoed; a silent client is not closed either.
        """
        server = self.start("--mode", "echo", "--line-timeout", str(TIMEOUT))
        silent = self.peer(server)
        dripping = self.peer(server)
        steady = self.peer(server)
        started = time.monotonic()
        stop_dripping = started + KEEP_GOING
        drip = run_in_thread(
            lambda: trickle(dripping, b"d", TIMEOUT / 4, stop_dripping, [])
        )

        def complete_lines() -> None:
            for i in range(int(KEEP_GOING / (TIMEOUT / 2))):
                steady.send(b"steady-%d\n" % i)
                time.sleep(TIMEOUT / 2)

        lines = run_in_thread(complete_lines)
        dripping.read_until(lambda: dripping.end is not None, TIMEOUT + 10)
        elapsed = time.monotonic() - started
        self.assertEqual(dripping.received, b"ERR line-timeout\n")
        self.assertIn(dripping.end, ("eof", "reset"))
        self.assertGreater(elapsed, TIMEOUT - 0.1)
        self.assertLess(elapsed, TIMEOUT + SLACK)
        # The dripping client's thread may see its sends fail once closed.
        with contextlib.suppress(OSError):
            drip()

        lines()
        count = int(KEEP_GOING / (TIMEOUT / 2))
        expected = b"".join(b"steady-%d\n" % i for i in range(count))
        steady.expect(expected)
        self.assertIsNone(steady.end)
        self.assertEqual(silent.silent_for(0.1), b"")
        self.assertIsNone(silent.end, "a silent client was closed by --line-timeout")
        self.stop(server)


# -- --max-line-length ----------------------------------------------------------------


class MaxLineLengthTests(LimitsCase):
    def test_one_byte_over(self) -> None:
        """
        C{--max-line-length 100}: lines of up to 100 bytes (terminator not
        counted, CRLF or LF) are delivered; a line of 101 bytes gets
        C{ERR line-too-long limit 100} and the close; the lines before it
        are in the sink, nothing of it or after it is.  An unterminated
        line that passes the limit is refused without waiting for its LF.
        """
        server = self.start("--max-line-length", "100")
        wait_until(lambda: "sink file:lines.log open" in server.log(), "sink open")
        exact = b"e" * 100
        client = self.peer(
            server,
            b"first\n" + exact + b"\r\n" + b"o" * 101 + b"\n" + b"after\n",
        )
        client.wait_closed()
        self.assertEqual(client.received, b"ERR line-too-long limit 100\n")

        unterminated = self.peer(server, b"u" * 102)
        unterminated.wait_closed()
        self.assertEqual(unterminated.received, b"ERR line-too-long limit 100\n")
        self.stop(server)
        sink = (self.dir / "server" / "lines.log").read_bytes()
        self.assertEqual(sink, b"first\n" + exact + b"\n")


# -- --high-watermark and --low-watermark ----------------------------------------------

#: Each line is its number, padded: 100 bytes with the LF.
LINE = b"%08d " + b"w" * 90 + b"\n"
#: What the client tries to send: far more than the server may hold.
TRY_TO_SEND = 64 << 20


def numbered(first: int, count: int) -> bytes:
    return b"".join(LINE % i for i in range(first, first + count))


def send_until_blocked(sock: socket.socket, stall: float = 1.5) -> int:
    """
    Send numbered lines without blocking until the peer has taken nothing
    for C{stall} seconds (or C{TRY_TO_SEND} bytes went).

    @return: the bytes sent (the last line may be cut short).
    """
    sock.setblocking(False)
    chunk_lines = 650
    sent = 0
    pending = b""
    stalled_since: float | None = None
    deadline = time.monotonic() + 60
    while sent < TRY_TO_SEND and time.monotonic() < deadline:
        if not pending:
            pending = numbered(sent // len(LINE % 0), chunk_lines)
        try:
            taken = sock.send(pending)
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > stall:
                break
            time.sleep(0.01)
            continue
        stalled_since = None
        sent += taken
        pending = pending[taken:]
    return sent


class WatermarkTests(LimitsCase):
    def test_slow_sink_pushes_back_and_loses_nothing(self) -> None:
        """
        C{--sink stdout: --high-watermark 256K --low-watermark 64K}, with
        the server's standard output a pipe that nobody reads: a client
        that tries to send 64 MiB of numbered lines is blocked long before
        (the server stopped reading it), the server grows by less than
        3 MiB meanwhile (the high watermark, a read, allocator slack: with
        the default watermarks of 4M/1M it grows by about 6 MiB here), and
        once the pipe is drained every line comes out of it exactly once,
        in order.
        """
        server = self.start(
            "--sink",
            "stdout:",
            "--high-watermark",
            "256K",
            "--low-watermark",
            "64K",
        )
        wait_until(lambda: "sink stdout: open" in server.log(), "sink open")
        before = server.rss_kib()
        client = self.peer(server)
        sent = send_until_blocked(client.sock)
        self.assertLess(sent, TRY_TO_SEND, "the client was never blocked")
        growth = server.rss_kib() - before
        self.assertLess(growth, 3 << 10, f"grew {growth} KiB with {sent} bytes sent")

        # Drain the pipe; the client finishes its last line and closes.
        stdout = server.proc.stdout
        assert stdout is not None
        out = bytearray()
        line_size = len(LINE % 0)
        lines = -(-sent // line_size)

        def drain() -> None:
            deadline = time.monotonic() + 60
            while out.count(b"\n") < lines and time.monotonic() < deadline:
                chunk = stdout.read1(1 << 20)  # type: ignore[attr-defined]
                if not chunk:
                    return
                out.extend(chunk)

        drained = run_in_thread(drain)
        client.sock.setblocking(True)
        client.sock.settimeout(30)
        client.send(numbered(0, lines)[sent:])
        client.close()
        drained()
        self.assertEqual(out.count(b"\n"), lines, "lines out of the pipe")
        self.assertEqual(bytes(out), numbered(0, lines))
        self.stop(server)
