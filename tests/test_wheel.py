"""The deadline wheel: many deadlines on one timer, never early, at most
one granularity late."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lineserver.wheel import Bucket, DeadlineWheel


class Owner:
    """
    An owner of a deadline: keeps its bucket, forgets it when it expires.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.bucket: Bucket[Owner] | None = None

    def __repr__(self) -> str:
        return self.name


def bucket_of(owner: Owner) -> Bucket[Owner] | None:
    return owner.bucket


class Wheel:
    """
    A wheel of L{Owner}s named by strings, as the tests use it: schedule
    and cancel by name; C{fired} lists (name, time) as they expire.
    """

    def __init__(self, clock: Clock, granularity: float, expire: Any = None) -> None:
        self.clock = clock
        self.fired: list[tuple[str, float]] = []
        self.owners: dict[str, Owner] = {}
        self._on_expire = expire
        self.wheel: DeadlineWheel[Owner] = DeadlineWheel(
            clock, granularity, self._expired, bucket_of
        )

    def _expired(self, owner: Owner) -> None:
        owner.bucket = None
        self.fired.append((owner.name, self.clock.seconds()))
        if self._on_expire is not None:
            self._on_expire(owner.name)

    def schedule(self, name: str, delay: float) -> None:
        owner = self.owners.setdefault(name, Owner(name))
        assert owner.bucket is None, "one deadline at a time"
        owner.bucket = self.wheel.schedule(owner, delay)

    def cancel(self, name: str) -> None:
        owner = self.owners[name]
        bucket, owner.bucket = owner.bucket, None
        assert bucket is not None
        self.wheel.cancel(owner, bucket)

    def __len__(self) -> int:
        return len(self.wheel)


def wheel(granularity: float = 1.0) -> tuple[Wheel, Clock, list[tuple[str, float]]]:
    clock = Clock()
    made = Wheel(clock, granularity)
    return made, clock, made.fired


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
        made.schedule("a", 5)
        made.schedule("b", 10)
        made.cancel("a")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        made.cancel("b")
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

        def again(owner: str) -> None:
            fired.append(clock.seconds())
            if len(fired) < 3:
                made.schedule(owner, 5)

        made = Wheel(clock, 1.0, again)
        made.schedule("x", 5)
        clock.pump([1.0] * 20)
        self.assertEqual(fired, [5.0, 10.0, 15.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_granularity_positive(self) -> None:
        self.assertRaises(ValueError, DeadlineWheel, Clock(), 0, print, bucket_of)

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

    def test_cancelled_owners_are_not_kept(self) -> None:
        """
        Owners that cancel are let go (a closed connection is not kept
        alive by its bucket until it fires): a bucket holds at most half
        its live owners more, plus a few; and one that cancels and
        schedules again into the same bucket fires once.
        """
        made, clock, fired = wheel()
        for n in range(1000):
            made.schedule(f"c{n}", 60)
        for n in range(900):
            made.cancel(f"c{n}")
        self.assertEqual(len(made), 100)
        buckets = {id(owner.bucket): owner.bucket for owner in made.owners.values()}
        buckets.pop(id(None))
        (bucket,) = buckets.values()
        assert bucket is not None
        self.assertEqual(bucket.live, 100)
        self.assertLessEqual(len(bucket), 150 + 8)
        made.cancel("c950")
        made.schedule("c950", 60)
        clock.advance(60)
        self.assertEqual(
            sorted(name for name, _ in fired), sorted(f"c{n}" for n in range(900, 1000))
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    @given(
        st.lists(
            st.tuples(st.integers(0, 19), st.booleans(), st.floats(0, 3)),
            min_size=1,
            max_size=80,
        )
    )
    def test_cancel_and_reschedule_property(
        self, steps: list[tuple[int, bool, float]]
    ) -> None:
        """
        Property: owners scheduling, cancelling and scheduling again in any
        order: each deadline that stands fires exactly once and never
        early, none that was cancelled fires, and the wheel counts the
        standing ones.
        """
        made, clock, fired = wheel(0.5)
        standing: dict[str, float] = {}

        def settle() -> None:
            for name, when in fired:
                due = standing.pop(name)  # KeyError: fired twice, or cancelled
                self.assertGreaterEqual(when, due - 1e-6)
            fired.clear()
            self.assertEqual(len(made), len(standing))

        for number, cancel, delay in steps:
            name = f"o{number}"
            clock.advance(0.1)
            settle()
            if name not in standing:
                made.schedule(name, delay)
                standing[name] = clock.seconds() + delay
            elif cancel:
                made.cancel(name)
                del standing[name]
            settle()
        clock.advance(10)
        settle()
        self.assertEqual(standing, {})
        self.assertEqual(clock.getDelayedCalls(), [])
