"""The sink service's pump: with a clock, one batch per reactor iteration;
with a sink that can take a batch at once, no Deferred."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lineserver.flow import SinkQueue
from lineserver.sink_service import SinkService
from lineserver.sinks import IImmediateSink, IPipelinedSink
from lineserver.stats import Stats
from tests.test_sinks import ControlledSink, ControlledSinkFactory, FakeSupervisor


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


@implementer(IImmediateSink, IPipelinedSink)
class ImmediateSink(ControlledSink):
    """
    A sink double that takes a batch at once while C{now} is true, and
    otherwise as C{ControlledSink} does; up to three batches in flight.
    """

    max_in_flight = 3

    def __init__(self, events: list[str]) -> None:
        super().__init__(events)
        self.now = True

    def write_now(self, lines: list[bytes]) -> bool:
        if not self.now:
            return False
        self.events.append("now " + b",".join(lines).decode())
        return True


class ImmediateSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.queue = SinkQueue(high_watermark=1000, low_watermark=100)
        self.factory = ControlledSinkFactory(ImmediateSink)
        self.stats = Stats()
        self.written: list[int] = []
        self.service = SinkService(
            self.factory,
            self.queue,
            self.stats,
            on_written=lambda _, lines: self.written.append(lines),
        )
        self.service.setServiceParent(FakeSupervisor())
        self.service.startService()
        sink = self.factory.sinks[0]
        assert isinstance(sink, ImmediateSink)
        self.sink = sink
        self.sink.opened.callback(None)

    def test_confirmed_at_once(self) -> None:
        """
        A batch the sink takes at once is confirmed when the put returns:
        counted, its bytes out of the queue, the write metric told, and no
        C{write} call.
        """
        self.queue.put([b"a", b"b"], 4)
        self.assertEqual(self.factory.events, ["open", "now a,b"])
        self.assertEqual(self.sink.writes, [])
        self.assertEqual(self.stats.get("lines.confirmed"), 2)
        self.assertEqual(self.queue.buffered, 0)
        self.assertEqual(self.written, [2])
        self.successResultOf(self.service.flushed())

    def test_refused_goes_to_write(self) -> None:
        """
        A batch the sink will not take at once goes to C{write}, and is
        confirmed when its Deferred fires.
        """
        self.sink.now = False
        self.queue.put([b"a"], 2)
        self.assertEqual(self.factory.events, ["open", "write a"])
        self.assertEqual(self.stats.get("lines.confirmed"), 0)
        self.sink.writes[0][1].callback(None)
        self.assertEqual(self.stats.get("lines.confirmed"), 1)

    def test_not_past_a_batch_in_flight(self) -> None:
        """
        While a batch is in flight, later ones go to C{write} too (a batch
        taken at once would overtake it); once none is, at once again.
        """
        self.sink.now = False
        self.queue.put([b"a"], 2)
        self.sink.now = True
        self.queue.put([b"b"], 2)
        self.assertEqual(self.factory.events, ["open", "write a", "write b"])
        self.sink.writes[0][1].callback(None)
        self.sink.writes[1][1].callback(None)
        self.queue.put([b"c"], 2)
        self.assertEqual(self.factory.events, ["open", "write a", "write b", "now c"])
        self.assertEqual(self.stats.get("lines.confirmed"), 3)
