"""The life of one connection, as a pure state machine: events in, actions out.

No sockets, no reactor, no Twisted: L{Session} takes what happened (the
peer connected, bytes arrived, a handshake finished, a deadline came) and
returns what to do (deliver lines, send a line, start TLS, arm a timer,
close, abort).  L{lineserver.protocol.LineProtocol} is the glue that feeds
it and carries its actions out.  The rules live here so that they can be
read in one place and tested over random sequences of events.

A connection moves through these phases, in this order, skipping those
that do not apply::

    NEW ─┬──────────────────────────┐
         ├─> PROXY ────────────────>├─> ADMISSION ─┬─> WAITING ─┐
         └─> HANDSHAKE ────────────>┘              └────────────┴─> SCREENING
                                                                    │     ^
                                               OPEN <── (screened) ─┤     │
                                                                    v     │
                                                             UPGRADING ───┘
    (any phase) ──close/error/deadline──> CLOSING ──lost──> CLOSED
    (any phase) ──lost──> CLOSED

  - NEW: built, not yet connected.
  - PROXY: a C{haproxy:} port, waiting for the PROXY header (which carries
    the real client address).
  - HANDSHAKE: TLS at accept (an C{ssl:} port); under TLS the PROXY header
    comes inside this phase.
  - ADMISSION: the address is known: it is checked against the allow list,
    then the connection registry gives its verdict (serve, wait, refuse).
  - WAITING: accepted past C{--max-connections}; paused until a slot frees.
  - SCREENING: the first lines go through the admission rules (STARTTLS,
    C{--require-tls}, C{AUTH}); lines before the connection is served are
    held, and screened once it is.
  - UPGRADING: C{STARTTLS} was answered; the TLS handshake runs.
  - OPEN: every line goes straight to the handler.
  - CLOSING: an error was sent or a close asked for; nothing more is read.
  - CLOSED: the connection is gone; every event is ignored.

L{TRANSITIONS} lists every legal move; any other raises L{SessionError}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from typing_extensions import override

from lineserver.admission import STARTTLS, Admission, AdmissionPolicy, Verdict
from lineserver.errors import ErrorCode
from lineserver.framing import LF, Frames, LineFramer


class Phase(Enum):
    NEW = "new"
    PROXY = "proxy"
    HANDSHAKE = "handshake"
    ADMISSION = "admission"
    WAITING = "waiting"
    SCREENING = "screening"
    UPGRADING = "upgrading"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"

    #: Hashed by identity (a C call), not Enum's hash of the name (a Python
    #: one): the state machine looks members up in dicts on every event.
    __hash__ = object.__hash__


class Event(Enum):
    ACCEPT = "accept"
    ACCEPT_PROXY = "accept-proxy"
    ACCEPT_TLS = "accept-tls"
    PROXY_HEADER = "proxy-header"
    HANDSHAKE_DONE = "handshake-done"
    ADDRESS_OK = "address-ok"
    SERVE = "serve"
    WAIT = "wait"
    SLOT = "slot"
    STARTTLS = "starttls"
    SCREENED = "screened"
    CLOSE = "close"
    LOST = "lost"

    #: Hashed by identity (a C call), not Enum's hash of the name (a Python
    #: one): the state machine looks members up in dicts on every event.
    __hash__ = object.__hash__


#: Every legal move: (phase, event) -> next phase.  CLOSE and LOST are
#: legal from every phase but CLOSED and are added below.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.NEW, Event.ACCEPT): Phase.ADMISSION,
    (Phase.NEW, Event.ACCEPT_PROXY): Phase.PROXY,
    (Phase.NEW, Event.ACCEPT_TLS): Phase.HANDSHAKE,
    (Phase.PROXY, Event.PROXY_HEADER): Phase.ADMISSION,
    (Phase.HANDSHAKE, Event.HANDSHAKE_DONE): Phase.ADMISSION,
    (Phase.ADMISSION, Event.SERVE): Phase.SCREENING,
    (Phase.ADMISSION, Event.WAIT): Phase.WAITING,
    (Phase.WAITING, Event.SLOT): Phase.SCREENING,
    (Phase.SCREENING, Event.STARTTLS): Phase.UPGRADING,
    (Phase.UPGRADING, Event.HANDSHAKE_DONE): Phase.SCREENING,
    (Phase.SCREENING, Event.SCREENED): Phase.OPEN,
    (Phase.CLOSING, Event.CLOSE): Phase.CLOSING,
}
for _phase in Phase:
    if _phase is not Phase.CLOSED:
        TRANSITIONS.setdefault((_phase, Event.CLOSE), Phase.CLOSING)
        TRANSITIONS[(_phase, Event.LOST)] = Phase.CLOSED

#: Phases in which lines read are held, to be screened once served.
HOLDING = frozenset({Phase.HANDSHAKE, Phase.ADMISSION, Phase.WAITING})


class SessionError(Exception):
    """
    An event that is not legal in the session's phase: a bug in the glue.
    """


class Deadline(Enum):
    """
    The kinds of deadline a connection has, one timer at most each.
    """

    PROXY = "proxy"
    HANDSHAKE = "handshake"
    IDLE = "idle"
    LINE = "line"
    CLOSE = "close"

    #: Hashed by identity (a C call), not Enum's hash of the name (a Python
    #: one): the state machine looks members up in dicts on every event.
    __hash__ = object.__hash__


class CloseReason(Enum):
    """
    Why a connection ended, as its close log line says.
    """

    CLEAN = "clean"
    RESET = "reset"
    REFUSED = "refused"
    IDLE_TIMEOUT = "idle-timeout"
    LINE_TIMEOUT = "line-timeout"
    LINE_TOO_LONG = "line-too-long"
    PROXY_TIMEOUT = "proxy-timeout"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    HANDSHAKE_FAILED = "tls-handshake-failed"
    NOT_READING = "not-reading"
    SERVER = "server"


#: ErrorCode is a StrEnum: a handler's plain-string code finds its reason.
_ERROR_REASONS: dict[str, CloseReason] = {
    ErrorCode.IDLE_TIMEOUT: CloseReason.IDLE_TIMEOUT,
    ErrorCode.LINE_TIMEOUT: CloseReason.LINE_TIMEOUT,
    ErrorCode.LINE_TOO_LONG: CloseReason.LINE_TOO_LONG,
}


# -- actions: what the glue must do -------------------------------------------


@dataclass(slots=True)
class Deliver:
    """
    Hand these lines (and their bytes as received) to the handler.  (Not
    frozen: one is made per read, and a frozen dataclass's constructor
    costs twice as much.)
    """

    lines: list[bytes]
    raw: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """
    Write one line (the terminator is added by the glue).
    """

    line: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """
    The client broke a rule: it is sent C{ERR code detail}, then closed.
    C{why} is for the log.
    """

    code: ErrorCode | str
    detail: str = ""
    why: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """
    Start TLS on this socket (after C{OK starttls} went out in plaintext).
    """


@dataclass(frozen=True, slots=True)
class Arm:
    """
    Make sure the timer of C{kind} fires no later than C{delay} seconds
    from now (an armed timer that fires earlier is fine: it asks again).
    """

    kind: Deadline
    delay: float


@dataclass(frozen=True, slots=True)
class Disarm:
    kind: Deadline


@dataclass(frozen=True, slots=True)
class AskSlot:
    """
    Ask the connection registry for a slot; answer with L{Session.served},
    L{Session.queued} or L{Session.refused}.  C{now} is the time of the
    event that asks, to pass on to L{Session.served} (the same float: the
    idle deadline keeps it, and so may the glue).
    """

    host: str | None
    now: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Serve:
    """
    The connection is served: build its handler (before any L{Deliver}).
    """


@dataclass(frozen=True, slots=True)
class Close:
    """
    Close after the pending output (then abort at the close deadline).
    """


@dataclass(frozen=True, slots=True)
class Abort:
    """
    Drop the connection now, without waiting for output: the peer did not
    do in time what C{deadline} waited for (send its PROXY header, finish
    its TLS handshake, take its last bytes).
    """

    deadline: Deadline


@dataclass(frozen=True, slots=True)
class Authenticated:
    """
    An C{AUTH} line was accepted (and consumed), for the log and counters.
    """


Action = (
    Deliver
    | Send
    | Refuse
    | StartTLS
    | Arm
    | Disarm
    | AskSlot
    | Serve
    | Close
    | Abort
    | Authenticated
)


@dataclass(frozen=True)
class ProtocolSettings:
    """
    Per-connection limits.

    @ivar max_line_length: longest line in bytes, terminator not counted.
    @ivar idle_timeout: seconds without any byte before C{ERR idle-timeout},
        or None for no limit.
    @ivar line_timeout: seconds a line may stay incomplete before
        C{ERR line-timeout} (slowloris), or None for no limit.
    @ivar close_timeout: seconds a closing connection may take to flush its
        last bytes before it is aborted (a peer that does not read would
        otherwise keep it forever).
    @ivar handshake_timeout: seconds a TLS handshake (at accept or after
        STARTTLS) or a PROXY header may take before the connection is
        aborted; None for no limit.
    @ivar tcp_keepalive: seconds of silence before the kernel probes a TCP
        peer (and, after a few unanswered probes, drops it, freeing its
        slot); None turns TCP keepalive off.
    @ivar log_connections: log one line per closed connection (peer, TLS
        subject, lines, bytes, duration, reason).
    """

    max_line_length: int = 65536
    idle_timeout: float | None = None
    line_timeout: float | None = None
    close_timeout: float = 5.0
    handshake_timeout: float | None = 10.0
    tcp_keepalive: float | None = 300.0
    log_connections: bool = True


def after_lines(raw: bytes, count: int, delimiter: bytes = LF) -> bytes:
    """
    @return: C{raw} without its first C{count} lines.
    """
    offset = 0
    for _ in range(count):
        offset = raw.index(delimiter, offset) + len(delimiter)
    return raw[offset:]


class Session(LineFramer):
    """
    The state of one connection and its rules.

    A session frames its connection's bytes itself: it is the
    connection's L{LineFramer} (one object per connection, not two).

    @ivar phase: where the connection is in its life; one value, never
        inferred from which attributes happen to be set.
    @ivar lines: complete lines received; each is delivered, consumed (a
        command: C{AUTH}, C{STARTTLS}), dropped (sent by a client that was
        refused, from the offending line on), or still held (read before
        the connection was served):
        C{lines == delivered + consumed + dropped + held}.
    @ivar delivered: lines handed out in L{Deliver} actions (counted as
        what the others leave: a slot fewer per connection).
    @ivar bytes: bytes received.
    @ivar reason: why the connection ended (or is ending), once known.
    @ivar armed: the deadlines whose timer the glue holds.
    @ivar tls: TLS is on (or being negotiated) on this connection.
    """

    __slots__ = (
        "_admission",
        "_armed",
        "_held",
        "_idle_since",
        "_line_since",
        "bytes",
        "consumed",
        "dropped",
        "lines",
        "phase",
        "policy",
        "reason",
        "settings",
    )

    def __init__(
        self,
        settings: ProtocolSettings,
        policy: AdmissionPolicy,
        framer: LineFramer | None = None,
        *,
        max_line_length: int | None = None,
        delimiter: bytes = LF,
    ) -> None:
        """
        Frame with C{max_line_length} and C{delimiter} (the connection's
        C{MAX_LENGTH} and C{delimiter}), or those of C{framer}; by default
        C{settings.max_line_length} and LF.
        """
        if framer is not None:
            max_line_length, delimiter = framer.max_line_length, framer.delimiter
        if max_line_length is None:
            max_line_length = settings.max_line_length
        super().__init__(max_line_length, delimiter)
        self.settings = settings
        self.policy = policy
        self._admission: Admission | None = (
            Admission(policy) if _has_rules(policy) else None
        )
        #: Reads held before the connection is served (None: none yet).
        self._held: list[Frames] | None = None
        self._idle_since: float | None = None
        self._line_since: float | None = None
        self.phase = Phase.NEW
        #: The armed deadlines, one bit each (L{_BITS}): an int, not a set
        #: (an empty set is 216 bytes, and there is one per connection);
        #: and L{_TLS}.
        self._armed = 0
        self.lines = 0
        self.consumed = 0
        self.dropped = 0
        self.bytes = 0
        self.reason: CloseReason | None = None

    @property
    def delivered(self) -> int:
        """
        Lines handed out in L{Deliver} actions.
        """
        return self.lines - self.consumed - self.dropped - self.held

    @property
    def tls(self) -> bool:
        """
        TLS is on (or being negotiated) on this connection.
        """
        return bool(self._armed & _TLS)

    @property
    def armed(self) -> frozenset[Deadline]:
        """
        The deadlines whose timer the glue holds.
        """
        armed = self._armed
        return frozenset(kind for kind in _ORDERED if armed & _BITS[kind])

    @property
    def framer(self) -> LineFramer:
        """
        The connection's framer: the session itself.
        """
        return self

    @property
    def held(self) -> int:
        """
        Lines read before the connection was served, not yet screened.
        """
        held = self._held
        return sum(len(frames.lines) for frames in held) if held else 0

    def _deliver(self, lines: list[bytes], raw: bytes) -> Deliver:
        return Deliver(lines, raw)

    def _move(self, event: Event) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise SessionError(
                f"{event.value} is not legal in phase {self.phase.value}"
            ) from None

    def _arm(self, kind: Deadline, delay: float | None) -> list[Action]:
        if delay is None:
            return []
        self._armed |= _BITS[kind]
        return [Arm(kind, delay)]

    def _disarm(self, kind: Deadline) -> list[Action]:
        bit = _BITS[kind]
        if self._armed & bit:
            self._armed &= ~bit
            return [Disarm(kind)]
        return []

    # -- events ---------------------------------------------------------------

    def connected(
        self, tls: bool, behind_proxy: bool, host: str | None, now: float
    ) -> list[Action]:
        """
        The transport is up.  C{host} is the peer's address as the socket
        says (None for a unix socket); behind a proxy it is the proxy's.
        """
        timeout = self.settings.handshake_timeout
        if tls:
            # The PROXY header, if any, comes before the handshake ends:
            # the handshake deadline covers both.
            self._move(Event.ACCEPT_TLS)
            self._armed |= _TLS
            return self._arm(Deadline.HANDSHAKE, timeout)
        if behind_proxy:
            self._move(Event.ACCEPT_PROXY)
            return self._arm(Deadline.PROXY, timeout)
        self._move(Event.ACCEPT)
        return self._check_address(host, now)

    def proxy_header(self, host: str | None, now: float) -> list[Action]:
        """
        The PROXY header is in: C{host} is the real client's address.
        """
        if self.phase is not Phase.PROXY:
            return []  # under TLS it is judged with the handshake
        self._move(Event.PROXY_HEADER)
        return self._disarm(Deadline.PROXY) + self._check_address(host, now)

    def handshake_done(self, host: str | None, now: float) -> list[Action]:
        """
        The TLS handshake finished; C{host} as in L{connected} (behind a
        proxy, now the real client's).
        """
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return []
        upgrade = self.phase is Phase.UPGRADING
        self._move(Event.HANDSHAKE_DONE)
        actions = self._disarm(Deadline.HANDSHAKE)
        if self._admission is not None:
            self._admission.tls_started()
        if upgrade:
            return actions + self._after_screening()
        return actions + self._check_address(host, now)

    def _check_address(self, host: str | None, now: float) -> list[Action]:
        allow = self.policy.allow
        if allow is not None and host is not None and not allow(host):
            return self._refuse(ErrorCode.FORBIDDEN, why="address not allowed")
        return [AskSlot(host, now)]

    def served(self, now: float) -> list[Action]:
        """
        The registry gave this connection a slot at once.
        """
        self._move(Event.SERVE)
        return self._start(now)

    def queued(self) -> list[Action]:
        """
        The registry is full: wait (paused by the glue) for a slot.
        """
        self._move(Event.WAIT)
        return []

    def slot_granted(self, now: float) -> list[Action]:
        """
        A slot freed up for this waiting connection.
        """
        if self.phase is not Phase.WAITING:
            return []  # closed meanwhile
        self._move(Event.SLOT)
        return self._start(now)

    def refused(self, code: ErrorCode, why: str) -> list[Action]:
        """
        The registry refused this connection.
        """
        return self._refuse(code, why=why)

    def _start(self, now: float) -> list[Action]:
        actions: list[Action] = [Serve()]
        idle = self.settings.idle_timeout
        if idle:
            self._idle_since = now
            actions += self._arm(Deadline.IDLE, idle)
        if self._admission is None:
            self._move(Event.SCREENED)
        held, self._held = self._held or [], None
        for index, frames in enumerate(held):
            if self.phase not in (Phase.SCREENING, Phase.OPEN):
                # Refused or upgrading part way: the rest is not served.
                self.dropped += sum(len(f.lines) for f in held[index:])
                break
            last = frames is held[-1]
            actions += self._lines(frames.lines, frames.raw, last_read=last)
            if frames.error is not None:
                actions += self._too_long(frames)
        return actions

    def data(self, data: bytes, now: float) -> list[Action]:
        """
        Bytes arrived from the client.
        """
        phase = self.phase
        if phase is Phase.CLOSING or phase is Phase.CLOSED:
            return []  # refused or closing: nothing more is read into lines
        self.bytes += len(data)
        frames = self.feed(data)
        if self._idle_since is not None:
            self._idle_since = now
        if (
            phase is Phase.OPEN
            and frames.lines
            and frames.error is None
            and (not self._pending or not self.settings.line_timeout)
        ):
            # The common case, kept short: an open connection's lines.  A
            # read that ends on a line boundary leaves no partial line, so
            # the line deadline has nothing to time (a deadline armed for
            # an earlier partial line finds none when it fires).
            self._line_since = None
            self.lines += len(frames.lines)
            return [Deliver(frames.lines, frames.raw)]
        actions: list[Action] = []
        line_timeout = self.settings.line_timeout
        if line_timeout:
            # A read that completed lines and left a tail started a new line.
            if not self._pending:
                self._line_since = None
            elif frames.lines or self._line_since is None:
                self._line_since = now
                if not self._armed & _BITS[Deadline.LINE]:
                    actions += self._arm(Deadline.LINE, line_timeout)
        lines = frames.lines
        if lines:
            self.lines += len(lines)
            if phase is Phase.OPEN:
                actions.append(Deliver(lines, frames.raw))
            elif phase in HOLDING or phase is Phase.PROXY:
                self._keep(frames)
                return actions
            elif phase is Phase.SCREENING:
                actions += self._lines(lines, frames.raw, last_read=True)
            else:
                # UPGRADING: plaintext after STARTTLS was refused already.
                self.dropped += len(lines)
                return actions + self._refuse(
                    ErrorCode.PROTOCOL, "data after STARTTLS", why="data after STARTTLS"
                )
        if frames.error is not None:
            if phase in HOLDING and not lines:
                self._keep(frames)
                return actions
            actions += self._too_long(frames)
        return actions

    def _keep(self, frames: Frames) -> None:
        if self._held is None:
            self._held = []
        self._held.append(frames)

    def _too_long(self, frames: Frames) -> list[Action]:
        assert frames.error is not None
        limit = frames.error.limit
        return self._refuse(
            ErrorCode.LINE_TOO_LONG,
            f"limit {limit}",
            why=f"line longer than {limit} bytes",
        )

    def _lines(self, lines: list[bytes], raw: bytes, last_read: bool) -> list[Action]:
        """
        Lines in SCREENING (or held ones, once served) or OPEN.
        """
        if self.phase is Phase.OPEN:
            return [self._deliver(lines, raw)]
        admission = self._admission
        assert admission is not None
        # Once lines flow, only a STARTTLS line still needs a look.
        if admission.delivering and STARTTLS not in raw:
            return [self._deliver(lines, raw), *self._after_screening()]
        return self._screen(admission, lines, raw, last_read)

    def _screen(
        self, admission: Admission, lines: list[bytes], raw: bytes, last_read: bool
    ) -> list[Action]:
        """
        Pass lines through the admission rules until the connection is open.
        Lines to deliver that come before a command are delivered first.
        """
        actions: list[Action] = []
        count = len(lines)
        offset = 0  # where line `index` starts in raw
        start: int | None = None  # first line of a run to deliver
        start_offset = 0
        for index, line in enumerate(lines):
            end = raw.index(LF, offset) + 1
            last = last_read and index == count - 1 and not self._pending
            decision = admission.on_line(line, last)
            verdict = decision.verdict
            if verdict is Verdict.DELIVER:
                if start is None:
                    start, start_offset = index, offset
                if admission.open:
                    actions.append(self._deliver(lines[start:], raw[start_offset:]))
                    return actions + self._after_screening()
                offset = end
                continue
            if start is not None:
                actions.append(
                    self._deliver(lines[start:index], raw[start_offset:offset])
                )
                start = None
            if verdict is Verdict.CONSUMED:
                self.consumed += 1
                actions.append(Authenticated())
                offset = end
                continue
            if verdict is Verdict.START_TLS:
                # A command, consumed like AUTH.  It had to be the last line
                # sent, so no line is left after it here.
                self.consumed += 1
                return actions + self._start_tls()
            assert decision.code is not None
            self.dropped += count - index
            return actions + self._refuse(
                decision.code, decision.detail, why=decision.code.value
            )
        if start is not None:
            actions.append(self._deliver(lines[start:], raw[start_offset:]))
        return actions + self._after_screening()

    def _after_screening(self) -> list[Action]:
        admission = self._admission
        if self.phase is Phase.SCREENING and (admission is None or admission.open):
            self._move(Event.SCREENED)
            self._admission = None  # screened: lines go straight through
        return []

    def _start_tls(self) -> list[Action]:
        self._move(Event.STARTTLS)
        self._armed |= _TLS
        # Nothing is pending: STARTTLS had to be the last thing sent.
        LineFramer.__init__(self, self.max_line_length, self.delimiter)
        self._line_since = None
        return [
            Send(b"OK starttls"),
            StartTLS(),
            *self._arm(Deadline.HANDSHAKE, self.settings.handshake_timeout),
        ]

    def expired(self, kind: Deadline, now: float, paused: bool) -> list[Action]:
        """
        The timer of C{kind} fired.  C{paused}: we stopped reading this
        connection ourselves, so its silence is ours, not the client's.
        """
        bit = _BITS[kind]
        if not self._armed & bit:
            return []
        self._armed &= ~bit
        if self.phase is Phase.CLOSED:
            return []
        if kind is Deadline.IDLE or kind is Deadline.LINE:
            since = self._idle_since if kind is Deadline.IDLE else self._line_since
            timeout = (
                self.settings.idle_timeout
                if kind is Deadline.IDLE
                else self.settings.line_timeout
            )
            assert timeout
            if since is None or self.phase is Phase.CLOSING:
                return []
            left = since + timeout - now
            if paused:
                if kind is Deadline.IDLE:
                    self._idle_since = now
                else:
                    self._line_since = now
                left = timeout
            if left > 0:
                return self._arm(kind, left)
            code = (
                ErrorCode.IDLE_TIMEOUT
                if kind is Deadline.IDLE
                else ErrorCode.LINE_TIMEOUT
            )
            why = (
                f"idle for {timeout}s"
                if kind is Deadline.IDLE
                else f"a line stayed incomplete for {timeout}s"
            )
            return self._refuse(code, why=why)
        if kind is Deadline.CLOSE:
            self.reason = self.reason or CloseReason.NOT_READING
            return [Abort(Deadline.CLOSE)]
        if kind is Deadline.PROXY:
            self.reason = CloseReason.PROXY_TIMEOUT
            self._move(Event.CLOSE)
            return [*self._disarm_all(), Abort(Deadline.PROXY)]
        self.reason = CloseReason.HANDSHAKE_TIMEOUT
        self._move(Event.CLOSE)
        return [*self._disarm_all(), Abort(Deadline.HANDSHAKE)]

    def close(self, reason: CloseReason = CloseReason.SERVER) -> list[Action]:
        """
        Close after the pending output: the client half-closed, or the
        server is stopping.
        """
        if self.phase is Phase.CLOSED:
            return []
        first = self.phase is not Phase.CLOSING
        self._move(Event.CLOSE)
        if not first:
            return []
        if self.reason is None:
            self.reason = reason
        return self._closing()

    def refuse(
        self, code: ErrorCode | str, detail: str = "", why: str = ""
    ) -> list[Action]:
        """
        Send C{ERR code detail} and close: a rule was broken (also what a
        handler asks for through C{IConnection.send_error}).
        """
        return self._refuse(code, detail, why)

    def _refuse(
        self, code: ErrorCode | str, detail: str = "", why: str = ""
    ) -> list[Action]:
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return []
        self._move(Event.CLOSE)
        self.reason = _ERROR_REASONS.get(code, CloseReason.REFUSED)
        self.dropped += self.held
        self._held = None
        return [Refuse(code, detail, why), *self._closing()]

    def _closing(self) -> list[Action]:
        self._idle_since = self._line_since = None
        actions = self._disarm_all()
        actions.append(Close())
        actions += self._arm(Deadline.CLOSE, self.settings.close_timeout)
        return actions

    def _disarm_all(self) -> list[Action]:
        armed = self._armed & _DEADLINES
        if not armed:
            return []
        self._armed &= ~_DEADLINES
        return [Disarm(kind) for kind in _ORDERED if armed & _BITS[kind]]

    def lost(self, clean: bool) -> list[Action]:
        """
        The connection is gone (C{clean}: the peer closed in an orderly
        way, or we did).
        """
        if self.phase is Phase.CLOSED:
            return []
        if self.phase in (Phase.HANDSHAKE, Phase.UPGRADING) and self.reason is None:
            self.reason = CloseReason.HANDSHAKE_FAILED
        elif self.reason is None:
            self.reason = CloseReason.CLEAN if clean else CloseReason.RESET
        self._move(Event.LOST)
        # Lines held for a connection never served: its client saw no
        # answer to them, and they are counted as refused.
        self.dropped += self.held
        self._held = None
        self._idle_since = self._line_since = None
        return self._disarm_all()

    @property
    def handshaking(self) -> bool:
        return self.phase is Phase.HANDSHAKE or self.phase is Phase.UPGRADING

    @property
    @override
    def pending(self) -> int:
        """
        Bytes of an unterminated line (discarded if the connection ends).
        """
        return self._pending


#: Each deadline's bit in L{Session}'s mask.
_BITS: dict[Deadline, int] = {kind: 1 << index for index, kind in enumerate(Deadline)}
#: Every deadline's bit.
_DEADLINES = sum(_BITS.values())
#: The mask's one other bit: TLS is on (a flag of its own would be one
#: more slot per connection).
_TLS = 1 << len(_BITS)
#: The order in which deadlines are disarmed together (by name, as ever).
_ORDERED: tuple[Deadline, ...] = tuple(sorted(Deadline, key=lambda kind: kind.value))


def _has_rules(policy: AdmissionPolicy) -> bool:
    """
    Does any admission rule apply?  Where none does, every line is data,
    unchanged (a first line C{STARTTLS} or C{AUTH x} included).
    """
    return policy.starttls or policy.require_tls or policy.check_token is not None
