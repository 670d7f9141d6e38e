"""Flow control: pause gates compose; the sink queue pushes back with hysteresis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lineserver.flow import Pause, PauseGate, SinkQueue


class Switch:
    def __init__(self) -> None:
        self.reading = True
        self.calls: list[str] = []

    def pause(self) -> None:
        self.reading = False
        self.calls.append("pause")

    def resume(self) -> None:
        self.reading = True
        self.calls.append("resume")


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class PauseGateTests(SynchronousTestCase):
    def test_two_reasons(self) -> None:
        """
        Releasing one reason does not resume while another holds.
        """
        switch = Switch()
        gate = PauseGate(switch.pause, switch.resume)
        gate.hold(Pause.SINK)
        gate.hold(Pause.OUTPUT)
        gate.release(Pause.SINK)
        self.assertFalse(switch.reading)
        gate.release(Pause.OUTPUT)
        self.assertTrue(switch.reading)
        self.assertEqual(switch.calls, ["pause", "resume"])

    def test_producer_adapter(self) -> None:
        """
        The adapter is an IPushProducer holding and releasing its reason.
        """
        switch = Switch()
        gate = PauseGate(switch.pause, switch.resume)
        producer = gate.producer(Pause.OUTPUT)
        verifyObject(IPushProducer, producer)
        producer.pauseProducing()
        self.assertEqual(gate.reasons, {Pause.OUTPUT})
        producer.resumeProducing()
        self.assertFalse(gate.paused)
        producer.stopProducing()
        self.assertTrue(switch.reading)

    @given(st.lists(st.tuples(st.booleans(), st.sampled_from(list(Pause)))))
    def test_reading_iff_no_reason(self, ops: list[tuple[bool, Pause]]) -> None:
        """
        Property: for any sequence of holds and releases, the source reads
        exactly when no reason is held, and pause/resume alternate.
        """
        switch = Switch()
        gate = PauseGate(switch.pause, switch.resume)
        held: set[Pause] = set()
        for hold, reason in ops:
            if hold:
                gate.hold(reason)
                held.add(reason)
            else:
                gate.release(reason)
                held.discard(reason)
            self.assertEqual(switch.reading, not held)
        for first, second in zip(switch.calls, switch.calls[1:], strict=False):
            self.assertNotEqual(first, second)


class SinkQueueTests(SynchronousTestCase):
    def test_pause_at_high_resume_at_low(self) -> None:
        """
        Producers pause when buffered bytes reach the high watermark and
        resume only when confirmed writes bring them to the low watermark.
        """
        queue = SinkQueue(high_watermark=100, low_watermark=40)
        producer = Producer()
        queue.register(producer)
        queue.put([b"x"], 60)
        self.assertFalse(producer.paused)
        queue.put([b"y"], 40)
        self.assertTrue(producer.paused)
        lines, cost = queue.take(1000)
        self.assertEqual((lines, cost), ([b"x", b"y"], 100))
        queue.confirm(50)
        self.assertTrue(producer.paused, "50 > low watermark: still paused")
        queue.confirm(10)
        self.assertFalse(producer.paused)
        self.assertEqual(queue.pauses, 1)

    def test_late_producer_paused(self) -> None:
        """
        A producer that registers while the queue is full starts paused.
        """
        queue = SinkQueue(10, 5)
        queue.put([b"x"], 10)
        producer = Producer()
        queue.register(producer)
        self.assertTrue(producer.paused)

    def test_unregistered_not_resumed(self) -> None:
        """
        An unregistered producer is left alone.
        """
        queue = SinkQueue(10, 5)
        producer = Producer()
        queue.register(producer)
        queue.put([b"x"], 10)
        queue.unregister(producer)
        queue.take(100)
        queue.confirm(10)
        self.assertTrue(producer.paused)
        self.assertEqual(queue.producers, 0)

    def test_take_merges_up_to_max(self) -> None:
        """
        take merges whole batches until max_cost is reached, in order, and
        always takes at least one batch.
        """
        queue = SinkQueue(1000, 10)
        for i in range(5):
            queue.put([b"%d" % i], 30)
        self.assertEqual(queue.take(50), ([b"0", b"1"], 60))
        self.assertEqual(queue.take(1), ([b"2"], 30))
        self.assertEqual(queue.take(1000), ([b"3", b"4"], 60))
        self.assertEqual(queue.take(1000), ([], 0))
        self.assertEqual(queue.buffered, 150, "bytes stay counted until confirmed")

    def test_give_back(self) -> None:
        """
        A batch given back after a failed write comes out first again.
        """
        queue = SinkQueue(1000, 10)
        queue.put([b"a"], 1)
        queue.put([b"b"], 1)
        lines, cost = queue.take(1)
        queue.give_back(lines, cost)
        self.assertEqual(queue.take(100), ([b"a", b"b"], 2))

    def test_when_ready_once(self) -> None:
        """
        when_ready's callback runs at the next put, once.
        """
        queue = SinkQueue(1000, 10)
        calls: list[int] = []
        queue.when_ready(lambda: calls.append(len(queue)))
        queue.put([b"a"], 1)
        queue.put([b"b"], 1)
        self.assertEqual(calls, [1])

    def test_bad_watermarks(self) -> None:
        """
        The low watermark must be below the high one.
        """
        self.assertRaises(ValueError, SinkQueue, 10, 10)
        self.assertRaises(ValueError, SinkQueue, 10, -1)

    @given(st.lists(st.tuples(st.booleans(), st.integers(1, 50)), max_size=80))
    def test_hysteresis_property(self, ops: list[tuple[bool, int]]) -> None:
        """
        Property: a producer is paused only after the buffer reached the
        high watermark and until it fell to the low one; nothing is lost:
        the lines taken are the lines put, in order.
        """
        queue = SinkQueue(high_watermark=100, low_watermark=30)
        producer = Producer()
        queue.register(producer)
        sent: list[bytes] = []
        got: list[bytes] = []
        in_flight: list[int] = []
        for n, (put, size) in enumerate(ops):
            if put:
                line = b"%d" % n
                sent.append(line)
                queue.put([line], size)
            elif in_flight:
                queue.confirm(in_flight.pop(0))
            else:
                lines, cost = queue.take(60)
                got += lines
                if cost:
                    in_flight.append(cost)
            if producer.paused:
                self.assertGreater(queue.buffered, 30)
            else:
                self.assertLess(queue.buffered, 100)
        while True:
            lines, _ = queue.take(1000)
            if not lines:
                break
            got += lines
        self.assertEqual(got, sent)
