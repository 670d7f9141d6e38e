"""Tests for L{lineserver.supervisor}: order, restarts, backoff, intensity."""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import IService, IServiceCollection, Service
from twisted.internet import defer
from twisted.internet import error as twisted_errors
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from typing_extensions import override
from zope.interface.verify import verifyObject

from lineserver.interfaces import ISupervisor
from lineserver.outage import is_outage
from lineserver.sinks import SinkUnavailable
from lineserver.supervisor import ChildSpec, Supervisor, default_backoff


class CrashError(Exception):
    """
    The crash our fake children suffer.
    """


def boom(message: str = "boom") -> Failure:
    return Failure(CrashError(message))


class FakeService(Service):
    """
    A child that records its starts and stops in a shared list, and whose
    start may raise and whose stop may return a Deferred the test controls.
    """

    def __init__(
        self,
        label: str,
        events: list[str],
        *,
        stop_result: Deferred[None] | None = None,
        start_error: Exception | None = None,
    ) -> None:
        self.label = label
        self.events = events
        self.stop_result = stop_result
        self.start_error = start_error

    @override
    def startService(self) -> None:
        self.events.append(f"start {self.label}")
        if self.start_error is not None:
            raise self.start_error
        self.running = 1

    @override
    def stopService(self) -> Deferred[None] | None:
        self.events.append(f"stop {self.label}")
        self.running = 0
        return self.stop_result


class Factory:
    """
    A C{ChildSpec.start}: builds instances labelled C{<name><n>} (n from 1).

    @ivar stops: stop results for given instance numbers.
    @ivar start_error: raised by every instance's C{startService}.
    @ivar build_error: raised by this factory itself from build C{n} on.
    """

    def __init__(
        self,
        name: str,
        events: list[str],
        *,
        stops: dict[int, Deferred[None]] | None = None,
        start_error: Exception | None = None,
        build_error_from: int | None = None,
    ) -> None:
        self.name = name
        self.events = events
        self.stops = stops or {}
        self.start_error = start_error
        self.build_error_from = build_error_from
        self.built: list[FakeService] = []
        self.calls = 0

    def __call__(self) -> IService:
        self.calls += 1
        if self.build_error_from is not None and self.calls >= self.build_error_from:
            raise CrashError("cannot build")
        number = len(self.built) + 1
        service = FakeService(
            f"{self.name}{number}",
            self.events,
            stop_result=self.stops.get(number),
            start_error=self.start_error,
        )
        self.built.append(service)
        return service


def fixed(delay: float) -> Callable[[int], float]:
    """
    A deterministic backoff: always C{delay} seconds.
    """
    return lambda attempt: delay


class SupervisorTestsMixin:
    """
    Builds supervisors on a fresh L{Clock} with children recording into
    C{self.events}.
    """

    clock: Clock
    events: list[str]
    escalations: list[Failure]

    def setUp(self) -> None:
        self.clock = Clock()
        self.events = []
        self.escalations = []

    def supervisor(self, **kwargs: Any) -> Supervisor:
        kwargs.setdefault("backoff", fixed(1.0))
        kwargs.setdefault("on_escalate", self.escalations.append)
        return Supervisor(clock=self.clock, **kwargs)

    def factory(self, name: str, **kwargs: Any) -> Factory:
        return Factory(name, self.events, **kwargs)


class InterfaceTests(SupervisorTestsMixin, SynchronousTestCase):
    def test_provides_interfaces(self) -> None:
        """
        A Supervisor is an ISupervisor, and still an IService and an
        IServiceCollection, so it composes into any Twisted application.
        """
        supervisor = self.supervisor()
        self.assertTrue(verifyObject(ISupervisor, supervisor))
        self.assertTrue(verifyObject(IService, supervisor))
        self.assertTrue(verifyObject(IServiceCollection, supervisor))

    def test_default_backoff_is_jittered_capped_exponential(self) -> None:
        """
        Without a backoff, delays double from 0.2s (attempt 1) up to a cap
        of 5s, plus less than one second of jitter that varies.
        """
        supervisor = Supervisor(clock=self.clock)
        for attempt in range(1, 30):
            base = min(0.1 * 2.0**attempt, 5.0)
            delay = supervisor.backoff(attempt)
            self.assertTrue(base <= delay < base + 1.0, (attempt, delay))
        samples = {supervisor.backoff(1) for _ in range(50)}
        self.assertGreater(len(samples), 1)
        policy = default_backoff()
        self.assertTrue(5.0 <= policy(1000) < 6.0)

    def test_default_backoff_on_the_clock(self) -> None:
        """
        With the default backoff, a first restart comes no sooner than 0.2s
        and no later than 1.2s after the failure.
        """
        supervisor = Supervisor(clock=self.clock)
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        supervisor.child_failed(factory.built[0], boom())
        self.clock.advance(0.19)
        self.assertEqual(len(factory.built), 1)
        self.clock.advance(1.01)
        self.assertEqual(len(factory.built), 2)
        self.assertTrue(factory.built[1].running)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 1)

    def test_invalid_limits(self) -> None:
        """
        A negative restart budget or an empty window is a configuration
        error, reported when the supervisor is built.
        """
        self.assertRaises(ValueError, Supervisor, clock=self.clock, max_restarts=-1)
        self.assertRaises(ValueError, Supervisor, clock=self.clock, period=0.0)


class OrderTests(SupervisorTestsMixin, SynchronousTestCase):
    def test_start_order(self) -> None:
        """
        Children start in the order they were added.
        """
        supervisor = self.supervisor()
        for name in "abc":
            supervisor.add_child(ChildSpec(name, self.factory(name)))
        self.assertEqual(self.events, [])
        supervisor.startService()
        self.assertEqual(self.events, ["start a1", "start b1", "start c1"])
        self.assertTrue(supervisor.running)

    def test_add_child_while_running_starts_it(self) -> None:
        """
        A child added to a running supervisor starts at once, and is found
        by name.
        """
        supervisor = self.supervisor()
        supervisor.startService()
        added = supervisor.add_child(ChildSpec("a", self.factory("a")))
        self.assertEqual(self.events, ["start a1"])
        self.assertIs(supervisor.child("a"), added)
        self.assertRaises(KeyError, supervisor.child, "nope")

    def test_stop_is_sequential_in_reverse_order(self) -> None:
        """
        Children stop in reverse order, and a child is not asked to stop
        until the previous child's stop Deferred has fired; the supervisor's
        stop fires after the last one.
        """
        stops: dict[str, Deferred[None]] = {n: Deferred() for n in "abc"}
        supervisor = self.supervisor()
        for name in "abc":
            factory = self.factory(name, stops={1: stops[name]})
            supervisor.add_child(ChildSpec(name, factory))
        supervisor.startService()
        del self.events[:]
        stopped = supervisor.stopService()
        self.assertFalse(supervisor.running)
        self.assertEqual(self.events, ["stop c1"])
        self.assertNoResult(stopped)
        stops["c"].callback(None)
        self.assertEqual(self.events, ["stop c1", "stop b1"])
        self.assertNoResult(stopped)
        stops["b"].callback(None)
        self.assertEqual(self.events, ["stop c1", "stop b1", "stop a1"])
        self.assertNoResult(stopped)
        stops["a"].callback(None)
        self.assertIsNone(self.successResultOf(stopped))

    def test_stop_error_does_not_prevent_other_stops(self) -> None:
        """
        A child whose stop fails is logged; the children after it still
        stop and the supervisor's stop succeeds.
        """
        supervisor = self.supervisor()
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        supervisor.add_child(
            ChildSpec("b", self.factory("b", stops={1: fail(CrashError("stuck"))}))
        )
        supervisor.startService()
        del self.events[:]
        stopped = supervisor.stopService()
        self.assertEqual(self.events, ["stop b1", "stop a1"])
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 1)

    def test_stop_twice(self) -> None:
        """
        A second stop while the first is under way fires with the first;
        a stop of a stopped supervisor fires at once and stops nothing.
        """
        stop: Deferred[None] = Deferred()
        supervisor = self.supervisor()
        supervisor.add_child(ChildSpec("a", self.factory("a", stops={1: stop})))
        supervisor.startService()
        first = supervisor.stopService()
        second = supervisor.stopService()
        self.assertNoResult(second)
        stop.callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        del self.events[:]
        self.successResultOf(supervisor.stopService())
        self.assertEqual(self.events, [])

    def test_position_kept_after_restart(self) -> None:
        """
        A restarted child takes its old place in the order, so the first
        child (the sink) is still stopped last.
        """
        supervisor = self.supervisor()
        factories = {name: self.factory(name) for name in "abc"}
        for name in "abc":
            supervisor.add_child(ChildSpec(name, factories[name]))
        supervisor.startService()
        supervisor.child_failed(factories["a"].built[0], boom())
        self.clock.advance(1.0)
        self.assertEqual([s.name for s in supervisor], ["a", "b", "c"])
        self.assertIs(supervisor.child("a"), factories["a"].built[1])
        del self.events[:]
        supervisor.stopService()
        self.assertEqual(self.events, ["stop c1", "stop b1", "stop a2"])
        self.flushLoggedErrors(CrashError)

    def test_foreign_service_refused(self) -> None:
        """
        A service not described by a ChildSpec cannot join, as the
        supervisor could not rebuild it; a second child with a taken name
        is refused too.
        """
        supervisor = self.supervisor()
        foreign = Service()
        foreign.setName("x")
        self.assertRaises(ValueError, foreign.setServiceParent, supervisor)
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        self.assertRaises(
            RuntimeError, supervisor.add_child, ChildSpec("a", self.factory("a"))
        )
        self.assertEqual([s.name for s in supervisor], ["a"])

    def test_disown_ends_supervision(self) -> None:
        """
        A child removed with disownServiceParent is stopped and forgotten:
        its failures are ignored and its name is free again.
        """
        supervisor = self.supervisor()
        factory = self.factory("a")
        child = supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        child.disownServiceParent()
        self.assertEqual(self.events, ["start a1", "stop a1"])
        self.assertIsNone(child.parent)
        supervisor.child_failed(child, boom())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        self.assertEqual(self.events[-1], "start a1")


class RestartTests(SupervisorTestsMixin, SynchronousTestCase):
    def test_permanent_child_restarted_fresh_after_backoff(self) -> None:
        """
        A failed permanent child is stopped and removed at once, and after
        the backoff a new instance from its spec takes its name and starts.
        """
        supervisor = self.supervisor(backoff=fixed(2.0))
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        first = factory.built[0]
        supervisor.child_failed(first, boom())
        self.assertEqual(self.events, ["start a1", "stop a1"])
        self.assertRaises(KeyError, supervisor.child, "a")
        self.assertIsNone(first.parent)
        self.clock.advance(1.99)
        self.assertEqual(len(factory.built), 1)
        self.assertEqual(supervisor.restarts, 0)
        self.clock.advance(0.01)
        self.assertEqual(len(factory.built), 2)
        second = supervisor.child("a")
        self.assertIsNot(second, first)
        self.assertTrue(second.running)
        self.assertIs(second.parent, supervisor)
        self.assertEqual(self.events[-1], "start a2")
        self.assertEqual(supervisor.restarts, 1)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 1)

    def test_backoff_attempt_counts_restarts_in_window(self) -> None:
        """
        The backoff gets the child's restart number within the current
        window, from 1; it falls back to 1 once old restarts leave it.
        """
        attempts: list[int] = []

        def backoff(attempt: int) -> float:
            attempts.append(attempt)
            return 1.0

        supervisor = self.supervisor(backoff=backoff, max_restarts=10, period=10.0)
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        for _ in range(3):
            supervisor.child_failed(supervisor.child("a"), boom())
            self.clock.advance(1.0)
        self.clock.advance(10.0)
        supervisor.child_failed(supervisor.child("a"), boom())
        self.assertEqual(attempts, [1, 2, 3, 1])
        self.flushLoggedErrors(CrashError)

    def test_failure_is_logged_with_name(self) -> None:
        """
        A failure is logged as an error, "child <name> failed: <reason>",
        with the failure attached.
        """
        supervisor = self.supervisor()
        factory = self.factory("sink")
        supervisor.add_child(ChildSpec("sink", factory))
        supervisor.startService()
        with capturedLogs() as events:
            supervisor.child_failed(factory.built[0], boom("disk full"))
        failed = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failed), 1)
        self.assertEqual(formatEvent(failed[0]), "child sink failed: disk full")
        self.assertEqual(failed[0]["name"], "sink")
        self.assertEqual(failed[0]["log_level"], LogLevel.error)
        self.assertIsInstance(failed[0]["log_failure"].value, CrashError)
        self.flushLoggedErrors(CrashError)

    def test_restart_waits_for_stop_of_failed_child(self) -> None:
        """
        The backoff starts only once the failed instance has stopped, so the
        old and the new instance never hold the same resource.
        """
        stop: Deferred[None] = Deferred()
        supervisor = self.supervisor()
        factory = self.factory("a", stops={1: stop})
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        supervisor.child_failed(factory.built[0], boom())
        self.clock.advance(100.0)
        self.assertEqual(len(factory.built), 1)
        stop.callback(None)
        self.clock.advance(1.0)
        self.assertEqual(len(factory.built), 2)
        self.flushLoggedErrors(CrashError)

    def test_failed_stop_of_failed_child_still_restarts(self) -> None:
        """
        If the failed instance's stop fails too, that is logged and the
        child is restarted anyway.
        """
        supervisor = self.supervisor()
        factory = self.factory("a", stops={1: fail(CrashError("stop"))})
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        supervisor.child_failed(factory.built[0], boom())
        self.clock.advance(1.0)
        self.assertEqual(len(factory.built), 2)
        self.assertTrue(factory.built[1].running)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 2)

    def test_temporary_child_not_restarted(self) -> None:
        """
        A failed temporary child is stopped and removed, never rebuilt, does
        not count towards the restart intensity, and frees its name.
        """
        supervisor = self.supervisor(max_restarts=0)
        factory = self.factory("conn")
        supervisor.add_child(ChildSpec("conn", factory, restart="temporary"))
        supervisor.startService()
        supervisor.child_failed(factory.built[0], boom())
        self.assertEqual(self.events, ["start conn1", "stop conn1"])
        self.assertRaises(KeyError, supervisor.child, "conn")
        self.clock.advance(100.0)
        self.assertEqual(len(factory.built), 1)
        self.assertFalse(supervisor.escalated)
        self.assertEqual(supervisor.restarts, 0)
        supervisor.add_child(ChildSpec("conn", self.factory("conn")))
        self.assertEqual(self.events[-1], "start conn1")
        self.flushLoggedErrors(CrashError)

    def test_stale_incarnation_ignored(self) -> None:
        """
        A report from an instance that was already replaced, or that is
        already being restarted, changes nothing.
        """
        supervisor = self.supervisor()
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        first = factory.built[0]
        supervisor.child_failed(first, boom())
        supervisor.child_failed(first, boom())
        self.assertEqual(self.events, ["start a1", "stop a1"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.0)
        supervisor.child_failed(first, boom())
        self.assertIs(supervisor.child("a"), factory.built[1])
        self.assertTrue(factory.built[1].running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.events, ["start a1", "stop a1", "start a2"])
        self.assertEqual(supervisor.restarts, 1)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 1)

    def test_failure_while_stopped_ignored(self) -> None:
        """
        A report reaching a supervisor that is not running is ignored: no
        stop, no restart.
        """
        supervisor = self.supervisor()
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.child_failed(factory.built[0], boom())
        self.assertIs(supervisor.child("a"), factory.built[0])
        self.assertEqual(self.events, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(CrashError), [])

    def test_pending_restart_cancelled_by_stop(self) -> None:
        """
        Stopping the supervisor cancels a restart that waits for its
        backoff; starting it again builds a fresh instance at once.
        """
        supervisor = self.supervisor(backoff=fixed(5.0))
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        supervisor.child_failed(factory.built[0], boom())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(supervisor.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10.0)
        self.assertEqual(len(factory.built), 1)
        supervisor.startService()
        self.assertEqual(len(factory.built), 2)
        self.assertTrue(factory.built[1].running)
        self.flushLoggedErrors(CrashError)

    def test_stop_waits_for_failed_child_stop(self) -> None:
        """
        A supervisor stopped while a failed child is still stopping fires
        only after that stop, and does not restart the child.
        """
        stop: Deferred[None] = Deferred()
        supervisor = self.supervisor()
        factory = self.factory("a", stops={1: stop})
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.add_child(ChildSpec("b", self.factory("b")))
        supervisor.startService()
        supervisor.child_failed(factory.built[0], boom())
        stopped = supervisor.stopService()
        self.assertIn("stop b1", self.events)
        self.assertNoResult(stopped)
        stop.callback(None)
        self.successResultOf(stopped)
        self.clock.advance(10.0)
        self.assertEqual(len(factory.built), 1)
        self.flushLoggedErrors(CrashError)

    def test_start_raising_in_add_child_is_a_failure(self) -> None:
        """
        A child added to a running supervisor whose startService raises is
        restarted like any failed child.
        """
        supervisor = self.supervisor()
        supervisor.startService()
        factory = self.factory("a", start_error=CrashError("no port"))
        supervisor.add_child(ChildSpec("a", factory))
        self.assertEqual(self.events, ["start a1", "stop a1"])
        factory.start_error = None
        self.clock.advance(1.0)
        self.assertTrue(supervisor.child("a").running)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 1)


class IntensityTests(SupervisorTestsMixin, SynchronousTestCase):
    def test_too_many_restarts_escalate(self) -> None:
        """
        max_restarts + 1 failures within the period escalate: the critical
        line is logged, every child stops, and on_escalate is called once,
        with the last failure, after the children have stopped.
        """
        stop: Deferred[None] = Deferred()
        supervisor = self.supervisor(max_restarts=3, period=10.0)
        supervisor.add_child(ChildSpec("sink", self.factory("sink", stops={1: stop})))
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        for _ in range(3):
            supervisor.child_failed(supervisor.child("a"), boom())
            self.clock.advance(1.0)
        self.assertFalse(supervisor.escalated)
        last = boom("last straw")
        with capturedLogs() as events:
            supervisor.child_failed(supervisor.child("a"), last)
        self.assertTrue(supervisor.escalated)
        self.assertFalse(supervisor.running)
        critical = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            [formatEvent(e) for e in critical],
            [
                "restart intensity exceeded: 4 restarts in 10.0s, "
                "the last of a; stopping"
            ],
        )
        self.assertEqual(self.events[-2:], ["stop a4", "stop sink1"])
        self.assertEqual(self.escalations, [])
        stop.callback(None)
        self.assertEqual(self.escalations, [last])
        self.clock.advance(100.0)
        self.assertEqual(len(factory.built), 4)
        supervisor.child_failed(supervisor.child("a"), boom())
        self.assertEqual(len(self.escalations), 1)
        self.assertEqual(supervisor.restarts, 3)
        self.flushLoggedErrors(CrashError)

    def test_restarts_of_all_children_count_together(self) -> None:
        """
        As in OTP, the intensity counts restarts of every child: two
        children failing in turn escalate as one flapping child would.
        """
        supervisor = self.supervisor(max_restarts=2, period=10.0)
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        supervisor.add_child(ChildSpec("b", self.factory("b")))
        supervisor.startService()
        supervisor.child_failed(supervisor.child("a"), boom())
        supervisor.child_failed(supervisor.child("b"), boom())
        self.clock.advance(1.0)
        self.assertFalse(supervisor.escalated)
        supervisor.child_failed(supervisor.child("a"), boom())
        self.assertTrue(supervisor.escalated)
        self.assertEqual(len(self.escalations), 1)
        self.flushLoggedErrors(CrashError)

    def test_failures_spread_beyond_period_do_not_escalate(self) -> None:
        """
        Failures that never put more than max_restarts restarts in one
        period are restarted forever without escalation; a restart exactly
        one period old has left the window.
        """
        supervisor = self.supervisor(max_restarts=2, period=10.0)
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        for _ in range(20):
            supervisor.child_failed(supervisor.child("a"), boom())
            self.clock.advance(5.0)
        self.assertFalse(supervisor.escalated)
        self.assertEqual(supervisor.restarts, 20)
        self.assertEqual(self.escalations, [])
        self.assertTrue(supervisor.child("a").running)
        self.flushLoggedErrors(CrashError)

    def test_zero_restarts_escalates_on_first_failure(self) -> None:
        """
        With max_restarts=0 a permanent child's first failure escalates.
        """
        supervisor = self.supervisor(max_restarts=0)
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        supervisor.startService()
        supervisor.child_failed(supervisor.child("a"), boom())
        self.assertTrue(supervisor.escalated)
        self.assertEqual(len(self.escalations), 1)
        self.flushLoggedErrors(CrashError)

    def test_start_that_always_raises_escalates(self) -> None:
        """
        A child whose startService always raises is restarted with backoff
        until the intensity is exceeded, then the supervisor gives up: a
        bounded number of attempts, no loop.
        """
        supervisor = self.supervisor(max_restarts=2, period=60.0)
        factory = self.factory("a", start_error=CrashError("cannot listen"))
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertTrue(supervisor.escalated)
        self.assertEqual(len(factory.built), 3)
        self.assertEqual(len(self.escalations), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(supervisor.running)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 3)

    def test_build_that_raises_on_restart_escalates(self) -> None:
        """
        A spec whose start() raises when rebuilding counts as a failure of
        that child, and ends in escalation too.
        """
        supervisor = self.supervisor(max_restarts=2, period=60.0)
        factory = self.factory("a", build_error_from=2)
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.startService()
        supervisor.child_failed(supervisor.child("a"), boom())
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertTrue(supervisor.escalated)
        self.assertEqual(factory.calls, 3)
        self.assertEqual(len(self.escalations), 1)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 3)

    def test_escalation_during_start(self) -> None:
        """
        A child that escalates while the supervisor starts stops the start:
        the children after it are not started.
        """
        supervisor = self.supervisor(max_restarts=0)
        supervisor.add_child(
            ChildSpec("a", self.factory("a", start_error=CrashError("no")))
        )
        supervisor.add_child(ChildSpec("b", self.factory("b")))
        supervisor.startService()
        self.assertTrue(supervisor.escalated)
        self.assertNotIn("start b1", self.events)
        self.assertEqual(len(self.escalations), 1)
        self.flushLoggedErrors(CrashError)

    @settings(max_examples=300, deadline=None)
    @given(
        times=st.lists(st.integers(0, 60), max_size=20).map(sorted),
        period=st.integers(1, 15),
        max_restarts=st.integers(0, 4),
    )
    def test_intensity_window_property(
        self, times: list[int], period: int, max_restarts: int
    ) -> None:
        """
        For any failure times of a child restarted without delay, the
        supervisor escalates (once) iff some window of C{period} seconds
        holds more than C{max_restarts} failures.
        """
        clock = Clock()
        escalations: list[Failure] = []
        supervisor = Supervisor(
            clock=clock,
            max_restarts=max_restarts,
            period=float(period),
            backoff=fixed(0.0),
            on_escalate=escalations.append,
        )
        supervisor.add_child(ChildSpec("a", Factory("a", [])))
        supervisor.startService()
        for time in times:
            clock.advance(time - clock.seconds())
            if supervisor.escalated:
                break
            supervisor.child_failed(supervisor.child("a"), boom())
        expected = any(
            sum(1 for other in times if start <= other < start + period) > max_restarts
            for start in times
        )
        self.assertEqual(supervisor.escalated, expected)
        self.assertEqual(len(escalations), int(expected))
        self.flushLoggedErrors(CrashError)


class Staged(Supervisor):
    """
    A supervisor with its own order: starts only C{first} by itself, and
    stops C{first_to_stop} before the rest.
    """

    def __init__(self, first: str, first_to_stop: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first = first
        self.first_to_stop = first_to_stop
        self.stop_results: list[Deferred[None]] = []

    @override
    def start_children(self) -> None:
        self.start_child(self.first)

    @override
    async def stop_children(self) -> None:
        for name in self.first_to_stop:
            first = self.stop_child(name)
            again = self.stop_child(name)
            self.stop_results += [first, again]
            await first
            await again


class LifecycleTests(SupervisorTestsMixin, SynchronousTestCase):
    def staged(self, first: str, first_to_stop: list[str]) -> Staged:
        return Staged(
            first,
            first_to_stop,
            clock=self.clock,
            backoff=fixed(1.0),
            on_escalate=self.escalations.append,
        )

    def test_staged_start(self) -> None:
        """
        An overridden start_children starts what it chooses; start_child
        starts the others later, each once.
        """
        supervisor = self.staged("b", [])
        for name in "abc":
            supervisor.add_child(ChildSpec(name, self.factory(name)))
        supervisor.startService()
        self.assertEqual(self.events, ["start b1"])
        for name in "abc":
            supervisor.start_child(name)
        self.assertEqual(self.events, ["start b1", "start a1", "start c1"])

    def test_custom_stop_order_each_child_once(self) -> None:
        """
        Children an overridden stop_children stops are stopped in its
        order, once each even if asked twice (the second ask waits for the
        first stop); the supervisor then stops the rest in reverse order.
        """
        stop_b: Deferred[None] = Deferred()
        supervisor = self.staged("a", ["b", "a"])
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        supervisor.add_child(ChildSpec("b", self.factory("b", stops={1: stop_b})))
        supervisor.add_child(ChildSpec("c", self.factory("c")))
        supervisor.add_child(ChildSpec("d", self.factory("d")))
        for name in "bcd":
            supervisor.start_child(name)
        supervisor.startService()
        del self.events[:]
        stopped = supervisor.stopService()
        self.assertEqual(self.events, ["stop b1"])
        first, again = supervisor.stop_results
        self.assertNoResult(first)
        self.assertNoResult(again)
        stop_b.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.events, ["stop b1", "stop a1", "stop d1", "stop c1"])

    def test_no_restart_while_stopping(self) -> None:
        """
        A child that fails while the supervisor stops (here: while another
        child's stop is still pending) is not restarted, and nothing is
        scheduled.
        """
        stop_b: Deferred[None] = Deferred()
        supervisor = self.supervisor()
        factory = self.factory("a")
        supervisor.add_child(ChildSpec("a", factory))
        supervisor.add_child(ChildSpec("b", self.factory("b", stops={1: stop_b})))
        supervisor.startService()
        stopped = supervisor.stopService()
        supervisor.child_failed(factory.built[0], boom())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        stop_b.callback(None)
        self.successResultOf(stopped)
        self.clock.advance(10.0)
        self.assertEqual(len(factory.built), 1)
        self.assertEqual(self.events.count("stop a1"), 1)
        self.assertEqual(self.flushLoggedErrors(CrashError), [])

    def test_start_after_stop_builds_fresh_children(self) -> None:
        """
        A stopped supervisor started again starts a fresh instance of every
        child, in order, and never the stopped ones again; a child is
        reachable by name from the moment the start begins.
        """
        supervisor = self.supervisor()
        factories = {name: self.factory(name) for name in "ab"}
        for name in "ab":
            supervisor.add_child(ChildSpec(name, factories[name]))
        supervisor.startService()
        self.successResultOf(supervisor.stopService())
        del self.events[:]
        supervisor.startService()
        self.assertEqual(self.events, ["start a2", "start b2"])
        for name in "ab":
            self.assertIs(supervisor.child(name), factories[name].built[1])
            self.assertFalse(factories[name].built[0].running)
        self.successResultOf(supervisor.stopService())
        self.assertEqual(self.events[-2:], ["stop b2", "stop a2"])


def down(message: str = "Connection refused") -> Failure:
    return Failure(ConnectionRefusedError(111, message))


class OutageTests(SupervisorTestsMixin, SynchronousTestCase):
    """
    A child whose spec tells outages from crashes (C{ChildSpec.outage}).
    """

    def outage_supervisor(self) -> tuple[Supervisor, Factory]:
        supervisor = self.supervisor(max_restarts=2, period=10.0)
        factory = self.factory("sink")
        supervisor.add_child(ChildSpec("sink", factory, outage=is_outage))
        supervisor.startService()
        return supervisor, factory

    def test_outages_never_escalate(self) -> None:
        """
        A child failing with an outage, over and over for far longer than
        the intensity window, is restarted every time and never escalates;
        outages and restarts are counted.
        """
        supervisor, factory = self.outage_supervisor()
        for _ in range(100):
            supervisor.child_failed(supervisor.child("sink"), down())
            self.clock.advance(1.0)
        self.assertFalse(supervisor.escalated)
        self.assertEqual(self.escalations, [])
        self.assertEqual(len(factory.built), 101)
        self.assertEqual(supervisor.outages, 100)
        self.assertEqual(supervisor.restarts, 100)
        self.assertTrue(supervisor.child("sink").running)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_outage_backoff_is_capped_exponential(self) -> None:
        """
        Restarts after outages wait the backoff of the outage's try number
        (here the default: doubling from 0.2s, capped at 5s plus jitter),
        whatever the intensity window.
        """
        supervisor = Supervisor(clock=self.clock, max_restarts=0, period=1.0)
        factory = self.factory("sink")
        supervisor.add_child(ChildSpec("sink", factory, outage=is_outage))
        supervisor.startService()
        delays = []
        for _ in range(8):
            supervisor.child_failed(supervisor.child("sink"), down())
            waited = 0.0
            while "sink" not in supervisor.namedServices:
                self.clock.advance(0.05)
                waited += 0.05
            delays.append(waited)
        for attempt, waited in enumerate(delays, start=1):
            base = min(0.1 * 2.0**attempt, 5.0)
            self.assertTrue(base <= waited < base + 1.1, (attempt, waited))
        self.assertFalse(supervisor.escalated)

    def test_outage_logged_every_few_seconds(self) -> None:
        """
        An outage says what is wrong, for how long, and what waits (the
        supervisor's outage_detail), at most every 5 seconds, without a
        traceback.
        """
        supervisor, _ = self.outage_supervisor()
        supervisor.outage_detail = lambda name: f"7 line(s) wait for {name}"  # type: ignore[method-assign]
        with capturedLogs() as events:
            for _ in range(20):
                supervisor.child_failed(supervisor.child("sink"), down())
                self.clock.advance(1.0)
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 4)
        self.assertTrue(
            warnings[0].startswith(
                "child sink is down (an outage, not a crash): Connection refused;"
                " down for 0.0s; 7 line(s) wait for sink; retrying in 1.0s"
            ),
            warnings[0],
        )
        self.assertIn("down for 5.0s", warnings[1])
        self.assertFalse(any("log_failure" in e for e in events))

    def test_a_crash_still_counts(self) -> None:
        """
        The same child failing with a bug (not an outage) counts against
        the intensity, and outages between crashes do not.
        """
        supervisor, _ = self.outage_supervisor()
        for _ in range(2):
            supervisor.child_failed(supervisor.child("sink"), boom())
            self.clock.advance(1.0)
            supervisor.child_failed(supervisor.child("sink"), down())
            self.clock.advance(1.0)
        self.assertFalse(supervisor.escalated)
        supervisor.child_failed(supervisor.child("sink"), boom())
        self.assertTrue(supervisor.escalated)
        self.assertEqual(len(self.flushLoggedErrors(CrashError)), 3)

    def test_without_outage_spec_an_oserror_is_a_crash(self) -> None:
        """
        A child whose spec names no outages escalates on OSErrors as on
        any crash.
        """
        supervisor = self.supervisor(max_restarts=1)
        supervisor.add_child(ChildSpec("a", self.factory("a")))
        supervisor.startService()
        supervisor.child_failed(supervisor.child("a"), down())
        self.clock.advance(1.0)
        supervisor.child_failed(supervisor.child("a"), down())
        self.assertTrue(supervisor.escalated)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 2)

    def test_is_outage(self) -> None:
        """
        SinkUnavailable, OSError (with ConnectionError, TimeoutError) and
        Twisted's connection errors are outages; anything else is a bug.
        """
        for error in (
            SinkUnavailable("full"),
            OSError(28, "No space left on device"),
            ConnectionResetError(),
            TimeoutError(),
            twisted_errors.ConnectionRefusedError(),
            twisted_errors.TimeoutError(),
            twisted_errors.DNSLookupError(),
            twisted_errors.ConnectionLost(),
            twisted_errors.ConnectionDone(),
            defer.TimeoutError(),
        ):
            self.assertTrue(is_outage(error), error)
            self.assertTrue(is_outage(Failure(error)), error)
        bugs: tuple[Exception, ...] = (RuntimeError(), ValueError(), CrashError())
        for bug in bugs:
            self.assertFalse(is_outage(bug), bug)
