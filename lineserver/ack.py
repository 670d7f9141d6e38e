"""Acknowledgements (C{--ack}), the pure part: what to tell a client, when.

One L{AckCounter} per connection counts the data lines it handed to the
sink queue and those the sink confirmed, and decides which C{ACK <n>} to
send: one per confirmation that moved the number (coalesced: the queue
tells an owner once per confirmed batch), and the latest one again at each
repeat tick while lines wait.  No I/O and no clock here; the glue is
L{lineserver.handlers.AckSinkHandler}.
"""

from __future__ import annotations


def ack_line(number: int) -> bytes:
    """
    @return: the wire form of C{ACK <number>}, terminator included.
    """
    return b"ACK %d\n" % number


class AckCounter:
    """
    A connection's data lines: delivered to the queue, confirmed durable,
    and the last number it was told.

    Invariants: C{0 <= sent <= confirmed <= delivered}, and none of the
    three ever decreases.

    @ivar delivered: data lines handed to the sink queue.
    @ivar confirmed: of those, lines the sink confirmed (the oldest first).
    @ivar sent: the number in the last C{ACK} line sent (0: none yet).
    """

    __slots__ = ("confirmed", "delivered", "sent")

    def __init__(self) -> None:
        self.delivered = 0
        self.confirmed = 0
        self.sent = 0

    def put(self, count: int) -> None:
        """
        C{count} more lines went to the queue.
        """
        self.delivered += count

    def durable(self, count: int) -> int | None:
        """
        The sink confirmed C{count} more of this connection's lines.

        @return: the number to send now (C{ACK <n>}), or None if it would
            not move (nothing new, or C{count} is 0).
        @raise ValueError: more lines confirmed than delivered (a bug).
        """
        if self.confirmed + count > self.delivered:
            raise ValueError(
                f"{count} line(s) confirmed with only "
                f"{self.delivered - self.confirmed} outstanding"
            )
        self.confirmed += count
        if self.confirmed == self.sent:
            return None
        self.sent = self.confirmed
        return self.sent

    @property
    def waiting(self) -> int:
        """
        Lines delivered and not yet acknowledged.
        """
        return self.delivered - self.sent

    def repeat(self) -> int | None:
        """
        A repeat tick (every C{--ack-interval} seconds).

        @return: the latest number again while lines wait to be
            acknowledged (so a client behind backpressure hears from the
            server), or None once everything is: stop repeating.
        """
        if self.waiting:
            return self.sent
        return None
