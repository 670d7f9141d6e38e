"""LineProtocol, the per-connection glue, and the factory that makes it.

The rules of a connection's life (phases, deadlines, admission, framing)
live in the pure L{lineserver.session.Session}; this module feeds it what
Twisted reports and carries out the actions it returns, and keeps what
only the glue can: the producer contract, the handler (rebuilt if it
raises), timers and the log.

LineProtocol is a C{LineReceiver} and honours its contract: C{sendLine};
C{MAX_LENGTH} and C{delimiter} when a subclass sets them; C{lineReceived}
for subclasses that want one line at a time (then C{pauseProducing} stops
at a line boundary, and C{setRawMode} hands the rest of the stream to
C{rawDataReceived}).  Its hot path does not call C{lineReceived}: each
read is framed at once and the whole batch goes to the handler in one
call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from lineserver.admission import AdmissionPolicy
from lineserver.connections import ConnectionRegistry, Refusal, Slot
from lineserver.errors import ErrorCode, error_line
from lineserver.flow import BaseGate, Pause
from lineserver.framing import LF
from lineserver.handlers import IAcknowledging, LineFailed
from lineserver.interfaces import IConnection, ILineHandler, ILineHandlerFactory
from lineserver.session import (
    Abort,
    Action,
    Arm,
    AskSlot,
    Authenticated,
    Close,
    CloseReason,
    Deadline,
    Deliver,
    Disarm,
    Phase,
    ProtocolSettings,
    Refuse,
    Send,
    Serve,
    Session,
    StartTLS,
    after_lines,
)
from lineserver.stats import Stats
from lineserver.tls import peer_subject, tls_at_accept, tls_failure_text
from lineserver.transports import behind_proxy, enable_keepalive
from lineserver.wheel import Bucket, DeadlineWheel

__all__ = ["LineFactory", "LineProtocol", "ProtocolSettings", "describe_address"]

log = Logger(namespace="lineserver.protocol")
#: One line per closed connection; its own namespace, to filter or quiet.
connection_log = Logger(namespace="lineserver.connection")

#: Counters for the refusals and timeouts that have one of their own.
_REFUSAL_COUNTERS: dict[str, str] = {
    ErrorCode.FORBIDDEN: "connections.refused.forbidden",
    ErrorCode.LINE_TOO_LONG: "lines.too_long",
    ErrorCode.IDLE_TIMEOUT: "timeouts.idle",
    ErrorCode.LINE_TIMEOUT: "timeouts.line",
}
#: Errors that end a connection that was being served: "closing", not
#: "refusing", in the log.
_CLOSING_ERRORS: frozenset[str] = frozenset(
    {ErrorCode.LINE_TOO_LONG, ErrorCode.IDLE_TIMEOUT, ErrorCode.LINE_TIMEOUT}
)
_CLOSED_PHASES = frozenset({Phase.CLOSING, Phase.CLOSED})
_ABORT_COUNTERS = {
    Deadline.PROXY: "timeouts.proxy",
    Deadline.HANDSHAKE: "timeouts.handshake",
    Deadline.CLOSE: "connections.aborted",
}


def describe_address(address: IAddress) -> str:
    """
    @return: C{host:port} for IP addresses, else the address's own text.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name!r}" if isinstance(name, bytes) else f"unix:{name}"
    return str(address)


def _host(address: IAddress) -> str | None:
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def _overrides(cls: type, name: str) -> bool:
    """
    Does a subclass of L{LineProtocol} set C{name} itself?
    """
    for klass in cls.__mro__:
        if klass is LineProtocol:
            return False
        if name in vars(klass):
            return True
    return False


@implementer(IConnection, IHalfCloseableProtocol, IHandshakeListener)
class LineProtocol(LineReceiver):
    """
    One client connection.

    @ivar session: the connection's state and rules (pure).
    @ivar handler: the current handler; replaced if it raises.
    @ivar gate: the pause gate in front of the transport's reading.
    """

    delimiter = LF
    factory: LineFactory
    #: A TCP, TLS or UNIX transport; ITransport alone lacks the producer
    #: and abort methods that every one of them has.
    transport: Any
    _actions: ClassVar[dict[type, Callable[[LineProtocol, Any], None]]]

    # Slots for what every connection sets (its base classes have none, so
    # an instance still has a __dict__, left empty unless one of the rare
    # attributes below, or a subclass's own, is set).
    __slots__ = (
        "_idle_bucket",
        "_output_registered",
        "_peer",
        "_started",
        "connected",
        "factory",
        "gate",
        "handler",
        "number",
        "session",
        "transport",
    )

    #: Rarely set, so class-level defaults: the TLS client's subject, the
    #: held lines of a per-line subclass, the rare deadlines' timers
    #: (line, handshake, PROXY, close), the steps of a close waiting for
    #: acknowledgements (C{--ack}) and its timer.
    tls_subject: str | None = None
    #: Does this class take lines one at a time (a C{lineReceived} of its
    #: own)?  Per class, set as each subclass is made.
    _per_line = False
    #: Does this class set C{MAX_LENGTH} itself?  Per class, likewise.
    _own_max_length = False
    _held: list[tuple[list[bytes], bytes, int]] | None = None
    _timers: dict[Deadline, IDelayedCall] | None = None
    _after_acks: list[Callable[[], None]] | None = None
    _ack_wait: IDelayedCall | None = None

    def __init__(self, factory: LineFactory, peer: IAddress, number: int) -> None:
        self.factory = factory
        self.transport = None
        self.connected = 0
        self._peer: IAddress | None = peer
        self.number = number
        settings = factory.settings
        self.session = Session(
            settings,
            factory.admission,
            max_line_length=self.MAX_LENGTH
            if self._own_max_length
            else settings.max_line_length,
            delimiter=self.delimiter,
        )
        #: The idle deadline's bucket in the factory's wheel, if armed.
        self._idle_bucket: Bucket[LineProtocol] | None = None
        self._output_registered = False
        self._started = 0.0
        self.handler: ILineHandler | None = None
        self.gate: BaseGate = _ConnectionGate(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._per_line = cls.lineReceived is not LineProtocol.lineReceived
        cls._own_max_length = _overrides(cls, "MAX_LENGTH")

    @override
    def __repr__(self) -> str:
        return f"<LineProtocol {self.identity}>"

    @property
    def peer(self) -> IAddress:
        """
        The peer's address: behind a proxy the PROXY header's, once read.
        Once connected it is the transport's (asked when needed: an address
        object kept per connection is ~100 bytes), unless the address this
        protocol was built for differs from it.
        """
        peer = self._peer
        if peer is None:
            return self.transport.getPeer()  # type: ignore[no-any-return]
        return peer

    @peer.setter
    def peer(self, address: IAddress) -> None:
        self._peer = address

    @property  # type: ignore[override]
    def MAX_LENGTH(self) -> int:  # noqa: N802 (LineReceiver's name)
        """
        The longest line, in bytes: the configured limit, unless a
        subclass sets its own (then this property is not seen).  Kept by
        the session's framer, not per connection here as well.
        """
        return self.session.max_line_length

    @MAX_LENGTH.setter
    def MAX_LENGTH(self, limit: int) -> None:  # noqa: N802 (LineReceiver's name)
        self.session.max_line_length = limit

    @property
    def identity(self) -> str:
        """
        C{#number address}, and the TLS subject once known: for the log,
        made each time it is used (most connections need it only for their
        close line; kept, it would cost every connection its bytes).
        """
        identity = f"#{self.number} {describe_address(self.peer)}"
        if self.tls_subject:
            identity = f"{identity} ({self.tls_subject})"
        return identity

    @property
    def age(self) -> float:
        """
        Seconds since the connection was made (for C{show connections}).
        """
        return self._now() - self._started if self._started else 0.0

    # -- carrying out the session's actions ---------------------------------

    def _run(self, actions: list[Action]) -> None:
        perform = self._actions
        for action in actions:
            perform[type(action)](self, action)

    def _now(self) -> float:
        return float(self.factory.clock.seconds())

    def _do_deliver(self, action: Deliver) -> None:
        lines = action.lines
        self.factory.stats.incr("lines.received", len(lines))
        if self._per_line or self._held:
            self._deliver_each(lines, action.raw)
        else:
            self._deliver(lines, action.raw)

    def _do_send(self, action: Send) -> None:
        self.sendLine(action.line)

    def _do_refuse(self, action: Refuse) -> None:
        code = str(action.code)
        verb = "closing" if code in _CLOSING_ERRORS else "refusing"
        why = action.why or code
        detail = f" ({action.detail})" if action.detail and action.why else ""
        log.info(
            "{verb} {conn}: {why}{detail}",
            verb=verb,
            conn=self.identity,
            why=why,
            detail=detail,
        )
        self.factory.stats.incr(f"errors.{code}")
        counter = _REFUSAL_COUNTERS.get(code)
        if counter is not None:
            self.factory.stats.incr(counter)
        self.gate.hold(Pause.CLOSING)
        line = error_line(code, action.detail)
        self._when_acknowledged(lambda: self.sendLine(line))
        if code == ErrorCode.LINE_TOO_LONG:
            self.lineLengthExceeded(b"")

    def _do_start_tls(self, action: StartTLS) -> None:
        self.factory.stats.incr("tls.starttls")
        self.transport.startTLS(self.factory.admission.starttls_context)

    def _do_arm(self, action: Arm) -> None:
        if action.kind is Deadline.IDLE:
            # Every connection has one: on the factory's wheel, not a
            # DelayedCall each (the session asks again if it is early).
            wheel = self.factory.idle_wheel
            if self._idle_bucket is not None:
                wheel.cancel(self, self._idle_bucket)
            self._idle_bucket = wheel.schedule(self, action.delay)
            return
        timers = self._timers
        if timers is None:
            timers = self._timers = {}
        timer = timers.get(action.kind)
        if timer is not None and timer.active():
            if timer.getTime() <= self._now() + action.delay:
                return  # fires early enough; the session asks again then
            timer.cancel()
        timers[action.kind] = self.factory.clock.callLater(
            action.delay, self._expired, action.kind
        )

    def _do_disarm(self, action: Disarm) -> None:
        if action.kind is Deadline.IDLE:
            self._cancel_idle()
            return
        timer = self._timers.pop(action.kind, None) if self._timers else None
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_idle(self) -> None:
        bucket, self._idle_bucket = self._idle_bucket, None
        if bucket is not None:
            self.factory.idle_wheel.cancel(self, bucket)

    def idle_expired(self) -> None:
        """
        The idle deadline's bucket came round (the factory's wheel).
        """
        self._idle_bucket = None
        self._expired(Deadline.IDLE)

    def _expired(self, kind: Deadline) -> None:
        if self._timers:
            self._timers.pop(kind, None)
        self._run(self.session.expired(kind, self._now(), self.gate.paused))

    def _do_ask_slot(self, action: AskSlot) -> None:
        verdict = self.factory.registry.admit(self, action.host)
        if verdict is Slot.SERVE:
            self._run(self.session.served(action.now))
        elif verdict is Slot.WAIT:
            self.gate.hold(Pause.WAITING)
            self._run(self.session.queued())
        else:
            assert isinstance(verdict, Refusal)
            self._run(self.session.refused(verdict.code, verdict.why))

    def slot_granted(self) -> None:
        """
        The registry let this waiting connection in (a slot freed, or the
        server is stopping and serves every waiter to drain it).
        """
        self.gate.release(Pause.WAITING)
        self._run(self.session.slot_granted(self._now()))

    def _do_serve(self, action: Serve) -> None:
        self.handler = self.factory.handler_factory(self)

    def _do_close(self, action: Close) -> None:
        self._when_acknowledged(self._lose)

    def _when_acknowledged(self, step: Callable[[], None]) -> None:
        """
        Run C{step} (the C{ERR} line, the close) once the lines handed to
        an acknowledging handler (C{--ack}) are acknowledged, or after half
        the close timeout, whichever comes first; the other half is left
        for the client to read its last ACK and the C{ERR}.  Steps keep
        their order.  Without C{--ack}, or with nothing to wait for, now.
        """
        pending = self._after_acks
        if pending is not None:
            pending.append(step)
            return
        handler = self.handler
        waiter = handler.acknowledged() if IAcknowledging.providedBy(handler) else None
        if waiter is None:
            step()
            return
        self._after_acks = [step]
        waiter.addCallback(lambda _: self._acknowledged())
        self._ack_wait = self.factory.clock.callLater(
            self.factory.settings.close_timeout / 2, self._acknowledged
        )

    def _acknowledged(self) -> None:
        timer, self._ack_wait = self._ack_wait, None
        if timer is not None and timer.active():
            timer.cancel()
        steps, self._after_acks = self._after_acks, None
        if steps is None or self.session.phase is Phase.CLOSED:
            return
        for step in steps:
            step()

    def _lose(self) -> None:
        # TLS sends its close_notify only once no producer is registered,
        # and then waits for the peer's: read (and drop) until it comes.
        if self._output_registered:
            self._output_registered = False
            self.transport.unregisterProducer()
        if self.session.tls:
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def _do_abort(self, action: Abort) -> None:
        kind = action.deadline
        if kind is Deadline.CLOSE:
            log.info(
                "aborting {conn}: it did not take its last bytes", conn=self.identity
            )
        else:
            log.info(
                "aborting {conn}: no {missing} within {t}s",
                conn=self.identity,
                missing="PROXY header" if kind is Deadline.PROXY else "TLS handshake",
                t=self.factory.settings.handshake_timeout,
            )
        self.factory.stats.incr(_ABORT_COUNTERS[kind])
        self.transport.abortConnection()

    def _do_authenticated(self, action: Authenticated) -> None:
        self.factory.stats.incr("auth.accepted")
        log.info("{conn} authenticated", conn=self.identity)

    # -- Twisted's protocol contract ------------------------------------

    @override
    def connectionMade(self) -> None:
        # The reactor's time (as the deadlines'), and the same float that
        # the idle deadline keeps: one float per idle connection, not two.
        self._started = now = self._now()
        transport = self.transport
        host = _host(self.peer)
        plain = isinstance(transport, tcp.Server) and not transport.TLS
        # The transport's address, asked when needed, unless this protocol
        # was built for another (a test's); a TCP port builds both from
        # the same accept() result.
        if plain or self._peer == transport.getPeer():
            self._peer = None
        # The gate itself is the transport's producer (Pause.OUTPUT): no
        # separate producer object per connection.
        transport.registerProducer(self.gate, True)
        self._output_registered = True
        keepalive = self.factory.settings.tcp_keepalive
        if keepalive:
            enable_keepalive(transport, keepalive)
        if plain:
            # Plain TCP, the common case, told at once: no layer under it.
            tls = proxied = False
        else:
            tls = tls_at_accept(transport)
            proxied = behind_proxy(transport)
        self._run(
            self.session.connected(tls=tls, behind_proxy=proxied, host=host, now=now)
        )

    def proxy_header_received(self) -> None:
        """
        The PROXY header is in (L{lineserver.proxy}): judge the real client.
        """
        if self.session.phase is not Phase.PROXY:
            return  # under TLS, judged when the handshake completes
        self._peer = None  # the transport's: the header's now
        self._run(self.session.proxy_header(_host(self.peer), self._now()))

    def handshakeCompleted(self) -> None:
        """
        IHandshakeListener: the TLS handshake is done.
        """
        self.tls_subject = peer_subject(self.transport)
        self._peer = None  # the transport's: behind a proxy, its header's
        self.factory.stats.incr("tls.handshakes")
        log.info("{conn} TLS handshake complete", conn=self.identity)
        self._run(self.session.handshake_done(_host(self.peer), self._now()))

    @override
    def dataReceived(self, data: bytes) -> None:
        if not self.line_mode:
            self.rawDataReceived(data)
            return
        session = self.session
        if session.phase is Phase.PROXY:
            # The wrapper passes data on only once the header is parsed.
            self.proxy_header_received()
        # Only the idle and line deadlines read the time of a read.
        now = self._now() if self.factory.timed_reads else 0.0
        actions = session.data(data, now)
        if len(actions) == 1 and type(actions[0]) is Deliver:
            self._do_deliver(actions[0])  # the common case, without dispatch
        else:
            self._run(actions)

    @override
    def lineReceived(self, line: bytes) -> None:
        """
        Hand one line to the handler; subclasses may override this to take
        lines one at a time, as with any C{LineReceiver}.
        """
        self._deliver([line], line + self.delimiter)

    @override
    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A line broke C{MAX_LENGTH}: the session has sent C{ERR
        line-too-long} (after delivering the lines before it) and is
        closing.  A subclass may override this to hear of it; C{line} is
        empty, since the framer keeps only the length of a line it refuses.
        """

    @override
    def setLineMode(self, extra: bytes = b"") -> None:
        """
        Back to lines from raw mode; C{extra} is framed as if just read.
        """
        self.line_mode = 1
        if extra:
            self.dataReceived(extra)

    def readConnectionLost(self) -> None:
        """
        The client shut its write side: every complete line is delivered
        already; finish writing pending replies, then close.
        """
        self._run(self.session.close(CloseReason.CLEAN))

    def writeConnectionLost(self) -> None:
        """
        We never shut our write side alone; nothing to do.
        """

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        session = self.session
        handshaking = session.handshaking and session.reason is None
        pending = session.pending
        self._run(session.lost(clean=reason.check(ConnectionDone) is not None))
        if self._timers:
            for timer in self._timers.values():
                if timer.active():
                    timer.cancel()
            self._timers.clear()
        self._cancel_idle()
        # Reset only where set: these live in the instance dict, and a key
        # set there on every connection would grow every new connection's
        # inline values (by 8 bytes a key).
        if self._after_acks is not None:
            self._after_acks = None
        if self._ack_wait is not None:
            if self._ack_wait.active():
                self._ack_wait.cancel()
            self._ack_wait = None
        if handshaking:
            self._handshake_failed(reason)
        if pending:
            self.factory.stats.incr("lines.partial_discarded")
            log.debug(
                "{conn} closed with {n} bytes of an unterminated line; "
                "discarded (a line is accepted only with its terminator)",
                conn=self.identity,
                n=pending,
            )
        if self.handler is not None:
            try:
                self.handler.connection_lost()
            except Exception:
                log.failure("handler of {conn} failed on close", conn=self.identity)
        self._log_close()
        for waiter in self.factory.registry.remove(self):
            waiter.slot_granted()

    def _log_close(self) -> None:
        session = self.session
        if not self.factory.settings.log_connections:
            return
        reason = session.reason.value if session.reason is not None else "clean"
        connection_log.info(
            "closed {conn}: {reason}; {lines} line(s), {bytes} bytes "
            "in {duration:.3f}s",
            conn=self.identity,
            peer=describe_address(self.peer),
            subject=self.tls_subject,
            lines=session.lines,
            bytes=session.bytes,
            duration=self._now() - self._started if self._started else 0.0,
            reason=reason,
        )

    def _handshake_failed(self, reason: Failure) -> None:
        """
        The connection ended before its TLS handshake did: say why, in
        OpenSSL's words when it was a TLS error (old protocol, no or bad
        client certificate, not TLS at all).
        """
        why = tls_failure_text(reason)
        if why is None:
            # Closed before any TLS error: a port probe or health check,
            # not a client we refused.
            self.factory.stats.incr("tls.abandoned")
            log.debug(
                "{conn} closed before its TLS handshake ({why})",
                conn=self.identity,
                why=reason.getErrorMessage(),
            )
            return
        self.factory.stats.incr("tls.refused")
        log.info(
            "refusing {conn}: TLS handshake failed: {why}", conn=self.identity, why=why
        )

    # -- LineReceiver's producer contract: pause at a line boundary ------

    @override
    def pauseProducing(self) -> None:
        self.paused = True
        self.gate.hold(Pause.PROTOCOL)

    @override
    def resumeProducing(self) -> None:
        self.paused = False
        self.gate.release(Pause.PROTOCOL)
        if self._held:
            self._deliver_each([], b"")

    @override
    def stopProducing(self) -> None:
        self.paused = True
        self.transport.stopProducing()

    # -- IConnection -------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def producer(self, reason: Pause) -> IPushProducer:
        return self.gate.producer(reason)

    def send_error(self, code: ErrorCode | str, detail: str = "") -> None:
        """
        Send one C{ERR} line, stop reading, and close; abort if the peer
        does not take the last bytes within the close timeout.
        """
        self._run(self.session.refuse(code, detail))

    def close(self) -> None:
        """
        Close after the pending output; abort after the close timeout.
        """
        self._run(self.session.close())

    # -- delivery ------------------------------------------------------------

    def _deliver(self, lines: list[bytes], raw: bytes) -> None:
        handler = self.handler
        assert handler is not None, "the session delivers only once served"
        try:
            handler.lines_received(lines, raw)
        except LineFailed as failed:
            self._handler_failed(Failure(failed.reason), 1)
            rest = failed.index + 1
            if rest < len(lines):
                self._deliver(lines[rest:], after_lines(raw, rest, self.delimiter))
        except Exception:
            self._handler_failed(Failure(), len(lines))

    def _deliver_each(self, lines: list[bytes], raw: bytes) -> None:
        """
        One C{lineReceived} call per line, stopping at a line boundary when
        paused; a switch to raw mode hands the rest on as raw bytes.
        """
        held = self._held
        if held is None:
            held = self._held = []
        if lines:
            held.append((lines, raw, 0))
        # Not the phase OPEN: a read's lines before an error that the same
        # read brought are delivered, though the session is closing by now.
        while held and not self.paused and self.session.phase is not Phase.CLOSED:
            batch, batch_raw, index = held[0]
            while index < len(batch) and not self.paused:
                line = batch[index]
                index += 1
                try:
                    self.lineReceived(line)
                except Exception:
                    self._handler_failed(Failure(), 1)
                if not self.line_mode:
                    self._to_raw(batch_raw, index)
                    return
            if index < len(batch):
                held[0] = (batch, batch_raw, index)
                return
            held.pop(0)

    def _to_raw(self, batch_raw: bytes, index: int) -> None:
        """
        A C{lineReceived} called C{setRawMode}: what followed that line
        (held lines, the unterminated tail) goes to C{rawDataReceived}.
        """
        rest = [after_lines(batch_raw, index, self.delimiter)]
        rest += [raw for _, raw, _ in (self._held or [])[1:]]
        self._held = []
        rest.append(self.session.framer.take_tail())
        data = b"".join(rest)
        if data:
            self.rawDataReceived(data)

    def _handler_failed(self, reason: Failure, failed_lines: int) -> None:
        self.factory.stats.incr("handler.failures")
        self.factory.stats.incr("lines.failed", failed_lines)
        log.failure(
            "handler of {conn} failed; {n} line(s) counted as failed; "
            "handler recreated",
            reason,
            conn=self.identity,
            n=failed_lines,
        )
        old = self.handler
        if old is not None:
            try:
                old.connection_lost()
            except Exception:
                log.failure(
                    "failed handler of {conn} failed on close", conn=self.identity
                )
        self.handler = self.factory.handler_factory(self)

    def _pause_transport(self) -> None:
        # Once closing, reading is the close's business: TCP stopped it,
        # TLS keeps it on to read the peer's close_notify.
        if self.session.phase not in _CLOSED_PHASES:
            self.transport.pauseProducing()

    def _resume_transport(self) -> None:
        if self.session.phase not in _CLOSED_PHASES:
            self.transport.resumeProducing()


@implementer(IPushProducer)
class _ConnectionGate(BaseGate):
    """
    A connection's pause gate, calling its protocol's methods without a
    pair of bound methods per connection; also the producer registered
    with the transport, for C{Pause.OUTPUT} (the client does not read).
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: LineProtocol) -> None:
        super().__init__()
        self._protocol = protocol

    @override
    def _paused(self) -> None:
        self._protocol._pause_transport()

    @override
    def _resumed(self) -> None:
        self._protocol._resume_transport()

    def pauseProducing(self) -> None:
        self.hold(Pause.OUTPUT)

    def resumeProducing(self) -> None:
        self.release(Pause.OUTPUT)

    def stopProducing(self) -> None:
        """
        The transport is gone; the connection closes on its own path.
        """

    @override
    def producer(self, reason: Pause) -> IPushProducer:
        if reason is Pause.OUTPUT:
            return self
        return super().producer(reason)


LineProtocol._actions = {
    Deliver: LineProtocol._do_deliver,
    Send: LineProtocol._do_send,
    Refuse: LineProtocol._do_refuse,
    StartTLS: LineProtocol._do_start_tls,
    Arm: LineProtocol._do_arm,
    Disarm: LineProtocol._do_disarm,
    AskSlot: LineProtocol._do_ask_slot,
    Serve: LineProtocol._do_serve,
    Close: LineProtocol._do_close,
    Abort: LineProtocol._do_abort,
    Authenticated: LineProtocol._do_authenticated,
}


def _idle_bucket_of(protocol: LineProtocol) -> Bucket[LineProtocol] | None:
    return protocol._idle_bucket


class LineFactory(ServerFactory):
    """
    Makes a L{LineProtocol} per connection; shared by every listener.

    @ivar registry: tracks live connections and applies the limits.
    @ivar admission: who may connect and the rules for first lines.
    """

    protocol = LineProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        handler_factory: ILineHandlerFactory,
        registry: ConnectionRegistry[LineProtocol],
        clock: IReactorTime,
        settings: ProtocolSettings | None = None,
        stats: Stats | None = None,
        protocol_class: Callable[[LineFactory, IAddress, int], LineProtocol]
        | None = None,
        policy: AdmissionPolicy | None = None,
    ) -> None:
        self.handler_factory = handler_factory
        self.registry = registry
        self.clock = clock
        self.settings = settings or ProtocolSettings()
        self.stats = stats if stats is not None else Stats()
        self._make = protocol_class or LineProtocol
        self._numbers = itertools.count(1)
        self.admission = policy if policy is not None else AdmissionPolicy()
        #: Does a read need the time (an idle or line deadline is set)?
        self.timed_reads = bool(
            self.settings.idle_timeout or self.settings.line_timeout
        )
        #: Every connection's idle deadline, on one timer: it fires at
        #: most a tenth of the idle timeout late, and at most a second.
        idle = self.settings.idle_timeout
        self.idle_wheel: DeadlineWheel[LineProtocol] = DeadlineWheel(
            clock,
            min(1.0, idle / 10) if idle else 1.0,
            LineProtocol.idle_expired,
            _idle_bucket_of,
        )

    @override
    def buildProtocol(self, addr: IAddress | None) -> LineProtocol:  # type: ignore[override]
        assert addr is not None
        return self._make(self, addr, next(self._numbers))
