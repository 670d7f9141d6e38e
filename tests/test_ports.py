"""lineserver's defaults on --port descriptions: loopback and a real backlog."""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.ports import listens_everywhere, with_defaults


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
        registry = ConnectionRegistry()
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
    @inlineCallbacks
    def test_embedded_port_binds_loopback(self) -> Any:
        """
        An embedded LineServer applies the same defaults: C{tcp:0} listens
        on 127.0.0.1 with the configured backlog.
        """
        from tests.support import start_server

        server = yield start_server(self, "echo", None, ports=["tcp:0"], backlog=77)
        (listener,) = server.listeners
        self.assertEqual(listener.description, "tcp:0:interface=127.0.0.1:backlog=77")
        assert listener.port is not None
        self.assertEqual(listener.port.getHost().host, "127.0.0.1")
