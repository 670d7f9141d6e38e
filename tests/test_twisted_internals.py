"""Each private Twisted name lineserver relies on still behaves as we use it.

L{lineserver.twisted_internals} is the one module that touches them.  Twisted
may change a private name in any release; these tests say which one changed
and what in lineserver depends on it, so an upgrade fails here, clearly,
rather than somewhere downstream.  Each looks the name up by itself first,
so a missing one is reported by name even though importing
L{lineserver.twisted_internals} would fail too.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import importlib
import os
import socket
import ssl
from collections.abc import Generator
from functools import partial
from typing import Any, cast

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from typing_extensions import override

from tests.support import Client, connect, reactor, temp_dir
from tests.test_tls import Echo, EchoFactory, TLSTestCase
from tests.test_transports import Recorder, RecorderFactory, poll
from tests.tls_clients import client_context

PROXY_HEADER = b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 4040\r\n"


def require(case: SynchronousTestCase, module: str, name: str, used_for: str) -> Any:
    """
    @return: C{module.name}, or fail saying what lineserver loses without it.
    """
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        case.fail(
            f"this Twisted has no {module}.{name} ({error}); lineserver uses it "
            f"{used_for}: adapt lineserver/twisted_internals.py"
        )
    return found


class EndpointParserTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        C{twisted.internet.endpoints._parse} splits a description into
        positional and named parts, unquoting C{\\:}, as
        L{lineserver.ports} and L{lineserver.tls} expect.
        """
        require(
            self,
            "twisted.internet.endpoints",
            "_parse",
            "to add defaults to --port descriptions and to take ssl: ones apart",
        )
        from lineserver.twisted_internals import parse_endpoint_description

        cases = [
            ("tcp:4040", (["tcp", "4040"], {})),
            (
                "tcp6:4040:interface=\\:\\:1:backlog=5",
                (["tcp6", "4040"], {"interface": "::1", "backlog": "5"}),
            ),
            ("unix:/run/a\\:b.sock:660", (["unix", "/run/a:b.sock", "660"], {})),
            (
                "ssl:4443:privateKey=k.pem:certKey=c.pem",
                (["ssl", "4443"], {"privateKey": "k.pem", "certKey": "c.pem"}),
            ),
        ]
        for description, expected in cases:
            self.assertEqual(
                parse_endpoint_description(description),
                expected,
                f"endpoints._parse splits {description!r} differently now",
            )


class ProxyWrapperTests(TestCase):
    def test_names(self) -> None:
        """
        The PROXY protocol wrapper and its factory are where we import them
        from, and still a protocol wrapper and a wrapping factory.
        """
        wrapper = require(
            self,
            "twisted.protocols.haproxy._wrapper",
            "HAProxyProtocolWrapper",
            "to know when a PROXY header has arrived, and to see a haproxy: "
            "connection among a protocol's transports",
        )
        factory = require(
            self,
            "twisted.protocols.haproxy._wrapper",
            "HAProxyWrappingFactory",
            "to wrap haproxy: ports with our header-aware wrapper",
        )
        self.assertTrue(issubclass(wrapper, ProtocolWrapper))
        self.assertTrue(issubclass(factory, WrappingFactory))
        self.assertIs(factory.protocol, wrapper)

    @inlineCallbacks
    def test_header_received(self) -> Generator[Deferred[Any], Any, None]:
        """
        Over a real connection: no header yet means C{_proxyInfo} is None;
        once the header is in, it is set, and the peer is the one the
        header names.
        """
        from lineserver.twisted_internals import (
            HAProxyWrappingFactory,
            proxy_header_received,
        )

        factory = RecorderFactory()
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port: IListeningPort = yield endpoint.listen(HAProxyWrappingFactory(factory))
        self.addCleanup(port.stopListening)
        client: Client = yield connect(port.getHost().port)  # type: ignore[attr-defined]
        self.addCleanup(self.disconnect, client)
        yield poll(lambda: bool(factory.connections), "the server side")
        server: Recorder = yield factory.connections[0]
        wrapper = server.transport
        message = (
            "HAProxyProtocolWrapper._proxyInfo no longer tells whether the "
            "PROXY header has arrived; lineserver.proxy relies on it"
        )
        self.assertFalse(proxy_header_received(wrapper), message)  # type: ignore[arg-type]
        assert client.transport is not None
        client.transport.write(PROXY_HEADER + b"hello\n")
        yield poll(lambda: server.received == b"hello\n", "the line after the header")
        self.assertTrue(proxy_header_received(wrapper), message)  # type: ignore[arg-type]
        self.assertEqual(server.transport.getPeer().host, "192.0.2.7")  # type: ignore[union-attr]

    def disconnect(self, client: Client) -> Deferred[None]:
        if client.transport is not None and client.reason is None:
            client.transport.loseConnection()
        return client.gone


class CountingSocket:
    """
    A listening socket's stand-in that counts accept() calls.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def accept(self) -> tuple[socket.socket, Any]:
        self.accepts += 1
        return self.sock.accept()


class ListeningSocketTests(TestCase):
    """
    A listening port accepts through its C{socket} attribute, which the
    accept guard replaces (L{lineserver.accept_guard}).
    """

    @inlineCallbacks
    def check_port(
        self, port: IListeningPort, connect_client: Any
    ) -> Generator[Deferred[Any], Any, None]:
        from lineserver.twisted_internals import (
            listening_socket,
            replace_listening_socket,
        )

        self.addCleanup(port.stopListening)
        kind = type(port).__module__ + "." + type(port).__name__
        real = listening_socket(port)
        self.assertIsInstance(
            real,
            socket.socket,
            f"{kind} keeps no socket in its 'socket' attribute any more; the "
            "accept guard cannot stand in front of it",
        )
        assert real is not None
        stand_in = CountingSocket(real)
        replace_listening_socket(port, stand_in)
        self.assertIs(listening_socket(port), stand_in)
        self.assertEqual(
            port.fileno(),  # type: ignore[attr-defined]
            real.fileno(),
            f"{kind}.fileno no longer stays the real socket's after the swap",
        )
        client = yield connect_client()
        self.addCleanup(client.transport.loseConnection)
        yield poll(lambda: bool(self.factory.connections), "the accepted connection")
        self.assertGreaterEqual(
            stand_in.accepts,
            1,
            f"{kind} accepted without calling its 'socket' attribute's accept(); "
            "the accept guard would be bypassed",
        )

    def setUp(self) -> None:
        self.factory = RecorderFactory()

    def test_tcp_port(self) -> Deferred[None]:
        """
        C{tcp.Port}.
        """
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        return self.check_port(port, lambda: connect(port.getHost().port))

    def test_unix_port(self) -> Deferred[None]:
        """
        C{unix.Port}.
        """
        path = os.path.join(temp_dir(self), "s.sock")
        port = reactor.listenUNIX(path, self.factory)

        def connect_unix() -> Deferred[Client]:
            from twisted.internet.endpoints import UNIXClientEndpoint

            endpoint = UNIXClientEndpoint(reactor, path)
            connected: Deferred[Client] = endpoint.connect(Factory.forProtocol(Client))
            return connected

        return self.check_port(port, connect_unix)


class LogObserverTests(SynchronousTestCase):
    """
    twistd's C{--logfile} is found through the global publisher's
    observers and the file behind a C{FileLogObserver}, so that SIGUSR1
    can reopen it (L{lineserver.logs.reopen_logs}).
    """

    def test_global_log_observers(self) -> None:
        """
        An observer added to the global publisher is among
        C{globalLogPublisher._observers}, and gone once removed.
        """
        from twisted.logger import globalLogPublisher

        from lineserver.twisted_internals import global_log_observers

        message = (
            "LogPublisher._observers no longer lists the global observers; "
            "SIGUSR1 cannot find twistd's --logfile to reopen it"
        )
        self.assertTrue(hasattr(globalLogPublisher, "_observers"), message)
        seen: list[object] = []
        observer = cast(ILogObserver, seen.append)
        globalLogPublisher.addObserver(observer)
        try:
            self.assertIn(observer, global_log_observers(), message)
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertNotIn(observer, global_log_observers(), message)

    def test_file_observer_output(self) -> None:
        """
        C{textFileLogObserver(LogFile)}, as twistd builds its C{--logfile}
        observer, keeps the L{LogFile} in C{_outFile}; other observers
        have no file.
        """
        from twisted.logger import textFileLogObserver
        from twisted.python.logfile import LogFile

        from lineserver.twisted_internals import file_observer_output

        log_file = LogFile.fromFullPath(os.path.join(temp_dir(self), "twistd.log"))
        self.addCleanup(log_file.close)
        observer = textFileLogObserver(log_file)
        self.assertIs(
            file_observer_output(observer),
            log_file,
            "FileLogObserver._outFile is no longer the file it writes to; "
            "SIGUSR1 cannot reopen twistd's --logfile",
        )
        self.assertIsNone(file_observer_output(lambda event: None))


class TLSReceiveTests(TLSTestCase):
    """
    L{lineserver.tls.CoalescingTLSProtocol} overrides and calls private
    members of Twisted's TLS layer.
    """

    def test_members(self) -> None:
        """
        Each private method it overrides or calls is still a method of
        C{TLSMemoryBIOProtocol}, and each flag it reads a class-level bool.
        """
        from lineserver.twisted_internals import TLS_RECEIVE_FLAGS, TLS_RECEIVE_METHODS

        layer = require(
            self,
            "twisted.protocols.tls",
            "TLSMemoryBIOProtocol",
            "as the base of lineserver.tls.CoalescingTLSProtocol",
        )
        used_for = "in lineserver.tls.CoalescingTLSProtocol._flushReceiveBIO"
        for name in TLS_RECEIVE_METHODS:
            self.assertTrue(
                callable(getattr(layer, name, None)),
                f"TLSMemoryBIOProtocol.{name} is gone or no longer a method; "
                f"lineserver uses it {used_for}: adapt lineserver/tls.py",
            )
        for name in TLS_RECEIVE_FLAGS:
            self.assertIsInstance(
                getattr(layer, name, None),
                bool,
                f"TLSMemoryBIOProtocol.{name} is no longer a class-level bool; "
                f"lineserver reads it {used_for}: adapt lineserver/tls.py",
            )

    @inlineCallbacks
    def test_connection_attribute(self) -> Generator[Deferred[Any], Any, None]:
        """
        Over a real TLS connection through L{lineserver.tls}'s endpoint, the
        transport under the protocol holds its OpenSSL connection in
        C{TLS_CONNECTION_ATTRIBUTE}, and is a CoalescingTLSProtocol.
        """
        from OpenSSL import SSL

        from lineserver import twisted_internals
        from lineserver.tls import CoalescingTLSProtocol

        self.assertEqual(
            twisted_internals.TLS_CONNECTION_ATTRIBUTE, TLS_CONNECTION_ATTRIBUTE
        )

        factory = TransportRecorderFactory()
        port, _ = yield self.listen_tls(self.server(), factory)
        echoed = yield deferToThread(_send_line, port, client_context(self.pki))
        self.assertEqual(echoed, b"hello\n")
        transport, tls_connection, aggregator = factory.transports[0]
        self.assertEqual(
            twisted_internals.TLS_AGGREGATOR_ATTRIBUTE, TLS_AGGREGATOR_ATTRIBUTE
        )
        self.assertTrue(
            callable(getattr(aggregator, "flush", None)),
            f"the TLS layer no longer has a write aggregator with a flush() in "
            f"{TLS_AGGREGATOR_ATTRIBUTE}; lineserver.tls.CoalescingTLSProtocol "
            "flushes it once per read: adapt lineserver/tls.py",
        )
        self.assertIsInstance(transport, CoalescingTLSProtocol)
        self.assertIsInstance(
            tls_connection,
            SSL.Connection,
            f"the TLS layer no longer keeps its OpenSSL connection in "
            f"{TLS_CONNECTION_ATTRIBUTE}; lineserver.tls.CoalescingTLSProtocol "
            "reads it: adapt lineserver/tls.py",
        )


# As in lineserver.twisted_internals (checked there).
TLS_CONNECTION_ATTRIBUTE = "_tlsConnection"
TLS_AGGREGATOR_ATTRIBUTE = "_aggregator"


class TransportRecorder(Echo):
    @override
    def dataReceived(self, data: bytes) -> None:
        # What the transport holds while the connection is up (the TLS
        # layer lets go of its OpenSSL connection once it is lost).
        transport = self.transport
        seen = (
            transport,
            getattr(transport, TLS_CONNECTION_ATTRIBUTE, None),
            getattr(transport, TLS_AGGREGATOR_ATTRIBUTE, None),
        )
        self.factory.transports.append(seen)  # type: ignore[attr-defined]
        super().dataReceived(data)


class TransportRecorderFactory(EchoFactory):
    def __init__(self) -> None:
        super().__init__()
        self.transports: list[Any] = []

    @override
    def buildProtocol(self, addr: Any) -> TransportRecorder:  # type: ignore[override]
        protocol = TransportRecorder()
        protocol.factory = self
        return protocol


def _send_line(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"hello\n")
        received = b""
        while not received.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                break
            received += chunk
        return received


class LeanServerTests(TestCase):
    def listen(self) -> Deferred[tuple[IListeningPort, RecorderFactory]]:
        factory = RecorderFactory()
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def listening(port: IListeningPort) -> tuple[IListeningPort, RecorderFactory]:
            self.addCleanup(port.stopListening)
            return port, factory

        listened: Deferred[tuple[IListeningPort, RecorderFactory]] = d.addCallback(
            listening
        )
        return listened

    @inlineCallbacks
    def test_twisted_server(self) -> Generator[Deferred[Any], Any, None]:
        """
        A listening C{tcp.Port} builds its transports from its class
        attribute C{transport}, C{tcp.Server}, whose C{__init__} keeps a
        log prefix and a repr per connection, made with the private
        C{_getLogPrefix} and the port's C{_realPortNumber}: what
        L{lineserver.twisted_internals.LeanServer} replaces.
        """
        from twisted.internet import tcp

        self.assertIs(
            tcp.Port.transport,
            tcp.Server,
            "tcp.Port no longer builds its connections from a 'transport' class "
            "attribute set to tcp.Server; lineserver sets it to LeanServer: adapt "
            "lineserver/twisted_internals.py",
        )
        self.assertTrue(callable(getattr(tcp.Server, "_getLogPrefix", None)))
        port, factory = yield self.listen()
        self.assertIsInstance(getattr(port, "_realPortNumber", None), int)
        client = yield connect(port.getHost().port)  # type: ignore[attr-defined]
        self.addCleanup(client.transport.loseConnection)
        yield poll(lambda: bool(factory.connections), "the server side")
        server = yield factory.connections[0]
        self.assertIn("logstr", vars(server.transport))
        self.assertIn("repstr", vars(server.transport))

    @inlineCallbacks
    def test_lean_server(self) -> Generator[Deferred[Any], Any, None]:
        """
        Through real sockets, a port given L{use_lean_transport} builds
        L{LeanServer}s: nothing kept per connection for the log prefix and
        the repr, which read as Twisted's would.
        """
        from lineserver.twisted_internals import LeanServer, use_lean_transport

        port, factory = yield self.listen()
        self.assertTrue(use_lean_transport(port))
        client = yield connect(port.getHost().port)  # type: ignore[attr-defined]
        self.addCleanup(client.transport.loseConnection)
        yield poll(lambda: bool(factory.connections), "the server side")
        server = yield factory.connections[0]
        transport = server.transport
        self.assertIsInstance(transport, LeanServer)
        self.assertNotIn("logstr", vars(transport))
        self.assertNotIn("repstr", vars(transport))
        self.assertEqual(transport.logPrefix(), f"{type(server).__name__},0,127.0.0.1")
        self.assertEqual(
            repr(transport),
            f"<{type(server).__name__} #0 on {port.getHost().port}>",  # type: ignore[attr-defined]
        )

    @inlineCallbacks
    def test_prefix_per_kind_of_protocol(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        The log prefix's protocol part is kept per kind of protocol, the
        wrapper's class and the wrapped one's: two ports whose wrappers
        wrap different protocols each log their own, as Twisted would.
        """
        from lineserver.twisted_internals import use_lean_transport

        class Other(Recorder):
            pass

        class OtherFactory(RecorderFactory):
            @override
            def buildProtocol(self, addr: Any) -> Recorder:
                ready: Deferred[Recorder] = Deferred()
                self.connections.append(ready)
                return Other(ready, self.paused)

        prefixes = []
        for inner in (RecorderFactory(), OtherFactory()):
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
            port = yield endpoint.listen(WrappingFactory(inner))
            self.addCleanup(port.stopListening)
            self.assertTrue(use_lean_transport(port))
            client = yield connect(port.getHost().port)
            self.addCleanup(client.transport.loseConnection)
            yield poll(partial(bool, inner.connections), "the server side")
            server = yield inner.connections[0]
            # Under the wrapper (server.transport), the TCP transport.
            prefixes.append(server.transport.transport.logPrefix())
        self.assertEqual(
            prefixes,
            [
                "Recorder (ProtocolWrapper),0,127.0.0.1",
                "Other (ProtocolWrapper),0,127.0.0.1",
            ],
        )

    def test_other_ports_left_alone(self) -> None:
        """
        A port that is not a TCP port, or whose transport class someone
        else chose, keeps it.
        """
        from twisted.internet import tcp

        from lineserver.twisted_internals import use_lean_transport

        class Custom(tcp.Server):
            pass

        port = tcp.Port(0, Factory(), interface="127.0.0.1")
        port.transport = Custom
        self.assertFalse(use_lean_transport(port))
        self.assertIs(port.transport, Custom)
        self.assertFalse(use_lean_transport(object()))
