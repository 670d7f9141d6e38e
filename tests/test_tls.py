"""TLS building blocks: loading, TLS 1.2 floor, client certificates, reload,
the handshake deadline, and TLS over an upgraded (STARTTLS) connection.

The real-socket tests listen on 127.0.0.1 with a trivial echo protocol and
connect with Python's blocking C{ssl} module in a thread (every socket
operation has a timeout, see L{tests.tls_clients}), so the client is a TLS
stack independent of the server's.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from typing_extensions import override
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lineserver.tls import (
    ReloadableServerTLS,
    TLSConfigError,
    load_credentials,
    load_server_options,
    peer_subject,
    split_ssl_description,
    ssl_server_endpoint,
    tls_failure_text,
    tls_server_endpoint,
)
from tests.certs import (
    cert_pem,
    issue,
    key_pem,
    load_issuer,
    make_server_cert,
    new_key,
)
from tests.tls_clients import (
    SOCKET_TIMEOUT,
    ClientResult,
    client_context,
    client_hello,
    new_pki,
    run_client,
)

reactor: Any = _reactor


# -- the server side: an echo protocol that tells what happened ---------------


@implementer(IHandshakeListener)
class Echo(Protocol):
    """
    Echoes bytes; records the handshake, the client subject, and the loss.
    """

    factory: EchoFactory

    def __init__(self) -> None:
        self.handshake_done = False
        self.subject: str | None = None
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.deadline: IDelayedCall | None = None
        self.expired = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        timeout = self.factory.handshake_timeout
        if timeout is not None:
            self.deadline = reactor.callLater(timeout, self.expire)

    def expire(self) -> None:
        self.expired = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.subject = peer_subject(self.transport)
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.reason = reason
        self.lost.callback(None)


class EchoFactory(Factory):
    def __init__(self, handshake_timeout: float | None = None) -> None:
        self.handshake_timeout = handshake_timeout
        self.connections: list[Echo] = []

    @override
    def buildProtocol(self, addr: IAddress | None) -> Echo:  # type: ignore[override]
        protocol = Echo()
        protocol.factory = self
        return protocol


@implementer(IHandshakeListener)
class StartTLSEcho(LineReceiver):
    """
    Plain lines until C{STARTTLS}; then C{OK starttls}, TLS, and echo.
    """

    delimiter = b"\n"

    def __init__(self, tls: ReloadableServerTLS) -> None:
        self.tls = tls
        self.subject: str | None = None
        self.handshake_done = False
        self.plain_lines: list[bytes] = []
        self.tls_lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        if self.handshake_done:
            self.tls_lines.append(line)
            self.sendLine(line)
        elif line == b"STARTTLS":
            self.sendLine(b"OK starttls")
            self.transport.startTLS(self.tls)  # type: ignore[union-attr]
        else:
            self.plain_lines.append(line)
            self.sendLine(b"plain " + line)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.subject = peer_subject(self.transport)


# -- the client side: blocking Python ssl in a thread -------------------------


def client(port: int, context: ssl.SSLContext, **kw: Any) -> Deferred[ClientResult]:
    """
    L{run_client} in a thread.
    """
    return deferToThread(run_client, port, context, **kw)


class TLSTestCase(TestCase):
    """
    Real loopback sockets; a fresh PKI per test.
    """

    timeout = 20

    def setUp(self) -> None:
        self.pki = new_pki(self)

    def listen_tls(
        self, tls: ReloadableServerTLS, factory: EchoFactory | None = None
    ) -> Deferred[tuple[int, EchoFactory]]:
        """
        Listen on 127.0.0.1 through L{tls_server_endpoint}.
        """
        factory = factory or EchoFactory()
        endpoint = tls_server_endpoint(reactor, "tcp:0:interface=127.0.0.1", tls)
        d = endpoint.listen(factory)

        def listening(port: IListeningPort) -> tuple[int, EchoFactory]:
            self.addCleanup(port.stopListening)
            return port.getHost().port, factory  # type: ignore[attr-defined]

        return d.addCallback(listening)

    def server(self, **kw: Any) -> ReloadableServerTLS:
        return ReloadableServerTLS(self.pki.server_cert, self.pki.server_key, **kw)


# -- TLS at accept ------------------------------------------------------------


class AcceptTests(TLSTestCase):
    @inlineCallbacks
    def test_good_client(self) -> Any:
        """
        A client trusting our CA completes the handshake with TLS 1.2 or
        later, its line is echoed, the server saw C{handshakeCompleted}, and
        without mutual TLS there is no client subject.
        """
        port, factory = yield self.listen_tls(self.server())
        result = yield client(port, client_context(self.pki))
        self.assertIsNone(result.error)
        self.assertIn(result.version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(result.echoed, b"hello\n")
        self.assertEqual(result.server_serial, self.pki.server_serial)
        (echo,) = factory.connections
        yield echo.lost
        self.assertTrue(echo.handshake_done)
        self.assertIsNone(echo.subject)

    @inlineCallbacks
    def test_tls12_is_enough(self) -> Any:
        """
        TLS 1.2 is the floor, not above it: a TLS 1.2-only client is served.
        """
        port, _ = yield self.listen_tls(self.server())
        result = yield client(port, client_context(self.pki, max_tls12=True))
        self.assertIsNone(result.error)
        self.assertEqual(result.version, "TLSv1.2")
        self.assertEqual(result.echoed, b"hello\n")

    @inlineCallbacks
    def test_tls11_refused(self) -> Any:
        """
        A client offering only TLS 1.1 fails the handshake; the server never
        completes one and echoes nothing.
        """
        port, factory = yield self.listen_tls(self.server())
        result = yield client(port, client_context(self.pki, tls11_only=True))
        self.assertIsNotNone(result.error)
        self.assertIsNone(result.version)
        self.assertEqual(result.echoed, b"")
        (echo,) = factory.connections
        yield echo.lost
        self.assertFalse(echo.handshake_done)
        assert echo.reason is not None
        self.assertIn("protocol", tls_failure_text(echo.reason) or "")

    def test_tls11_client_really_offers_tls11(self) -> Deferred[None]:
        """
        The control for L{test_tls11_refused}: the same client context does
        complete TLS 1.1 with a server that accepts it (Python's own, in a
        thread), so its refusal above is the server's doing.
        """
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.minimum_version = ssl.TLSVersion.TLSv1_1
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
        server.load_cert_chain(str(self.pki.server_cert), str(self.pki.server_key))
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(SOCKET_TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(SOCKET_TIMEOUT)
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(100))
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, SOCKET_TIMEOUT)
        d = client(listener.getsockname()[1], client_context(self.pki, tls11_only=True))

        def check(result: ClientResult) -> None:
            self.assertIsNone(result.error)
            self.assertEqual(result.version, "TLSv1.1")
            self.assertEqual(result.echoed, b"hello\n")

        return d.addCallback(check)

    @inlineCallbacks
    def test_twisted_ssl_endpoint_refuses_tls11(self) -> Any:
        """
        Twisted 26.10's own C{ssl:} endpoint string also has TLS 1.2 as its
        floor (its C{CertificateOptions} default): a TLS 1.1 client is
        refused there and a TLS 1.2 client is served.
        """
        description = (
            f"ssl:0:privateKey={self.pki.server_key}:certKey={self.pki.server_cert}"
            ":interface=127.0.0.1"
        )
        factory = EchoFactory()
        port = yield serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        old = yield client(number, client_context(self.pki, tls11_only=True))
        self.assertIsNotNone(old.error)
        self.assertIsNone(old.version)
        new = yield client(number, client_context(self.pki, max_tls12=True))
        self.assertIsNone(new.error)
        self.assertEqual(new.version, "TLSv1.2")

    @inlineCallbacks
    def test_ssl_server_endpoint(self) -> Any:
        """
        An C{ssl:} description through L{ssl_server_endpoint} listens with
        our context: TLS 1.1 refused, a good client served, and the context
        returned is the one that serves it.
        """
        description = (
            f"ssl:0:privateKey={self.pki.server_key}:certKey={self.pki.server_cert}"
            ":interface=127.0.0.1"
        )
        endpoint, tls = ssl_server_endpoint(reactor, description)
        self.assertEqual(tls.certificate.serial_number, self.pki.server_serial)
        port = yield endpoint.listen(EchoFactory())
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        old = yield client(number, client_context(self.pki, tls11_only=True))
        self.assertIsNotNone(old.error)
        good = yield client(number, client_context(self.pki))
        self.assertIsNone(good.error)
        self.assertEqual(good.echoed, b"hello\n")

    @inlineCallbacks
    def test_tls_memory_bio_factory(self) -> Any:
        """
        L{ReloadableServerTLS} also works handed straight to
        C{TLSMemoryBIOFactory} (as a listener building its own port would).
        """
        factory = EchoFactory()
        port = reactor.listenTCP(
            0, TLSMemoryBIOFactory(self.server(), False, factory), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        result = yield client(port.getHost().port, client_context(self.pki))
        self.assertIsNone(result.error)
        self.assertEqual(result.echoed, b"hello\n")


# -- client certificates ------------------------------------------------------


class MutualTLSTests(TLSTestCase):
    def mutual(self) -> ReloadableServerTLS:
        return self.server(client_ca_path=self.pki.ca_cert)

    @inlineCallbacks
    def assert_refused(self, context: ssl.SSLContext, why: str) -> Any:
        """
        The client fails, nothing is echoed, the server never completes
        the handshake, and OpenSSL's reason on the server's side says C{why}.
        """
        port, factory = yield self.listen_tls(self.mutual())
        result = yield client(port, context)
        self.assertIsNotNone(result.error)
        self.assertEqual(result.echoed, b"")
        (echo,) = factory.connections
        yield echo.lost
        self.assertFalse(echo.handshake_done)
        self.assertIsNone(echo.subject)
        assert echo.reason is not None
        self.assertIn(why, tls_failure_text(echo.reason) or "")

    def test_no_client_certificate(self) -> Deferred[None]:
        """
        With a client CA, a client without a certificate is refused at the
        handshake: nothing echoed, no completed handshake on the server.
        """
        return self.assert_refused(client_context(self.pki), "certificate")

    def test_other_ca(self) -> Deferred[None]:
        """
        A client certificate from another CA is refused at the handshake.
        """
        return self.assert_refused(
            client_context(
                self.pki,
                cert=self.pki.other_client_cert,
                key=self.pki.other_client_key,
            ),
            "certificate verify failed",
        )

    @inlineCallbacks
    def test_good_certificate_subject(self) -> Any:
        """
        A client certificate from our CA is accepted, and L{peer_subject}
        gives its subject, most specific first.
        """
        port, factory = yield self.listen_tls(self.mutual())
        context = client_context(
            self.pki, cert=self.pki.client_cert, key=self.pki.client_key
        )
        result = yield client(port, context)
        self.assertIsNone(result.error)
        self.assertEqual(result.echoed, b"hello\n")
        (echo,) = factory.connections
        yield echo.lost
        self.assertTrue(echo.handshake_done)
        self.assertEqual(echo.subject, "CN=vehicle-17,O=lineserver tests")
        self.assertEqual(echo.subject, self.pki.client_subject)

    def test_only_the_given_cas(self) -> None:
        """
        The client CA file is the only trust: the server's context trusts
        exactly its certificates and requires a client certificate.
        """
        tls = self.mutual()
        self.assertTrue(tls.mutual)
        self.assertEqual(
            [c.serial_number for c in tls.credentials.client_cas],
            [
                x509.load_pem_x509_certificate(
                    self.pki.ca_cert.read_bytes()
                ).serial_number
            ],
        )
        self.assertFalse(self.server().mutual)


# -- STARTTLS: TLS on an established connection -------------------------------


class StartTLSTests(TLSTestCase):
    def run_starttls(
        self, port: int, context: ssl.SSLContext
    ) -> tuple[bytes, bytes, bytes, str | None]:
        """
        Plain line, STARTTLS, then a line over TLS (blocking, bounded).
        """
        raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        try:
            reader = raw.makefile("rb")
            raw.sendall(b"before\n")
            plain = reader.readline()
            raw.sendall(b"STARTTLS\n")
            ok = reader.readline()
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                conn.sendall(b"after\n")
                echoed = b""
                while not echoed.endswith(b"\n"):
                    data = conn.recv(100)
                    if not data:
                        break
                    echoed += data
                return plain, ok, echoed, conn.version()
        finally:
            raw.close()

    @inlineCallbacks
    def test_starttls_with_client_certificate(self) -> Any:
        """
        C{transport.startTLS(ReloadableServerTLS)} upgrades a plain
        connection: the plain line stays plain, the TLS line is echoed over
        TLS, C{handshakeCompleted} is called, and the client subject is
        known afterwards.
        """
        tls = self.server(client_ca_path=self.pki.ca_cert)
        protocols: list[StartTLSEcho] = []

        def build() -> StartTLSEcho:
            protocol = StartTLSEcho(tls)
            protocols.append(protocol)
            return protocol

        factory = Factory.forProtocol(build)  # type: ignore[arg-type]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        context = client_context(
            self.pki, cert=self.pki.client_cert, key=self.pki.client_key
        )
        plain, ok, echoed, version = yield deferToThread(
            self.run_starttls, port.getHost().port, context
        )
        self.assertEqual(plain, b"plain before\n")
        self.assertEqual(ok, b"OK starttls\n")
        self.assertEqual(echoed, b"after\n")
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        (protocol,) = protocols
        self.assertTrue(protocol.handshake_done)
        self.assertEqual(protocol.subject, self.pki.client_subject)
        self.assertEqual(protocol.plain_lines, [b"before"])
        self.assertEqual(protocol.tls_lines, [b"after"])


# -- reload -------------------------------------------------------------------


class ReloadTests(TLSTestCase):
    def install(self, cert: Path, key: Path, tls: ReloadableServerTLS) -> None:
        Path(tls.cert_path).write_bytes(cert.read_bytes())
        Path(tls.key_path).write_bytes(key.read_bytes())

    @inlineCallbacks
    def test_new_certificate_for_new_connections(self) -> Any:
        """
        After L{ReloadableServerTLS.reload} a new connection is served the
        new certificate (a new serial), while a connection made before the
        reload goes on working.
        """
        tls = self.server()
        port, _ = yield self.listen_tls(tls)
        held = threading.Event()
        release = threading.Event()

        def hold() -> None:
            held.set()
            release.wait(SOCKET_TIMEOUT)

        old_d = client(port, client_context(self.pki), between=hold)
        try:
            yield deferToThread(held.wait, SOCKET_TIMEOUT)
            self.assertTrue(held.is_set())
            cert, key, serial = make_server_cert(self.pki)
            self.install(cert, key, tls)
            tls.reload()
            self.assertEqual(tls.certificate.serial_number, serial)
            new = yield client(port, client_context(self.pki))
        finally:
            release.set()
        old = yield old_d
        self.assertIsNone(new.error)
        self.assertEqual(new.server_serial, serial)
        self.assertIsNone(old.error)
        self.assertEqual(old.server_serial, self.pki.server_serial)
        self.assertEqual(old.echoed, b"hello\n")

    @inlineCallbacks
    def test_bad_certificate_keeps_the_old(self) -> Any:
        """
        A reload from a broken certificate file raises L{TLSConfigError},
        and new connections are still served the old certificate.
        """
        tls = self.server()
        port, _ = yield self.listen_tls(tls)
        Path(tls.cert_path).write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        error = self.assertRaises(TLSConfigError, tls.reload)
        self.assertIn(str(self.pki.server_cert), str(error))
        result = yield client(port, client_context(self.pki))
        self.assertIsNone(result.error)
        self.assertEqual(result.server_serial, self.pki.server_serial)

    @inlineCallbacks
    def test_mismatched_key_keeps_the_old(self) -> Any:
        """
        A new certificate installed without its new key is refused on
        reload (the key does not match), and the old pair stays in use.
        """
        tls = self.server()
        port, _ = yield self.listen_tls(tls)
        cert, _key, _serial = make_server_cert(self.pki)
        Path(tls.cert_path).write_bytes(cert.read_bytes())
        error = self.assertRaises(TLSConfigError, tls.reload)
        self.assertIn("does not match", str(error))
        self.assertEqual(tls.certificate.serial_number, self.pki.server_serial)
        result = yield client(port, client_context(self.pki))
        self.assertEqual(result.server_serial, self.pki.server_serial)
        self.assertEqual(result.echoed, b"hello\n")


class StalledClientTests(TLSTestCase):
    def connect_and_wait(self, port: int, send: bytes) -> tuple[bytes, float]:
        """
        Connect, send C{send}, and wait (bounded) until the server closes.

        @return: what the server sent, and how long it took to close.
        """
        started = time.monotonic()
        raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        received = b""
        try:
            if send:
                raw.sendall(send)
            while True:
                try:
                    data = raw.recv(4096)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
        finally:
            raw.close()
        return received, time.monotonic() - started

    @inlineCallbacks
    def assert_aborted_by_deadline(self, send: bytes) -> Any:
        """
        A client that sends C{send} and then nothing is aborted by the
        handshake deadline (0.5 s here), well before its own 5 s timeout.
        """
        port, factory = yield self.listen_tls(
            self.server(), EchoFactory(handshake_timeout=0.5)
        )
        received, elapsed = yield deferToThread(self.connect_and_wait, port, send)
        self.assertEqual(received, b"")
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertLess(elapsed, 3.0)
        (echo,) = factory.connections
        yield echo.lost
        self.assertTrue(echo.expired)
        self.assertFalse(echo.handshake_done)

    def test_silent_client_aborted(self) -> Any:
        """
        A client that connects and sends nothing is aborted.
        """
        return self.assert_aborted_by_deadline(b"")

    def test_stalled_mid_handshake_aborted(self) -> Any:
        """
        A client that sends half of a real ClientHello and then stalls is
        aborted too.
        """
        hello = client_hello(client_context(self.pki))
        return self.assert_aborted_by_deadline(hello[: len(hello) // 2])

    @inlineCallbacks
    def test_plaintext_client_closed(self) -> Any:
        """
        A client that sends plaintext instead of a ClientHello is closed at
        once by the TLS layer (well under a second), with no handshake; the
        deadline is not what closed it.
        """
        port, factory = yield self.listen_tls(
            self.server(), EchoFactory(handshake_timeout=10)
        )
        received, elapsed = yield deferToThread(
            self.connect_and_wait, port, b"hello, this is not TLS\n"
        )
        self.assertNotIn(b"hello", received)
        self.assertLess(elapsed, 1.0)
        (echo,) = factory.connections
        yield echo.lost
        self.assertFalse(echo.handshake_done)
        assert echo.deadline is not None
        self.assertFalse(echo.expired)
        assert echo.reason is not None
        self.assertIsNotNone(tls_failure_text(echo.reason))


# -- loading and validation ---------------------------------------------------


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = new_pki(self)
        self.dir = self.pki.directory

    def test_valid(self) -> None:
        """
        Good files give options with TLS 1.2 as the floor and, with a
        client CA, a required and verified client certificate.
        """
        options = load_server_options(
            self.pki.server_cert, self.pki.server_key, self.pki.ca_cert
        )
        self.assertTrue(options.verify)
        self.assertTrue(options.requireCertificate)
        plain = load_server_options(self.pki.server_cert, self.pki.server_key)
        self.assertFalse(plain.verify)
        # OpenSSL's option bits that switch off TLS 1.0 and 1.1 are set
        # (setting no new bit returns the bits in force).
        bits = plain.getContext().set_options(0)
        self.assertTrue(bits & SSL.OP_NO_TLSv1)
        self.assertTrue(bits & SSL.OP_NO_TLSv1_1)
        self.assertFalse(bits & SSL.OP_NO_TLSv1_2)

    def test_missing_file(self) -> None:
        """
        A missing file is named, with the system's reason.
        """
        missing = self.dir / "nope.pem"
        error = self.assertRaises(
            TLSConfigError, load_server_options, missing, self.pki.server_key
        )
        self.assertIn(str(missing), str(error))
        self.assertIn("No such file", str(error))
        error = self.assertRaises(
            TLSConfigError,
            load_server_options,
            self.pki.server_cert,
            self.pki.server_key,
            missing,
        )
        self.assertIn("client CA file", str(error))

    def test_not_pem(self) -> None:
        """
        A certificate or key file without PEM in it is named.
        """
        junk = self.dir / "junk.pem"
        junk.write_bytes(b"not a certificate\n")
        error = self.assertRaises(
            TLSConfigError, load_server_options, junk, self.pki.server_key
        )
        self.assertIn(f"certificate file {junk}", str(error))
        error = self.assertRaises(
            TLSConfigError, load_server_options, self.pki.server_cert, junk
        )
        self.assertIn(f"key file {junk}", str(error))

    def test_key_does_not_match(self) -> None:
        """
        A key that is not the certificate's is refused, naming both files.
        """
        error = self.assertRaises(
            TLSConfigError,
            load_server_options,
            self.pki.server_cert,
            self.pki.client_key,
        )
        self.assertIn(str(self.pki.client_key), str(error))
        self.assertIn(str(self.pki.server_cert), str(error))
        self.assertIn("does not match", str(error))

    def test_expired(self) -> None:
        """
        An expired certificate is refused with its expiry date.
        """
        cert, key, _ = make_server_cert(self.pki, "expired", valid_days=-1)
        error = self.assertRaises(TLSConfigError, load_server_options, cert, key)
        self.assertIn("expired", str(error))
        self.assertIn(str(cert), str(error))

    def test_encrypted_key(self) -> None:
        """
        An encrypted key is refused with that reason (there is no prompt).
        """
        key = serialization.load_pem_private_key(self.pki.server_key.read_bytes(), None)
        encrypted = self.dir / "encrypted.key"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        error = self.assertRaises(
            TLSConfigError, load_server_options, self.pki.server_cert, encrypted
        )
        self.assertIn("encrypted", str(error))

    def test_combined_file_and_chain(self) -> None:
        """
        One file holding key and certificate works for both (Twisted's
        C{privateKey=} alone); certificates after the first are its chain.
        """
        combined = self.dir / "combined.pem"
        combined.write_bytes(
            self.pki.server_key.read_bytes()
            + self.pki.server_cert.read_bytes()
            + self.pki.ca_cert.read_bytes()
        )
        credentials = load_credentials(combined, combined)
        self.assertEqual(credentials.certificate.serial_number, self.pki.server_serial)
        self.assertEqual(len(credentials.chain), 1)

    def test_rsa_key(self) -> None:
        """
        RSA keys work as well as EC ones.
        """
        from cryptography.hazmat.primitives.asymmetric import rsa

        ca = load_issuer(self.pki.ca_cert, self.pki.ca_key)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert, _ = issue(ca, "localhost", server=True, key=rsa_key)  # type: ignore[arg-type]
        cert_path = self.dir / "rsa.pem"
        key_path = self.dir / "rsa.key"
        cert_path.write_bytes(cert_pem(cert))
        key_path.write_bytes(key_pem(rsa_key))  # type: ignore[arg-type]
        tls = ReloadableServerTLS(cert_path, key_path)
        self.assertEqual(tls.certificate.serial_number, cert.serial_number)

    def test_reloadable_interfaces(self) -> None:
        """
        L{ReloadableServerTLS} provides both the connection-creator interface
        (TLSMemoryBIOFactory, wrapServerTLS) and the context factory one.
        """
        tls = ReloadableServerTLS(self.pki.server_cert, self.pki.server_key)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, tls))
        self.assertTrue(verifyObject(IOpenSSLContextFactory, tls))
        self.assertIn("CN=localhost", tls.describe())

    def test_reload_reads_the_client_ca_again(self) -> None:
        """
        The client CA file is read again on reload too (a CA rotated on
        disk takes effect for new connections).
        """
        ca_path = self.dir / "client-ca.pem"
        ca_path.write_bytes(self.pki.ca_cert.read_bytes())
        tls = ReloadableServerTLS(self.pki.server_cert, self.pki.server_key, ca_path)
        ca_path.write_bytes(self.pki.other_ca_cert.read_bytes())
        tls.reload()
        other = x509.load_pem_x509_certificate(self.pki.other_ca_cert.read_bytes())
        self.assertEqual(tls.credentials.client_cas, (other,))
        ca_path.write_bytes(b"")
        error = self.assertRaises(TLSConfigError, tls.reload)
        self.assertIn(f"client CA file {ca_path}", str(error))
        self.assertEqual(tls.credentials.client_cas, (other,))

    def test_bad_first_load_raises(self) -> None:
        """
        With no good certificate to fall back on, construction raises.
        """
        self.assertRaises(
            TLSConfigError,
            ReloadableServerTLS,
            self.pki.server_cert,
            self.pki.client_key,
        )


# -- peer_subject without sockets ---------------------------------------------


class FakeTLSTransport(StringTransport):
    """
    Just enough of a TLS transport for L{peer_subject}.
    """

    def __init__(self, peer: crypto.X509 | None, verified: bool = True) -> None:
        super().__init__()
        self._peer = peer
        self._verified = verified

    def getPeerCertificate(self) -> crypto.X509 | None:  # noqa: N802
        return self._peer

    def getHandle(self) -> Any:  # noqa: N802
        verified = self._verified
        peer = self._peer

        class Handle:
            def get_verified_chain(self) -> list[crypto.X509] | None:
                return [peer] if verified and peer is not None else None

        return Handle()


class PeerSubjectTests(SynchronousTestCase):
    def certificate(self, common_name: str) -> crypto.X509:
        pki = new_pki(self)
        ca = load_issuer(pki.ca_cert, pki.ca_key)
        cert, _ = issue(ca, common_name, server=False, key=new_key())
        return crypto.X509.from_cryptography(cert)

    def test_plain_transport(self) -> None:
        """
        A transport without TLS has no subject.
        """
        self.assertIsNone(peer_subject(StringTransport()))
        self.assertIsNone(peer_subject(object()))

    def test_verified(self) -> None:
        """
        A verified certificate's subject is reported, most specific first.
        """
        transport = FakeTLSTransport(self.certificate("vehicle-17"))
        self.assertEqual(peer_subject(transport), "CN=vehicle-17,O=lineserver tests")

    def test_no_certificate(self) -> None:
        """
        TLS without a client certificate has no subject.
        """
        self.assertIsNone(peer_subject(FakeTLSTransport(None)))

    def test_unverified(self) -> None:
        """
        A certificate OpenSSL did not verify is not reported as a subject.
        """
        transport = FakeTLSTransport(self.certificate("x"), verified=False)
        self.assertIsNone(peer_subject(transport))

    def test_failure_text(self) -> None:
        """
        L{tls_failure_text} gives OpenSSL's reasons for a TLS error, and
        None for any other way a connection ends.
        """
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(tls_failure_text(Failure(error)), "certificate verify failed")
        self.assertIsNone(tls_failure_text(Failure(ConnectionLost())))

    def test_escaping(self) -> None:
        """
        Special characters in a name are escaped (RFC 4514), so a CN cannot
        pose as another attribute in a log line.
        """
        transport = FakeTLSTransport(self.certificate("evil,O=admins"))
        self.assertEqual(
            peer_subject(transport), r"CN=evil\,O=admins,O=lineserver tests"
        )


# -- endpoint descriptions ----------------------------------------------------


class DescriptionTests(SynchronousTestCase):
    def test_split_ssl(self) -> None:
        """
        C{ssl:} parameters are split into a plain TCP description and the
        file names; the interface is quoted again for the TCP parser.
        """
        spec = split_ssl_description(
            r"ssl:4443:privateKey=/k/key.pem:certKey=/k/cert.pem:interface=\:\:1"
            ":backlog=7:extraCertChain=/k/chain.pem"
        )
        self.assertEqual(spec.plain, r"tcp:4443:interface=\:\:1:backlog=7")
        self.assertEqual(spec.key_path, "/k/key.pem")
        self.assertEqual(spec.cert_path, "/k/cert.pem")
        self.assertEqual(spec.chain_path, "/k/chain.pem")
        endpoint = serverFromString(reactor, spec.plain)
        self.assertEqual(endpoint._interface, "::1")  # type: ignore[attr-defined]

    def test_split_defaults_and_haproxy(self) -> None:
        """
        Twisted's defaults hold (C{certKey} is C{privateKey}, which is
        C{server.pem}); a C{haproxy:} prefix stays in front of C{tcp:}.
        """
        spec = split_ssl_description("haproxy:ssl:4443")
        self.assertEqual(spec.plain, "haproxy:tcp:4443")
        self.assertEqual((spec.cert_path, spec.key_path), ("server.pem", "server.pem"))
        spec = split_ssl_description("ssl:port=4443:privateKey=both.pem")
        self.assertEqual(spec.plain, "tcp:4443")
        self.assertEqual(spec.cert_path, "both.pem")

    def test_split_refusals(self) -> None:
        """
        Not C{ssl:}, a protocol method, DH parameters, an unknown parameter
        or no port: each is a C{ValueError} naming the description.
        """
        for bad in (
            "tcp:4443",
            "ssl:4443:sslmethod=TLSv1_METHOD",
            "ssl:4443:dhParameters=dh.pem",
            "ssl:4443:bogus=1",
            "ssl:privateKey=k.pem",
        ):
            error = self.assertRaises(ValueError, split_ssl_description, bad)
            self.assertIn(repr(bad), str(error))

    def test_tls_endpoint_refuses_double_tls(self) -> None:
        """
        L{tls_server_endpoint} takes the plain endpoint under TLS; an
        C{ssl:} description there would be TLS twice.
        """
        pki = new_pki(self)
        tls = ReloadableServerTLS(pki.server_cert, pki.server_key)
        for bad in ("ssl:4443", "haproxy:ssl:4443", "tls:/certs:4443"):
            self.assertRaises(ValueError, tls_server_endpoint, reactor, bad, tls)
