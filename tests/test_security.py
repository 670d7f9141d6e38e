"""Security wired into an embedded LineServer, through real loopback sockets.

TLS at accept with client certificates, the handshake deadline of a TLS
port, PROXY headers in front of TLS, STARTTLS with required TLS and auth
tokens, reload through the embedding API, and SIGHUP.  The same refusals
through a real twistd process are in L{tests.test_security_twistd}.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.flow import SinkQueue
from lineserver.handlers import SinkHandlerFactory
from lineserver.interfaces import IConnection, ILineHandler
from lineserver.protocol import ProtocolSettings
from lineserver.security import Security, SecurityConfig, SecurityConfigError
from lineserver.server import LineServer
from lineserver.signals import HangupReload
from tests.certs import TestPKI, make_server_cert
from tests.support import (
    MemorySinkFactory,
    eventually,
    reactor,
    start_server,
    temp_dir,
    wait_until,
)
from tests.tls_clients import client_context, client_hello, new_pki, run_client

TIMEOUT = 10.0


class RecordingHandlers:
    """
    The sink handler factory, recording each connection it serves.
    """

    def __init__(self, queue: SinkQueue) -> None:
        self.inner = SinkHandlerFactory(queue)
        self.served: list[IConnection] = []

    def __call__(self, conn: IConnection) -> ILineHandler:
        self.served.append(conn)
        return self.inner(conn)


def ssl_port(pki: TestPKI, cert: Path | None = None, key: Path | None = None) -> str:
    return (
        f"ssl:0:privateKey={key or pki.server_key}:"
        f"certKey={cert or pki.server_cert}:interface=127.0.0.1"
    )


def tls_session(
    port: int,
    context: ssl.SSLContext,
    before: bytes = b"",
    lines: bytes = b"",
    expect_reply: bool = False,
    landed: Callable[[], bool] | None = None,
) -> tuple[bytes, str | None]:
    """
    Connect, send C{before} in plaintext (a PROXY header, or STARTTLS and
    read its answer), handshake, send C{lines}, then read to the end
    (C{expect_reply}: the server closes), or, for a client that is let in,
    wait until C{landed()} (its lines are in the sink) and close.

    @return: what came back after the handshake, and the error if the
        handshake or the reading failed.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    received = b""
    try:
        if before:
            raw.sendall(before)
            if before.endswith(b"STARTTLS\n"):
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = raw.recv(1)
                    if not chunk:
                        return answer, "closed before the upgrade"
                    answer += chunk
                assert answer == b"OK starttls\n", answer
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(lines)
            if not expect_reply:
                assert landed is not None, "a client let in waits for its lines"
                wait_until(landed, "the client's lines in the sink")
                return received, None
            while chunk := conn.recv(4096):
                received += chunk
    except (OSError, ssl.SSLError) as error:
        return received, f"{type(error).__name__}: {error}"
    finally:
        raw.close()
    return received, None


def proxy_v2(source: str, source_port: int, port: int) -> bytes:
    """
    A binary PROXY protocol v2 header for TCP over IPv4 to 127.0.0.1.
    """
    addresses = (
        socket.inet_aton(source)
        + socket.inet_aton("127.0.0.1")
        + struct.pack("!HH", source_port, port)
    )
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    return signature + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


def plain_session(port: int, data: bytes, half_close: bool = False) -> bytes:
    """
    Send C{data} (then shut our write side, if C{half_close}), and read
    until the server closes or resets.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    return received


class SecurityConfigTests(SynchronousTestCase):
    def test_contradictions(self) -> None:
        """
        Combinations that cannot work are refused, naming the options.
        """
        tcp, tls = ["tcp:1"], ["ssl:1:privateKey=k"]
        cases = [
            (SecurityConfig(starttls=True), tcp, "--starttls needs --tls-cert"),
            (SecurityConfig(tls_cert="c.pem"), tcp, "--tls-cert and --tls-key are"),
            (SecurityConfig(tls_client_ca="ca.pem"), tcp, "--tls-client-ca needs"),
            (SecurityConfig(require_tls=True), tcp, "--require-tls would refuse"),
        ]
        for config, ports, words in cases:
            with self.assertRaises(SecurityConfigError) as caught:
                config.check(ports)
            self.assertIn(words, str(caught.exception))
        SecurityConfig(require_tls=True, tls_client_ca="ca.pem").check(tls)
        SecurityConfig(starttls=True, tls_cert="c", require_tls=True).check(tcp)

    def test_bad_files_named(self) -> None:
        """
        An unreadable token file, a bad network or a missing certificate
        stops the start with the culprit named.
        """
        cases = [
            (SecurityConfig(auth_tokens="/nonexistent/tokens"), "/nonexistent/tokens"),
            (SecurityConfig(allow=["10.1.2.3/8"]), "10.1.2.3/8"),
            (
                SecurityConfig(starttls=True, tls_cert="/nonexistent/cert.pem"),
                "/nonexistent/cert.pem",
            ),
        ]
        for config, culprit in cases:
            with self.assertRaises(SecurityConfigError) as caught:
                Security(config)
            self.assertIn(culprit, str(caught.exception))
        with self.assertRaises(SecurityConfigError) as caught:
            Security(SecurityConfig()).endpoint(
                reactor, "ssl:0:privateKey=/nonexistent/key.pem"
            )
        self.assertIn("/nonexistent/key.pem", str(caught.exception))

    def test_reload_keeps_tokens_on_bad_file(self) -> None:
        """
        A token file that became unusable keeps the tokens in use.
        """
        tokens = Path(temp_dir(self), "tokens")
        tokens.write_bytes(b"one\n")
        security = Security(SecurityConfig(auth_tokens=str(tokens)))
        check = security.policy().check_token
        assert check is not None
        tokens.write_bytes(b"two\n")
        self.assertTrue(security.reload())
        self.assertEqual((check(b"one"), check(b"two")), (False, True))
        tokens.write_bytes(b"# nothing\n")
        self.assertFalse(security.reload())
        self.assertTrue(check(b"two"))


class EmbeddedTLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = new_pki(self)
        self.sink = MemorySinkFactory()
        self.handlers: RecordingHandlers | None = None

    def build(self, queue: SinkQueue) -> RecordingHandlers:
        self.handlers = RecordingHandlers(queue)
        return self.handlers

    def start(self, ports: list[str], **config: Any) -> Deferred[LineServer]:
        return start_server(self, self.build, self.sink, ports=ports, **config)

    def good_client(self) -> ssl.SSLContext:
        return client_context(
            self.pki, cert=self.pki.client_cert, key=self.pki.client_key
        )

    @inlineCallbacks
    def test_mutual_tls_subject_reaches_handler(self) -> Any:
        """
        On a TLS port with client CAs, a client with a good certificate is
        served and its verified subject is in the connection's identity;
        one without a certificate is refused at the handshake, counted, and
        never gets a handler.
        """
        server = yield self.start(
            [ssl_port(self.pki)],
            security=SecurityConfig(tls_client_ca=str(self.pki.ca_cert)),
        )
        (port,) = server.port_numbers()
        _, error = yield deferToThread(
            tls_session,
            port,
            self.good_client(),
            lines=b"pos 1\npos 2\n",
            landed=lambda: len(self.sink.store) >= 2,
        )
        self.assertIsNone(error)
        _, error = yield deferToThread(
            tls_session,
            port,
            client_context(self.pki),
            lines=b"stolen\n",
            expect_reply=True,
        )
        self.assertIsNotNone(error)
        yield eventually(
            lambda: server.stats.get("tls.refused") >= 1, "the refusal counted"
        )
        self.assertEqual(self.sink.store, [b"pos 1", b"pos 2"])
        assert self.handlers is not None
        (conn,) = self.handlers.served
        self.assertEqual(conn.tls_subject, self.pki.client_subject)
        self.assertIn(f"({self.pki.client_subject})", conn.identity)
        self.assertEqual(server.stats.get("tls.refused"), 1)
        self.assertEqual(server.stats.get("tls.handshakes"), 1)

    @inlineCallbacks
    def test_handshake_deadline_at_accept(self) -> Any:
        """
        A client that stalls mid-handshake on a TLS port is aborted when
        the handshake timeout expires, and holds no handler meanwhile.
        """
        server = yield self.start(
            [ssl_port(self.pki)],
            settings=ProtocolSettings(handshake_timeout=0.5),
        )
        (port,) = server.port_numbers()
        hello = client_hello(client_context(self.pki))

        def stall() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(hello[: len(hello) // 2])
                started = time.monotonic()
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                return data, time.monotonic() - started

        data, elapsed = yield deferToThread(stall)
        self.assertEqual(data, b"")
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertLess(elapsed, 4.0)
        self.assertEqual(server.stats.get("timeouts.handshake"), 1)
        assert self.handlers is not None
        self.assertEqual(self.handlers.served, [])

    @inlineCallbacks
    def test_plaintext_on_tls_port(self) -> Any:
        """
        Plaintext on a TLS port is closed at once with nothing delivered.
        """
        server = yield self.start([ssl_port(self.pki)])
        (port,) = server.port_numbers()
        started = time.monotonic()
        received = yield deferToThread(plain_session, port, b"not tls\n")
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertNotIn(b"not tls", received)
        yield eventually(
            lambda: server.stats.get("tls.refused") >= 1, "the refusal counted"
        )
        self.assertEqual(self.sink.store, [])
        self.assertEqual(server.stats.get("tls.refused"), 1)
        # A port probe (connect, close) is no refusal: counted apart.
        yield deferToThread(
            lambda: socket.create_connection(("127.0.0.1", port)).close()
        )
        yield eventually(
            lambda: server.stats.get("tls.abandoned") >= 1, "the probe counted"
        )
        self.assertEqual(server.stats.get("tls.abandoned"), 1)
        self.assertEqual(server.stats.get("tls.refused"), 1)

    @inlineCallbacks
    def test_proxy_header_before_tls(self) -> Any:
        """
        Behind HAProxy (PROXY header, then TLS), the allow list judges the
        address in the header, after the handshake.
        """
        server = yield self.start(
            [f"haproxy:{ssl_port(self.pki)}"],
            security=SecurityConfig(allow=["10.0.0.0/8"]),
        )
        (port,) = server.port_numbers()
        allowed = b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 4443\r\n"
        refused = b"PROXY TCP4 192.0.2.9 127.0.0.1 40001 4443\r\n"
        _, error = yield deferToThread(
            tls_session,
            port,
            client_context(self.pki),
            allowed,
            b"from 10/8\n",
            landed=lambda: self.sink.store == [b"from 10/8"],
        )
        self.assertIsNone(error)
        started = time.monotonic()
        received, _ = yield deferToThread(
            tls_session,
            port,
            client_context(self.pki),
            refused,
            b"from outside\n",
            True,
        )
        self.assertEqual(received, b"ERR forbidden\n")
        # Closed by a TLS close, not by the 5 s abort of a stuck close.
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertEqual(self.sink.store, [b"from 10/8"])
        assert self.handlers is not None
        (conn,) = self.handlers.served
        self.assertIn("10.1.2.3:40000", conn.identity)
        self.assertEqual(server.stats.get("connections.refused.forbidden"), 1)

    @inlineCallbacks
    def test_proxy_header_judged_on_arrival(self) -> Any:
        """
        On a plain haproxy: port the client is judged when its PROXY header
        (v1 or v2) arrives, not at its first line: a refused one hears so at once, an
        admitted one may stay quiet past the header deadline; a peer that
        never sends the header is aborted at that deadline.
        """
        server = yield self.start(
            ["haproxy:tcp:0:interface=127.0.0.1"],
            security=SecurityConfig(allow=["10.0.0.0/8"]),
            settings=ProtocolSettings(handshake_timeout=0.3),
        )
        (port,) = server.port_numbers()
        refused = yield deferToThread(
            plain_session, port, b"PROXY TCP4 192.0.2.9 127.0.0.1 40001 4040\r\n"
        )
        self.assertEqual(refused, b"ERR forbidden\n")

        def quiet_then_line() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"PROXY TCP4 10.9.8.7 127.0.0.1 40002 4040\r\n")
                # Quiet past the header deadline: the pace of the client.
                time.sleep(0.6)
                sock.sendall(b"late but fine\n")
                sock.shutdown(socket.SHUT_WR)
                return sock.recv(100)

        v2_refused = yield deferToThread(
            plain_session, port, proxy_v2("192.0.2.10", 40003, 4040)
        )
        self.assertEqual(v2_refused, b"ERR forbidden\n")
        yield deferToThread(
            plain_session,
            port,
            proxy_v2("10.7.7.7", 40004, 4040) + b"v2 line\n",
            True,
        )
        received = yield deferToThread(quiet_then_line)
        self.assertEqual(received, b"")
        silent = yield deferToThread(plain_session, port, b"")
        self.assertEqual(silent, b"")
        yield eventually(lambda: len(self.sink.store) >= 2, "two lines in the sink")
        self.assertEqual(sorted(self.sink.store), [b"late but fine", b"v2 line"])
        self.assertEqual(server.stats.get("timeouts.proxy"), 1)

    @inlineCallbacks
    def test_starttls_required_and_tokens(self) -> Any:
        """
        With --starttls, --require-tls and tokens: a plaintext line is
        refused; STARTTLS, then AUTH, then lines: only those lines land.
        """
        tokens = Path(self.pki.directory, "tokens")
        tokens.write_bytes(b"s3cret\n")
        server = yield self.start(
            ["tcp:0:interface=127.0.0.1"],
            security=SecurityConfig(
                starttls=True,
                tls_cert=str(self.pki.server_cert),
                tls_key=str(self.pki.server_key),
                require_tls=True,
                auth_tokens=str(tokens),
            ),
        )
        (port,) = server.port_numbers()
        received = yield deferToThread(plain_session, port, b"plain line\n")
        self.assertEqual(received, b"ERR tls-required\n")
        _, error = yield deferToThread(
            tls_session,
            port,
            client_context(self.pki),
            b"STARTTLS\n",
            b"AUTH s3cret\nsecure line\n",
            landed=lambda: self.sink.store == [b"secure line"],
        )
        self.assertIsNone(error)
        received, _ = yield deferToThread(
            tls_session,
            port,
            client_context(self.pki),
            b"STARTTLS\n",
            b"AUTH wrong\nsneaky line\n",
            True,
        )
        self.assertEqual(received, b"ERR unauthorized\n")
        self.assertEqual(self.sink.store, [b"secure line"])

    @inlineCallbacks
    def test_reload(self) -> Any:
        """
        LineServer.reload serves a renewed certificate to new connections;
        a broken one is refused and the renewed one stays in use.
        """
        cert = Path(self.pki.directory, "live.pem")
        key = Path(self.pki.directory, "live.key")
        cert.write_bytes(self.pki.server_cert.read_bytes())
        key.write_bytes(self.pki.server_key.read_bytes())
        server = yield start_server(
            self, "echo", None, ports=[ssl_port(self.pki, cert, key)]
        )
        (port,) = server.port_numbers()
        first = yield deferToThread(run_client, port, client_context(self.pki))
        self.assertEqual(first.server_serial, self.pki.server_serial)
        new_cert, new_key, serial = make_server_cert(self.pki)
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        self.assertTrue(server.reload())
        second = yield deferToThread(run_client, port, client_context(self.pki))
        self.assertEqual((second.server_serial, second.echoed), (serial, b"hello\n"))
        cert.write_bytes(b"not a certificate\n")
        self.assertFalse(server.reload())
        third = yield deferToThread(run_client, port, client_context(self.pki))
        self.assertEqual((third.server_serial, third.echoed), (serial, b"hello\n"))


class HangupReloadTests(TestCase):
    def test_installed_only_while_running(self) -> None:
        """
        The handler is installed once the reactor runs and the previous
        one is back after stop.
        """
        before = signal.getsignal(signal.SIGHUP)
        clock = Clock()
        calls: list[None] = []

        class Reactor:
            def callWhenRunning(self, f: Any) -> None:  # noqa: N802
                clock.callLater(0, f)

            def callFromThread(self, f: Any) -> None:  # noqa: N802
                f()

        service = HangupReload(Reactor(), lambda: calls.append(None))
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        clock.advance(0)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    @inlineCallbacks
    def test_sighup_reloads(self) -> Any:
        """
        A real SIGHUP to this process calls reload from the reactor; a
        reload that raises is logged, not fatal.
        """
        calls: list[str] = []
        reloaded: Deferred[None] = Deferred()

        def reload() -> None:
            calls.append("reload")
            if len(calls) == 1:
                raise RuntimeError("boom")
            reloaded.callback(None)

        before = signal.getsignal(signal.SIGHUP)
        service = HangupReload(reactor, reload)
        service.startService()
        self.addCleanup(service.stopService)
        yield eventually(
            lambda: signal.getsignal(signal.SIGHUP) != before, "the handler installed"
        )
        os.kill(os.getpid(), signal.SIGHUP)
        # Two signals in a row may be one: the second after the first ran.
        yield eventually(lambda: calls == ["reload"], "the first reload")
        os.kill(os.getpid(), signal.SIGHUP)
        yield reloaded.addTimeout(5, reactor)
        self.assertEqual(calls, ["reload", "reload"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
