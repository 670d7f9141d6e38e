"""An OTP-style one_for_one supervisor for Twisted services.

A L{Supervisor} is a L{MultiService} whose children are described by
L{ChildSpec}s rather than given as instances, because a crashed service is
not trusted again: the supervisor builds a fresh one (and, as in OTP, a
child stopped with its supervisor is built afresh when the supervisor
starts again).  Twisted's own L{MultiService} stops its children all at
once; the supervisor stops each child exactly once, by default one after the
other in reverse start order.  A subclass that needs its own order (stop
accepting, drain, flush the sink) overrides L{Supervisor.start_children} and
L{Supervisor.stop_children} and calls L{Supervisor.start_child} and
L{Supervisor.stop_child}; the supervisor still guarantees that no child is
stopped twice, that every child is stopped, and that nothing is restarted
while it stops.

Time comes from an L{IReactorTime} given to the constructor, so tests drive
restarts, backoff and the intensity window with a L{Clock}.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from twisted.application.internet import backoffPolicy
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from lineserver.interfaces import ISupervisor

RestartPolicy = Literal["permanent", "temporary"]


@dataclass(frozen=True)
class ChildSpec:
    """
    How to make one supervised child, again and again.

    @ivar name: the child's service name, unique within its supervisor.
    @ivar start: builds a fresh, unstarted service each time it is called;
        never return an instance that was used before.
    @ivar restart: C{"permanent"} children are restarted after a failure;
        C{"temporary"} ones are stopped, removed and forgotten.
    @ivar outage: tells an outage of the child (its destination down, full
        or refusing) from a crash; an outage restarts a permanent child
        with capped backoff forever and never counts against the restart
        intensity.  None: every failure is a crash.
    """

    name: str
    start: Callable[[], IService]
    restart: RestartPolicy = "permanent"
    outage: Callable[[Failure], bool] | None = None


#: Seconds between two log lines about the same child's outage.
OUTAGE_COMPLAINT_INTERVAL = 5.0

#: Seconds without a failure after which a child's next outage is a new
#: one (its backoff starts again from the shortest delay): longer than
#: the longest restart delay, jitter included.
OUTAGE_RESET = 15.0


@dataclass
class _Outage:
    """
    One child's current outage: how long, how many tries, when last said.
    """

    since: float
    last: float
    attempts: int = 0
    complained: float = float("-inf")


def default_backoff() -> Callable[[int], float]:
    """
    The default restart delay: exponential from 0.1s, doubling, capped at
    5s, plus up to 1s of random jitter so that children which failed
    together do not all come back in the same instant.

    @return: a callable from the attempt number (1 for the first restart of
        a child in the current window) to a delay in seconds.
    """
    return backoffPolicy(initialDelay=0.1, maxDelay=5.0, factor=2.0)


def _caught() -> Failure:
    """
    The exception being handled, as a Failure (Twisted's constructor is
    untyped, so the ignore lives here).
    """
    return Failure()  # type: ignore[no-untyped-call]


def _reason_text(failure: Failure) -> str:
    """
    @return: the OS's words for an C{OSError}, the exception's text else.
    """
    error = failure.value
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _as_failure(reason: object) -> Failure:
    """
    Callers of L{Supervisor.child_failed} are asked for a L{Failure}, but a
    bare exception or text should still be logged sensibly.
    """
    if isinstance(reason, Failure):
        return reason
    exc = reason if isinstance(reason, BaseException) else RuntimeError(str(reason))
    return Failure(exc)  # type: ignore[no-untyped-call]


class _PendingRestart:
    """
    One restart of one child, from its failure to its fresh start.

    A distinct object per episode, so that the end of an old episode (a
    slow stop finishing after the supervisor was stopped and started again)
    cannot schedule a restart on behalf of a newer one.

    @ivar call: the delayed rebuild, once the failed instance has stopped.
    """

    call: IDelayedCall | None = None


class _ChildStop:
    """
    The one stop of one child during a stop of its supervisor, for whoever
    else waits for it to end (however it ends).
    """

    def __init__(self, stopping: Deferred[None]) -> None:
        self.done = False
        self._waiters: list[Deferred[None]] = []
        stopping.addBoth(self._ended)

    def _ended(self, result: object) -> object:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return result

    def when_done(self) -> Deferred[None]:
        if self.done:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


@implementer(ISupervisor)
class Supervisor(MultiService):
    """
    Start children in order, restart failed permanent ones with backoff, and
    give up (escalate) when they fail too often.

    Children are added with L{add_child}; adding a service directly with
    C{setServiceParent} is refused, since the supervisor could not rebuild
    it.  A child reports a crash by calling L{child_failed} on its parent;
    a child whose C{startService} raises (or whose spec's C{start} raises on
    a restart) is treated the same way.

    Restart intensity works as in OTP: every restart of a permanent child,
    whichever it is, is recorded; when more than C{max_restarts} of them
    fall within C{period} seconds, the supervisor stops all its children
    and calls C{on_escalate}.

    Outages (a failure the child's spec calls one, see L{ChildSpec.outage})
    are not crashes: the child is restarted with capped backoff for as long
    as it takes, a warning says what is wrong at most every
    L{OUTAGE_COMPLAINT_INTERVAL} seconds, and the intensity window never
    sees them.

    @ivar escalated: C{True} once the restart intensity was exceeded.
    @ivar restarts: how many fresh instances were started after failures
        (outages included).
    @ivar restarts_by_child: the same, by child name (for metrics).
    @ivar outages: how many failures were outages.
    @ivar backoff: the restart delay policy in use (attempt -> seconds).
    """

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        max_restarts: int = 5,
        period: float = 10.0,
        backoff: Callable[[int], float] | None = None,
        on_escalate: Callable[[Failure], None] | None = None,
    ) -> None:
        """
        @param clock: schedules restarts and timestamps failures.
        @param max_restarts: restarts tolerated within C{period}; one more
            escalates.  Zero means the first failure escalates.
        @param period: the length, in seconds, of the sliding window.
        @param backoff: the delay before restart number C{attempt} of a
            child (counted within the current window, from 1); by default
            L{default_backoff}.
        @param on_escalate: called once, with the failure that exceeded the
            intensity, after every child has stopped.  A server uses it to
            exit with a non-zero status.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {max_restarts}")
        if period <= 0:
            raise ValueError(f"period must be > 0, not {period}")
        self._clock = clock
        self._max_restarts = max_restarts
        self._period = period
        self.backoff = backoff if backoff is not None else default_backoff()
        self._on_escalate = on_escalate
        self.escalated = False
        self.restarts = 0
        self.restarts_by_child: Counter[str] = Counter()
        self.outages = 0
        # The current outage of each child in one, by name.
        self._outages: dict[str, _Outage] = {}
        # Every known child by name; insertion order is start order.
        self._specs: dict[str, ChildSpec] = {}
        # (time, name) of each restart still inside the intensity window.
        self._window: deque[tuple[float, str]] = deque()
        # Children between failure and fresh start.
        self._restarting: dict[str, _PendingRestart] = {}
        # Stops of failed instances that were taken out of the collection.
        self._detached_stops: set[Deferred[None]] = set()
        self._stopping = False
        self._stop_waiters: list[Deferred[None]] = []
        # The one stop of each child during the current stop, by name.
        self._child_stops: dict[str, _ChildStop] = {}
        # Children whose current instance was stopped with the supervisor:
        # rebuilt from their spec at the next start.
        self._spent: set[str] = set()

    def add_child(self, spec: ChildSpec) -> IService:
        """
        Supervise a new child, after the ones already added.

        The first instance is built at once; if the supervisor is running
        it is started at once too, and a C{startService} that raises is a
        failure of the child (restarted or escalated like any other).  A
        C{spec.start} that raises here propagates to the caller: a child
        that cannot even be built is a configuration error.

        @return: the first instance.
        @raise RuntimeError: if a child of that name is already supervised.
        """
        if spec.name in self._specs:
            raise RuntimeError(f"cannot have two children named {spec.name!r}")
        service = spec.start()
        service.setName(spec.name)  # type: ignore[no-untyped-call]
        self._specs[spec.name] = spec
        self._attach(spec.name, service)
        return service

    def child(self, name: str) -> IService:
        """
        @return: the current instance of the child named C{name}.
        @raise KeyError: if there is none (unknown, or being restarted).
        """
        service: IService = self.namedServices[name]
        return service

    def child_failed(self, child: object, reason: object) -> None:
        """
        A child can no longer do its job: restart it, drop it, or escalate.

        Reports from an instance that is no longer current (a stale
        incarnation, or one already being restarted) and reports while the
        supervisor is not running are ignored, as they describe a child
        that is already being dealt with.
        """
        name = getattr(child, "name", None)
        if (
            not self.running
            or not isinstance(name, str)
            or self.namedServices.get(name) is not child
        ):
            self.log.debug(
                "ignoring failure of {child!r} (not a running child): {reason}",
                child=child,
                reason=reason,
            )
            return
        self._handle_failure(name, self.namedServices[name], _as_failure(reason))

    @override
    def startService(self) -> None:
        """
        Start the children (by default in the order they were added).

        A child stopped with the supervisor is replaced by a fresh instance
        first, as OTP starts children from their specs: a stopped instance
        is not trusted to start again.  A child whose restart was cut short
        by a stop gets its fresh instance now too.
        """
        self._renew_spent()
        Service.startService(self)  # type: ignore[no-untyped-call]
        self._window.clear()
        self.start_children()

    def _renew_spent(self) -> None:
        """
        Put fresh, unstarted instances in place of the children stopped by
        the last stop (before running, so that they are not started yet).
        """
        spent, self._spent = self._spent, set()
        for name in spent:
            old = self.namedServices.get(name)
            if name not in self._specs or old is None:
                continue
            self._detach(name, old)
            try:
                fresh = self._specs[name].start()
                fresh.setName(name)  # type: ignore[no-untyped-call]
            except Exception:
                continue  # start_child builds it again, as a failure
            self._attach(name, fresh)

    def start_children(self) -> None:
        """
        Start every child, in the order they were added.  Override to start
        them in stages (with L{start_child}); the supervisor is running
        while this runs.
        """
        for name in list(self._specs):
            if not self.running:
                # A child escalated while starting.
                return
            self.start_child(name)

    def start_child(self, name: str) -> None:
        """
        Start child C{name} if it is not running (building it if it has no
        instance).  A start that raises is the child's failure.
        """
        if not self.running or name not in self._specs:
            return
        service = self.namedServices.get(name)
        if service is None:
            self._spawn(name)
        elif not service.running:
            self._start(name, service)

    @override
    def stopService(self) -> Deferred[None]:
        """
        Cancel pending restarts, then stop every child once: those that
        L{stop_children} stops, in its order, then any it left running, in
        reverse start order.

        The supervisor stops running at once, so a child failing while it
        stops is not restarted.  A child whose stop fails is logged and the
        others still stop.  Calling this again while a stop is under way
        returns a Deferred for the same stop.
        """
        if self._stopping:
            waiter: Deferred[None] = Deferred()
            self._stop_waiters.append(waiter)
            return waiter
        if not self.running:
            return succeed(None)
        Service.stopService(self)  # type: ignore[no-untyped-call]
        for pending in self._restarting.values():
            if pending.call is not None and pending.call.active():
                pending.call.cancel()
        self._restarting.clear()
        self._stopping = True
        self._child_stops = {}
        return Deferred.fromCoroutine(self._stop_everything())

    async def stop_children(self) -> None:
        """
        Stop the children, each after the previous one's stop has finished,
        in reverse start order.  Override to stop them in another order
        (with L{stop_child}); children left running are stopped afterwards.
        """
        await self._stop_the_rest()

    def stop_child(self, name: str) -> Deferred[None]:
        """
        Stop the current instance of child C{name}, once per stop of the
        supervisor: asked again, it returns a Deferred that fires when that
        one stop has ended.

        @return: the child's own stop Deferred the first time, so that the
            caller may put a deadline on it (what cancelling means is the
            child's business); a fired Deferred if there is no such child.
        """
        done = self._child_stops.get(name)
        if done is not None:
            return done.when_done()
        service = self.namedServices.get(name)
        if service is None:
            return succeed(None)
        stopping: Deferred[None] = maybeDeferred(service.stopService)
        self._child_stops[name] = _ChildStop(stopping)
        self._spent.add(name)
        return stopping

    async def _stop_the_rest(self) -> None:
        for service in reversed(list(self.services)):
            if service.name in self._child_stops:
                continue
            try:
                await self.stop_child(service.name)
            except Exception:
                self._log_stop_error(_caught(), service.name)

    async def _stop_everything(self) -> None:
        try:
            try:
                await self.stop_children()
            except Exception:
                self.log.failure("stopping the children failed")
            await self._stop_the_rest()
            pending = list(self._detached_stops)
            if pending:
                await DeferredList(pending)
        finally:
            self._stopping = False
            waiters, self._stop_waiters = self._stop_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    @override
    def addService(self, service: IService) -> None:
        """
        Insert a child at its place in the start order (not at the end, as
        L{MultiService} would), so that a restarted child keeps its place.

        @raise ValueError: if C{service} was not added with L{add_child}.
        @raise RuntimeError: if the child already has a current instance.
        """
        name = service.name
        if not isinstance(name, str) or name not in self._specs:
            raise ValueError(
                f"{service!r} is not a supervised child; use add_child(ChildSpec)"
            )
        if name in self.namedServices:
            raise RuntimeError(f"cannot have two children named {name!r}")
        # self.services is kept in spec order, so the place is the number
        # of current children that were added before this one.
        order = list(self._specs)
        position = order.index(name)
        index = sum(1 for other in self.services if order.index(other.name) < position)
        self.services.insert(index, service)
        self.namedServices[name] = service
        if self.running:
            service.privilegedStartService()  # type: ignore[no-untyped-call]
            service.startService()  # type: ignore[no-untyped-call]

    @override
    def removeService(self, service: IService) -> Deferred[None] | None:
        """
        The owner takes a child out of supervision (through
        C{disownServiceParent}): forget its spec, and stop it if running.
        """
        name = service.name
        if not isinstance(name, str) or self.namedServices.get(name) is not service:
            raise ValueError(f"{service!r} is not a current child")
        self._detach(name, service)
        del self._specs[name]
        if self.running:
            stopped: Deferred[None] = maybeDeferred(service.stopService)
            return stopped
        return None

    def _attach(self, name: str, service: IService) -> None:
        """
        Add a built instance (starting it if running); a start that raises
        is that child's failure.
        """
        try:
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
        except Exception:
            failure = _caught()
            if self.namedServices.get(name) is service and self.running:
                self._handle_failure(name, service, failure)
            else:
                raise

    def _spawn(self, name: str) -> None:
        """
        Build and add a fresh instance of a known child; building that
        raises is the child's failure.
        """
        spec = self._specs[name]
        try:
            service = spec.start()
            service.setName(name)  # type: ignore[no-untyped-call]
        except Exception:
            self._handle_failure(name, None, _caught())
            return
        self._attach(name, service)

    def _start(self, name: str, service: IService) -> None:
        try:
            service.startService()  # type: ignore[no-untyped-call]
        except Exception:
            self._handle_failure(name, service, _caught())

    def _detach(self, name: str, service: IService) -> None:
        """
        Take an instance out of the collection without stopping it.
        """
        del self.namedServices[name]
        self.services.remove(service)
        service.parent = None

    def outage_detail(self, name: str) -> str:
        """
        @return: what an outage of child C{name} holds up, for its log
            line (a server says how many lines wait); empty by default.
        """
        return ""

    def _is_outage(self, name: str, failure: Failure) -> bool:
        spec = self._specs.get(name)
        return (
            spec is not None
            and spec.restart == "permanent"
            and spec.outage is not None
            and spec.outage(failure)
        )

    def _outage(self, name: str, service: IService | None, failure: Failure) -> None:
        """
        Restart a child whose destination is down, with capped backoff and
        a warning at most every few seconds; the intensity is not touched.
        """
        self.outages += 1
        now = self._clock.seconds()
        outage = self._outages.get(name)
        if outage is None or now - outage.last >= max(self._period, OUTAGE_RESET):
            # A failure long after the last one starts a new outage.
            outage = self._outages[name] = _Outage(since=now, last=now)
        outage.last = now
        outage.attempts += 1
        delay = self.backoff(outage.attempts)
        if now - outage.complained >= OUTAGE_COMPLAINT_INTERVAL:
            outage.complained = now
            detail = self.outage_detail(name)
            self.log.warn(
                "child {name} is down (an outage, not a crash): {reason}; "
                "down for {seconds:.1f}s{detail}; retrying in {delay:.1f}s",
                name=name,
                reason=_reason_text(failure),
                seconds=now - outage.since,
                detail=f"; {detail}" if detail else "",
                delay=delay,
            )
        pending = self._restarting[name] = _PendingRestart()
        if service is None:
            self._schedule(name, pending, outage.attempts, delay)
            return
        self._detach(name, service)
        stopped = self._stop_detached(name, service)
        stopped.addCallback(
            lambda _: self._schedule(name, pending, outage.attempts, delay)
        )
        stopped.addErrback(
            lambda f: self.log.failure(
                "could not schedule a restart of {name}", f, name=name
            )
        )

    def _handle_failure(
        self, name: str, service: IService | None, failure: Failure
    ) -> None:
        if self._is_outage(name, failure):
            self._outage(name, service, failure)
            return
        self.log.failure(
            "child {name} failed: {reason}",
            failure,
            LogLevel.error,
            name=name,
            reason=failure.getErrorMessage(),
        )
        spec = self._specs[name]
        if spec.restart == "temporary":
            del self._specs[name]
            if service is not None:
                self._detach(name, service)
                self._stop_detached(name, service)
            return
        now = self._clock.seconds()
        self._window.append((now, name))
        while now - self._window[0][0] >= self._period:
            self._window.popleft()
        if len(self._window) > self._max_restarts:
            self._escalate(name, failure)
            return
        attempt = sum(1 for _, other in self._window if other == name)
        pending = self._restarting[name] = _PendingRestart()
        if service is None:
            self._schedule(name, pending, attempt)
            return
        self._detach(name, service)
        stopped = self._stop_detached(name, service)
        stopped.addCallback(lambda _: self._schedule(name, pending, attempt))
        stopped.addErrback(
            lambda f: self.log.failure(
                "could not schedule a restart of {name}", f, name=name
            )
        )

    def _stop_detached(self, name: str, service: IService) -> Deferred[None]:
        """
        Stop an instance that left the collection; L{stopService} waits for
        these too.

        @return: a Deferred that fires (never fails) when the stop is over.
        """
        stopped: Deferred[None] = maybeDeferred(service.stopService)
        stopped.addErrback(self._log_stop_error, name)
        self._detached_stops.add(stopped)

        def _done(result: None) -> None:
            self._detached_stops.discard(stopped)
            return result

        stopped.addBoth(_done)
        return stopped

    def _log_stop_error(self, failure: Failure, name: str) -> None:
        self.log.failure(
            "error while stopping child {name}", failure, LogLevel.error, name=name
        )

    def _schedule(
        self,
        name: str,
        pending: _PendingRestart,
        attempt: int,
        delay: float | None = None,
    ) -> None:
        if not self.running or self._restarting.get(name) is not pending:
            # Cancelled by stopService while the failed instance stopped.
            return
        if delay is None:
            delay = self.backoff(attempt)
            self.log.info(
                "restarting child {name} in {delay:.2f}s (attempt {attempt})",
                name=name,
                delay=delay,
                attempt=attempt,
            )
        pending.call = self._clock.callLater(delay, self._restart, name)

    def _restart(self, name: str) -> None:
        del self._restarting[name]
        self.restarts += 1
        self.restarts_by_child[name] += 1
        self._spawn(name)

    def _escalate(self, name: str, failure: Failure) -> None:
        self.escalated = True
        self.log.critical(
            "restart intensity exceeded: {count} restarts in {period}s, "
            "the last of {name}; stopping",
            count=len(self._window),
            period=self._period,
            name=name,
        )
        stopped = self.stopService()
        on_escalate = self._on_escalate
        if on_escalate is not None:
            stopped.addCallback(lambda _: on_escalate(failure))
            stopped.addErrback(lambda f: self.log.failure("on_escalate raised", f))
