"""Issue 4 end to end: TLS, STARTTLS and who may connect, through real twistd.

Every server here is a real C{twistd -n lineserver} child process
(L{tests.support.ServerProcess}) in sink mode with the default
C{file:lines.log} in its own directory; every client is a blocking socket
(Python's own C{ssl} module for TLS, so the client's TLS stack is not the
server's) with a timeout on every operation.  Certificates come from
L{tests.certs.make_pki}, made at run time.

Each refusal of the issue is provoked by a real client and checked three
ways: what the client saw (an C{ERR} line, a failed handshake, a close), the
server's log line about that connection (found by the client's own source
port), and the sink file after a clean stop: it must hold exactly the lines
of the clients that were let in, and nothing of any refused one.

A test starts only once its server logged "listening on" for every port:
the listeners listen from the running reactor, so by then twistd's signal
handlers (SIGTERM for the ordered stop, SIGHUP for reloads) are installed.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from tests.certs import (
    CLIENT_CN,
    ORGANIZATION,
    TestPKI,
    cert_pem,
    issue,
    make_ca,
    make_intermediate_ca,
    make_pki,
    make_server_cert,
    write_pair,
)
from tests.support import (
    TWISTD,
    ServerProcess,
    ipv6_loopback_error,
    listening_addresses,
    proxy_v1,
    temp_dir,
    unread_bytes,
    wait_until,
    without_ipv6,
)
from tests.tls_clients import SOCKET_TIMEOUT, client_context, client_hello

#: The handshake deadline of the servers that test it: long enough to tell
#: apart from the sub-second close of a plaintext client, short enough to
#: keep the file fast.
HANDSHAKE_TIMEOUT = 1.5
SIGTERM_STATUS = -signal.SIGTERM
CLIENT_SUBJECT = f"CN={CLIENT_CN},O={ORGANIZATION}"
DOCS = Path(__file__).parent.parent / "docs" / "security.md"
EXAMPLE_MARKER = "<!-- tested-example -->"


# -- addresses and ports ------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """
    @return: C{count} distinct free ports on C{host} (held together while
        looking, so no two are the same).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probes = [socket.socket(family) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def ssl_port(port: int, pki: TestPKI, *, cert: Path | None = None) -> str:
    """
    An C{ssl:} description on 127.0.0.1 with C{pki}'s server key and
    certificate (or C{cert}, with the key named C{cert} with .key).
    """
    cert = cert or pki.server_cert
    key = cert.with_suffix(".key")
    return f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"


# -- clients --------------------------------------------------------------------


@dataclass
class Seen:
    """
    What one client saw.

    @ivar source: the client's own address as the server sees it
        (C{127.0.0.1:PORT}, C{[::1]:PORT}), to find its log lines.
    @ivar received: every byte the server sent (in plaintext, or decrypted).
    @ivar end: how the connection ended: C{"eof"}, C{"reset"},
        C{"timeout"} (the server never closed it), an C{ssl} error, or None
        if the client closed it itself.
    @ivar version: the TLS version, if the client's handshake completed.
    @ivar serial: the serial of the certificate the server showed.
    @ivar handshake_error: why the client's handshake failed.
    @ivar elapsed: seconds from the last thing the client sent (or from the
        connect) to the end of the connection.
    """

    source: str
    received: bytes = b""
    end: str | None = None
    version: str | None = None
    serial: int | None = None
    handshake_error: str | None = None
    elapsed: float = 0.0

    @property
    def closed_by_server(self) -> bool:
        return self.end is not None and self.end != "timeout"


def source_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=SOCKET_TIMEOUT)


def read_until_closed(
    sock: socket.socket, seen: Seen, timeout: float = SOCKET_TIMEOUT
) -> None:
    """
    Read into C{seen} until the server ends the connection or C{timeout}.
    """
    started = time.monotonic()
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            seen.end = "timeout"
            break
        except ssl.SSLError as e:
            seen.end = f"ssl: {e.reason or e}"
            break
        except ConnectionResetError:
            seen.end = "reset"
            break
        except OSError as e:
            seen.end = f"{type(e).__name__}: {e}"
            break
        if not chunk:
            seen.end = "eof"
            break
        seen.received += chunk
    seen.elapsed = time.monotonic() - started


def read_line(sock: socket.socket) -> bytes:
    """
    One line from a plain socket, a byte at a time, so that nothing after
    it (the server's TLS handshake) is consumed.
    """
    line = b""
    while not line.endswith(b"\n") and len(line) < 1000:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def plain_client(
    port: int,
    send: bytes = b"",
    *,
    host: str = "127.0.0.1",
    then: Callable[[], None] | None = None,
) -> Seen:
    """
    Send C{send} in one write, then either call C{then} and close (a client
    that was let in: C{then} waits for its lines to land) or, without
    C{then}, read until the server closes.
    """
    with connect(port, host) as sock:
        seen = Seen(source_of(sock))
        if send:
            sock.sendall(send)
        if then is not None:
            then()
            return seen
        read_until_closed(sock, seen)
        return seen


def tls_client(
    port: int,
    context: ssl.SSLContext,
    send: bytes = b"",
    *,
    host: str = "127.0.0.1",
    preamble: bytes = b"",
    starttls: bool = False,
    then: Callable[[], None] | None = None,
) -> Seen:
    """
    Connect, optionally send a plaintext C{preamble} (a PROXY header, lines
    before STARTTLS) and do C{STARTTLS}, handshake, send C{send} in one
    write; then either call C{then} and close, or read until closed.
    """
    sock = connect(port, host)
    seen = Seen(source_of(sock))
    try:
        if preamble:
            sock.sendall(preamble)
        if starttls:
            sock.sendall(b"STARTTLS\n")
            answer = read_line(sock)
            if answer != b"OK starttls\n":
                seen.received = answer
                read_until_closed(sock, seen)
                seen.handshake_error = f"no OK to STARTTLS: {seen.received!r}"
                return seen
        started = time.monotonic()
        try:
            conn = context.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as e:
            seen.handshake_error = f"{type(e).__name__}: {e}"
            seen.end = "handshake failed"
            seen.elapsed = time.monotonic() - started
            return seen
        with conn:
            seen.version = conn.version()
            der = conn.getpeercert(binary_form=True)
            if der is not None:
                seen.serial = x509.load_der_x509_certificate(der).serial_number
            if send:
                try:
                    conn.sendall(send)
                except (ssl.SSLError, OSError) as e:
                    seen.end = f"send failed: {e}"
                    return seen
            if then is not None:
                then()
                return seen
            read_until_closed(conn, seen)
            return seen
    finally:
        sock.close()


def in_thread(target: Callable[[], Seen]) -> Callable[[], Seen]:
    """
    Run C{target} in a thread now.

    @return: a function that joins it (bounded) and gives its result.
    """
    box: list[Seen | BaseException] = []

    def run() -> None:
        try:
            box.append(target())
        except BaseException as e:  # re-raised in the test's thread
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Seen:
        thread.join(3 * SOCKET_TIMEOUT)
        if thread.is_alive() or not box:
            raise AssertionError("client thread did not finish")
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    return join


# -- the server and its files ---------------------------------------------------


class SecurityCase(SynchronousTestCase):
    """
    A fresh PKI per test; servers in their own directories under one
    temporary directory.
    """

    def setUp(self) -> None:
        self.dir = Path(temp_dir(self))
        self.pki = make_pki(self.dir / "pki")

    def start(
        self,
        *args: str,
        port: int | None = None,
        listen: str | None = None,
        ports: int = 1,
        name: str = "server",
    ) -> ServerProcess:
        """
        Start a server in C{self.dir/name}, and wait until it listens on
        all its C{ports}.
        """
        cwd = self.dir / name
        cwd.mkdir()
        server = ServerProcess(
            str(cwd), *args, "--shutdown-timeout", "5", port=port, listen=listen
        )
        self.addCleanup(server.kill)
        server.wait_listening(ports, timeout=15)
        return server

    def sink_path(self, name: str = "server") -> Path:
        return self.dir / name / "lines.log"

    def sink_lines(self, name: str = "server") -> list[bytes]:
        path = self.sink_path(name)
        data = path.read_bytes() if path.exists() else b""
        return data.split(b"\n")[:-1]

    def landed(self, lines: list[bytes], name: str = "server") -> Callable[[], None]:
        """
        @return: a wait for C{lines} (bytes without LF) to be in the sink
            file, for a client to call before it closes.
        """

        def wait() -> None:
            wait_until(
                lambda: not (Counter(lines) - Counter(self.sink_lines(name))),
                f"{lines!r} in the sink file",
            )

        return wait

    def tls_served(
        self,
        port: int,
        context: ssl.SSLContext,
        lines: list[bytes],
        *,
        auth: bytes | None = None,
        preamble: bytes = b"",
        starttls: bool = False,
    ) -> Seen:
        """
        A L{tls_client} that is let in: it sends C{AUTH auth} (if given)
        and C{lines} (bytes without LF) in one write, and closes once those
        lines are in the sink file.
        """
        send = b"".join(line + b"\n" for line in lines)
        if auth is not None:
            send = b"AUTH " + auth + b"\n" + send
        return tls_client(
            port,
            context,
            send,
            preamble=preamble,
            starttls=starttls,
            then=self.landed(lines),
        )

    def stop(self, server: ServerProcess) -> str:
        """
        SIGTERM, check the clean exit and the absence of tracebacks.

        @return: the whole log.
        """
        status = server.stop(timeout=15)
        log = server.log()
        self.assertEqual(status, SIGTERM_STATUS, log[-3000:])
        self.assertNotIn("Traceback", log)
        return log

    def assert_sink(self, expected: list[bytes], name: str = "server") -> None:
        """
        The sink file holds exactly C{expected} (each once; lines of one
        client, which share their first word, in their order), after the
        server stopped.
        """
        lines = self.sink_lines(name)
        self.assertEqual(Counter(lines), Counter(expected))
        for client in {line.split(b"-")[0] for line in expected}:
            mine = [x for x in lines if x.split(b"-")[0] == client]
            self.assertEqual(mine, [x for x in expected if x.split(b"-")[0] == client])

    def log_about(self, server: ServerProcess, seen: Seen | str) -> list[str]:
        """
        @return: the log lines naming this client's address and port.
        """
        source = seen if isinstance(seen, str) else seen.source
        pattern = re.compile(re.escape(source) + r"(?!\d)")
        return [line for line in server.log().splitlines() if pattern.search(line)]

    def refusal(
        self, server: ServerProcess, seen: Seen | str, timeout: float = 10.0
    ) -> str:
        """
        Wait for the server's "refusing #N HOST:PORT: ..." line about this
        client.

        @return: that line.
        """
        found: list[str] = []

        def logged() -> bool:
            found[:] = [
                line for line in self.log_about(server, seen) if "refusing #" in line
            ]
            return bool(found)

        source = seen if isinstance(seen, str) else seen.source
        wait_until(logged, f"a refusal log line for {source}", timeout)
        return found[0]

    def assert_refused_with(self, seen: Seen, code: str) -> None:
        """
        The server sent exactly one C{ERR code} line and closed.
        """
        self.assertTrue(seen.received.startswith(b"ERR " + code.encode()), seen)
        self.assertEqual(seen.received.count(b"\n"), 1, seen)
        self.assertTrue(seen.closed_by_server, seen)

    def assert_tls_refused(self, seen: Seen) -> None:
        """
        The client's TLS connection failed (at the handshake, or with TLS
        1.3 on the first read, where a refused client certificate is
        reported) and no line came back.
        """
        self.assertTrue(seen.handshake_error or seen.end, seen)
        self.assertNotEqual(seen.end, "timeout", seen)
        self.assertEqual(seen.received, b"", seen)


# -- TLS at accept ----------------------------------------------------------------


class TLSPortTests(SecurityCase):
    def test_tls_port_admits_and_refuses(self) -> None:
        """
        One C{ssl:} port with C{--tls-client-ca} and a 1.5 s
        C{--tls-handshake-timeout}:

          - a client with a certificate from our CA is served over TLS 1.2
            or later (a TLS 1.2-only client too): its lines land in the sink,
            and the log lines about it carry its verified subject;
          - a TLS 1.1 client is refused ("unsupported protocol" logged);
          - a client without a certificate is refused ("peer did not return
            a certificate"), one from another CA too ("certificate verify
            failed");
          - a client that connects and sends nothing, and one that stalls
            halfway through its ClientHello, are aborted when the handshake
            deadline expires (not before it, and within a generous bound);
          - a plaintext client is closed within a second, and a client
            sending garbage instead of a ClientHello is closed at once;
            neither by the deadline.

        After the stop, the sink file holds the good clients' lines and
        nothing else.
        """
        port = free_ports(1)[0]
        server = self.start(
            "--tls-client-ca",
            str(self.pki.ca_cert),
            "--tls-handshake-timeout",
            str(HANDSHAKE_TIMEOUT),
            port=port,
            listen=ssl_port(port, self.pki),
        )
        pki = self.pki
        good = client_context(pki, cert=pki.client_cert, key=pki.client_key)
        good12 = client_context(
            pki, cert=pki.client_cert, key=pki.client_key, max_tls12=True
        )

        # The slow ones first, in the background.
        silent = in_thread(lambda: plain_client(port))
        hello = client_hello(client_context(pki))
        stalled = in_thread(lambda: plain_client(port, hello[: len(hello) // 2]))

        served = self.tls_served(port, good, [b"good-1", b"good-2"])
        served12 = self.tls_served(port, good12, [b"tls12-1"])
        old = tls_client(
            port,
            client_context(
                pki, cert=pki.client_cert, key=pki.client_key, tls11_only=True
            ),
            b"old-1\n",
        )
        no_cert = tls_client(port, client_context(pki), b"nocert-1\n")
        other_ca = tls_client(
            port,
            client_context(pki, cert=pki.other_client_cert, key=pki.other_client_key),
            b"otherca-1\n",
        )
        plaintext = plain_client(port, b"plaintext-1\n")
        garbage = plain_client(port, b"\xde\xad\xbe\xef" * 64 + b"\n")
        silent_seen, stalled_seen = silent(), stalled()

        # What the clients saw.
        self.assertIsNone(served.handshake_error, served)
        self.assertIn(served.version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(served.serial, pki.server_serial)
        self.assertEqual(served12.version, "TLSv1.2", served12)
        self.assertIsNotNone(old.handshake_error, old)
        self.assertIsNone(old.version)
        for refused in (no_cert, other_ca):
            self.assert_tls_refused(refused)
        for aborted in (silent_seen, stalled_seen):
            self.assertEqual(aborted.received, b"", aborted)
            self.assertTrue(aborted.closed_by_server, aborted)
            self.assertGreaterEqual(aborted.elapsed, HANDSHAKE_TIMEOUT - 0.2, aborted)
            self.assertLess(aborted.elapsed, HANDSHAKE_TIMEOUT + 4, aborted)
        self.assertTrue(plaintext.closed_by_server, plaintext)
        self.assertLess(plaintext.elapsed, 1.0, plaintext)
        self.assertNotIn(b"plaintext", plaintext.received)
        self.assertTrue(garbage.closed_by_server, garbage)
        self.assertLess(garbage.elapsed, HANDSHAKE_TIMEOUT, garbage)

        # What the server logged about each of them.
        about_served = self.log_about(server, served)
        self.assertTrue(
            any(f"({CLIENT_SUBJECT})" in line for line in about_served), about_served
        )
        self.assertIn("unsupported protocol", self.refusal(server, old))
        self.assertIn(
            "peer did not return a certificate", self.refusal(server, no_cert)
        )
        self.assertIn("certificate verify failed", self.refusal(server, other_ca))
        for aborted in (silent_seen, stalled_seen):
            line = "\n".join(self.log_about(server, aborted))
            self.assertIn("no TLS handshake within", line)
        for closed in (plaintext, garbage):
            line = self.refusal(server, closed)
            self.assertNotIn("no TLS handshake within", line)

        self.stop(server)
        self.assert_sink([b"good-1", b"good-2", b"tls12-1"])


class CertificateChainTests(SecurityCase):
    def test_extra_cert_chain(self) -> None:
        """
        A server certificate signed by an intermediate CA, on an C{ssl:}
        port with C{extraCertChain=} naming the intermediate: a client that
        trusts only the root verifies the chain and is served.  The control,
        the same certificate without C{extraCertChain=} on a second port,
        fails the client's verification: the intermediate came from
        C{extraCertChain}.
        """
        directory = self.dir / "chain"
        directory.mkdir()
        root = make_ca("Chain Root CA", path_length=1)
        intermediate = make_intermediate_ca(root, "Chain Intermediate CA")
        root_path = directory / "root.pem"
        root_path.write_bytes(cert_pem(root.cert))
        chain_path = directory / "intermediate.pem"
        chain_path.write_bytes(cert_pem(intermediate.cert))
        cert, key = write_pair(
            directory, "leaf", *issue(intermediate, "localhost", server=True)
        )
        chained, bare = free_ports(2)
        server = self.start(
            "--port",
            f"ssl:{bare}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
            port=chained,
            listen=(
                f"ssl:{chained}:privateKey={key}:certKey={cert}"
                f":extraCertChain={chain_path}:interface=127.0.0.1"
            ),
            ports=2,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(root_path))
        served = self.tls_served(chained, context, [b"chain-1"])
        unverified = tls_client(bare, context, b"bare-1\n")
        self.stop(server)
        self.assertIsNone(served.handshake_error, served)
        self.assertIn("certificate verify failed", unverified.handshake_error or "")
        self.assert_sink([b"chain-1"])


# -- STARTTLS ----------------------------------------------------------------------


class StartTLSTests(SecurityCase):
    def starttls_args(self) -> list[str]:
        return [
            "--starttls",
            "--tls-cert",
            str(self.pki.server_cert),
            "--tls-key",
            str(self.pki.server_key),
        ]

    def test_upgrade(self) -> None:
        """
        On a plain port with C{--starttls} and C{--tls-client-ca}:

          - a client sends C{STARTTLS}, gets C{OK starttls} in plaintext,
            completes TLS with its certificate on the same socket, and sends
            lines: they land, in order, and the log names it with its
            subject after the upgrade;
          - a client that puts a line after C{STARTTLS} in the same write
            (command injection) gets C{ERR protocol-error} and that line
            never lands;
          - C{STARTTLS} again inside TLS gets C{ERR tls-unavailable};
          - a client without a certificate is refused at the handshake after
            the upgrade ("peer did not return a certificate");
          - a client that gets C{OK starttls} and then never starts its
            handshake is aborted by the handshake deadline;
          - a client that never upgrades (TLS is offered, not required) is
            served in plaintext.
        """
        pki = self.pki
        server = self.start(
            *self.starttls_args(),
            "--tls-client-ca",
            str(pki.ca_cert),
            "--tls-handshake-timeout",
            str(HANDSHAKE_TIMEOUT),
        )
        port = server.port
        good = client_context(pki, cert=pki.client_cert, key=pki.client_key)

        def stall_after_ok() -> Seen:
            with connect(port) as sock:
                seen = Seen(source_of(sock))
                sock.sendall(b"STARTTLS\n")
                seen.received = read_line(sock)
                read_until_closed(sock, seen)
                return seen

        stalled = in_thread(stall_after_ok)
        upgraded = self.tls_served(
            port, good, [b"upgraded-1", b"upgraded-2"], starttls=True
        )
        injected = plain_client(port, b"STARTTLS\ninjected-1\n")
        twice = tls_client(port, good, b"STARTTLS\ntwice-1\n", starttls=True)
        no_cert = tls_client(port, client_context(pki), b"nocert-1\n", starttls=True)
        plain = plain_client(
            port, b"plain-1\nplain-2\n", then=self.landed([b"plain-2"])
        )
        stalled_seen = stalled()

        self.assertIsNone(upgraded.handshake_error, upgraded)
        self.assertIn(upgraded.version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(upgraded.serial, pki.server_serial)
        self.assert_refused_with(injected, "protocol-error")
        self.assertIsNone(twice.handshake_error, twice)
        self.assert_refused_with(twice, "tls-unavailable")
        self.assert_tls_refused(no_cert)
        self.assertEqual(stalled_seen.received[:12], b"OK starttls\n")
        self.assertTrue(stalled_seen.closed_by_server, stalled_seen)
        self.assertGreaterEqual(stalled_seen.elapsed, HANDSHAKE_TIMEOUT - 0.2)
        self.assertLess(stalled_seen.elapsed, HANDSHAKE_TIMEOUT + 4)
        self.assertIsNone(plain.end)

        self.assertTrue(
            any(
                f"({CLIENT_SUBJECT})" in line
                for line in self.log_about(server, upgraded)
            ),
            self.log_about(server, upgraded),
        )
        self.assertIn("protocol-error", self.refusal(server, injected))
        self.assertIn(
            "peer did not return a certificate", self.refusal(server, no_cert)
        )
        self.assertIn(
            "no TLS handshake within", "\n".join(self.log_about(server, stalled_seen))
        )

        self.stop(server)
        self.assert_sink([b"upgraded-1", b"upgraded-2", b"plain-1", b"plain-2"])

    def test_lines_before_starttls(self) -> None:
        """
        With C{--starttls} but not C{--require-tls}, lines may come before
        the upgrade (the issue: C{--require-tls} is what refuses them):
        a client sends two plaintext lines, then C{STARTTLS} in a later
        write, upgrades, and sends two more.  All four land, in order; the
        C{STARTTLS} line itself does not.  A client that sends a plaintext
        line and C{STARTTLS} with a line after it in one write gets
        C{ERR protocol-error}: its first line lands, the injected one not.
        """
        server = self.start(*self.starttls_args())
        port = server.port
        context = client_context(self.pki)

        def upgrade_after_lines() -> Seen:
            with connect(port) as sock:
                seen = Seen(source_of(sock))
                sock.sendall(b"mixed-1\nmixed-2\n")
                self.landed([b"mixed-1", b"mixed-2"])()
                sock.sendall(b"STARTTLS\n")
                answer = read_line(sock)
                if answer != b"OK starttls\n":
                    seen.handshake_error = f"no OK to STARTTLS: {answer!r}"
                    return seen
                with context.wrap_socket(sock, server_hostname="127.0.0.1") as conn:
                    seen.version = conn.version()
                    conn.sendall(b"mixed-3\nmixed-4\n")
                    self.landed([b"mixed-3", b"mixed-4"])()
                return seen

        try:
            upgraded = upgrade_after_lines()
        except TimeoutError:
            upgraded = Seen("", handshake_error="no answer to STARTTLS in 5 s")
        injected = plain_client(port, b"injectfirst-1\nSTARTTLS\ninjected-1\n")
        self.stop(server)
        self.assertIsNone(upgraded.handshake_error, upgraded)
        self.assertIn(upgraded.version, ("TLSv1.2", "TLSv1.3"))
        self.assert_refused_with(injected, "protocol-error")
        self.assert_sink(
            [b"mixed-1", b"mixed-2", b"mixed-3", b"mixed-4", b"injectfirst-1"]
        )

    def test_require_tls_and_auth(self) -> None:
        """
        With C{--starttls --require-tls --auth-tokens}:

          - any line before the upgrade gets C{ERR tls-required} and the
            close, an C{AUTH} line with a good token too (a token is never
            accepted in plaintext);
          - after C{STARTTLS}, C{AUTH <good token>} is consumed and the
            lines after it land; a wrong token or no C{AUTH} line gets
            C{ERR unauthorized} over TLS.

        Only the authenticated client's lines reach the sink; no C{AUTH}
        line does.
        """
        tokens = self.dir / "tokens"
        tokens.write_text("# fleet A\ntoken-alpha\n")
        server = self.start(
            *self.starttls_args(), "--require-tls", "--auth-tokens", str(tokens)
        )
        port = server.port
        context = client_context(self.pki)

        plaintext = plain_client(port, b"plaintext-1\n")
        plain_auth = plain_client(port, b"AUTH token-alpha\nplainauth-1\n")
        authed = self.tls_served(
            port,
            context,
            [b"authed-1", b"authed-2"],
            auth=b"token-alpha",
            starttls=True,
        )
        wrong = tls_client(port, context, b"AUTH token-beta\nwrong-1\n", starttls=True)
        missing = tls_client(port, context, b"missing-1\n", starttls=True)

        self.assert_refused_with(plaintext, "tls-required")
        self.assert_refused_with(plain_auth, "tls-required")
        self.assertIsNone(authed.handshake_error, authed)
        for refused in (wrong, missing):
            self.assertIsNone(refused.handshake_error, refused)
            self.assert_refused_with(refused, "unauthorized")
        self.assertIn("tls-required", self.refusal(server, plaintext))
        self.assertIn("unauthorized", self.refusal(server, wrong))

        self.stop(server)
        self.assert_sink([b"authed-1", b"authed-2"])


class StartTLSNotOfferedTests(SecurityCase):
    def test_no_rule_commands_are_data(self) -> None:
        """
        Where no admission rule applies (no C{--starttls}, C{--require-tls}
        or C{--auth-tokens}), a first line C{STARTTLS} or C{AUTH x} is data:
        it reaches the sink unchanged, on a plain port and on an C{ssl:}
        port, and so do the lines after it.
        """
        tls_port = free_ports(1)[0]
        server = self.start("--port", ssl_port(tls_port, self.pki), ports=2)
        plain = plain_client(
            server.port,
            b"STARTTLS\nplainafter-1\n",
            then=self.landed([b"plainafter-1"]),
        )
        auth = plain_client(
            server.port, b"AUTH x\nauthafter-1\n", then=self.landed([b"authafter-1"])
        )
        tls = self.tls_served(
            tls_port, client_context(self.pki), [b"STARTTLS", b"tlsafter-1"]
        )
        self.stop(server)
        for seen in (plain, auth):
            self.assertEqual(seen.received, b"", seen)
            self.assertFalse(seen.closed_by_server, seen)
        self.assertIsNone(tls.handshake_error, tls)
        self.assertEqual(tls.received, b"", tls)
        self.assertEqual(
            Counter(self.sink_lines()),
            Counter(
                [
                    *(b"STARTTLS", b"plainafter-1", b"AUTH x", b"authafter-1"),
                    *(b"STARTTLS", b"tlsafter-1"),
                ]
            ),
        )

    def test_starttls_not_offered_where_rules_apply(self) -> None:
        """
        Where a rule applies but C{STARTTLS} is not offered (C{--auth-tokens}
        on a plain port), a first line C{STARTTLS} is refused with
        C{ERR tls-unavailable}; it is not taken for a line, nor is the one
        after it.
        """
        tokens = self.dir / "tokens"
        tokens.write_text("sesame\n")
        server = self.start("--auth-tokens", str(tokens))
        plain = plain_client(server.port, b"STARTTLS\nplainafter-1\n")
        self.stop(server)
        self.assert_refused_with(plain, "tls-unavailable")
        self.assert_sink([])


# -- who may connect -------------------------------------------------------------


class AllowTests(SecurityCase):
    def test_allow_v4_denied_v6_and_proxy_allowed(self) -> None:
        """
        With C{--allow 10.0.0.0/8 --allow ::1}:

          - 127.0.0.1 gets C{ERR forbidden} without sending a byte, and the
            close; a client that sends at once gets the same and its line
            never lands;
          - ::1 on a C{tcp6:} port is served;
          - on a C{haproxy:tcp:} port, the address in the PROXY header is
            judged (the real peer is 127.0.0.1, refused elsewhere): 10.1.2.3
            is served, 192.0.2.9 and 2001:db8::5 get C{ERR forbidden}, and
            the log names the header's address; a connection without a
            PROXY header is closed with nothing delivered;
          - on a C{haproxy:ssl:} port the PROXY header comes first, then
            TLS: 10.1.2.3 is served, 192.0.2.9 gets C{ERR forbidden};
          - a forbidden PROXY header alone, with nothing after it, is
            refused too: the server does not wait for a line to judge it;
          - a connection to the C{haproxy:tcp:} port that sends no header at
            all is aborted when C{--tls-handshake-timeout} (1.5 s) expires.
        """
        v6_error = ipv6_loopback_error()
        v4, proxied, proxied_tls = free_ports(3)
        args = ["--allow", "10.0.0.0/8", "--allow", "::1"]
        args += ["--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT)]
        args += ["--port", f"haproxy:tcp:{proxied}:interface=127.0.0.1"]
        args += ["--port", "haproxy:" + ssl_port(proxied_tls, self.pki)]
        if v6_error is None:
            v6 = free_ports(1, "::1")[0]
            args += ["--port", rf"tcp6:{v6}:interface=\:\:1"]
        server = self.start(*args, port=v4, ports=4 if v6_error is None else 3)

        # HAProxy sends the header as soon as it connects, before the
        # client's first byte: the verdict must not wait for data.
        header_only = in_thread(
            lambda: plain_client(proxied, proxy_v1("192.0.2.10", 40006, proxied))
        )
        headerless = in_thread(lambda: plain_client(proxied))
        quiet = plain_client(v4)
        eager = plain_client(v4, b"eager-1\n")
        header = proxy_v1("10.1.2.3", 40001, proxied)
        via_proxy = plain_client(
            proxied, header + b"proxy-1\nproxy-2\n", then=self.landed([b"proxy-2"])
        )
        denied_header = plain_client(
            proxied, proxy_v1("192.0.2.9", 40002, proxied) + b"proxydenied-1\n"
        )
        denied_v6_header = plain_client(
            proxied, proxy_v1("2001:db8::5", 40003, proxied) + b"proxydenied6-1\n"
        )
        no_header = plain_client(proxied, b"noheader-1\n")
        context = client_context(self.pki)
        via_proxy_tls = self.tls_served(
            proxied_tls,
            context,
            [b"proxytls-1"],
            preamble=proxy_v1("10.1.2.3", 40004, proxied_tls),
        )
        denied_tls = tls_client(
            proxied_tls,
            context,
            b"proxytlsdenied-1\n",
            preamble=proxy_v1("192.0.2.9", 40005, proxied_tls),
        )

        for refused in (quiet, eager, denied_header, denied_v6_header):
            self.assert_refused_with(refused, "forbidden")
        self.assertIsNone(via_proxy.end)
        self.assertTrue(no_header.closed_by_server, no_header)
        self.assertIsNone(via_proxy_tls.handshake_error, via_proxy_tls)
        self.assertNotEqual(denied_tls.end, "timeout", denied_tls)
        self.assertIn(b"ERR forbidden", denied_tls.received)

        self.assertIn("address not allowed", self.refusal(server, quiet))
        self.assertIn("address not allowed", self.refusal(server, "192.0.2.9:40002"))
        self.assertIn(
            "address not allowed", self.refusal(server, "[2001:db8::5]:40003")
        )
        self.assertIn("address not allowed", self.refusal(server, "192.0.2.9:40005"))
        silent = headerless()
        self.assertEqual(silent.received, b"", silent)
        self.assertTrue(silent.closed_by_server, silent)
        self.assertGreaterEqual(silent.elapsed, HANDSHAKE_TIMEOUT - 0.2, silent)
        self.assertLess(silent.elapsed, HANDSHAKE_TIMEOUT + 4, silent)
        self.assertIn(
            "no PROXY header within", "\n".join(self.log_about(server, silent))
        )

        expected = [b"proxy-1", b"proxy-2", b"proxytls-1"]
        if v6_error is None:
            served_v6 = plain_client(
                v6, b"v6-1\nv6-2\n", host="::1", then=self.landed([b"v6-2"])
            )
            self.assertIsNone(served_v6.end)
            expected += [b"v6-1", b"v6-2"]
        self.stop(server)
        self.assert_sink(expected)
        # Joined after the stop: a server that waited for data would have
        # kept it until then, and it sees the stop's close, not an ERR.
        self.assert_refused_with(header_only(), "forbidden")
        if v6_error is not None:
            without_ipv6(
                "IPv4 and PROXY cases passed; the IPv6 case did not run: "
                f"no IPv6 loopback here ({v6_error})"
            )

    def test_allow_v4_allowed_v6_denied(self) -> None:
        """
        With C{--allow 127.0.0.1/32 --allow 2001:db8::/32}: 127.0.0.1 is
        served, ::1 gets C{ERR forbidden} before sending anything.
        """
        v6_error = ipv6_loopback_error()
        args = ["--allow", "127.0.0.1/32", "--allow", "2001:db8::/32"]
        if v6_error is None:
            v6 = free_ports(1, "::1")[0]
            args += ["--port", rf"tcp6:{v6}:interface=\:\:1"]
        server = self.start(*args, ports=2 if v6_error is None else 1)

        served = plain_client(
            server.port, b"v4-1\nv4-2\n", then=self.landed([b"v4-1", b"v4-2"])
        )
        self.assertIsNone(served.end)
        if v6_error is None:
            denied = plain_client(v6, host="::1")
            self.assert_refused_with(denied, "forbidden")
            self.assertIn("address not allowed", self.refusal(server, denied))
        self.stop(server)
        self.assert_sink([b"v4-1", b"v4-2"])
        if v6_error is not None:
            without_ipv6(
                "IPv4 cases passed; the IPv6 case did not run: "
                f"no IPv6 loopback here ({v6_error})"
            )


class AuthTokenTests(SecurityCase):
    def test_tokens(self) -> None:
        """
        With C{--auth-tokens FILE} (comments and blank lines in it): each
        token of the file admits a client whose first line is
        C{AUTH <token>} (also when that line comes alone, before the
        others); the C{AUTH} line is consumed.  A wrong token, a token that
        is only in a comment, an empty C{AUTH} and no C{AUTH} line at all
        each get C{ERR unauthorized} and the close, and nothing of those
        connections lands.
        """
        tokens = self.dir / "tokens"
        tokens.write_text(
            "# vehicles\ntoken-alpha\n\n   # retired: token-gamma\n  token-beta  \n"
        )
        server = self.start("--auth-tokens", str(tokens))
        port = server.port

        alpha = plain_client(
            port,
            b"AUTH token-alpha\nalpha-1\nalpha-2\n",
            then=self.landed([b"alpha-2"]),
        )

        def auth_alone() -> None:
            with connect(port) as sock:
                sock.sendall(b"AUTH token-beta\n")
                # The server reads the AUTH line on its own: the kernel
                # shows nothing left unread before the next line goes.
                wait_until(lambda: not unread_bytes(port), "the AUTH line read")
                sock.sendall(b"beta-1\n")
                self.landed([b"beta-1"])()

        auth_alone()
        refused = {
            "wrong": plain_client(port, b"AUTH token-delta\nwrong-1\n"),
            "comment": plain_client(port, b"AUTH token-gamma\ncomment-1\n"),
            "empty": plain_client(port, b"AUTH \nempty-1\n"),
            "missing": plain_client(port, b"missing-1\nmissing-2\n"),
            "quiet-wrong": plain_client(port, b"AUTH token-alphA\n"),
        }
        self.assertIsNone(alpha.end)
        for name, seen in refused.items():
            self.assertTrue(seen.received.startswith(b"ERR unauthorized"), (name, seen))
            self.assert_refused_with(seen, "unauthorized")
            self.assertIn("unauthorized", self.refusal(server, seen), name)
        log = self.stop(server)
        self.assertNotIn("token-alpha", log)
        self.assertNotIn("token-delta", log)
        self.assert_sink([b"alpha-1", b"alpha-2", b"beta-1"])


# -- reload on SIGHUP --------------------------------------------------------------


class ReloadTests(SecurityCase):
    def setUp(self) -> None:
        super().setUp()
        # The live files the server reads, distinct from the PKI's originals.
        self.live = self.dir / "live"
        self.live.mkdir()
        for stem in ("tls", "starttls"):
            (self.live / f"{stem}.pem").write_bytes(self.pki.server_cert.read_bytes())
            (self.live / f"{stem}.key").write_bytes(self.pki.server_key.read_bytes())
        self.tokens = self.live / "tokens"
        self.tokens.write_text("token-old\n")

    def start_reloadable(self) -> tuple[ServerProcess, int, int]:
        """
        An C{ssl:} port and a C{STARTTLS} plain port, each with its own
        live certificate, and C{--auth-tokens}.

        @return: the server, the TLS port, the STARTTLS port.
        """
        tls_port, plain_port = free_ports(2)
        server = self.start(
            "--port",
            f"tcp:{plain_port}:interface=127.0.0.1",
            "--starttls",
            "--tls-cert",
            str(self.live / "starttls.pem"),
            "--tls-key",
            str(self.live / "starttls.key"),
            "--auth-tokens",
            str(self.tokens),
            port=tls_port,
            listen=ssl_port(tls_port, self.pki, cert=self.live / "tls.pem"),
            ports=2,
        )
        return server, tls_port, plain_port

    def install(self, stem: str, cert: Path, key: Path) -> None:
        (self.live / f"{stem}.pem").write_bytes(cert.read_bytes())
        (self.live / f"{stem}.key").write_bytes(key.read_bytes())

    def sighup(self, server: ServerProcess, word: str, count: int) -> None:
        """
        SIGHUP the server, and wait for C{count} more log lines with C{word}.
        """
        before = server.log().count(word)
        os.kill(server.pid, signal.SIGHUP)
        wait_until(
            lambda: server.log().count(word) >= before + count,
            f"{count} log line(s) with {word!r} after SIGHUP",
        )

    @contextlib.contextmanager
    def held(
        self, port: int, *, starttls: bool, tag: bytes
    ) -> Iterator[Callable[[bytes], None]]:
        """
        A client that authenticates, sends a line, and stays connected.

        @return: (in the with block) a function to send another line.
        """
        context = client_context(self.pki)
        with connect(port) as sock:
            if starttls:
                sock.sendall(b"STARTTLS\n")
                self.assertEqual(read_line(sock), b"OK starttls\n")
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as conn:
                der = conn.getpeercert(binary_form=True)
                assert der is not None
                self.assertEqual(
                    x509.load_der_x509_certificate(der).serial_number,
                    self.pki.server_serial,
                )
                conn.sendall(b"AUTH token-old\n" + tag + b"-1\n")
                self.landed([tag + b"-1"])()

                def send(line: bytes) -> None:
                    conn.sendall(line + b"\n")
                    self.landed([line])()

                yield send

    def test_sighup_reloads_certificates_and_tokens(self) -> None:
        """
        SIGHUP after new certificates (new serials) are installed for the
        C{ssl:} port and for C{STARTTLS}, and the token file is rewritten:
        new connections on each port are served the new certificate and
        admitted with the new token only; connections made before the
        reload go on sending lines, untouched.  The log says "reloaded".
        """
        server, tls_port, plain_port = self.start_reloadable()
        with (
            self.held(tls_port, starttls=False, tag=b"oldtls") as old_tls,
            self.held(plain_port, starttls=True, tag=b"oldstarttls") as old_starttls,
        ):
            cert, key, tls_serial = make_server_cert(self.pki, "renewed-tls")
            self.install("tls", cert, key)
            cert, key, starttls_serial = make_server_cert(self.pki, "renewed-starttls")
            self.install("starttls", cert, key)
            self.tokens.write_text("# rotated\ntoken-new\n")
            self.sighup(server, "reloaded", 3)

            context = client_context(self.pki)
            new_tls = self.tls_served(
                tls_port, context, [b"newtls-1"], auth=b"token-new"
            )
            new_starttls = self.tls_served(
                plain_port,
                context,
                [b"newstarttls-1"],
                auth=b"token-new",
                starttls=True,
            )
            old_token = tls_client(tls_port, context, b"AUTH token-old\noldtoken-1\n")
            old_tls(b"oldtls-2")
            old_starttls(b"oldstarttls-2")

        self.assertEqual(new_tls.serial, tls_serial, new_tls)
        self.assertEqual(new_starttls.serial, starttls_serial, new_starttls)
        self.assert_refused_with(old_token, "unauthorized")
        log = self.stop(server)
        self.assertNotIn("could not reload", log)
        reloaded = [line for line in log.splitlines() if "reloaded" in line]
        self.assertTrue(any("STARTTLS" in x for x in reloaded), reloaded)
        self.assertTrue(any(f"ssl:{tls_port}:" in x for x in reloaded), reloaded)
        self.assertTrue(any(str(self.tokens) in x for x in reloaded), reloaded)
        self.assert_sink(
            [
                b"oldtls-1",
                b"oldtls-2",
                b"oldstarttls-1",
                b"oldstarttls-2",
                b"newtls-1",
                b"newstarttls-1",
            ]
        )

    def test_bad_reload_keeps_the_old(self) -> None:
        """
        SIGHUP after garbage was written over the C{ssl:} port's
        certificate, a new certificate without its key was installed for
        C{STARTTLS}, and the token file lost every token: each failure is
        logged ("keeping"), and new connections are still served the old
        certificates and admitted with the old token.
        """
        server, tls_port, plain_port = self.start_reloadable()
        (self.live / "tls.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        cert, _key, _serial = make_server_cert(self.pki, "keyless")
        (self.live / "starttls.pem").write_bytes(cert.read_bytes())
        self.tokens.write_text("# every token revoked by mistake\n")
        self.sighup(server, "keeping", 3)

        context = client_context(self.pki)
        tls = self.tls_served(tls_port, context, [b"tls-1"], auth=b"token-old")
        starttls = self.tls_served(
            plain_port, context, [b"starttls-1"], auth=b"token-old", starttls=True
        )
        self.assertEqual(tls.serial, self.pki.server_serial, tls)
        self.assertEqual(starttls.serial, self.pki.server_serial, starttls)
        log = self.stop(server)
        keeping = [line for line in log.splitlines() if "keeping" in line]
        self.assertTrue(any(str(self.live / "tls.pem") in x for x in keeping), keeping)
        self.assertTrue(any("does not match" in x for x in keeping), keeping)
        self.assertTrue(any(str(self.tokens) in x for x in keeping), keeping)
        self.assert_sink([b"tls-1", b"starttls-1"])


# -- where it listens --------------------------------------------------------------


class DefaultBindTests(SecurityCase):
    def test_loopback_unless_told(self) -> None:
        """
        C{tcp:PORT}, C{ssl:PORT:...}, C{haproxy:tcp:PORT} without
        C{interface=} listen on 127.0.0.1 only, C{tcp6:PORT} on ::1 only,
        as the kernel's socket table shows; nothing on 0.0.0.0 or ::.
        """
        v6_error = ipv6_loopback_error()
        plain, tls, proxied = free_ports(3)
        key, cert = self.pki.server_key, self.pki.server_cert
        args = [
            "--port",
            f"ssl:{tls}:privateKey={key}:certKey={cert}",
            "--port",
            f"haproxy:tcp:{proxied}",
        ]
        if v6_error is None:
            v6 = free_ports(1, "::1")[0]
            args += ["--port", f"tcp6:{v6}"]
        server = self.start(
            *args, port=plain, listen=f"tcp:{plain}", ports=4 if v6_error is None else 3
        )
        for port in (plain, tls, proxied):
            self.assertEqual(listening_addresses(port), {"127.0.0.1"}, port)
        if v6_error is None:
            self.assertEqual(listening_addresses(v6), {"::1"})
        self.stop(server)
        if v6_error is not None:
            without_ipv6(f"IPv4 cases passed; no IPv6 loopback here ({v6_error})")


# -- the documentation's example ---------------------------------------------------


def documented_example() -> str:
    """
    @return: the shell block right after the tested-example marker in
        docs/security.md.
    """
    text = DOCS.read_text()
    _, marker, after = text.partition(EXAMPLE_MARKER)
    if not marker:
        raise AssertionError(f"{EXAMPLE_MARKER} not found in {DOCS}")
    match = re.match(r"\s*```sh\n(.*?)\n```", after, re.DOTALL)
    if match is None:
        raise AssertionError(f"no ```sh block right after {EXAMPLE_MARKER}")
    return match.group(1)


class DocumentationTests(SecurityCase):
    def test_example_configuration(self) -> None:
        """
        The example of docs/security.md, run as written with only its
        documented placeholders replaced (the /etc/lineserver and
        /var/lib/lineserver paths by this test's PKI and directory, port
        4443 by a free port, 0.0.0.0 by 127.0.0.1): a client with a
        certificate from the CA and a token is served; one without a
        certificate, one with another CA's, and one with a wrong token are
        refused, and nothing of theirs lands.
        """
        tokens = self.dir / "tokens"
        tokens.write_text("# one token per device group\ntoken-fleet-a\n")
        port = free_ports(1)[0]
        cwd = self.dir / "server"
        cwd.mkdir()
        sink = cwd / "lines.log"
        replacements = {
            "/etc/lineserver/server.key": str(self.pki.server_key),
            "/etc/lineserver/server.pem": str(self.pki.server_cert),
            "/etc/lineserver/clients-ca.pem": str(self.pki.ca_cert),
            "/etc/lineserver/tokens": str(tokens),
            "/var/lib/lineserver/lines.log": str(sink),
            "4443": str(port),
            "interface=0.0.0.0": "interface=127.0.0.1",
        }
        command = documented_example()
        for placeholder, value in replacements.items():
            self.assertIn(placeholder, command)
            command = command.replace(placeholder, value)
        self.assertNotIn("/etc/lineserver", command)
        argv = shlex.split(command.replace("\\\n", " "))
        self.assertEqual(argv[0], "twistd")
        log_path = cwd / "server.log"
        argv = [str(TWISTD), f"--logfile={log_path}", *argv[1:]]
        with open(cwd / "output", "wb") as output:
            proc = subprocess.Popen(argv, cwd=cwd, stdout=output, stderr=output)

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(kill)

        def log() -> str:
            return log_path.read_text() if log_path.exists() else ""

        def listening() -> bool:
            if proc.poll() is not None:
                output = (cwd / "output").read_text()
                raise AssertionError(
                    f"example exited {proc.returncode}: {output}\n{log()}\n{argv}"
                )
            return "listening on " in log()

        wait_until(listening, "the example listening", timeout=15)
        pki = self.pki
        good = client_context(pki, cert=pki.client_cert, key=pki.client_key)
        served = self.tls_served(
            port, good, [b"example-1", b"example-2"], auth=b"token-fleet-a"
        )
        no_cert = tls_client(port, client_context(pki), b"AUTH token-fleet-a\nx-1\n")
        other_ca = tls_client(
            port,
            client_context(pki, cert=pki.other_client_cert, key=pki.other_client_key),
            b"AUTH token-fleet-a\ny-1\n",
        )
        wrong = tls_client(port, good, b"AUTH token-fleet-b\nz-1\n")
        self.assertIsNone(served.handshake_error, served)
        self.assert_tls_refused(no_cert)
        self.assert_tls_refused(other_ca)
        self.assert_refused_with(wrong, "unauthorized")
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(15), SIGTERM_STATUS, log()[-3000:])
        self.assert_sink([b"example-1", b"example-2"])

    def test_unusable_files_stop_the_start(self) -> None:
        """
        As docs/security.md says, an unusable file is a usage error naming
        it, with exit status 1, before anything listens: a key that does
        not match its certificate on an C{ssl:} port, a token file without
        tokens, a C{--tls-cert} that holds no certificate.
        """
        pki = self.pki
        tokens = self.dir / "tokens"
        tokens.write_text("# every token commented out\n")
        port = free_ports(1)[0]
        cases = [
            (
                [
                    "--port",
                    f"ssl:{port}:privateKey={pki.client_key}:certKey={pki.server_cert}"
                    ":interface=127.0.0.1",
                ],
                str(pki.client_key),
                "does not match",
            ),
            (["--auth-tokens", str(tokens)], str(tokens), "no tokens"),
            (
                ["--starttls", "--tls-cert", str(pki.ca_key)],
                str(pki.ca_key),
                "no PEM certificate",
            ),
        ]
        for args, path, reason in cases:
            result = subprocess.run(
                [str(TWISTD), "-n", "--pidfile=", "--logfile=-", "lineserver", *args],
                capture_output=True,
                cwd=self.dir,
                timeout=30,
                check=False,
            )
            output = (result.stdout + result.stderr).decode()
            self.assertEqual(result.returncode, 1, output)
            message = output.strip().splitlines()[-1]
            self.assertIn(path, message)
            self.assertIn(reason, message)
            self.assertNotIn("listening on", output)

    def test_documented_options_exist(self) -> None:
        """
        Every option docs/security.md names is one C{twistd lineserver
        --help} lists, and the handshake timeout's default is 10 s.
        """
        result = subprocess.run(
            [str(TWISTD), "lineserver", "--help"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        help_text = result.stdout.decode()
        documented = {
            option
            for line in DOCS.read_text().splitlines()
            if line.startswith("| `--")
            for option in re.findall(r"`(--[a-z][a-z0-9-]+)", line.split("|")[1])
        }
        self.assertGreaterEqual(len(documented), 8, documented)
        listed = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text))
        self.assertEqual(sorted(documented - listed), [], help_text)
        timeout_help = help_text.split("--tls-handshake-timeout", 1)[1].split("--", 1)[
            0
        ]
        self.assertIn("10", timeout_help)
