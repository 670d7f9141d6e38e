"""The sink service's pump: with a clock, one batch per reactor iteration."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lineserver.flow import SinkQueue
from lineserver.sink_service import SinkService
from tests.test_sinks import ControlledSinkFactory, FakeSupervisor


class CoalescedPumpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.queue = SinkQueue(high_watermark=1000, low_watermark=100)
        self.factory = ControlledSinkFactory()
        self.clock = Clock()
        self.service = SinkService(self.factory, self.queue, clock=self.clock)
        self.service.setServiceParent(FakeSupervisor())
        self.service.startService()
        self.sink = self.factory.sinks[0]
        self.sink.opened.callback(None)

    def test_one_batch_per_iteration(self) -> None:
        """
        Puts while the sink is idle are written together once the reactor
        turns, not one write per put.
        """
        for line in (b"a", b"b", b"c"):
            self.queue.put([line], 2)
        self.assertEqual(self.sink.writes, [])
        self.clock.advance(0)
        self.assertEqual([lines for lines, _ in self.sink.writes], [[b"a", b"b", b"c"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_puts_during_a_write_follow_it(self) -> None:
        """
        Lines put while a batch is in flight go in the next batch as soon
        as it is confirmed (no extra turn), then the pump waits again.
        """
        self.queue.put([b"a"], 2)
        self.clock.advance(0)
        self.queue.put([b"b"], 2)
        self.queue.put([b"c"], 2)
        self.sink.writes[0][1].callback(None)
        self.assertEqual(
            [lines for lines, _ in self.sink.writes], [[b"a"], [b"b", b"c"]]
        )
        self.sink.writes[1][1].callback(None)
        self.assertEqual(self.queue.buffered, 0)
        self.queue.put([b"d"], 2)
        self.assertEqual(len(self.sink.writes), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.sink.writes), 3)

    def test_flushed_waits_for_the_pending_pump(self) -> None:
        """
        A stop's flush waits for lines whose pump is still to come.
        """
        self.queue.put([b"a"], 2)
        flushed = self.service.flushed()
        self.assertNoResult(flushed)
        self.clock.advance(0)
        self.sink.writes[0][1].callback(None)
        self.successResultOf(flushed)

    def test_without_a_clock_at_once(self) -> None:
        """
        Without a clock (the default), a put is pumped at once, as before.
        """
        factory = ControlledSinkFactory()
        queue = SinkQueue(high_watermark=1000, low_watermark=100)
        service = SinkService(factory, queue)
        service.setServiceParent(FakeSupervisor())
        service.startService()
        factory.sinks[0].opened.callback(None)
        queue.put([b"a"], 2)
        self.assertEqual([lines for lines, _ in factory.sinks[0].writes], [[b"a"]])
