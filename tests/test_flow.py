"""Flow control: pause gates compose; the sink queue pushes back with hysteresis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lineserver.flow import Batch, IAckOwner, Pause, PauseGate, SinkQueue


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


@implementer(IAckOwner)
class Owner:
    """
    Records what the queue tells it, one entry per call.
    """

    def __init__(self) -> None:
        self.told: list[int] = []

    def lines_durable(self, count: int) -> None:
        self.told.append(count)


class OwnerTests(SynchronousTestCase):
    """
    A put may name whose lines they are; a confirmed batch tells each of
    its owners once how many of its lines became durable.
    """

    def test_owner_is_told_once_per_batch(self) -> None:
        one, two = Owner(), Owner()
        queue = SinkQueue(1000, 100)
        queue.put([b"a"], 2, one)
        queue.put([b"b", b"c"], 4, two)
        queue.put([b"d"], 2, one)
        queue.put([b"e"], 2)  # no owner
        batch = queue.take(1000)
        self.assertEqual(batch, ([b"a", b"b", b"c", b"d", b"e"], 10))
        self.assertEqual((one.told, two.told), ([], []))
        queue.confirm_batch(batch)
        self.assertEqual((one.told, two.told), ([2], [2]))
        self.assertEqual((queue.buffered, queue.buffered_lines), (0, 0))

    def test_count_given(self) -> None:
        owner = Owner()
        queue = SinkQueue(1000, 100)
        queue.put([b"a", b"b"], 4, owner, count=1)
        queue.confirm_batch(queue.take(100))
        self.assertEqual(owner.told, [1])

    def test_confirmed_out_of_order(self) -> None:
        """
        A later batch confirmed first tells its own owner, not the owner
        of the oldest batch in flight.
        """
        first, second = Owner(), Owner()
        queue = SinkQueue(1000, 100)
        queue.put([b"a"], 2, first)
        older = queue.take(1)
        queue.put([b"b"], 2, second)
        newer = queue.take(1)
        queue.confirm_batch(newer)
        self.assertEqual((first.told, second.told), ([], [1]))
        self.assertEqual((queue.buffered, queue.buffered_lines), (2, 1))
        queue.confirm_batch(older)
        self.assertEqual((first.told, second.told), ([1], [1]))

    def test_given_back_keeps_owners(self) -> None:
        owner = Owner()
        queue = SinkQueue(1000, 100)
        queue.put([b"a"], 2, owner)
        batch = queue.take(1)
        queue.give_back_batch(batch)
        self.assertEqual(queue.waiting_lines, 1)
        queue.confirm_batch(queue.take(100))
        self.assertEqual(owner.told, [1])
        # The byte-count calls of older callers keep the owners too.
        queue.put([b"b"], 2, owner)
        lines, cost = queue.take(1)
        queue.give_back(lines, cost)
        queue.take(1)
        queue.confirm(2)
        self.assertEqual(owner.told, [1, 1])

    def test_drop_all(self) -> None:
        """
        A stop that gives the sink up drops what is queued and in flight;
        owners hear nothing (nothing became durable), and paused producers
        resume.
        """
        owner, producer = Owner(), Producer()
        queue = SinkQueue(4, 2)
        queue.register(producer)
        queue.put([b"a"], 2, owner)
        queue.take(1)
        queue.put([b"b", b"c"], 4, owner)
        self.assertTrue(producer.paused)
        self.assertEqual(queue.drop_all(), 3)
        self.assertEqual(
            (queue.buffered, queue.buffered_lines, queue.waiting_lines, len(queue)),
            (0, 0, 0, 0),
        )
        self.assertFalse(producer.paused)
        self.assertEqual(owner.told, [])

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["put", "take", "give_back", "confirm"]),
                st.integers(min_value=0, max_value=3),
                st.integers(min_value=1, max_value=4),
            ),
            max_size=60,
        )
    )
    def test_owners_told_exactly_their_confirmed_lines(
        self, ops: list[tuple[str, int, int]]
    ) -> None:
        """
        Over any sequence of puts (by one of three owners, or none), takes,
        give-backs and confirmations in any order: each owner is told at
        most once per batch, the lines it is told of are exactly its lines
        in confirmed batches, and the line counts always add up.
        """
        owners = [Owner(), Owner(), Owner()]
        queue = SinkQueue(1 << 30, 1)
        in_flight: list[Batch] = []
        put = {id(o): 0 for o in owners}
        confirmed = {id(o): 0 for o in owners}
        for op, who, size in ops:
            if op == "put":
                owner = owners[who] if who < 3 else None
                queue.put([b"x"] * size, size, owner)
                if owner is not None:
                    put[id(owner)] += size
            elif op == "take" and len(queue):
                in_flight.append(queue.take(size))
            elif op == "give_back" and in_flight:
                queue.give_back_batch(in_flight.pop())
            elif op == "confirm" and in_flight:
                batch = in_flight.pop(who % len(in_flight))
                before = [len(o.told) for o in owners]
                queue.confirm_batch(batch)
                for index, told in enumerate(owners):
                    self.assertLessEqual(len(told.told) - before[index], 1)
                for whose, count in batch.owners or []:
                    confirmed[id(whose)] += count
            flying = sum(len(b.lines) for b in in_flight)
            self.assertEqual(queue.buffered_lines, queue.waiting_lines + flying)
        for owner in owners:
            self.assertEqual(sum(owner.told), confirmed[id(owner)])
            self.assertLessEqual(confirmed[id(owner)], put[id(owner)])
