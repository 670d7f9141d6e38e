"""The deadline wheel: many deadlines on one timer, never early, at most
one granularity late."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lineserver.wheel import DeadlineWheel


def wheel(
    granularity: float = 1.0,
) -> tuple[DeadlineWheel[str], Clock, list[tuple[str, float]]]:
    clock = Clock()
    fired: list[tuple[str, float]] = []
    made: DeadlineWheel[str] = DeadlineWheel(
        clock, granularity, lambda owner: fired.append((owner, clock.seconds()))
    )
    return made, clock, fired


class DeadlineWheelTests(SynchronousTestCase):
    def test_one_timer_for_many(self) -> None:
        """
        A thousand deadlines within a second share one DelayedCall; each
        fires once, on the boundary after it.
        """
        made, clock, fired = wheel()
        for n in range(1000):
            clock.advance(0.001)
            made.schedule(f"c{n}", 60)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(len(made), 1000)
        clock.advance(59)
        self.assertEqual(fired, [])
        clock.advance(1)
        self.assertEqual(
            sorted(owner for owner, _ in fired), sorted(f"c{n}" for n in range(1000))
        )
        self.assertEqual({when for _, when in fired}, {61.0})
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_leaves_no_timer(self) -> None:
        """
        Cancelling the last deadline cancels the wheel's timer (a closed
        server leaves no pending call behind).
        """
        made, clock, fired = wheel()
        first = made.schedule("a", 5)
        second = made.schedule("b", 10)
        made.cancel("a", first)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        made.cancel("b", second)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(20)
        self.assertEqual(fired, [])

    def test_earlier_deadline_moves_the_timer(self) -> None:
        made, clock, fired = wheel()
        made.schedule("late", 30)
        made.schedule("soon", 2)
        clock.advance(2)
        self.assertEqual(fired, [("soon", 2.0)])
        clock.advance(28)
        self.assertEqual(fired, [("soon", 2.0), ("late", 30.0)])

    def test_rescheduled_from_expiry(self) -> None:
        """
        An owner that schedules itself again when it expires (the idle
        deadline after traffic) fires again later.
        """
        clock = Clock()
        fired: list[float] = []
        made: DeadlineWheel[str] = DeadlineWheel(clock, 1.0, lambda owner: again(owner))

        def again(owner: str) -> None:
            fired.append(clock.seconds())
            if len(fired) < 3:
                made.schedule(owner, 5)

        made.schedule("x", 5)
        clock.pump([1.0] * 20)
        self.assertEqual(fired, [5.0, 10.0, 15.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_granularity_positive(self) -> None:
        self.assertRaises(ValueError, DeadlineWheel, Clock(), 0, print)

    @given(
        st.floats(0.01, 2.0),
        st.lists(st.tuples(st.floats(0, 5), st.floats(0, 20)), min_size=1, max_size=30),
    )
    def test_never_early_at_most_one_granularity_late(
        self, granularity: float, deadlines: list[tuple[float, float]]
    ) -> None:
        """
        Property: every deadline fires once, not before it is due and no
        later than one granularity after.
        """
        made, clock, fired = wheel(granularity)
        due: dict[str, float] = {}
        step = granularity / 7
        for n, (wait, delay) in enumerate(deadlines):
            for _ in range(int(wait / step)):
                clock.advance(step)  # time passes as a reactor's would
            due[f"o{n}"] = clock.seconds() + delay
            made.schedule(f"o{n}", delay)
        for _ in range(int((max(due.values()) - clock.seconds()) / step) + 20):
            if len(fired) == len(due):
                break
            clock.advance(step)
        self.assertEqual(sorted(owner for owner, _ in fired), sorted(due))
        for owner, when in fired:
            self.assertGreaterEqual(when, due[owner] - 1e-6)
            self.assertLessEqual(when, due[owner] + granularity + step + 1e-6)
