"""C{lineserver-send}: send a file or standard input to a line server.

    lineserver-send [--ack] [--tls ...] HOST:PORT|ENDPOINT [FILE|-]

With C{--ack} every line is kept until the server acknowledged it; after
a reset or a server restart it reconnects with capped exponential backoff
and sends again, in order, every line not acknowledged; it exits 0 only
when every line is acknowledged.  Without C{--ack} it sends, then shuts
its writing side and reads until the server closes, so it never closes
with unread bytes in its socket (which would make its kernel send a reset
and the server's kernel drop lines not read yet).  docs/sending.md says
what each mode promises.

Exit status: 0 done; 1 a permanent error (C{ERR unauthorized}, ...), no
progress for C{--give-up} seconds, or (without C{--ack}) a connection lost
before the end; 2 a usage error.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Sequence
from typing import IO, Any, BinaryIO, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
)
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.failure import Failure

from lineserver.client import (
    LineSenderProtocol,
    Reply,
    ReportingEndpoint,
    Sender,
    SenderFactory,
    is_tls,
)

#: Endpoint types that make the target a Twisted endpoint string rather
#: than HOST:PORT.
_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "tls", "unix"})

#: Bytes read from the input at a time.
CHUNK = 256 * 1024

#: How long to wait for the server to close after we shut our writing side.
DRAIN_TIMEOUT = 30.0


class Options(usage.Options):
    synopsis = "lineserver-send [options] HOST:PORT|ENDPOINT [FILE|-]"
    longdesc = (
        "Send the lines of FILE (standard input if '-' or absent) to a "
        "lineserver.  The target is HOST:PORT ([::1]:PORT for IPv6) or a "
        "Twisted client endpoint (tcp:host=H:port=P, tls:H:P:...)."
    )
    optFlags = [
        [
            "ack",
            None,
            "Wait for the server's ACKs (it must run with --ack), "
            "resend after a reconnect, exit 0 only when all are acknowledged.",
        ],
        ["tls", None, "TLS from the start (for a HOST:PORT target)."],
        ["starttls", None, "Plain TCP, then STARTTLS (server --starttls)."],
    ]
    optParameters = [
        [
            "ca",
            None,
            None,
            "CA certificates (PEM) the server's must chain to (default: the system's).",
        ],
        ["cert", None, None, "Client certificate PEM (for --tls-client-ca)."],
        ["key", None, None, "Client key PEM (default: in --cert)."],
        [
            "server-name",
            None,
            None,
            "Name to check the server certificate against (default: HOST).",
        ],
        [
            "auth-token-file",
            None,
            None,
            "File whose first line is the token "
            "sent as AUTH <token> (server --auth-tokens).",
        ],
        [
            "window",
            None,
            10_000,
            "Most unacknowledged lines held in memory; reading the input pauses there.",
            int,
        ],
        [
            "give-up",
            None,
            300.0,
            "Exit 1 after this many seconds without progress (0: never).",
            float,
        ],
        ["max-retry-delay", None, 10.0, "Longest wait between reconnects.", float],
    ]

    def parseArgs(  # type: ignore[override]  # noqa: N802
        self, target: str, source: str = "-"
    ) -> None:
        self["target"] = target
        self["source"] = source

    def postOptions(self) -> None:
        if self["window"] < 1:
            raise usage.UsageError("--window must be at least 1")
        if self["give-up"] < 0:
            raise usage.UsageError("--give-up must be 0 or more")
        if self["tls"] and self["starttls"]:
            raise usage.UsageError("--tls and --starttls exclude each other")
        if self["key"] and not self["cert"]:
            raise usage.UsageError("--key needs --cert")
        if self["auth-token-file"]:
            try:
                with open(self["auth-token-file"], "rb") as f:
                    token = f.readline().strip()
            except OSError as e:
                raise usage.UsageError(
                    f"--auth-token-file {self['auth-token-file']}: {e.strerror}"
                ) from e
            if not token:
                raise usage.UsageError(
                    f"--auth-token-file {self['auth-token-file']}: empty"
                )
            self["token"] = token
        else:
            self["token"] = None


def split_host_port(target: str) -> tuple[str, int]:
    """
    C{"host:4040"} or C{"[::1]:4040"} to (host, port).

    @raise usage.UsageError: no port, or not a number.
    """
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise usage.UsageError(f"{target!r}: want HOST:PORT or an endpoint string")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_endpoint_string(target: str) -> bool:
    return target.split(":", 1)[0].lower() in _ENDPOINT_TYPES


def tls_options(options: Options, hostname: str) -> Any:
    """
    The client TLS options: the server certificate checked against
    C{--ca} (or the system's CAs) and C{--server-name}; C{--cert} sent.
    """
    trust: Any = platformTrust()
    if options["ca"]:
        with open(options["ca"], "rb") as f:
            trust = Certificate.loadPEM(f.read())
    client: Any = None
    if options["cert"]:
        with open(options["cert"], "rb") as f:
            pem = f.read()
        if options["key"]:
            with open(options["key"], "rb") as f:
                pem += b"\n" + f.read()
        client = PrivateCertificate.loadPEM(pem)
    return optionsForClientTLS(
        options["server-name"] or hostname, trustRoot=trust, clientCertificate=client
    )


def endpoint_for(reactor: Any, options: Options) -> tuple[IStreamClientEndpoint, Any]:
    """
    @return: the endpoint to connect to, and the TLS options for
        C{--starttls} (or None).
    """
    target = options["target"]
    if target.lower().startswith("ssl:"):
        raise usage.UsageError(
            "ssl: client endpoints do not check the server's certificate; "
            "use --tls HOST:PORT or tls:HOST:PORT"
        )
    if is_endpoint_string(target):
        if options["tls"] or options["starttls"]:
            raise usage.UsageError(
                "--tls/--starttls go with HOST:PORT; an endpoint string says "
                "its own TLS (tls:HOST:PORT:trustRoots=...)"
            )
        return clientFromString(reactor, target), None
    host, port = split_host_port(target)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port)
    if options["tls"]:
        return wrapClientTLS(tls_options(options, host), endpoint), None
    if options["starttls"]:
        return endpoint, tls_options(options, host)
    return endpoint, None


class LineSource:
    """
    Reads lines from a file in chunks, on a thread (a pipe or a slow disk
    must not stall the reactor), one chunk at a time, and hands them out
    as the window has room: not reading the next chunk is how the sender
    pauses its input, so memory holds the window and one chunk at most.

    A last line without a terminator is sent as a line.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._rest = b""
        self._lines: deque[bytes] = deque()
        self.eof = False

    @property
    def buffered(self) -> int:
        return len(self._lines)

    @property
    def exhausted(self) -> bool:
        return self.eof and not self._lines

    def take(self, most: int) -> list[bytes]:
        """
        @return: up to C{most} lines read already.
        """
        count = min(most, len(self._lines))
        return [self._lines.popleft() for _ in range(count)]

    def read(self) -> Deferred[None]:
        """
        Read the next chunk; at the end, L{eof} is set.
        """
        read1: Any = getattr(self.stream, "read1", self.stream.read)
        return deferToThread(read1, CHUNK).addCallback(self._split)

    def _split(self, data: bytes) -> None:
        if not data:
            self.eof = True
            rest, self._rest = self._rest, b""
            if rest:
                self._lines.append(rest)
            return
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        self._lines.extend(lines)


class SendRun:
    """
    One run of C{lineserver-send}: the input, the engine, the connection
    service, and when to stop.

    @ivar status: the exit status once L{done} fired.
    @ivar done: fires with the exit status.
    """

    def __init__(
        self,
        reactor: Any,
        options: Options,
        source: LineSource,
        err: IO[str],
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.source = source
        self.err = err
        self.ack = bool(options["ack"])
        endpoint, starttls = endpoint_for(reactor, options)
        self.sender = Sender(
            ack=self.ack,
            window=options["window"],
            auth_token=options["token"],
            starttls=starttls,
        )
        self.sender.on_progress = self._progress
        self.sender.on_room = self._pump
        self.sender.on_error = self._error
        self.service = ClientService(
            ReportingEndpoint(endpoint, self._connect_failed),
            _Factory(self),
            retryPolicy=backoffPolicy(
                initialDelay=0.1, maxDelay=options["max-retry-delay"]
            ),
            clock=reactor,
        )
        self.done: Deferred[int] = Deferred()
        self.status: int | None = None
        self._reading = False
        self._pumping = False
        self._finishing = False
        self._give_up: IDelayedCall | None = None
        self.last_failure: str | None = None
        self._drain: IDelayedCall | None = None

    def start(self) -> Deferred[int]:
        self.service.startService()
        self._progress()
        self._pump()
        return self.done

    # -- input ---------------------------------------------------------------

    def _pump(self) -> None:
        # Sending can call back here (a write that releases lines at once);
        # the loop below does that work instead of a deeper recursion.
        if self._pumping:
            return
        self._pumping = True
        try:
            window = self.sender.window
            while self.status is None and self.sender.can_take and self.source.buffered:
                self.sender.send(self.source.take(window.cap - window.unacknowledged))
        finally:
            self._pumping = False
        if self.status is not None:
            return
        if self.source.exhausted:
            self._check_done()
        elif not self._reading and not self.source.eof and self.sender.can_take:
            self._reading = True
            self.source.read().addCallbacks(self._got, self._read_failed)

    def _got(self, _: None) -> None:
        self._reading = False
        self._pump()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        self._finish(1, f"reading {self.options['source']}: {failure.value}")

    # -- progress and the end ------------------------------------------------

    def _progress(self) -> None:
        seconds = self.options["give-up"]
        if not seconds or self.status is not None or self._finishing:
            return
        if self._give_up is not None and self._give_up.active():
            self._give_up.reset(seconds)
        else:
            self._give_up = self.reactor.callLater(seconds, self._no_progress)
        self._check_done()

    def _no_progress(self) -> None:
        window = self.sender.window
        what = "acknowledged" if self.ack else "written"
        why = (
            f" (last connection attempt: {self.last_failure})"
            if self.last_failure and self.sender.protocol is None
            else ""
        )
        self._finish(
            1,
            f"no progress for {self.options['give-up']:g} seconds; giving up "
            f"with {window.acknowledged} of {window.taken} lines {what}{why}",
        )

    def _connect_failed(self, reason: Failure) -> None:
        self.last_failure = reason.getErrorMessage()

    def _error(self, reply: Reply) -> None:
        text = f"ERR {reply.code}" + (f" {reply.detail}" if reply.detail else "")
        if reply.permanent:
            self._finish(1, f"the server refused: {text}")
        elif not self.ack:
            self._finish(
                1,
                f"the server closed with {text}; without --ack "
                "the lines after the last one it read are unknown",
            )
        else:
            self.err.write(f"lineserver-send: {text}; reconnecting\n")

    def connected(self) -> None:
        self._check_done()

    def disconnected(self) -> None:
        if self.status is not None:
            return
        if self._finishing:
            self._finish(0)
        elif not self.ack and self.sender.window.taken:
            self._finish(
                1,
                "the connection was lost; without --ack it is unknown which "
                f"of the {self.sender.window.acknowledged} lines written arrived",
            )

    def _check_done(self) -> None:
        window = self.sender.window
        if (
            self._finishing
            or self.status is not None
            or not self.source.exhausted
            or window.acknowledged != window.taken
            or self.sender.protocol is None
        ):
            return
        # Everything is acknowledged (or written): shut our writing side
        # and read until the server closes, so that nothing unread is left
        # in our socket when it closes.
        self._finishing = True
        if self._give_up is not None and self._give_up.active():
            self._give_up.cancel()
        transport: Any = self.sender.protocol.transport
        # A TLS transport does not start its close while a producer is
        # registered; there is nothing left to produce anyway.
        transport.unregisterProducer()
        if is_tls(transport):
            # Twisted's TLS close sends close_notify and keeps reading until
            # the server's own close_notify: a half-close at the TLS level.
            transport.loseConnection()
        else:
            transport.loseWriteConnection()
        self._drain = self.reactor.callLater(DRAIN_TIMEOUT, self._drained_late)

    def _drained_late(self) -> None:
        if self.ack:
            self._finish(0)
        else:
            self._finish(1, f"the server did not close within {DRAIN_TIMEOUT:g} s")

    def _finish(self, status: int, message: str = "") -> None:
        if self.status is not None:
            return
        self.status = status
        if message:
            self.err.write(f"lineserver-send: {message}\n")
        for call in (self._give_up, self._drain):
            if call is not None and call.active():
                call.cancel()
        d = self.service.stopService()
        d.addBoth(lambda _: self.done.callback(status))


class _Factory(SenderFactory):
    def __init__(self, run: SendRun) -> None:
        super().__init__(run.sender)
        self.run = run

    def buildProtocol(self, addr: Any) -> LineSenderProtocol:
        protocol = _RunProtocol(self.run)
        protocol.factory = self
        return protocol


class _RunProtocol(LineSenderProtocol):
    """
    Tells the run about the connection as well as the engine.
    """

    def __init__(self, run: SendRun) -> None:
        super().__init__(run.sender)
        self.run = run

    def connectionMade(self) -> None:
        super().connectionMade()
        self.run.connected()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.run.disconnected()


def run(reactor: Any, argv: Sequence[str], err: IO[str]) -> Deferred[int]:
    """
    Parse C{argv} and send; the Deferred fires with the exit status.

    @raise usage.UsageError: bad arguments.
    """
    options = Options()
    options.parseOptions(argv)
    name = options["source"]
    stream: BinaryIO
    if name == "-":
        stream = cast(BinaryIO, os.fdopen(os.dup(sys.stdin.fileno()), "rb"))
    else:
        try:
            stream = open(name, "rb")  # noqa: SIM115 - closed when done
        except OSError as e:
            raise usage.UsageError(f"{name}: {e.strerror}") from e
    sending = SendRun(reactor, options, LineSource(stream), err)
    return sending.start().addBoth(_closing(stream))


def _closing(stream: BinaryIO) -> Any:
    def close(result: Any) -> Any:
        stream.close()
        return result

    return close


def main(argv: Sequence[str] | None = None) -> None:
    """
    The console script.
    """
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        d = run(reactor, args, sys.stderr)
    except usage.UsageError as e:
        sys.stderr.write(f"lineserver-send: {e}\n{Options().getSynopsis()}\n")
        sys.exit(2)
    status: list[int] = []

    def stop(result: Any) -> None:
        status.append(result if isinstance(result, int) else 1)
        if isinstance(result, Failure):
            sys.stderr.write(f"lineserver-send: {result.getErrorMessage()}\n")
        reactor.stop()

    d.addBoth(stop)
    reactor.run()
    sys.exit(status[0] if status else 1)


if __name__ == "__main__":
    main()
