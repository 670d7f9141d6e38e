"""TLS 1.3 session tickets and clients that close without reading.

After a TLS 1.3 handshake the server sends session tickets.  A client that
sends its lines and closes without reading them closes with unread bytes,
so its kernel sends a reset, and the server's kernel drops whatever of
that client the server had not read yet: lines lost.

pyOpenSSL 26.4 and cryptography 50 (OpenSSL 4.0, linked into
cryptography's own module) expose neither C{SSL_CTX_set_num_tickets} nor
C{SSL_CONF_cmd}; C{OP_NO_TICKET}, which Twisted already sets, only makes
the tickets stateful, and C{SESS_CACHE_OFF} does not stop them.  What
works is OpenSSL's own configuration, read when the process starts:
C{NumTickets = 0} in the C{system_default} section of the file named by
C{OPENSSL_CONF} (docs/sending.md shows the file).  These tests run a real
twistd both ways, with Python's C{ssl} client doing C{sendall} then
C{close}.
"""

from __future__ import annotations

import fcntl
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lineserver.tls import load_server_options, session_ticket_bytes
from tests.certs import make_pki
from tests.support import ServerProcess, free_port, temp_dir, wait_until

#: The OpenSSL configuration docs/sending.md gives operators.
NO_TICKETS_CONF = """\
openssl_conf = openssl_init

[openssl_init]
ssl_conf = ssl_section

[ssl_section]
system_default = system_default_section

[system_default_section]
NumTickets = 0
"""


def unread(sock: socket.socket) -> int:
    """
    @return: bytes waiting, unread, in C{sock}'s kernel receive queue.
    """
    data = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    count: int = struct.unpack("i", data)[0]
    return count


class SessionTicketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(temp_dir(self))
        self.pki = make_pki(self.dir / "pki")

    def server(self, *, conf: str | None) -> tuple[ServerProcess, Path]:
        port = free_port()
        cwd = self.dir / f"server-{port}"
        cwd.mkdir()
        out = cwd / "out.log"
        listen = (
            f"ssl:{port}:privateKey={self.pki.server_key}:"
            f"certKey={self.pki.server_cert}:interface=127.0.0.1"
        )
        saved = os.environ.get("OPENSSL_CONF")
        if conf is not None:
            path = cwd / "openssl.cnf"
            path.write_text(conf)
            os.environ["OPENSSL_CONF"] = str(path)
        try:
            server = ServerProcess(
                str(cwd), "--sink", f"file:{out}", listen=listen, port=port
            )
        finally:
            if saved is None:
                os.environ.pop("OPENSSL_CONF", None)
            else:
                os.environ["OPENSSL_CONF"] = saved
        self.addCleanup(server.kill)
        server.wait_listening()
        return server, out

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context

    def tickets_waiting(self, port: int) -> int:
        """
        Handshake, wait a moment, read nothing.

        @return: the bytes the server sent after the handshake (its
            tickets), waiting unread in the client's socket.
        """
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with self.context().wrap_socket(raw, server_hostname="localhost") as tls:
            time.sleep(0.3)
            return unread(tls)

    def send_and_close(self, port: int, data: bytes) -> None:
        """
        Python's C{ssl} client as such clients are written: handshake,
        C{sendall}, C{close}, never a read.
        """
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with self.context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(data)

    def logged(self, server: ServerProcess, text: str) -> Callable[[], bool]:
        return lambda: text in server.log()

    def has_lines(self, out: Path, count: int) -> Callable[[], bool]:
        return lambda: len(self.sink_lines(out)) >= count

    def sink_lines(self, out: Path) -> list[bytes]:
        return out.read_bytes().splitlines() if out.exists() else []

    def lines(self, count: int) -> tuple[list[bytes], bytes]:
        lines = [b"ticket test line %08d %s" % (i, b"y" * 40) for i in range(count)]
        return lines, b"".join(line + b"\n" for line in lines)

    def test_no_tickets_no_loss(self) -> None:
        """
        With C{NumTickets = 0} the server sends nothing after the
        handshake, so the client closes with a FIN, and every line of
        several MB arrives, each time.
        """
        server, out = self.server(conf=NO_TICKETS_CONF)
        self.assertEqual(self.tickets_waiting(server.port), 0)
        self.assertIn("TLS 1.3: no session tickets are sent", server.log())
        lines, data = self.lines(60_000)  # 4.4 MB
        expected: list[bytes] = []
        for attempt in range(3):
            self.send_and_close(server.port, data)
            expected += lines
            marker = f"closed #{attempt + 2} "
            wait_until(
                self.logged(server, marker),
                "the connection's end",
                timeout=60,
            )
            wait_until(self.has_lines(out, len(expected)), "the lines in the sink", 60)
            self.assertEqual(self.sink_lines(out), expected)

    def test_default_sends_tickets(self) -> None:
        """
        Without it, the server's tickets wait unread in the client's
        socket: the cause of the loss.  How many lines a C{sendall} then
        C{close} loses varies with timing: it is printed, not asserted.
        """
        server, out = self.server(conf=None)
        self.assertGreater(self.tickets_waiting(server.port), 0)
        # The server says so when it starts.
        self.assertIn("TLS 1.3: this server sends session tickets", server.log())
        lines, data = self.lines(60_000)
        self.send_and_close(server.port, data)
        wait_until(self.logged(server, "closed #2 "), "the connection's end", 60)
        time.sleep(1)  # the sink's writer thread may still be writing
        lost = len(lines) - len(self.sink_lines(out))
        print(
            f"\nTLS 1.3 with tickets, sendall+close of {len(data)} bytes: "
            f"{lost} of {len(lines)} lines lost"
        )


class SessionTicketProbeTests(SynchronousTestCase):
    """
    L{session_ticket_bytes}, the in-memory handshake the server uses to
    say at start whether it sends tickets.
    """

    def setUp(self) -> None:
        self.pki = make_pki(Path(temp_dir(self)) / "pki")

    def test_default_context_sends_tickets(self) -> None:
        options = load_server_options(self.pki.server_cert, self.pki.server_key)
        count = session_ticket_bytes(options.getContext())
        assert count is not None
        self.assertGreater(count, 0)

    def test_mutual_tls_cannot_tell(self) -> None:
        """
        A server that requires a client certificate cannot be asked
        without one: None, not a guess.
        """
        options = load_server_options(
            self.pki.server_cert, self.pki.server_key, self.pki.ca_cert
        )
        self.assertIsNone(session_ticket_bytes(options.getContext()))
