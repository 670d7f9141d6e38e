"""Flow control: a bounded sink queue with hysteresis, and pause gates.

The data path runs one way (socket, protocol, queue, sink) and pushes back
the other way: when the queue holds more than its high watermark, every
connection that feeds it stops reading from its socket; below the low
watermark they read again.  Bytes count against the queue until the sink
has confirmed them, so a batch in flight still holds its memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IPushProducer
from typing_extensions import override
from zope.interface import Interface, implementer


class Pause(Enum):
    """
    Every reason to stop reading a socket, connection or listener.

    One enumeration, so that a misspelt reason is an error at import time
    and never a socket held paused forever by a string nobody releases.
    """

    #: The sink queue is above its high watermark.
    SINK = "sink"
    #: The client does not read what we write (echo replies, errors).
    OUTPUT = "output"
    #: A protocol's own C{pauseProducing} (C{LineReceiver}'s contract).
    PROTOCOL = "protocol"
    #: Accepted past the connection limit; waiting for a free slot.
    WAITING = "waiting"
    #: The server is stopping and has read what this client sent.
    DRAINING = "draining"
    #: An error was sent; nothing more of this client is read.
    CLOSING = "closing"
    #: A listener: the connection limit is reached.
    CONNECTION_LIMIT = "connection-limit"
    #: A listener: accept() failed for want of a resource; backing off.
    ACCEPT_ERRORS = "accept-errors"
    #: A listener: too few descriptors left below RLIMIT_NOFILE.
    FD_WATERMARK = "fd-watermark"

    #: Hashed by identity (a C call), not Enum's hash of the name (a
    #: Python one): every hold and release looks a reason up.
    __hash__ = object.__hash__


#: Each reason's bit in a L{PauseGate}'s mask.
_PAUSE_BITS: dict[Pause, int] = {
    reason: 1 << index for index, reason in enumerate(Pause)
}


class BaseGate:
    """
    Reading from one source is paused while any reason holds.

    Several parties pause a connection for their own reasons (the sink is
    full, the client does not read its echoes, the server is draining);
    each releases only its own reason, and reading resumes when none is
    left.  Without this, one party's resume would undo another's pause.

    Subclasses say what pausing and resuming do (L{_paused},
    L{_resumed}); L{PauseGate} calls two functions.
    """

    __slots__ = ("_reasons",)

    def __init__(self) -> None:
        #: The reasons held, one bit each (L{_PAUSE_BITS}): an int, not a
        #: set (an empty set is 216 bytes, and there is a gate per
        #: connection).
        self._reasons = 0

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    @property
    def reasons(self) -> frozenset[Pause]:
        held = self._reasons
        return frozenset(reason for reason in Pause if held & _PAUSE_BITS[reason])

    def hold(self, reason: Pause) -> None:
        bit = _PAUSE_BITS[reason]
        held = self._reasons
        if held & bit:
            return
        self._reasons = held | bit
        if not held:
            self._paused()

    def release(self, reason: Pause) -> None:
        bit = _PAUSE_BITS[reason]
        held = self._reasons
        if not held & bit:
            return
        self._reasons = held = held & ~bit
        if not held:
            self._resumed()

    def _paused(self) -> None:
        """
        The first reason is held: pause the source.
        """
        raise NotImplementedError

    def _resumed(self) -> None:
        """
        The last reason is released: resume the source.
        """
        raise NotImplementedError

    def producer(self, reason: Pause) -> IPushProducer:
        """
        @return: an IPushProducer that holds and releases C{reason}, for
            consumers (transports, queues) that speak Twisted's protocol.
        """
        return _GateProducer(self, reason)


class PauseGate(BaseGate):
    """
    A L{BaseGate} that calls C{pause} when the first reason is held and
    C{resume} when the last is released.
    """

    __slots__ = ("_pause", "_resume")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        super().__init__()
        self._pause = pause
        self._resume = resume

    @override
    def _paused(self) -> None:
        self._pause()

    @override
    def _resumed(self) -> None:
        self._resume()


@implementer(IPushProducer)
class _GateProducer:
    __slots__ = ("_gate", "_reason")

    def __init__(self, gate: BaseGate, reason: Pause) -> None:
        self._gate = gate
        self._reason = reason

    @override
    def __repr__(self) -> str:
        return f"<producer {self._reason.value!r} of {self._gate!r}>"

    def pauseProducing(self) -> None:
        self._gate.hold(self._reason)

    def resumeProducing(self) -> None:
        self._gate.release(self._reason)

    def stopProducing(self) -> None:
        """
        The consumer is gone; the connection closes on its own path.
        """


class IAckOwner(Interface):
    """
    Whose lines a batch holds: told how many of its lines became durable
    when the sink confirms the batch (C{--ack}).
    """

    def lines_durable(count: int) -> None:  # noqa: N805 (an interface)
        """
        C{count} more of this owner's lines (the oldest not yet confirmed)
        are durable by the sink's promise.  Called once per owner per
        confirmed batch, however many puts of that owner the batch merged.
        """


#: Who put the lines of a batch, in order: (owner, lines), or None for a
#: batch without owners (the common case: no C{--ack}).
Owners = list[tuple[IAckOwner, int]] | None


class Batch:
    """
    Batches taken from the queue and merged, with whose lines they are.
    It unpacks and compares as C{(lines, cost)}, so that
    C{lines, cost = take()} reads as it always has; its identity is what
    L{SinkQueue.confirm_batch} confirms.  (A class with slots: a tuple
    subclass with attributes costs three times as much to make, once per
    batch.)

    @ivar owners: the owners of its lines, in order, or None.
    @ivar left: bytes not yet confirmed (for the byte-count L{SinkQueue.confirm}).
    """

    __slots__ = ("cost", "left", "lines", "owners")

    def __init__(self, lines: list[bytes], cost: int, owners: Owners = None) -> None:
        self.lines = lines
        self.cost = cost
        self.owners = owners
        self.left = cost

    def __iter__(self) -> Iterator[Any]:
        return iter((self.lines, self.cost))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Batch):
            other = (other.lines, other.cost)
        return (self.lines, self.cost) == other

    __hash__ = object.__hash__

    @override
    def __repr__(self) -> str:
        return f"<Batch of {len(self.lines)} line(s), {self.cost} bytes>"


class SinkQueue:
    """
    The bounded buffer between connections and the sink.

    Producers (connections) register; when buffered bytes reach the high
    watermark every registered producer is paused, and when confirmed
    writes bring them under the low watermark, all are resumed.  Nothing is
    ever dropped: a full queue pushes back instead (only a stop that gives
    the sink up drops, through L{drop_all}, and says how many).

    A put may name an owner (L{IAckOwner}, a connection's acknowledgements)
    and the lines are followed through merged batches, so that confirming
    a batch tells each of its owners, once, how many of its lines are
    durable.

    @ivar buffered: bytes put and not yet confirmed by the sink.
    @ivar buffered_lines: lines put and not yet confirmed by the sink
        (waiting, or in a batch in flight), so that lines received equal
        lines delivered plus lines queued at any moment.
    @ivar waiting_lines: the lines of L{buffered_lines} not in flight.
    """

    def __init__(self, high_watermark: int, low_watermark: int) -> None:
        if not 0 <= low_watermark < high_watermark:
            raise ValueError(
                "need 0 <= low watermark < high watermark, got "
                f"{low_watermark} and {high_watermark}"
            )
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.buffered = 0
        self.buffered_lines = 0
        self.waiting_lines = 0
        self.paused = False
        self.pauses = 0
        self._batches: deque[tuple[list[bytes], int, Owners]] = deque()
        # Taken batches not yet confirmed, oldest first.
        self._in_flight: deque[Batch] = deque()
        #: Registered producers, a dict used as an ordered set: a set's
        #: table is about twice a dict's per entry, and there is an entry
        #: per connection.
        self._producers: dict[IPushProducer, None] = {}
        self._on_ready: Callable[[], None] | None = None

    def __len__(self) -> int:
        """
        @return: the number of batches waiting (not counting one in flight).
        """
        return len(self._batches)

    @property
    def producers(self) -> int:
        return len(self._producers)

    def register(self, producer: IPushProducer) -> None:
        self._producers[producer] = None
        if self.paused:
            producer.pauseProducing()

    def unregister(self, producer: IPushProducer) -> None:
        self._producers.pop(producer, None)

    def put(
        self,
        lines: list[bytes],
        cost: int,
        owner: IAckOwner | None = None,
        count: int | None = None,
    ) -> None:
        """
        Queue a batch of lines that costs C{cost} bytes of memory.

        @param owner: whose lines they are, told when they are durable.
        @param count: how many of C{owner}'s lines these are (default: all).
        """
        self._batches.append(
            (
                lines,
                cost,
                None
                if owner is None
                else [(owner, len(lines) if count is None else count)],
            )
        )
        self.buffered += cost
        self.buffered_lines += len(lines)
        self.waiting_lines += len(lines)
        if not self.paused and self.buffered >= self.high_watermark:
            self.paused = True
            self.pauses += 1
            for producer in list(self._producers):
                producer.pauseProducing()
        ready, self._on_ready = self._on_ready, None
        if ready is not None:
            ready()

    def take(self, max_cost: int) -> Batch:
        """
        Take queued batches, merged, up to about C{max_cost} bytes (always at
        least one batch).  Their bytes stay counted until confirmed.
        """
        batches = self._batches
        if not batches:
            return Batch([], 0)
        lines, cost, owners = batches.popleft()
        if batches and cost < max_cost:
            lines = list(lines)
            while batches and cost < max_cost:
                more, more_cost, more_owners = batches.popleft()
                lines += more
                cost += more_cost
                if more_owners is not None:
                    owners = more_owners if owners is None else owners + more_owners
        batch = Batch(lines, cost, owners)
        self.waiting_lines -= len(lines)
        self._in_flight.append(batch)
        return batch

    def give_back_batch(self, batch: Batch) -> None:
        """
        Put a taken batch back at the front, after a failed write.  Its
        lines and bytes stay counted: they are queued again.
        """
        self._forget(batch)
        self._batches.appendleft((batch.lines, batch.cost, batch.owners))
        self.waiting_lines += len(batch.lines)

    def give_back(self, lines: list[bytes], cost: int) -> None:
        """
        L{give_back_batch} for a caller that kept only C{lines} and
        C{cost}: the most recent batch taken of that size goes back.
        """
        for batch in reversed(self._in_flight):
            if len(batch.lines) == len(lines) and batch.cost == cost:
                self.give_back_batch(batch)
                return
        self._batches.appendleft((lines, cost, None))
        self.waiting_lines += len(lines)

    def _forget(self, batch: Batch) -> None:
        for index, flying in enumerate(self._in_flight):
            if flying is batch:
                del self._in_flight[index]
                return

    def confirm_batch(self, batch: Batch) -> None:
        """
        The sink has made C{batch} durable: its lines and bytes leave the
        count, each of its owners is told (once), and producers resume
        below the low watermark.
        """
        self._forget(batch)
        self.buffered -= batch.left
        batch.left = 0
        self._settled(batch)
        self._maybe_resume()

    def confirm(self, cost: int) -> None:
        """
        The sink has taken C{cost} bytes, the oldest in flight first (for
        callers that count bytes); resume producers below the low mark.
        """
        self.buffered -= cost
        in_flight = self._in_flight
        while in_flight and (cost > 0 or in_flight[0].left == 0):
            oldest = in_flight[0]
            settled = min(cost, oldest.left)
            oldest.left -= settled
            cost -= settled
            if oldest.left == 0:
                in_flight.popleft()
                self._settled(oldest)
        self._maybe_resume()

    def _settled(self, batch: Batch) -> None:
        self.buffered_lines -= len(batch.lines)
        owners = batch.owners
        if not owners:
            return
        if len(owners) == 1:
            owner, count = owners[0]
            owner.lines_durable(count)
            return
        # One word per owner per batch: gather, then tell each once.
        gathered: dict[IAckOwner, int] = {}
        for owner, count in owners:
            gathered[owner] = gathered.get(owner, 0) + count
        for owner, count in gathered.items():
            owner.lines_durable(count)

    def _maybe_resume(self) -> None:
        if self.paused and self.buffered <= self.low_watermark:
            self.paused = False
            for producer in list(self._producers):
                producer.resumeProducing()

    def drop_all(self) -> int:
        """
        Forget every line queued or in flight: the server stops and gave
        its sink up.  Owners are not told (nothing became durable).

        @return: how many lines were dropped.
        """
        dropped = self.buffered_lines
        self._batches.clear()
        self._in_flight.clear()
        self.buffered = 0
        self.buffered_lines = 0
        self.waiting_lines = 0
        self._maybe_resume()
        return dropped

    def when_ready(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once, at the next L{put}.
        """
        self._on_ready = callback
