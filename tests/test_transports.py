"""Tests for L{lineserver.transports}, over real loopback connections.

Each server is a plain Twisted protocol behind a real listening endpoint
(TCP, TLS over TCP, PROXY over TCP, TLS over PROXY over TCP, a unix
socket); the client is a real socket.  What the helpers set on a socket is
read back from the kernel with getsockopt.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.tcp import Server
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.proxy import HeaderAwareProxyWrapper, proxy_endpoint
from lineserver.tls import ReloadableServerTLS, tls_server_endpoint
from lineserver.transports import (
    KEEPALIVE_PROBES,
    behind_proxy,
    enable_keepalive,
    keepalive_on_listener,
    pending_input,
    socket_of,
    transport_chain,
)
from tests.support import Client, connect, reactor, temp_dir
from tests.tls_clients import new_pki

PROXY_HEADER = b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 4040\r\n"


class Recorder(Protocol):
    """
    A server protocol that hands itself to the test once connected, and
    keeps what it reads.
    """

    def __init__(self, ready: Deferred[Recorder], paused: bool) -> None:
        self.ready = ready
        self.paused = paused
        self.received = b""

    def connectionMade(self) -> None:
        if self.paused:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecorderFactory(Factory):
    def __init__(self, paused: bool = False) -> None:
        self.paused = paused
        self.connections: list[Deferred[Recorder]] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        ready: Deferred[Recorder] = Deferred()
        ready.addTimeout(10, reactor)
        self.connections.append(ready)
        return Recorder(ready, self.paused)


@inlineCallbacks
def poll(
    check: Callable[[], bool], what: str, timeout: float = 10.0
) -> Generator[Deferred[Any], Any, None]:
    """
    Let the reactor run until C{check()} holds, looking every 20 ms.

    @raise AssertionError: naming C{what}, after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield deferLater(reactor, 0.02, lambda: None)


def tcp_endpoint() -> IStreamServerEndpoint:
    return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")


class ChainTestCase(TestCase):
    """
    Listens on an endpoint and connects one client to it.
    """

    @inlineCallbacks
    def serve(
        self,
        endpoint: IStreamServerEndpoint,
        paused: bool = False,
        on_listen: Callable[[IListeningPort], object] | None = None,
    ) -> Generator[Deferred[Any], Any, tuple[Recorder, Client]]:
        """
        @param on_listen: called with the listening port before the client
            connects.
        @return: the server's protocol and the client, once connected.
        """
        factory = RecorderFactory(paused)
        port: IListeningPort = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        if on_listen is not None:
            on_listen(port)
        client: Client = yield connect(port.getHost().port)  # type: ignore[attr-defined]
        self.addCleanup(self.disconnect, client)
        yield poll(lambda: bool(factory.connections), "the server side")
        server: Recorder = yield factory.connections[0]
        return server, client

    def disconnect(self, client: Client) -> Deferred[None]:
        if client.transport is not None and client.reason is None:
            client.transport.loseConnection()
        return client.gone

    def tls(self) -> ReloadableServerTLS:
        pki = new_pki(self)
        return ReloadableServerTLS(pki.server_cert, pki.server_key)

    def assert_socket_is_the_connection(self, server: Recorder, client: Client) -> None:
        """
        The socket found under the server's transport is this very
        connection: its local end is the client's peer and the other way
        round.
        """
        assert client.transport is not None
        sock = socket_of(server.transport)
        self.assertIsInstance(sock, socket.socket)
        assert sock is not None
        self.assertEqual(sock.getpeername()[1], client.transport.getHost().port)  # type: ignore[attr-defined]
        self.assertEqual(sock.getsockname()[1], client.transport.getPeer().port)  # type: ignore[attr-defined]


class TransportChainTests(ChainTestCase):
    def assert_layers(self, server: Recorder, kinds: list[type]) -> None:
        """
        The chain under C{server} is one layer of each kind, top down.
        """
        chain = list(transport_chain(server.transport))
        self.assertEqual(len(chain), len(kinds), chain)
        for layer, kind in zip(chain, kinds, strict=True):
            self.assertIsInstance(layer, kind)

    @inlineCallbacks
    def test_plain_tcp(self) -> Generator[Deferred[Any], Any, None]:
        """
        Over plain TCP the chain is the transport alone, and its socket is
        the connection's; it is not behind a proxy.
        """
        server, client = yield self.serve(tcp_endpoint())
        self.assert_layers(server, [Server])
        self.assertIs(next(transport_chain(server.transport)), server.transport)
        self.assert_socket_is_the_connection(server, client)
        self.assertFalse(behind_proxy(server.transport))

    @inlineCallbacks
    def test_tls_over_tcp(self) -> Generator[Deferred[Any], Any, None]:
        """
        Under TLS the chain is the TLS layer, then TCP; the socket is found
        under the TLS layer (whose own handle is not a socket).
        """
        endpoint = tls_server_endpoint(reactor, tcp_endpoint(), self.tls())
        server, client = yield self.serve(endpoint)
        self.assert_layers(server, [TLSMemoryBIOProtocol, Server])
        self.assert_socket_is_the_connection(server, client)
        self.assertFalse(behind_proxy(server.transport))

    @inlineCallbacks
    def test_proxy_over_tcp(self) -> Generator[Deferred[Any], Any, None]:
        """
        Behind a C{haproxy:} port the chain is the PROXY wrapper, then TCP.
        """
        server, client = yield self.serve(proxy_endpoint(reactor, tcp_endpoint()))
        self.assert_layers(server, [HeaderAwareProxyWrapper, Server])
        self.assert_socket_is_the_connection(server, client)
        self.assertTrue(behind_proxy(server.transport))

    @inlineCallbacks
    def test_tls_over_proxy_over_tcp(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{haproxy:ssl:}: TLS, then the PROXY wrapper, then TCP; still
        behind a proxy, still the connection's own socket.
        """
        endpoint = tls_server_endpoint(
            reactor, proxy_endpoint(reactor, tcp_endpoint()), self.tls()
        )
        server, client = yield self.serve(endpoint)
        self.assert_layers(
            server, [TLSMemoryBIOProtocol, HeaderAwareProxyWrapper, Server]
        )
        self.assert_socket_is_the_connection(server, client)
        self.assertTrue(behind_proxy(server.transport))


class KeepaliveTests(ChainTestCase):
    def read_keepalive(self, sock: socket.socket) -> tuple[int, int, int, int]:
        """
        @return: SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT,
            as the kernel has them.
        """
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        )

    @inlineCallbacks
    def test_tcp(self) -> Generator[Deferred[Any], Any, None]:
        """
        On a TCP connection keepalive is off until enabled; then the kernel
        probes after the idle time, C{min(idle, 30)} seconds apart, and
        gives up after three probes.
        """
        server, _ = yield self.serve(tcp_endpoint())
        sock = socket_of(server.transport)
        assert sock is not None
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        self.assertTrue(enable_keepalive(server.transport, 7))
        self.assertEqual(self.read_keepalive(sock), (1, 7, 7, KEEPALIVE_PROBES))
        self.assertTrue(enable_keepalive(server.transport, 300))
        self.assertEqual(self.read_keepalive(sock), (1, 300, 30, KEEPALIVE_PROBES))

    @inlineCallbacks
    def test_fractions_round_to_whole_seconds(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        The kernel counts whole seconds: 0.2 becomes 1 (never 0, which it
        refuses), 2.6 becomes 3.
        """
        server, _ = yield self.serve(tcp_endpoint())
        sock = socket_of(server.transport)
        assert sock is not None
        self.assertTrue(enable_keepalive(server.transport, 0.2))
        self.assertEqual(self.read_keepalive(sock), (1, 1, 1, KEEPALIVE_PROBES))
        self.assertTrue(enable_keepalive(server.transport, 2.6))
        self.assertEqual(self.read_keepalive(sock), (1, 3, 3, KEEPALIVE_PROBES))

    @inlineCallbacks
    def test_under_tls_and_proxy(self) -> Generator[Deferred[Any], Any, None]:
        """
        Through TLS over PROXY, keepalive lands on the TCP socket below.
        """
        endpoint = tls_server_endpoint(
            reactor, proxy_endpoint(reactor, tcp_endpoint()), self.tls()
        )
        server, _ = yield self.serve(endpoint)
        self.assertTrue(enable_keepalive(server.transport, 60))
        sock = socket_of(server.transport)
        assert sock is not None
        self.assertEqual(self.read_keepalive(sock), (1, 60, 30, KEEPALIVE_PROBES))

    @inlineCallbacks
    def test_inherited_from_the_listener(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Options given to the listening socket reach every socket it accepts
        (Linux), so enabling the same ones per connection sets nothing;
        other ones are still set.
        """
        marked: list[bool] = []
        server, _ = yield self.serve(
            tcp_endpoint(),
            on_listen=lambda port: marked.append(keepalive_on_listener(port, 7)),
        )
        self.assertEqual(marked, [True])
        sock = socket_of(server.transport)
        assert sock is not None
        self.assertEqual(self.read_keepalive(sock), (1, 7, 7, KEEPALIVE_PROBES))
        self.assertTrue(enable_keepalive(server.transport, 7))
        self.assertEqual(self.read_keepalive(sock), (1, 7, 7, KEEPALIVE_PROBES))
        self.assertTrue(enable_keepalive(server.transport, 300))
        self.assertEqual(self.read_keepalive(sock), (1, 300, 30, KEEPALIVE_PROBES))

    @inlineCallbacks
    def test_inherited_under_tls_and_proxy(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Through TLS over PROXY, the TCP socket below inherits the listening
        socket's options, and the layers above find the mark.
        """
        endpoint = tls_server_endpoint(
            reactor, proxy_endpoint(reactor, tcp_endpoint()), self.tls()
        )
        marked: list[bool] = []
        server, _ = yield self.serve(
            endpoint,
            on_listen=lambda port: marked.append(keepalive_on_listener(port, 60)),
        )
        self.assertEqual(marked, [True])
        sock = socket_of(server.transport)
        assert sock is not None
        self.assertEqual(self.read_keepalive(sock), (1, 60, 30, KEEPALIVE_PROBES))
        self.assertTrue(enable_keepalive(server.transport, 60))

    @inlineCallbacks
    def test_unix_socket(self) -> Generator[Deferred[Any], Any, None]:
        """
        A unix socket has no TCP keepalive: the call says so and changes
        nothing.
        """
        path = os.path.join(temp_dir(self), "s.sock")
        factory = RecorderFactory()
        port: IListeningPort = yield UNIXServerEndpoint(reactor, path).listen(factory)
        self.addCleanup(port.stopListening)
        client_factory = Factory.forProtocol(Client)
        client: Client = yield UNIXClientEndpoint(reactor, path).connect(client_factory)
        self.addCleanup(self.disconnect, client)
        yield poll(lambda: bool(factory.connections), "the server side")
        server: Recorder = yield factory.connections[0]
        sock = socket_of(server.transport)
        assert sock is not None
        self.assertEqual(sock.family, socket.AF_UNIX)
        self.assertFalse(enable_keepalive(server.transport, 60))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        self.assertFalse(keepalive_on_listener(port, 60))


class NoSocketTests(SynchronousTestCase):
    def test_no_socket(self) -> None:
        """
        A transport with no socket under it (a test transport) has no
        socket, no keepalive, no pending input, no proxy.
        """
        transport = StringTransport()
        self.assertIsNone(socket_of(transport))
        self.assertFalse(enable_keepalive(transport, 60))
        self.assertEqual(pending_input(transport), 0)
        self.assertFalse(behind_proxy(transport))
        self.assertEqual(list(transport_chain(None)), [])

    def test_idle_must_be_positive(self) -> None:
        """
        Keepalive after 0 (or fewer) seconds is a mistake, not "off".
        """
        for idle in (0, -1, float("nan")):
            with self.assertRaises(ValueError):
                enable_keepalive(StringTransport(), idle)

    def test_chain_is_bounded(self) -> None:
        """
        A layer that points back at itself ends the walk instead of
        looping.
        """

        class Loop:
            transport: object = None

        loop = Loop()
        loop.transport = loop
        self.assertEqual(list(transport_chain(loop)), [loop])


class PendingInputTests(ChainTestCase):
    @inlineCallbacks
    def check_pending(
        self, endpoint: IStreamServerEndpoint, preamble: bytes = b""
    ) -> Generator[Deferred[Any], Any, None]:
        """
        With the server not reading, what the client sends waits in the
        kernel and is counted; once read, nothing is pending.
        """
        server, client = yield self.serve(endpoint, paused=True)
        assert client.transport is not None
        payload = b"x" * 5000
        client.transport.write(preamble + payload)
        size = len(preamble + payload)
        yield poll(lambda: pending_input(server.transport) == size, f"{size} pending")
        self.assertEqual(server.received, b"")
        server.transport.resumeProducing()  # type: ignore[union-attr]
        yield poll(lambda: server.received == payload, "the payload read")
        self.assertEqual(pending_input(server.transport), 0)

    def test_tcp(self) -> Deferred[None]:
        """
        Plain TCP.
        """
        return self.check_pending(tcp_endpoint())

    def test_behind_proxy(self) -> Deferred[None]:
        """
        Under the PROXY wrapper, the socket's own count (header included).
        """
        return self.check_pending(
            proxy_endpoint(reactor, tcp_endpoint()), preamble=PROXY_HEADER
        )

    @inlineCallbacks
    def test_closed(self) -> Generator[Deferred[Any], Any, None]:
        """
        Once the connection is closed there is nothing to count, and no
        error.
        """
        server, client = yield self.serve(tcp_endpoint())
        assert server.transport is not None
        server.transport.loseConnection()
        yield client.gone
        self.assertEqual(pending_input(server.transport), 0)
