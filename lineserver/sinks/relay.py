"""The relay sink: forwards lines to another line server.

    --sink 'tcp:HOST:PORT'              downstream runs with --ack (default)
    --sink 'tcp:HOST:PORT?ack=no'       downstream without --ack
    --sink 'tls:HOST:PORT:trustRoots=DIR:certificate=C:privateKey=K'

The target is a Twisted client endpoint string without its type (the
scheme is the type: C{tcp:} or C{tls:}); connections come from a
C{ClientService}, which reconnects with capped exponential backoff for as
long as it takes.  The lines go through L{lineserver.client.Sender}, the
engine of C{lineserver-send}.

What a batch's Deferred promises (docs/relay.md says it for operators):

  - C{ack=yes}: the downstream acknowledged every line of the batch
    (C{ACK <n>}), so it made them durable by its own sink's promise:
    acknowledgements chain end to end.  Lines not acknowledged when the
    connection drops are sent again, first, on the next connection; the
    downstream may then see a line twice (it had written it, but the ACK
    was lost with the connection).
  - C{ack=no}: the batch was written to a connected socket that was not
    pushing back; nothing more.  Lines written but not yet read by the
    downstream when it dies are lost.

While the downstream is down, writes wait: the queue fills and clients are
paused (or spooled); nothing is dropped and nothing crashes.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lineserver.client import (
    LineSenderProtocol,
    ProtocolViolation,
    Reply,
    ReportingEndpoint,
    Sender,
    SenderFactory,
    is_tls,
)
from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import IPipelinedSink, Scheme, SinkURL, SinkURLError

log = Logger(namespace="lineserver.sink.relay")

#: Batches awaiting their ACK at once (with ack=yes): the round trip to the
#: downstream is paid once for several batches.
ACK_IN_FLIGHT = 8

#: Seconds between two log lines about a downstream that stays unreachable.
FAILURE_LOG_EVERY = 30.0

#: How long C{close} waits for the downstream to close after our
#: half-close, before dropping the connection.
CLOSE_TIMEOUT = 10.0


class _RelaySender(Sender):
    """
    The engine, with log lines for an operator about the downstream.
    """

    def __init__(self, description: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.description = description
        self.closed: Deferred[None] | None = None

    def connected(self, protocol: LineSenderProtocol) -> None:
        log.info(
            "relay {relay}: connected; sending {count} unacknowledged line(s) first",
            relay=self.description,
            count=self.window.unacknowledged,
        )
        super().connected(protocol)

    def reply(self, protocol: LineSenderProtocol, reply: Reply) -> None:
        if reply.kind.name == "ERR":
            log.error(
                "relay {relay}: the downstream refused: ERR {code} {detail}",
                relay=self.description,
                code=reply.code,
                detail=reply.detail,
            )
        super().reply(protocol, reply)

    def violation(self, protocol: LineSenderProtocol, error: ProtocolViolation) -> None:
        log.error(
            "relay {relay}: {error}; reconnecting", relay=self.description, error=error
        )
        super().violation(protocol, error)

    def disconnected(
        self, protocol: LineSenderProtocol, reason: Failure | None
    ) -> None:
        was_current = protocol is self.protocol
        super().disconnected(protocol, reason)
        if self.closed is not None and not self.closed.called:
            self.closed.callback(None)
            return
        if was_current:
            log.warn(
                "relay {relay}: connection lost ({reason}); {count} line(s) not "
                "acknowledged will be sent again",
                relay=self.description,
                reason=reason.getErrorMessage() if reason else "closed",
                count=self.window.unacknowledged if self.ack else 0,
            )


@implementer(ISink, IPipelinedSink)
class RelaySink:
    """
    Forwards batches to a downstream line server; see the module docstring.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        description: str,
        *,
        ack: bool,
        auth_token: bytes | None = None,
        max_retry_delay: float = 5.0,
        ack_warning: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.description = description
        self.ack = ack
        self.max_in_flight = ACK_IN_FLIGHT if ack else 1
        # The window is only a bound on memory for lineserver-send; here
        # the sink queue bounds what is handed over, so it never fills.
        self.sender = _RelaySender(
            description, ack=ack, window=1 << 62, auth_token=auth_token
        )
        self._max_retry_delay = max_retry_delay
        self.service: ClientService | None = None
        self.sender.on_progress = self._connected_or_progress
        self._failures = 0
        self._failure_logged = 0.0
        self._ack_warning = ack_warning
        self._ack_check: IDelayedCall | None = None
        self._acknowledged_at_check = 0

    def open(self) -> Deferred[None]:
        """
        Start connecting; writes wait for the connection, so an absent
        downstream is an outage, not a failure to open.
        """
        self.service = ClientService(
            ReportingEndpoint(self.endpoint, self._connect_failed),
            SenderFactory(self.sender),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=self._max_retry_delay),
            clock=self.reactor,
        )
        self.service.startService()
        return succeed(None)

    def _connect_failed(self, reason: Failure) -> None:
        # Logged at the first failure, then at most every FAILURE_LOG_EVERY
        # seconds, so that a long outage is visible without flooding.
        self._failures += 1
        now = self.reactor.seconds()
        if self._failures > 1 and now - self._failure_logged < FAILURE_LOG_EVERY:
            return
        self._failure_logged = now
        log.warn(
            "relay {relay}: cannot connect ({reason}); {attempts} attempt(s) so far, "
            "retrying; {count} line(s) waiting",
            relay=self.description,
            reason=reason.getErrorMessage(),
            attempts=self._failures,
            count=self.sender.window.unacknowledged,
        )

    def _connected_or_progress(self) -> None:
        self._failures = 0

    def write(self, lines: list[bytes]) -> Deferred[None]:
        done = self.sender.when_done(self.sender.send(lines))
        if self.ack and self._ack_check is None:
            self._acknowledged_at_check = self.sender.window.acknowledged
            self._ack_check = self.reactor.callLater(
                self._ack_warning, self._check_acks
            )
        return done

    def _check_acks(self) -> None:
        # A downstream without --ack never acknowledges: with ack=yes the
        # relay would wait forever, so say what is likely wrong.
        self._ack_check = None
        window = self.sender.window
        if not window.unacknowledged:
            return
        if (
            window.acknowledged == self._acknowledged_at_check
            and self.sender.protocol is not None
        ):
            log.warn(
                "relay {relay}: connected, but no ACK for {seconds:g} s with "
                "{count} line(s) waiting; does the downstream run with --ack? "
                "(if not, use ?ack=no)",
                relay=self.description,
                seconds=self._ack_warning,
                count=window.unacknowledged,
            )
        self._acknowledged_at_check = window.acknowledged
        self._ack_check = self.reactor.callLater(self._ack_warning, self._check_acks)

    @property
    def unacknowledged(self) -> int:
        """
        Lines handed to this sink whose batch has not been confirmed.
        """
        return self.sender.window.unacknowledged

    def close(self) -> Deferred[None]:
        """
        Shut the writing side and wait (at most L{CLOSE_TIMEOUT}) for the
        downstream to close, so it has read every byte; then stop.
        """
        if self._ack_check is not None and self._ack_check.active():
            self._ack_check.cancel()
        self._ack_check = None
        service, self.service = self.service, None
        if service is None:
            return succeed(None)
        protocol = self.sender.protocol
        if protocol is None or protocol.transport is None:
            return Deferred.fromCoroutine(self._stop(service))
        closed: Deferred[None] = Deferred()
        self.sender.closed = closed
        transport: Any = protocol.transport
        transport.unregisterProducer()
        if is_tls(transport):
            transport.loseConnection()
        else:
            transport.loseWriteConnection()

        def late() -> None:
            if not closed.called:
                closed.callback(None)

        timer: IDelayedCall = self.reactor.callLater(CLOSE_TIMEOUT, late)

        async def finish() -> None:
            await closed
            if timer.active():
                timer.cancel()
            await self._stop(service)

        return Deferred.fromCoroutine(finish())

    async def _stop(self, service: ClientService) -> None:
        await service.stopService()


@implementer(ISinkFactory)
class RelaySinkFactory:
    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamClientEndpoint,
        description: str,
        *,
        ack: bool,
        auth_token: bytes | None,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.description = description
        self.ack = ack
        self.auth_token = auth_token

    def __call__(self) -> RelaySink:
        return RelaySink(
            self.reactor,
            self.endpoint,
            self.description,
            ack=self.ack,
            auth_token=self.auth_token,
        )


_YES = frozenset({"yes", "1", "true", "on"})
_NO = frozenset({"no", "0", "false", "off"})


def _relay_factory(url: SinkURL, reactor: Any) -> ISinkFactory:
    """
    C{tcp:HOST:PORT[:more=...]?ack=yes|no&auth_token_file=PATH}, and the
    same with C{tls:}.
    """
    if not url.target:
        raise SinkURLError(
            f"{url.scheme}: needs HOST:PORT, as in {url.scheme}:db1:4040"
        )
    ack_text = url.options.get("ack", "yes").lower()
    if ack_text not in _YES | _NO:
        raise SinkURLError(f"{url.scheme}: ack must be yes or no, not {ack_text!r}")
    token: bytes | None = None
    token_path = url.options.get("auth_token_file")
    if token_path is not None:
        try:
            with open(token_path, "rb") as f:
                token = f.readline().strip()
        except OSError as e:
            raise SinkURLError(
                f"{url.scheme}: auth_token_file {token_path}: {e.strerror}"
            ) from e
        if not token:
            raise SinkURLError(f"{url.scheme}: auth_token_file {token_path}: empty")
    description = f"{url.scheme}:{url.target}"
    try:
        endpoint = clientFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise SinkURLError(f"{description}: not a client endpoint ({e})") from e
    return RelaySinkFactory(
        reactor, endpoint, description, ack=ack_text in _YES, auth_token=token
    )


#: C{tcp:} and C{tls:}: a downstream line server.
relay_scheme = Scheme(_relay_factory, frozenset({"ack", "auth_token_file"}))
