"""The loss ledger, in lines: received = delivered + queued + spooled + dropped."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from lineserver.flow import SinkQueue
from lineserver.sink_service import SinkService
from lineserver.sinks import ISpooled
from lineserver.stats import Stats
from tests.support import Peer, eventually, later, start_server
from tests.test_sinks import ControlledSink, ControlledSinkFactory, capture_log


def ledger(stats: Mapping[str, int]) -> tuple[int, int]:
    """
    @return: lines received, and delivered + queued + spooled + dropped
        (every reason), from a Stats snapshot.
    """
    dropped = stats.get("lines.failed", 0) + sum(
        count for name, count in stats.items() if name.startswith("lines.dropped.")
    )
    return stats.get("lines.received", 0), (
        stats.get("lines.delivered", 0)
        + stats.get("queue.lines", 0)
        + stats.get("lines.spooled", 0)
        + dropped
    )


@implementer(ISpooled)
class SpoolingSink(ControlledSink):
    """
    A sink double that confirms into a "spool" and empties it when told.
    """

    def __init__(self, events: list[str]) -> None:
        super().__init__(events)
        self.spooled_lines = 0

    def confirm(self, index: int) -> None:
        lines, done = self.writes[index]
        self.spooled_lines += len(lines)
        done.callback(None)


class SinkServiceLedgerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory = ControlledSinkFactory(SpoolingSink)
        self.queue = SinkQueue(1000, 100)
        self.stats = Stats()
        self.stats.add_gauge("queue.lines", lambda: self.queue.buffered_lines)
        self.service = SinkService(self.factory, self.queue, self.stats)
        self.service.startService()
        sink = self.factory.sinks[0]
        assert isinstance(sink, SpoolingSink)
        self.sink = sink
        self.sink.opened.callback(None)

    def receive(self, *lines: bytes) -> None:
        self.stats.incr("lines.received", len(lines))
        self.queue.put(list(lines), sum(len(line) + 1 for line in lines))

    def test_spooled_is_not_delivered(self) -> None:
        """
        Lines a spooling sink confirmed are counted spooled until its
        destination has them; then delivered.  The ledger balances at
        every step.
        """
        self.receive(b"a", b"b")
        self.assertEqual(ledger(self.stats.snapshot()), (2, 2))
        self.sink.confirm(0)
        snapshot = self.stats.snapshot()
        self.assertEqual(
            (snapshot["lines.confirmed"], snapshot["lines.spooled"]), (2, 2)
        )
        self.assertEqual(snapshot["lines.delivered"], 0)
        self.assertEqual(ledger(snapshot), (2, 2))
        self.sink.spooled_lines = 0  # replayed to the destination
        snapshot = self.stats.snapshot()
        self.assertEqual(snapshot["lines.delivered"], 2)
        self.assertEqual(ledger(snapshot), (2, 2))

    def test_drop_unwritten(self) -> None:
        """
        A stop that gives the sink up drops what is in flight and queued,
        by reason; a write that ends later changes nothing.
        """
        self.receive(b"a")
        self.receive(b"b", b"c")
        self.assertEqual(self.service.drop_unwritten("shutdown_timeout"), 3)
        snapshot = self.stats.snapshot()
        self.assertEqual(snapshot["lines.dropped.shutdown_timeout"], 3)
        self.assertEqual(ledger(snapshot), (3, 3))
        self.sink.confirm(0)
        self.assertEqual(ledger(self.stats.snapshot()), (3, 3))


class ServerLedgerTests(TestCase):
    @inlineCallbacks
    def test_stop_past_the_deadline(self) -> Generator[Any, Any, None]:
        """
        A sink that never confirms: the stop gives it up at the shutdown
        timeout, the lines left are dropped as C{shutdown_timeout}, and
        the ledger logged at the end of the stop balances.
        """
        messages = capture_log(self)
        factory = ControlledSinkFactory()
        starting = self.start(factory)
        factory.sinks[0].opened.callback(None)
        server = yield starting
        port = server.port_numbers()[0]
        peer = Peer(port, send=b"a\nb\nc\n")
        self.addCleanup(peer.close)
        yield eventually(lambda: server.stats.get("lines.received") == 3, "3 lines")
        yield server.stopService()
        snapshot = server.stats.snapshot()
        self.assertEqual(snapshot["lines.dropped.shutdown_timeout"], 3)
        self.assertEqual(ledger(snapshot), (3, 3))
        self.assertIn(
            "ledger: 3 line(s) received = 0 delivered + 0 queued + 0 spooled + "
            "3 dropped (shutdown_timeout: 3)",
            messages,
        )

    @inlineCallbacks
    def test_clean_stop_drops_nothing(self) -> Generator[Any, Any, None]:
        messages = capture_log(self)
        factory = ControlledSinkFactory()
        starting = self.start(factory)
        sink = factory.sinks[0]
        sink.opened.callback(None)
        server = yield starting
        peer = Peer(server.port_numbers()[0], send=b"a\nb\n")
        self.addCleanup(peer.close)
        yield eventually(lambda: len(sink.writes) == 1, "a write")
        sink.writes[0][1].callback(None)
        yield later(0)
        stopping = server.stopService()
        sink.closed.callback(None)
        yield stopping
        self.assertEqual(ledger(server.stats.snapshot()), (2, 2))
        self.assertIn(
            "ledger: 2 line(s) received = 2 delivered + 0 queued + 0 spooled + "
            "0 dropped",
            messages,
        )

    @inlineCallbacks
    def test_stop_leaves_lines_in_the_spool(self) -> Generator[Any, Any, None]:
        """
        Lines a spooling sink still holds when the stop closes it are
        counted spooled, not delivered, in the ledger the stop logs, even
        if nothing read the stats while the server ran.
        """
        messages = capture_log(self)
        factory = ControlledSinkFactory(SpoolingSink)
        starting = self.start(factory)
        sink = factory.sinks[0]
        assert isinstance(sink, SpoolingSink)
        sink.opened.callback(None)
        server = yield starting
        peer = Peer(server.port_numbers()[0], send=b"a\nb\n")
        self.addCleanup(peer.close)
        yield eventually(lambda: len(sink.writes) == 1, "a write")
        sink.confirm(0)
        yield later(0)
        stopping = server.stopService()
        sink.closed.callback(None)
        yield stopping
        self.assertEqual(server.stats.get("lines.spooled"), 2)
        self.assertEqual(ledger(server.stats.snapshot()), (2, 2))
        ledger_lines = [m for m in messages if m.startswith("ledger:")]
        self.assertEqual(len(ledger_lines), 1, messages)
        self.assertTrue(
            ledger_lines[0].startswith(
                "ledger: 2 line(s) received = 0 delivered + 0 queued + 2 spooled"
                " + 0 dropped;"
            ),
            ledger_lines[0],
        )

    def start(self, factory: ControlledSinkFactory) -> Any:
        return start_server(self, sink=factory, shutdown_timeout=0.5)
