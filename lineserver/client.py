"""The sending side of the line protocol: a window of unacknowledged lines.

Used by C{lineserver-send} (L{lineserver.send}) and by the relay sink
(L{lineserver.sinks.relay}).  The logic is kept apart from the I/O:
L{SendWindow} knows which lines are out, what an C{ACK <n>} releases and
what to send again after a reconnect; L{parse_reply} reads one line from
the server; L{LineSenderProtocol} is the Twisted glue around them.

The numbering (docs/protocol.md, "Acknowledgements"): C{ACK <n>} counts
the data lines of I{one connection}, from 1.  After a reconnect the client
sends again every line not yet acknowledged, in order, so the new
connection's line 1 is the first unacknowledged line: the window keeps
C{base}, the number of lines acknowledged before this connection began, and
line C{k} of the connection is line C{base + k} of the whole stream.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: ERR codes after which sending again on a new connection can work: the
#: server was busy, shutting down, or the connection sat idle.  Any other
#: code (unauthorized, forbidden, line-too-long, ...) would fail again.
TRANSIENT_ERRORS = frozenset(
    {
        "idle-timeout",
        "line-timeout",
        "too-many-connections",
        "too-many-connections-from-peer",
        "shutting-down",
    }
)


class ProtocolViolation(Exception):
    """
    The server said something impossible (an ACK for lines never sent on
    this connection): the connection is dropped and the lines resent.
    """


class ReplyKind(enum.Enum):
    ACK = "ACK"
    ERR = "ERR"
    OTHER = "other"


@dataclass(frozen=True)
class Reply:
    """
    One line from the server, read.

    @ivar count: for C{ACK <n>}, n.
    @ivar code: for C{ERR <code> [detail]}, the code.
    @ivar detail: the rest of an C{ERR} line, or an C{OTHER} line whole.
    """

    kind: ReplyKind
    count: int = 0
    code: str = ""
    detail: str = ""

    @property
    def permanent(self) -> bool:
        """
        Is this an error that a new connection would meet again?
        """
        return self.kind is ReplyKind.ERR and self.code not in TRANSIENT_ERRORS


def parse_reply(line: bytes) -> Reply:
    """
    Read one line (without its terminator) from the server.

    @raise ProtocolViolation: an C{ACK} whose count is not a decimal
        number >= 0.
    """
    text = line.rstrip(b"\r").decode("ascii", "replace")
    word, _, rest = text.partition(" ")
    if word == "ACK":
        if not rest.isdigit() or not rest.isascii():
            raise ProtocolViolation(f"bad ACK line: {text!r}")
        return Reply(ReplyKind.ACK, count=int(rest))
    if word == "ERR":
        code, _, detail = rest.partition(" ")
        return Reply(ReplyKind.ERR, code=code, detail=detail)
    return Reply(ReplyKind.OTHER, detail=text)


class SendWindow:
    """
    The lines taken but not yet acknowledged, in order, with a cap.

    Lines are numbered from 1 over the whole stream (across connections).
    Pure: no I/O, no clock.

    @ivar cap: how many unacknowledged lines the window holds before
        L{full} says to stop taking more.
    @ivar taken: lines taken so far (the highest line number).
    @ivar acknowledged: lines acknowledged so far (cumulative).
    @ivar base: lines acknowledged when the current connection began.
    @ivar sent_upto: the highest line number written on this connection.
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"window cap must be at least 1, not {cap}")
        self.cap = cap
        self.taken = 0
        self.acknowledged = 0
        self.base = 0
        self.sent_upto = 0
        self.connected = False
        self._pending: deque[bytes] = deque()

    @property
    def unacknowledged(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.cap

    @property
    def sent(self) -> int:
        """
        Lines written on the current connection.
        """
        return self.sent_upto - self.base if self.connected else 0

    def take(self, line: bytes) -> int:
        """
        Add a line to the window; the caller sends it with L{next_to_send}.

        @return: its number.
        """
        self._pending.append(line)
        self.taken += 1
        return self.taken

    def connection_made(self) -> list[bytes]:
        """
        A new connection: its line 1 is the first unacknowledged line.

        @return: every unacknowledged line, in order, to send now.
        """
        self.connected = True
        self.base = self.acknowledged
        self.sent_upto = self.taken
        return list(self._pending)

    def next_to_send(self) -> list[bytes]:
        """
        @return: lines taken since the last call, not yet written on this
            connection (nothing while disconnected).
        """
        if not self.connected or self.sent_upto == self.taken:
            return []
        start = self.sent_upto - self.acknowledged
        lines = list(islice(self._pending, start, None))
        self.sent_upto = self.taken
        return lines

    def connection_lost(self) -> None:
        self.connected = False

    def ack(self, count: int) -> int:
        """
        The server acknowledged the first C{count} lines of this connection.

        @return: how many lines this released (0 for a repeated ACK).
        @raise ProtocolViolation: C{count} goes back, or beyond what was sent
            on this connection.
        """
        if not self.connected:
            raise ProtocolViolation("ACK with no connection")
        if count > self.sent:
            raise ProtocolViolation(
                f"ACK {count} but only {self.sent} lines sent on this connection"
            )
        upto = self.base + count
        if upto < self.acknowledged:
            raise ProtocolViolation(
                f"ACK {count} goes back ({self.acknowledged - self.base} lines"
                " of this connection acknowledged already)"
            )
        released = upto - self.acknowledged
        for _ in range(released):
            self._pending.popleft()
        self.acknowledged = upto
        return released

    def unacknowledged_lines(self) -> list[bytes]:
        """
        The unacknowledged lines, in order.
        """
        return list(self._pending)


def is_tls(transport: object) -> bool:
    """
    Is this transport TLS (at connect, or after C{startTLS})?  Its close
    is then TLS's own half-close: close_notify, then read to the end.
    """
    return isinstance(transport, TLSMemoryBIOProtocol) or ISSLTransport.providedBy(
        transport
    )


class LineSenderProtocol(LineOnlyReceiver):
    """
    One connection of a sender: writes what the owner gives it, and hands
    every server line (ACK, ERR, other) to the owner.

    The owner (a L{SenderOwner}-like object) is told C{connected(protocol)},
    C{reply(protocol, Reply)} and C{disconnected(protocol, reason)}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, owner: SenderOwner) -> None:
        self.owner = owner
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self.owner.connected(self)

    def lineReceived(self, line: bytes) -> None:
        try:
            reply = parse_reply(line)
        except ProtocolViolation as e:
            self.owner.violation(self, e)
            return
        self.owner.reply(self, reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.owner.violation(self, ProtocolViolation("server line too long"))

    def send_lines(self, lines: list[bytes]) -> None:
        if lines and self.transport is not None:
            self.transport.writeSequence([b"".join(line + b"\n" for line in lines)])

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.open = False
        self.owner.disconnected(self, reason)


class SenderOwner:
    """
    What L{LineSenderProtocol} reports to (a base class with no-ops).
    """

    def connected(self, protocol: LineSenderProtocol) -> None:
        """A connection is up."""

    def reply(self, protocol: LineSenderProtocol, reply: Reply) -> None:
        """The server sent a line."""

    def violation(self, protocol: LineSenderProtocol, error: ProtocolViolation) -> None:
        """The server broke the protocol: drop this connection."""
        transport: Any = protocol.transport
        if transport is not None:
            transport.abortConnection()

    def disconnected(
        self, protocol: LineSenderProtocol, reason: Failure | None
    ) -> None:
        """The connection is gone."""


class SenderFactory(Factory):
    """
    Builds L{LineSenderProtocol}s that all report to one owner.
    """

    # Not a "Starting factory" log line for every reconnect attempt.
    noisy = False

    def __init__(self, owner: SenderOwner) -> None:
        self.owner = owner

    def buildProtocol(self, addr: IAddress | None) -> LineSenderProtocol:
        protocol = LineSenderProtocol(self.owner)
        protocol.factory = self
        return protocol


@implementer(IPushProducer)
class Sender(SenderOwner):
    """
    The engine shared by C{lineserver-send} and the relay sink: takes
    lines, writes them on whatever connection is up, keeps them until
    they are acknowledged, and writes them again on the next connection.

    With C{ack=False} the server sends no ACKs: a line counts as done once
    it is written to a connected transport that is not pushing back (its
    write buffer below Twisted's high-water mark), which promises nothing
    about the server having read it.

    The connections come from outside (a C{ClientService} over a
    L{SenderFactory} for this engine), so the retry policy stays there.

    @ivar window: the lines and their numbering.
    @ivar error: the last C{ERR} the server sent, if any.
    """

    def __init__(
        self,
        *,
        ack: bool,
        window: int = 10_000,
        auth_token: bytes | None = None,
        starttls: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self.ack = ack
        self.window = SendWindow(window)
        self.auth_token = auth_token
        self.starttls = starttls
        self.protocol: LineSenderProtocol | None = None
        self.error: Reply | None = None
        self.paused = False
        self._ready = False
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self.on_progress: Callable[[], None] = lambda: None
        self.on_error: Callable[[Reply], None] = lambda reply: None
        self.on_room: Callable[[], None] = lambda: None

    # -- what the owner calls ------------------------------------------------

    def send(self, lines: list[bytes]) -> int:
        """
        Take C{lines}; write them now if a connection is ready.

        @return: the number of the last line taken.
        """
        for line in lines:
            self.window.take(line)
        self._flush()
        return self.window.taken

    def when_done(self, number: int) -> Deferred[None]:
        """
        @return: a Deferred that fires once lines 1 to C{number} are
            acknowledged (or, without ACKs, written).
        """
        if number <= self.window.acknowledged:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((number, waiter))
        return waiter

    @property
    def can_take(self) -> bool:
        """
        Should the owner give more lines now?  (Bounded memory: no while
        the window is full or the connection pushes back.)
        """
        return not self.window.full and not self.paused

    # -- the connection ------------------------------------------------------

    def connected(self, protocol: LineSenderProtocol) -> None:
        self.protocol = protocol
        self.paused = False
        transport: Any = protocol.transport
        transport.registerProducer(self, True)
        if self.starttls is not None:
            protocol.send_lines([b"STARTTLS"])
        else:
            self._start(protocol)

    def _start(self, protocol: LineSenderProtocol) -> None:
        if self.auth_token is not None:
            protocol.send_lines([b"AUTH " + self.auth_token])
        self._ready = True
        protocol.send_lines(self.window.connection_made())
        self._written()
        self.on_progress()

    def reply(self, protocol: LineSenderProtocol, reply: Reply) -> None:
        if reply.kind is ReplyKind.ACK and self.ack and self._ready:
            try:
                released = self.window.ack(reply.count)
            except ProtocolViolation as e:
                self.violation(protocol, e)
                return
            if released:
                self._release()
                self.on_progress()
        elif reply.kind is ReplyKind.ERR:
            self.error = reply
            self.on_error(reply)
        elif (
            reply.kind is ReplyKind.OTHER
            and reply.detail == "OK starttls"
            and self.starttls is not None
            and not self._ready
            and protocol.transport is not None
        ):
            protocol.transport.startTLS(self.starttls)  # type: ignore[attr-defined]
            self._start(protocol)

    def disconnected(
        self, protocol: LineSenderProtocol, reason: Failure | None
    ) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self._ready = False
        self.paused = False
        self.window.connection_lost()
        self.on_room()

    def _flush(self) -> None:
        if self.protocol is not None and self._ready:
            self.protocol.send_lines(self.window.next_to_send())
            self._written()

    def _written(self) -> None:
        if (
            not self.ack
            and not self.paused
            and self.window.connected
            and self.window.ack(self.window.sent)
        ):
            self._release()
            self.on_progress()

    def _release(self) -> None:
        done = self.window.acknowledged
        ready = [d for n, d in self._waiters if n <= done]
        self._waiters = [(n, d) for n, d in self._waiters if n > done]
        for waiter in ready:
            waiter.callback(None)
        if not self.window.full:
            self.on_room()

    # -- IPushProducer: the transport's push back -----------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._written()
        self.on_room()

    def stopProducing(self) -> None:
        self.paused = True


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """
    An endpoint that tells C{on_failure} why a connection attempt failed
    (C{ClientService} retries silently), so that its owner can say it.
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, on_failure: Callable[[Failure], None]
    ) -> None:
        self.endpoint = endpoint
        self.on_failure = on_failure

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:  # noqa: N803
        def failed(reason: Failure) -> Failure:
            self.on_failure(reason)
            return reason

        connecting: Deferred[IProtocol] = self.endpoint.connect(protocolFactory)
        return connecting.addErrback(failed)
