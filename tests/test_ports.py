"""lineserver's defaults on --port descriptions: loopback and a real backlog."""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    serverFromString,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.ports import listens_everywhere, with_defaults
from tests.support import (
    Client,
    completed_handshakes,
    handshakes_for_backlog,
    ipv6_loopback_error,
    listening_addresses,
    reactor,
    start_server,
    without_ipv6,
)


class WithDefaultsTests(SynchronousTestCase):
    def test_loopback_by_default(self) -> None:
        """
        tcp, tcp6 and ssl ports without an interface bind loopback only,
        also under haproxy:.
        """
        self.assertEqual(
            with_defaults("tcp:1", 99), "tcp:1:interface=127.0.0.1:backlog=99"
        )
        self.assertEqual(
            with_defaults("tcp6:1", 5), "tcp6:1:interface=\\:\\:1:backlog=5"
        )
        self.assertEqual(
            with_defaults("ssl:1:privateKey=k", 5),
            "ssl:1:privateKey=k:interface=127.0.0.1:backlog=5",
        )
        self.assertEqual(
            with_defaults("haproxy:tcp:1", 5),
            "haproxy:tcp:1:interface=127.0.0.1:backlog=5",
        )

    def test_parsed_by_twisted(self) -> None:
        """
        What comes out means what it says to Twisted's own parser.
        """
        reactor = MemoryReactor()
        serverFromString(reactor, with_defaults("tcp:4040", 77)).listen(None)
        serverFromString(reactor, with_defaults("tcp6:4041", 78)).listen(None)
        (port, _, backlog, interface), (port6, _, backlog6, interface6) = (
            reactor.tcpServers
        )
        self.assertEqual((port, backlog, interface), (4040, 77, "127.0.0.1"))
        self.assertEqual((port6, backlog6, interface6), (4041, 78, "::1"))

    def test_explicit_kept(self) -> None:
        """
        An interface or backlog given by name or position wins; every
        interface is had by asking for it.
        """
        for description in (
            "tcp:1:interface=0.0.0.0:backlog=3",
            "tcp:1:3:0.0.0.0",
            "tcp6:1:interface=\\:\\::backlog=3",
            "ssl:1:privateKey=k:interface=0.0.0.0:backlog=3",
        ):
            self.assertEqual(with_defaults(description, 99), description)
        self.assertEqual(with_defaults("tcp:1:3", 99), "tcp:1:3:interface=127.0.0.1")

    def test_other_kinds(self) -> None:
        """
        UNIX sockets get a file mode and a backlog; other kinds pass through.
        """
        self.assertEqual(with_defaults("unix:/s", 5), "unix:/s:mode=660:backlog=5")
        for description in ("systemd:domain=INET:index=0", "nonsense"):
            self.assertEqual(with_defaults(description, 9), description)

    @given(
        st.sampled_from(["tcp", "tcp6", "ssl", "haproxy:tcp", "unix", "systemd"]),
        st.integers(0, 65535),
        st.booleans(),
        st.booleans(),
    )
    def test_idempotent_and_additive(
        self, kind: str, port: int, interface: bool, backlog: bool
    ) -> None:
        """
        Defaults only ever add to the description, and adding twice adds
        nothing more.
        """
        description = f"{kind}:{port}"
        if interface:
            description += ":interface=127.0.0.2"
        if backlog:
            description += ":backlog=7"
        once = with_defaults(description, 50)
        self.assertTrue(once.startswith(description))
        self.assertEqual(with_defaults(once, 50), once)
        if interface:
            self.assertNotIn("127.0.0.1", once)

    def test_listens_everywhere(self) -> None:
        for host in ("0.0.0.0", "::"):
            self.assertTrue(listens_everywhere(host))
        for host in ("127.0.0.1", "::1", "10.0.0.1"):
            self.assertFalse(listens_everywhere(host))


class EveryInterfaceWarningTests(SynchronousTestCase):
    def listen(self, description: str) -> list[str]:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        from lineserver.connections import ConnectionRegistry
        from lineserver.handlers import EchoHandlerFactory
        from lineserver.listener import ListenerService
        from lineserver.protocol import LineFactory

        class Reactor(MemoryReactorClock):
            """
            Its fake ports report the interface they were asked for.
            """

            def listenTCP(  # noqa: N802
                self, port: int, factory: Any, backlog: int = 50, interface: str = ""
            ) -> Any:
                listening = super().listenTCP(port, factory, backlog, interface)
                listening._hostAddress = IPv4Address(
                    "TCP", interface or "0.0.0.0", port
                )
                return listening

        reactor = Reactor()
        registry: ConnectionRegistry[Any] = ConnectionRegistry()
        factory = LineFactory(EchoHandlerFactory(), registry, reactor)
        service = ListenerService(description, factory, registry, reactor)
        service.running = True
        with capturedLogs() as events:
            service._listen()
        self.assertIsNotNone(service.port)
        service.stopService()
        return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    def test_warned(self) -> None:
        """
        A port on every interface says so in the log; a loopback one does
        not.
        """
        (warning,) = self.listen("tcp:4040:interface=0.0.0.0")
        self.assertIn("listens on every interface", warning)
        self.assertEqual(self.listen("tcp:4040:interface=127.0.0.1"), [])


class EmbeddedDefaultsTests(TestCase):
    """
    An embedded LineServer's defaults, seen on the real listening socket:
    its address in the kernel's table, its backlog in the connects the
    kernel completes.
    """

    @inlineCallbacks
    def listen(self, port: str, backlog: int) -> Any:
        """
        Start an echo server on C{port} with C{--max-connections 1} and
        C{backlog}, and hold its one slot with a served client, so that
        it stops accepting.

        @return: the listening port number.
        """
        server = yield start_server(
            self, "echo", None, ports=[port], backlog=backlog, max_connections=1
        )
        (number,) = server.port_numbers()
        holder = yield connect_to(server.listeners[0].port.getHost())
        self.addCleanup(holder.transport.loseConnection)
        holder.transport.write(b"hold\n")
        yield holder.wait_for(5)
        return number

    @inlineCallbacks
    def assert_backlog(self, number: int, backlog: int, host: str) -> Any:
        completed, socks = yield deferToThread(
            completed_handshakes, number, backlog + 8, 1.5, host
        )
        for sock in socks:
            sock.close()
        # Linux's accept queue holds backlog + 1 connections.
        self.assertIn(completed, handshakes_for_backlog(backlog))

    @inlineCallbacks
    def test_embedded_port_binds_loopback(self) -> Any:
        """
        C{tcp:0} with C{backlog=5}: the kernel lists the socket as
        listening on 127.0.0.1 only, and, while the server does not
        accept, completes the handshakes of 6 clients (backlog + 1), not
        more: the backlog reached listen().
        """
        number = yield self.listen("tcp:0", 5)
        self.assertEqual(listening_addresses(number), {"127.0.0.1"})
        yield self.assert_backlog(number, 5, "127.0.0.1")

    @inlineCallbacks
    def test_embedded_tcp6_binds_ipv6_loopback(self) -> Any:
        """
        C{tcp6:0} with C{backlog=3}: listening on ::1 only, with a backlog
        of 3.
        """
        missing = ipv6_loopback_error()
        if missing is not None:
            without_ipv6(missing)
        number = yield self.listen("tcp6:0", 3)
        self.assertEqual(listening_addresses(number), {"::1"})
        yield self.assert_backlog(number, 3, "::1")


def connect_to(address: Any) -> Deferred[Client]:
    """
    Connect a test client to an IPv4 or IPv6 listening address.
    """
    endpoint_type = TCP6ClientEndpoint if ":" in address.host else TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, address.host, address.port)
    return endpoint.connect(Factory.forProtocol(Client))  # type: ignore[return-value]
