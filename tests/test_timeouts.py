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
from lineserver.timeouts import Deadline
from tests.support import connect, reactor, start_server


class CountingClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.scheduled = 0

    def callLater(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        self.scheduled += 1
        return super().callLater(*args, **kwargs)


class DeadlineTests(SynchronousTestCase):
    def test_expires_after_timeout(self) -> None:
        """
        Without activity, the callback runs once, at the timeout.
        """
        clock = Clock()
        fired: list[float] = []
        deadline = Deadline(clock, 10, lambda: fired.append(clock.seconds()))
        deadline.begin()
        clock.advance(9.9)
        self.assertEqual(fired, [])
        clock.advance(0.1)
        self.assertEqual(fired, [10])
        clock.advance(100)
        self.assertEqual(fired, [10])
        self.assertFalse(deadline.active)

    def test_touch_extends_without_timer_churn(self) -> None:
        """
        A touch every millisecond for 100 s keeps it alive and schedules
        one timer per timeout period, not one per touch.
        """
        clock = CountingClock()
        fired: list[float] = []
        deadline = Deadline(clock, 10, lambda: fired.append(clock.seconds()))
        deadline.begin()
        for _ in range(100_000):
            clock.advance(0.001)
            deadline.touch()
        self.assertEqual(fired, [])
        self.assertLessEqual(clock.scheduled, 11)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(10)
        self.assertEqual(len(fired), 1)

    def test_clear_and_cancel(self) -> None:
        """
        A cleared deadline lapses without firing; cancel drops the timer.
        """
        clock = Clock()
        fired: list[int] = []
        deadline = Deadline(clock, 5, lambda: fired.append(1))
        deadline.begin()
        deadline.clear()
        clock.advance(6)
        self.assertEqual((fired, clock.getDelayedCalls()), ([], []))
        deadline.begin()
        deadline.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])


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
