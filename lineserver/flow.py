"""Flow control: a bounded sink queue with hysteresis, and pause gates.

The data path runs one way (socket, protocol, queue, sink) and pushes back
the other way: when the queue holds more than its high watermark, every
connection that feeds it stops reading from its socket; below the low
watermark they read again.  Bytes count against the queue until the sink
has confirmed them, so a batch in flight still holds its memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum

from twisted.internet.interfaces import IPushProducer
from typing_extensions import override
from zope.interface import implementer


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


class PauseGate:
    """
    Reading from one source is paused while any reason holds.

    Several parties pause a connection for their own reasons (the sink is
    full, the client does not read its echoes, the server is draining);
    each releases only its own reason, and reading resumes when none is
    left.  Without this, one party's resume would undo another's pause.
    """

    __slots__ = ("_pause", "_reasons", "_resume")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._pause = pause
        self._resume = resume
        self._reasons: set[Pause] = set()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    @property
    def reasons(self) -> frozenset[Pause]:
        return frozenset(self._reasons)

    def hold(self, reason: Pause) -> None:
        if reason in self._reasons:
            return
        self._reasons.add(reason)
        if len(self._reasons) == 1:
            self._pause()

    def release(self, reason: Pause) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self._resume()

    def producer(self, reason: Pause) -> IPushProducer:
        """
        @return: an IPushProducer that holds and releases C{reason}, for
            consumers (transports, queues) that speak Twisted's protocol.
        """
        return _GateProducer(self, reason)


@implementer(IPushProducer)
class _GateProducer:
    __slots__ = ("_gate", "_reason")

    def __init__(self, gate: PauseGate, reason: Pause) -> None:
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


class SinkQueue:
    """
    The bounded buffer between connections and the sink.

    Producers (connections) register; when buffered bytes reach the high
    watermark every registered producer is paused, and when confirmed
    writes bring them under the low watermark, all are resumed.  Nothing is
    ever dropped: a full queue pushes back instead.

    @ivar buffered: bytes put and not yet confirmed by the sink.
    @ivar buffered_lines: lines put and not yet confirmed by the sink
        (waiting, or in a batch in flight), so that lines received equal
        lines delivered plus lines queued at any moment.
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
        self.paused = False
        self.pauses = 0
        self._batches: deque[tuple[list[bytes], int]] = deque()
        # Taken batches not yet confirmed, oldest first, as [lines, bytes
        # left to confirm]: confirm() is told bytes only, and a batch's
        # lines leave the count when its last byte is confirmed.
        self._in_flight: deque[list[int]] = deque()
        self._producers: set[IPushProducer] = set()
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
        self._producers.add(producer)
        if self.paused:
            producer.pauseProducing()

    def unregister(self, producer: IPushProducer) -> None:
        self._producers.discard(producer)

    def put(self, lines: list[bytes], cost: int) -> None:
        """
        Queue a batch of lines that costs C{cost} bytes of memory.
        """
        self._batches.append((lines, cost))
        self.buffered += cost
        self.buffered_lines += len(lines)
        if not self.paused and self.buffered >= self.high_watermark:
            self.paused = True
            self.pauses += 1
            for producer in list(self._producers):
                producer.pauseProducing()
        ready, self._on_ready = self._on_ready, None
        if ready is not None:
            ready()

    def take(self, max_cost: int) -> tuple[list[bytes], int]:
        """
        Take queued batches, merged, up to about C{max_cost} bytes (always at
        least one batch).  Their bytes stay counted until L{confirm}.
        """
        batches = self._batches
        if not batches:
            return [], 0
        lines, cost = batches.popleft()
        if batches and cost < max_cost:
            lines = list(lines)
            while batches and cost < max_cost:
                more, more_cost = batches.popleft()
                lines += more
                cost += more_cost
        self._in_flight.append([len(lines), cost])
        return lines, cost

    def give_back(self, lines: list[bytes], cost: int) -> None:
        """
        Put a taken batch back at the front, after a failed write.  Its
        lines and bytes stay counted: they are queued again.
        """
        self._batches.appendleft((lines, cost))
        # The batch is no longer in flight: the most recent taken batch of
        # this size (what was just taken is given back first).
        for index in range(len(self._in_flight) - 1, -1, -1):
            if self._in_flight[index] == [len(lines), cost]:
                del self._in_flight[index]
                break

    def confirm(self, cost: int) -> None:
        """
        The sink has taken C{cost} bytes; resume producers below the low mark.
        """
        self.buffered -= cost
        in_flight = self._in_flight
        while in_flight and (cost > 0 or in_flight[0][1] == 0):
            oldest = in_flight[0]
            settled = min(cost, oldest[1])
            oldest[1] -= settled
            cost -= settled
            if oldest[1] == 0:
                self.buffered_lines -= oldest[0]
                in_flight.popleft()
        if self.paused and self.buffered <= self.low_watermark:
            self.paused = False
            for producer in list(self._producers):
                producer.resumeProducing()

    def when_ready(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once, at the next L{put}.
        """
        self._on_ready = callback
