"""LineProtocol, the per-connection protocol, and the factory that makes it.

LineProtocol is a C{LineReceiver}: it keeps C{sendLine}, C{MAX_LENGTH},
C{lineLengthExceeded}, C{pauseProducing} at a line boundary and
C{lineReceived} for subclasses that want single lines.  Its hot path does
not call C{lineReceived} per line, though: each read goes through the pure
L{LineFramer} at once and the whole batch goes to the handler in one call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from lineserver.admission import STARTTLS, Admission, AdmissionPolicy, Verdict
from lineserver.errors import ErrorCode, error_line
from lineserver.flow import Pause, PauseGate
from lineserver.framing import LF, LineFramer
from lineserver.handlers import LineFailed
from lineserver.interfaces import IConnection, ILineHandler, ILineHandlerFactory
from lineserver.stats import Stats
from lineserver.timeouts import Deadline
from lineserver.tls import peer_subject, tls_at_accept, tls_failure_text

if TYPE_CHECKING:
    from lineserver.connections import ConnectionRegistry

log = Logger(namespace="lineserver.protocol")


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
    """

    max_line_length: int = 65536
    idle_timeout: float | None = None
    line_timeout: float | None = None
    close_timeout: float = 5.0
    handshake_timeout: float | None = 10.0
    tcp_keepalive: float | None = 300.0


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


def behind_proxy(transport: object) -> bool:
    """
    Is there a PROXY protocol wrapper (C{haproxy:} endpoint) in the chain
    of transports under a protocol, directly or under a TLS layer?
    """
    for _ in range(4):
        if transport is None:
            return False
        if isinstance(transport, HAProxyProtocolWrapper):
            return True
        transport = getattr(transport, "transport", None)
    return False


def _after_lines(raw: bytes, count: int) -> bytes:
    """
    @return: C{raw} without its first C{count} lines.
    """
    offset = 0
    for _ in range(count):
        offset = raw.index(LF, offset) + 1
    return raw[offset:]


@implementer(IConnection, IHalfCloseableProtocol, IHandshakeListener)
class LineProtocol(LineReceiver):
    """
    One client connection.

    @ivar handler: the current handler; replaced if it raises.
    @ivar gate: the pause gate in front of the transport's reading.
    """

    delimiter = LF
    factory: LineFactory
    #: A TCP, TLS or UNIX transport; ITransport alone lacks the producer
    #: and abort methods that every one of them has.
    transport: Any

    def __init__(self, factory: LineFactory, peer: IAddress, number: int) -> None:
        self.factory = factory
        self.peer = peer
        self.number = number
        self.identity = f"#{number} {describe_address(peer)}"
        self.tls_subject: str | None = None
        self.MAX_LENGTH = factory.settings.max_line_length
        self._framer = LineFramer(self.MAX_LENGTH)
        self._stats = factory.stats
        self._per_line = type(self).lineReceived is not LineProtocol.lineReceived
        self._held: list[bytes] = []
        self._closing = False
        self._abort_call: IDelayedCall | None = None
        self.handler: ILineHandler | None = None
        self.gate = PauseGate(self._pause_transport, self._resume_transport)
        self._awaiting_proxy = False
        self._proxy_wait: Deadline | None = None
        self._early: list[tuple[list[bytes], bytes]] = []
        self._handshake: Deadline | None = None
        self._tls = False
        self._output_registered = False
        self._serve_when_secure = False
        self._admission: Admission | None = Admission(factory.admission)
        settings = factory.settings
        self._idle = (
            Deadline(factory.clock, settings.idle_timeout, self._idle_expired)
            if settings.idle_timeout
            else None
        )
        self._line = (
            Deadline(factory.clock, settings.line_timeout, self._line_expired)
            if settings.line_timeout
            else None
        )

    @override
    def __repr__(self) -> str:
        return f"<LineProtocol {self.identity}>"

    # -- Twisted's protocol contract ------------------------------------

    @override
    def connectionMade(self) -> None:
        self.transport.registerProducer(self.gate.producer(Pause.OUTPUT), True)
        self._output_registered = True
        if tls_at_accept(self.transport):
            self._begin_handshake()
        if behind_proxy(self.transport):
            # The real client address comes with the PROXY header, which is
            # read before our first data (and before a TLS handshake ends).
            # A peer that never sends it must not hold the socket forever.
            # (Under TLS the handshake deadline covers the header too.)
            self._awaiting_proxy = True
            if not self._tls:
                self._proxy_wait = Deadline(
                    self.factory.clock,
                    self.factory.settings.handshake_timeout or 10.0,
                    self._proxy_expired,
                )
                self._proxy_wait.begin()
            return
        self._admit()

    def proxy_header_received(self) -> None:
        """
        The PROXY header is in (L{lineserver.proxy}): judge the real client.
        """
        if self._awaiting_proxy and not self._tls:
            self._admit()

    def _proxy_expired(self) -> None:
        self._proxy_wait = None
        self._abort_late("PROXY header", "timeouts.proxy")

    def _abort_late(self, missing: str, counter: str) -> None:
        """
        Abort (not close: a peer that does not read would hold a close)
        a connection that did not send C{missing} in time.
        """
        log.info(
            "aborting {conn}: no {missing} within {t}s",
            conn=self.identity,
            missing=missing,
            t=self.factory.settings.handshake_timeout,
        )
        self._stats.incr(counter)
        self.transport.abortConnection()

    def _set_identity(self) -> None:
        self.identity = f"#{self.number} {describe_address(self.peer)}"
        if self.tls_subject:
            self.identity = f"{self.identity} ({self.tls_subject})"

    def _admit(self) -> None:
        """
        Decide on the client by its address, then hand it to the registry.
        """
        self._awaiting_proxy = False
        if self._proxy_wait is not None:
            self._proxy_wait.cancel()
            self._proxy_wait = None
        self.peer = self.transport.getPeer()
        self._set_identity()
        allow = self.factory.admission.allow
        host = getattr(self.peer, "host", None)
        if allow is not None and host is not None and not allow(host):
            self._stats.incr("connections.refused.forbidden")
            log.info("refusing {conn}: address not allowed", conn=self.identity)
            self.send_error(ErrorCode.FORBIDDEN)
            return
        self.factory.registry.admit(self)

    def start_serving(self) -> None:
        """
        The registry admitted this connection: build its handler, and start
        the idle deadline.  A TLS connection waits for its handshake, so
        that it holds no handler (and no sink state) before it.
        """
        if self._handshake is not None:
            self._serve_when_secure = True
            return
        self.handler = self.factory.handler_factory(self)
        if self._idle is not None:
            self._idle.begin()
        early, self._early = self._early, []
        for lines, raw in early:
            self._deliver(lines, raw)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_proxy:
            self._admit()
        if self._closing:
            # Refused or closing: nothing more of it is read into lines.
            return
        frames = self._framer.feed(data)
        if self._idle is not None:
            self._idle.touch()
        if self._line is not None:
            # A read that completed lines and left a tail started a new line.
            if not self._framer.pending:
                self._line.clear()
            elif frames.lines or not self._line.active:
                self._line.begin()
        lines, raw = frames.lines, frames.raw
        admission = self._admission
        if lines and admission is not None:
            # Once lines flow, only a STARTTLS line still needs a look.
            if not admission.delivering or STARTTLS in raw:
                lines, raw = self._screen(lines, raw)
            if admission.open:
                self._admission = None  # screened: lines go straight through
        if lines:
            self._accept(lines, raw)
        if frames.error is not None:
            self._stats.incr("lines.too_long")
            self.lineLengthExceeded(b"")

    def _accept(self, lines: list[bytes], raw: bytes) -> None:
        self._stats.incr("lines.received", len(lines))
        if self._per_line or self._held:
            self._deliver_each(lines)
        else:
            self._deliver(lines, raw)

    @override
    def lineReceived(self, line: bytes) -> None:
        """
        Hand one line to the handler; subclasses may override this to take
        lines one at a time, as with any C{LineReceiver}.
        """
        self._deliver([line], line + LF)

    @override
    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A line broke C{MAX_LENGTH}: say so and close (lines before it were
        delivered already).  C{line} is empty: the framer keeps only length.
        """
        log.info(
            "closing {conn}: line longer than {limit} bytes",
            conn=self.identity,
            limit=self.MAX_LENGTH,
        )
        self.send_error(ErrorCode.LINE_TOO_LONG, f"limit {self.MAX_LENGTH}")

    def readConnectionLost(self) -> None:
        """
        The client shut its write side: every complete line is delivered
        already; finish writing pending replies, then close.
        """
        self.close()

    def writeConnectionLost(self) -> None:
        """
        We never shut our write side alone; nothing to do.
        """

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshake is not None and not self._closing:
            self._handshake_failed(reason)
        for deadline in (self._idle, self._line, self._handshake, self._proxy_wait):
            if deadline is not None:
                deadline.cancel()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._framer.pending:
            self._stats.incr("lines.partial_discarded")
            log.debug(
                "{conn} closed with {n} bytes of an unterminated line; "
                "discarded (a line is accepted only with its terminator)",
                conn=self.identity,
                n=self._framer.pending,
            )
        if self.handler is not None:
            try:
                self.handler.connection_lost()
            except Exception:
                log.failure("handler of {conn} failed on close", conn=self.identity)
        self.factory.registry.remove(self)

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
            self._deliver_each([])

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
        if self._closing:
            return
        self._closing = True
        code_text = code.value if isinstance(code, ErrorCode) else code
        self._stats.incr(f"errors.{code_text}")
        self.gate.hold(Pause.CLOSING)
        self.sendLine(error_line(code, detail))
        self.close()

    def close(self) -> None:
        """
        Close after the pending output; abort after the close timeout.
        """
        self._closing = True
        # TLS sends its close_notify only once no producer is registered,
        # and then waits for the peer's: read (and drop) until it comes.
        if self._output_registered:
            self._output_registered = False
            self.transport.unregisterProducer()
        if self._tls:
            self.transport.resumeProducing()
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.factory.clock.callLater(
                self.factory.settings.close_timeout, self._abort
            )

    # -- admission: STARTTLS, required TLS, AUTH -----------------------------

    def _screen(self, lines: list[bytes], raw: bytes) -> tuple[list[bytes], bytes]:
        """
        Pass lines through the admission rules until the connection is open.

        Lines to deliver that come before a command (C{STARTTLS} on a port
        that offers it) are delivered here, before the command acts.

        @return: the remaining lines (and their raw bytes) for the handler.
        """
        admission = self._admission
        assert admission is not None
        count = len(lines)
        offset = 0  # where line `index` starts in raw
        start: int | None = None  # first line of a run to deliver
        start_offset = 0
        for index, line in enumerate(lines):
            end = raw.index(LF, offset) + 1
            last = index == count - 1 and not self._framer.pending
            decision = admission.on_line(line, last)
            verdict = decision.verdict
            if verdict is Verdict.DELIVER:
                if start is None:
                    start, start_offset = index, offset
                if admission.open:
                    break
                offset = end
                continue
            if start is not None:
                self._accept(lines[start:index], raw[start_offset:offset])
                start = None
            if verdict is Verdict.CONSUMED:
                self._stats.incr("auth.accepted")
                log.info("{conn} authenticated", conn=self.identity)
                offset = end
                continue
            if verdict is Verdict.START_TLS:
                self._start_tls()
            else:
                assert decision.code is not None
                log.info(
                    "refusing {conn}: {code}{detail}",
                    conn=self.identity,
                    code=decision.code.value,
                    detail=f" ({decision.detail})" if decision.detail else "",
                )
                self.send_error(decision.code, decision.detail)
            return [], b""
        if start is None:
            return [], b""
        return lines[start:], raw[start_offset:]

    def _start_tls(self) -> None:
        """
        Answer C{OK starttls} in plaintext, then start TLS on this socket.
        Nothing is pending in the framer: STARTTLS had to be the last thing
        the client sent.
        """
        self.sendLine(b"OK starttls")
        self._framer = LineFramer(self.MAX_LENGTH)
        self._stats.incr("tls.starttls")
        self.transport.startTLS(self.factory.admission.starttls_context)
        self._begin_handshake()

    def _begin_handshake(self) -> None:
        self._tls = True
        timeout = self.factory.settings.handshake_timeout
        self._handshake = Deadline(
            self.factory.clock, timeout or 1e9, self._handshake_expired
        )
        self._handshake.begin()

    def _handshake_expired(self) -> None:
        self._handshake = None
        self._abort_late("TLS handshake", "timeouts.handshake")

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
            self._stats.incr("tls.abandoned")
            log.debug(
                "{conn} closed before its TLS handshake ({why})",
                conn=self.identity,
                why=reason.getErrorMessage(),
            )
            return
        self._stats.incr("tls.refused")
        log.info(
            "refusing {conn}: TLS handshake failed: {why}", conn=self.identity, why=why
        )

    def handshakeCompleted(self) -> None:
        """
        IHandshakeListener: the TLS handshake is done; serve the connection.
        """
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        self.tls_subject = peer_subject(self.transport)
        if self._awaiting_proxy:
            self.peer = self.transport.getPeer()  # the PROXY header's
        self._set_identity()
        if self._admission is not None:
            self._admission.tls_started()
        self._stats.incr("tls.handshakes")
        log.info("{conn} TLS handshake complete", conn=self.identity)
        if self._awaiting_proxy:
            # TLS behind a proxy: its header came before the handshake.
            self._admit()
        elif self._serve_when_secure:
            self._serve_when_secure = False
            self.start_serving()

    def _idle_expired(self) -> None:
        assert self._idle is not None
        if self.gate.paused:
            # We stopped reading it: its silence is ours, not the client's.
            self._idle.begin()
            return
        log.info(
            "closing {conn}: idle for {t}s", conn=self.identity, t=self._idle.timeout
        )
        self._stats.incr("timeouts.idle")
        self.send_error(ErrorCode.IDLE_TIMEOUT)

    def _line_expired(self) -> None:
        assert self._line is not None
        if self.gate.paused:
            self._line.begin()
            return
        log.info(
            "closing {conn}: a line stayed incomplete for {t}s",
            conn=self.identity,
            t=self._line.timeout,
        )
        self._stats.incr("timeouts.line")
        self.send_error(ErrorCode.LINE_TIMEOUT)

    def _abort(self) -> None:
        self._abort_call = None
        log.info("aborting {conn}: it did not take its last bytes", conn=self.identity)
        self._stats.incr("connections.aborted")
        self.transport.abortConnection()

    # -- delivery ------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """
        Bytes of an unterminated line held by the framer.
        """
        return self._framer.pending

    def _deliver(self, lines: list[bytes], raw: bytes) -> None:
        handler = self.handler
        if handler is None:
            # Read before this connection was served (waiting for a slot):
            # kept until start_serving.
            self._early.append((lines, raw))
            return
        try:
            handler.lines_received(lines, raw)
        except LineFailed as failed:
            self._handler_failed(Failure(failed.reason), 1)
            rest = failed.index + 1
            if rest < len(lines):
                self._deliver(lines[rest:], _after_lines(raw, rest))
        except Exception:
            self._handler_failed(Failure(), len(lines))

    def _deliver_each(self, lines: list[bytes]) -> None:
        """
        One call per line, stopping at a line boundary when paused.
        """
        held = self._held + lines if self._held else lines
        index = 0
        while index < len(held) and not self.paused and not self._closing:
            line = held[index]
            index += 1
            try:
                self.lineReceived(line)
            except Exception:
                self._handler_failed(Failure(), 1)
        self._held = held[index:]

    def _handler_failed(self, reason: Failure, failed_lines: int) -> None:
        self._stats.incr("handler.failures")
        self._stats.incr("lines.failed", failed_lines)
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
        self.transport.pauseProducing()

    def _resume_transport(self) -> None:
        if not self._closing:
            self.transport.resumeProducing()


class LineFactory(ServerFactory):
    """
    Makes a L{LineProtocol} per connection; shared by every listener.

    @ivar registry: tracks live connections and applies the limits.
    """

    protocol = LineProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        handler_factory: ILineHandlerFactory,
        registry: ConnectionRegistry,
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
        #: Who may connect; the rules for a connection's first lines.
        self.admission = policy if policy is not None else AdmissionPolicy()

    @override
    def buildProtocol(self, addr: IAddress | None) -> LineProtocol:  # type: ignore[override]
        assert addr is not None
        return self._make(self, addr, next(self._numbers))
