"""ConnectionRegistry: limits, waiting, per-peer caps, listener gates, drain."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lineserver.connections import (
    LIMIT_REASON,
    ConnectionRegistry,
    Overflow,
    peer_key,
)
from lineserver.flow import PauseGate
from lineserver.handlers import EchoHandlerFactory
from lineserver.protocol import LineFactory, LineProtocol
from lineserver.stats import Stats


class Listener:
    def __init__(self) -> None:
        self.reading = True
        self.gate = PauseGate(self.stop, self.start)

    def stop(self) -> None:
        self.reading = False

    def start(self) -> None:
        self.reading = True


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stats = Stats()

    def make(
        self,
        max_connections: int | None = None,
        max_per_peer: int | None = None,
        overflow: Overflow = "wait",
    ) -> ConnectionRegistry[LineProtocol]:
        self.registry: ConnectionRegistry[LineProtocol] = ConnectionRegistry(
            max_connections, max_per_peer, overflow, self.stats
        )
        self.factory = LineFactory(
            EchoHandlerFactory(), self.registry, Clock(), stats=self.stats
        )
        self.listener = Listener()
        self.registry.add_listener_gate(self.listener.gate)
        return self.registry

    def open(self, host: str = "127.0.0.1") -> tuple[LineProtocol, StringTransport]:
        peer = IPv4Address("TCP", host, 40000)
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def close(self, proto: LineProtocol) -> None:
        proto.connectionLost(Failure(ConnectionDone()))

    def test_limit_stops_and_resumes_accepting(self) -> None:
        """
        At the limit the listener stops reading; one close resumes it.
        """
        self.make(max_connections=2)
        first, _ = self.open()
        self.assertTrue(self.listener.reading)
        self.open()
        self.assertFalse(self.listener.reading)
        self.assertEqual(self.listener.gate.reasons, {LIMIT_REASON})
        self.close(first)
        self.assertTrue(self.listener.reading)

    def test_failing_watcher(self) -> None:
        """
        A watcher that raises (the descriptor count, out of descriptors) is
        logged; the connection is still served, counted and removed, and
        the watcher sees the counts after a removal.
        """
        self.make(max_connections=1)
        seen: list[int] = []

        def watch() -> None:
            seen.append(len(self.registry.active))
            raise OSError(24, "Too many open files")

        self.registry.watchers.append(watch)
        proto, _ = self.open()
        self.assertEqual(self.registry.active, {proto})
        self.assertIsNotNone(proto.handler)
        self.close(proto)
        self.assertEqual(len(self.registry), 0)
        self.assertTrue(self.listener.reading)
        self.assertEqual(seen, [0, 0])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

    def test_past_limit_waits_then_served(self) -> None:
        """
        A connection accepted past the limit waits, paused and without a
        handler, and is served first-in first-out as slots free up.
        """
        registry = self.make(max_connections=1)
        first, _ = self.open()
        second, t2 = self.open()
        third, _ = self.open()
        self.assertEqual(list(registry.waiting), [second, third])
        self.assertIsNone(second.handler)
        self.assertEqual(t2.producerState, "paused")
        self.close(first)
        self.assertIn(second, registry.active)
        self.assertIsNotNone(second.handler)
        self.assertEqual(t2.producerState, "producing")
        self.assertFalse(self.listener.reading, "still full with the second")
        self.assertEqual(list(registry.waiting), [third])

    def test_waiting_connection_that_leaves(self) -> None:
        """
        A waiting connection that closes leaves the queue.
        """
        registry = self.make(max_connections=1)
        self.open()
        second, _ = self.open()
        self.close(second)
        self.assertEqual(list(registry.waiting), [])
        self.assertEqual(len(registry), 1)

    def test_reject_overflow(self) -> None:
        """
        With overflow "reject", the connection past the limit gets
        ERR too-many-connections and is closed.
        """
        self.make(max_connections=1, overflow="reject")
        self.open()
        _, transport = self.open()
        self.assertEqual(transport.value(), b"ERR too-many-connections\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.stats.get("connections.refused.limit"), 1)

    def test_per_peer(self) -> None:
        """
        The connection over the per-peer cap gets its own error; other peers
        are unaffected; a close frees the peer's slot.
        """
        self.make(max_per_peer=2)
        a1, _ = self.open("10.0.0.1")
        self.open("10.0.0.1")
        _, refused = self.open("10.0.0.1")
        _, other = self.open("10.0.0.2")
        self.assertEqual(refused.value(), b"ERR too-many-connections-from-peer\n")
        self.assertEqual(other.value(), b"")
        self.close(a1)
        _, again = self.open("10.0.0.1")
        self.assertEqual(again.value(), b"")
        self.assertEqual(self.stats.get("connections.refused.peer"), 1)

    def test_stop_accepting(self) -> None:
        """
        After stop_accepting, newcomers get ERR shutting-down, and waiting
        connections are served past the limit so their lines drain.
        """
        registry = self.make(max_connections=1)
        self.open()
        waiting, _ = self.open()
        promoted = registry.stop_accepting()
        self.assertEqual(promoted, [waiting])
        self.assertIn(waiting, registry.active)
        self.assertIsNone(waiting.handler)  # the caller starts it
        waiting.slot_granted()
        self.assertIsNotNone(waiting.handler)
        _, late = self.open()
        self.assertEqual(late.value(), b"ERR shutting-down\n")

    def test_reject_keeps_accepting(self) -> None:
        """
        In reject mode the listeners keep accepting at the limit, so that
        a client past it gets its ERR at once, not silence in the backlog.
        """
        self.make(max_connections=1, overflow="reject")
        self.open()
        self.assertTrue(self.listener.reading)
        _, refused = self.open()
        self.assertEqual(refused.value(), b"ERR too-many-connections\n")
        self.assertTrue(self.listener.reading)

    def test_mapped_addresses_are_one_peer(self) -> None:
        """
        C{::ffff:10.0.0.1} (an IPv4 client on a dual-stack socket) and
        C{10.0.0.1} count as one peer.
        """
        self.make(max_per_peer=1)
        self.open("10.0.0.1")
        peer = IPv6Address("TCP", "::ffff:10.0.0.1", 40000)
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"ERR too-many-connections-from-peer\n")

    def test_when_empty(self) -> None:
        """
        when_empty fires once the last connection is gone.
        """
        registry = self.make()
        self.successResultOf(registry.when_empty())
        first, _ = self.open()
        empty = registry.when_empty()
        self.assertNoResult(empty)
        self.close(first)
        self.successResultOf(empty)

    def test_gauges(self) -> None:
        """
        The registry's gauges read live values.
        """
        self.make(max_connections=1)
        self.open()
        self.open()
        snapshot = self.stats.snapshot()
        self.assertEqual(snapshot["connections.active"], 1)
        self.assertEqual(snapshot["connections.waiting"], 1)
        self.assertEqual(snapshot["connections.paused"], 1)
        self.assertEqual(snapshot["connections.opened"], 2)

    @given(
        st.lists(
            st.tuples(st.booleans(), st.integers(min_value=0, max_value=40)),
            max_size=60,
        ),
        st.integers(min_value=1, max_value=4),
        st.sampled_from(["wait", "reject"]),
    )
    def test_active_count_property(
        self, steps: list[tuple[bool, int]], limit: int, overflow: Overflow
    ) -> None:
        """
        Property: over any opening and closing, the active gauge is the
        number of connections served (neither waiting nor refused), never
        above the limit, and a waiting connection is served as soon as a
        slot frees.
        """
        self.stats = Stats()
        registry = self.make(max_connections=limit, overflow=overflow)
        live: list[LineProtocol] = []
        for opening, pick in steps:
            if opening or not live:
                proto, _ = self.open(f"10.0.0.{pick % 3}")
                live.append(proto)
            else:
                self.close(live.pop(pick % len(live)))
            active = registry.active
            waiting = set(registry.waiting)
            self.assertEqual(self.stats.snapshot()["connections.active"], len(active))
            self.assertLessEqual(len(active), limit)
            self.assertFalse(active & waiting)
            self.assertEqual(len(registry), len(live))
            if waiting:
                self.assertEqual(len(active), limit)
            for proto in active:
                self.assertIsNotNone(proto.handler)
            for proto in waiting:
                self.assertIsNone(proto.handler)


class PeerKeyTests(SynchronousTestCase):
    @given(st.ip_addresses(v=4))
    def test_mapped_is_the_ipv4_address(self, address: object) -> None:
        """
        Property: an IPv4 address and its IPv4-mapped IPv6 form have one key.
        """
        self.assertEqual(peer_key(f"::ffff:{address}"), peer_key(str(address)))
        self.assertEqual(peer_key(str(address)), str(address))

    @given(st.ip_addresses(v=6))
    def test_ipv6_is_canonical(self, address: object) -> None:
        """
        Property: an IPv6 address that is not mapped keeps its canonical
        form, however it was written.
        """
        if getattr(address, "ipv4_mapped", None) is None:
            self.assertEqual(peer_key(str(address).upper()), str(address))

    def test_many_hosts_keys_stay_exact(self) -> None:
        """
        Keys are remembered for speed (a fleet from few addresses is not
        parsed per connection), but more distinct hosts than are
        remembered still each get their exact key, first time and again.
        """
        hosts = [f"::ffff:10.{n >> 8 & 255}.{n & 255}.1" for n in range(6000)]
        first = [peer_key(host) for host in hosts]
        again = [peer_key(host) for host in hosts]
        self.assertEqual(first, [host.removeprefix("::ffff:") for host in hosts])
        self.assertEqual(again, first)
        self.assertEqual(peer_key("::FFFF:1.2.3.4"), "1.2.3.4")
        self.assertEqual(peer_key("2001:DB8::1"), "2001:db8::1")

    def test_not_an_address(self) -> None:
        """
        A host that is not an IP address is its own key.
        """
        self.assertEqual(peer_key("unix"), "unix")
