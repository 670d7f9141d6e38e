"""Idle and line deadlines: lazy timers, slowloris, paused connections."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.connections import ConnectionRegistry
from lineserver.flow import SinkQueue
from lineserver.handlers import EchoHandlerFactory, SinkHandlerFactory
from lineserver.protocol import LineFactory, LineProtocol, ProtocolSettings
from lineserver.stats import Stats
from tests.support import connect, reactor, start_server


class CountingClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.scheduled = 0

    def callLater(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        self.scheduled += 1
        return super().callLater(*args, **kwargs)


class ProtocolTimerChurnTests(SynchronousTestCase):
    def test_reads_cost_no_timer_churn(self) -> None:
        """
        A read every millisecond for 100 s, with both deadlines on, keeps
        the connection alive and schedules about one timer per timeout
        period, not one per read.
        """
        settings = ProtocolSettings(idle_timeout=10, line_timeout=10)
        proto, transport, clock, _, _ = connected(settings)
        before = clock.scheduled
        for n in range(100_000):
            clock.advance(0.001)
            # a complete line and the start of the next: both deadlines move
            proto.dataReceived(b"x\ny" if n % 2 else b"\nx")
        self.assertFalse(transport.disconnecting)
        self.assertLessEqual(clock.scheduled - before, 25)
        self.assertLessEqual(len(clock.getDelayedCalls()), 2)


def connected(
    settings: ProtocolSettings, sink: bool = False
) -> tuple[LineProtocol, StringTransport, CountingClock, Stats, SinkQueue]:
    clock = CountingClock()
    stats = Stats()
    queue = SinkQueue(100, 10)
    handlers = SinkHandlerFactory(queue) if sink else EchoHandlerFactory()
    factory = LineFactory(
        handlers, ConnectionRegistry(stats=stats), clock, settings, stats
    )
    peer = IPv4Address("TCP", "127.0.0.1", 1)
    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport, clock, stats, queue


class ProtocolTimeoutTests(SynchronousTestCase):
    def test_idle(self) -> None:
        """
        A connection silent for the idle timeout gets ERR idle-timeout;
        traffic keeps it open.
        """
        proto, transport, clock, stats, _ = connected(ProtocolSettings(idle_timeout=30))
        clock.advance(20)
        proto.dataReceived(b"hello\n")
        clock.advance(29)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertEqual(transport.value(), b"hello\nERR idle-timeout\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(stats.get("timeouts.idle"), 1)

    def test_slowloris(self) -> None:
        """
        One byte a second into a line that never ends: closed at the line
        timeout although bytes keep coming (the idle timeout never fires).
        """
        proto, transport, clock, stats, _ = connected(
            ProtocolSettings(idle_timeout=5, line_timeout=20, max_line_length=1000)
        )
        for _ in range(19):
            proto.dataReceived(b"x")
            clock.advance(1)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"x")
        clock.advance(1)
        self.assertEqual(transport.value(), b"ERR line-timeout\n")
        self.assertEqual(stats.get("timeouts.line"), 1)

    def test_line_deadline_restarts_per_line(self) -> None:
        """
        A steady stream of lines, each read ending mid-line, never trips the
        line timeout: each new partial line starts its own count, and the
        timers stay O(1) per timeout period.
        """
        proto, transport, clock, _, _ = connected(
            ProtocolSettings(line_timeout=2, max_line_length=1000)
        )
        before = clock.scheduled
        for n in range(10_000):
            proto.dataReceived(b"%d\npart" % n)
            clock.advance(0.01)
        self.assertFalse(transport.disconnecting)
        self.assertLessEqual(clock.scheduled - before, 60)

    def test_paused_connection_not_timed_out(self) -> None:
        """
        A connection we stopped reading (a full sink queue) is not closed
        for its silence or its unfinished line.
        """
        proto, transport, clock, _, queue = connected(
            ProtocolSettings(idle_timeout=5, line_timeout=5), sink=True
        )
        proto.dataReceived(b"x" * 120 + b"\npartial")
        self.assertTrue(proto.gate.paused)
        clock.advance(60)
        self.assertFalse(transport.disconnecting)
        queue.take(1000)
        queue.confirm(queue.buffered)
        self.assertFalse(proto.gate.paused)
        clock.advance(5)
        self.assertTrue(transport.disconnecting)


class RealSocketTimeoutTests(TestCase):
    @inlineCallbacks
    def test_idle_timeout_over_socket(self) -> Generator[Any, Any, None]:
        """
        Through a socket: a silent client gets ERR idle-timeout and the
        close.
        """
        server = yield start_server(
            self, "echo", settings=ProtocolSettings(idle_timeout=0.3)
        )
        client = yield connect(server.port_numbers()[0])
        client.gone.addTimeout(5, reactor)
        yield client.gone
        self.assertEqual(client.received, b"ERR idle-timeout\n")
