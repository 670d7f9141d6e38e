"""The control socket: an operator's commands to a running server.

After HAProxy's runtime API: C{--control unix:/run/lineserver.sock} takes
one command per line and answers each, in text or (with a C{json} prefix)
in JSON.  Three layers, each testable alone:

  - L{parse}: a command line to a L{Command}, or a L{CommandError}; pure.
  - L{dispatch}: a L{Command} run against an L{IControlTarget}, to an
    L{Answer} (or a Deferred of one); pure but for what the target does.
  - L{ControlService}: a supervised port (L{SupervisedPort}) that reads
    lines, dispatches them, and writes the answers.

The target is an interface so that a parent process of several workers
could implement it by asking each worker and adding their answers up (a
fan-out), with the parsing, the wire format and C{lineserver-ctl}
unchanged.  L{ServerControl} is the target over one L{LineServer}.

Wire format: every answer ends with an empty line.  A text answer's other
lines are never empty; an error answer is one line, C{ERR <why>}.  A JSON
answer is one line, C{{"ok": true, "result": ...}} or C{{"ok": false,
"error": "..."}}.  C{drain} answers twice: at once (draining), and once
the server has stopped (drained); then the process exits and the socket
closes.  Only the socket's file mode guards it (docs/security.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import Interface, implementer

from lineserver.listener import DEFAULT_LISTEN_RETRY, SupervisedPort
from lineserver.protocol import describe_address

log = Logger(namespace="lineserver.control")

#: The longest command line taken; a longer one closes the connection.
MAX_COMMAND_LENGTH = 4096
#: The prefix that asks for a JSON answer: C{json show info}.
JSON_PREFIX = "json"


class CommandError(Exception):
    """
    A command line that is not a command, or a bad argument: an error
    answer, never a crash.
    """


@dataclass(frozen=True)
class Command:
    """
    One parsed command.

    @ivar name: the command's words, like C{"show connections"}.
    @ivar args: its arguments, converted.
    @ivar json: answer in JSON.
    """

    name: str
    args: tuple[Any, ...] = ()
    json: bool = False


def _count(word: str) -> int:
    if not word.isdigit() or int(word) < 1:
        raise CommandError(f"expected a whole number of at least 1, got {word!r}")
    return int(word)


def _limit(word: str) -> int | None:
    if word.lower() == "none":
        return None
    return _count(word)


def _connection_id(word: str) -> int:
    text = word[1:] if word.startswith("#") else word
    if not text.isdigit():
        raise CommandError(f"expected a connection id like 12 or #12, got {word!r}")
    return int(text)


def _seconds(word: str) -> float:
    try:
        value = float(word)
    except ValueError:
        raise CommandError(f"expected seconds, got {word!r}") from None
    if not 0 <= value < float("inf"):
        raise CommandError(f"expected seconds of at least 0, got {word!r}")
    return value


@dataclass(frozen=True)
class Spec:
    """
    A command's words, its arguments' converters, and its help line.

    @ivar optional: how many of the last converters may be left out.
    """

    name: str
    usage: str
    help: str
    converters: tuple[Callable[[str], Any], ...] = ()
    optional: int = 0


COMMANDS: tuple[Spec, ...] = (
    Spec("help", "help", "list the commands"),
    Spec("show info", "show info", "process, version, phase, listeners, limits"),
    Spec("show stats", "show stats", "every counter and gauge, by name"),
    Spec(
        "show connections",
        "show connections",
        "one line per connection: id, peer, subject, age, lines, bytes, paused",
    ),
    Spec(
        "disable listener",
        "disable listener",
        "stop accepting on every port (kept open: new clients wait in the backlog)",
    ),
    Spec("enable listener", "enable listener", "accept again"),
    Spec(
        "set max-connections",
        "set max-connections N|none",
        "change the connection limit (none: no limit)",
        (_limit,),
    ),
    Spec(
        "kill connection",
        "kill connection ID",
        "close connection ID (after what it already sent is delivered)",
        (_connection_id,),
    ),
    Spec(
        "reload",
        "reload",
        "what SIGHUP does: certificates, keys, CAs, tokens, reopen the sink",
    ),
    Spec("reopen log", "reopen log", "what SIGUSR1 does: reopen the log file(s)"),
    Spec(
        "drain",
        "drain [SECONDS]",
        "stop accepting, wait up to SECONDS for clients to leave, then stop "
        "in order (drain, flush, close) and exit with status 0",
        (_seconds,),
        optional=1,
    ),
)
_BY_NAME = {spec.name: spec for spec in COMMANDS}


def parse(line: str) -> Command:
    """
    @param line: one command line, like C{set max-connections 100} or
        C{json show info}.
    @raise CommandError: for anything that is not a command with good
        arguments.
    """
    words = line.split()
    as_json = bool(words) and words[0].lower() == JSON_PREFIX
    if as_json:
        words = words[1:]
    if not words:
        raise CommandError("empty command; try help")
    lowered = [word.lower() for word in words]
    for size in (2, 1):
        spec = _BY_NAME.get(" ".join(lowered[:size]))
        if spec is not None:
            break
    else:
        raise CommandError(f"unknown command {' '.join(words)!r}; try help")
    given = words[len(spec.name.split()) :]
    least = len(spec.converters) - spec.optional
    if not least <= len(given) <= len(spec.converters):
        raise CommandError(f"usage: {spec.usage}")
    args = tuple(
        convert(word) for convert, word in zip(spec.converters, given, strict=False)
    )
    return Command(spec.name, args, as_json)


@dataclass(frozen=True)
class Answer:
    """
    What a command answers: C{lines} in text, C{result} in JSON.

    @ivar error: why the command failed, or None.
    """

    lines: Sequence[str] = ()
    result: Any = None
    error: str | None = None

    @classmethod
    def failed(cls, why: str) -> Answer:
        return cls(error=why)

    def render(self, as_json: bool) -> bytes:
        """
        @return: the answer on the wire, its closing empty line included.
        """
        if as_json:
            body = (
                {"ok": False, "error": self.error}
                if self.error is not None
                else {"ok": True, "result": self.result}
            )
            text = json.dumps(body, sort_keys=True, default=str)
            return text.encode() + b"\n\n"
        if self.error is not None:
            lines = [f"ERR {_one_line(self.error)}"]
        else:
            lines = [_one_line(line) for line in self.lines] or ["OK"]
        return "".join(f"{line}\n" for line in lines).encode() + b"\n"


def _one_line(text: str) -> str:
    """
    A line of an answer: no line breaks, never empty (an empty line ends
    the answer).
    """
    flat = " ".join(text.splitlines()).strip()
    return flat or "-"


@dataclass(frozen=True)
class ConnectionInfo:
    """
    What C{show connections} says of one connection.
    """

    id: int
    peer: str
    subject: str | None
    age: float
    lines: int
    bytes: int
    paused: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListenerInfo:
    """
    What C{show info} says of one line port.
    """

    name: str
    address: str | None
    accepting: bool


@dataclass(frozen=True)
class ServerInfo:
    """
    What C{show info} says of the server.
    """

    pid: int
    version: str
    uptime: float
    phase: str
    mode: str
    listeners_enabled: bool
    max_connections: int | None
    connections: int
    listeners: tuple[ListenerInfo, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


class IControlTarget(Interface):
    """
    What the control socket acts on: one server, or (later) a parent that
    asks each of its workers and adds their answers up.
    """

    def info() -> ServerInfo:
        """
        The server's identity, phase, listeners and limits.
        """

    def stats() -> dict[str, int]:
        """
        Every counter and gauge, by name (L{lineserver.stats.Stats}).
        """

    def connections() -> list[ConnectionInfo]:
        """
        The live connections, oldest first.
        """

    def enable_listeners(enabled: bool) -> None:  # noqa: N805 (zope)
        """
        Stop (False) or resume (True) accepting, leaving the ports open.
        """

    def set_max_connections(limit: int | None) -> None:  # noqa: N805 (zope)
        """
        Change the connection limit; None lifts it.
        """

    def kill_connection(number: int) -> bool:  # noqa: N805 (zope)
        """
        Close connection C{number}; False if there is none.
        """

    def reload() -> bool:
        """
        Reload certificates, tokens, and reopen the sink; True if every
        file reloaded.
        """

    def reopen_logs() -> list[str]:
        """
        Reopen the log files; returns their names.
        """

    def drain(grace: float) -> Deferred[str]:  # noqa: N805 (zope)
        """
        Stop accepting, give clients C{grace} seconds to leave, stop the
        server in order, and make the process exit with status 0 once the
        returned Deferred's result has been reported.
        """


def help_answer() -> Answer:
    width = max(len(spec.usage) for spec in COMMANDS)
    return Answer(
        [f"{spec.usage.ljust(width)}  {spec.help}" for spec in COMMANDS]
        + [f"{JSON_PREFIX} COMMAND".ljust(width) + "  the answer in JSON"],
        {spec.usage: spec.help for spec in COMMANDS},
    )


def _info_answer(info: ServerInfo) -> Answer:
    lines = [
        f"pid: {info.pid}",
        f"version: {info.version}",
        f"uptime: {info.uptime:.1f}s",
        f"phase: {info.phase}",
        f"mode: {info.mode}",
        f"listeners: {'enabled' if info.listeners_enabled else 'disabled'}",
        f"max-connections: {_limit_text(info.max_connections)}",
        f"connections: {info.connections}",
    ]
    for listener in info.listeners:
        state = "accepting" if listener.accepting else "not accepting"
        lines.append(
            f"listener: {listener.name} on {listener.address or '-'} ({state})"
        )
    lines += [f"{key}: {value}" for key, value in sorted(info.extra.items())]
    result = {
        "pid": info.pid,
        "version": info.version,
        "uptime": round(info.uptime, 3),
        "phase": info.phase,
        "mode": info.mode,
        "listeners_enabled": info.listeners_enabled,
        "max_connections": info.max_connections,
        "connections": info.connections,
        "listeners": [
            {"name": lis.name, "address": lis.address, "accepting": lis.accepting}
            for lis in info.listeners
        ],
        **info.extra,
    }
    return Answer(lines, result)


def _limit_text(limit: int | None) -> str:
    return "none" if limit is None else str(limit)


def _connections_answer(conns: list[ConnectionInfo]) -> Answer:
    lines = [
        f"#{c.id} peer={c.peer} subject={c.subject or '-'} age={c.age:.1f}s "
        f"lines={c.lines} bytes={c.bytes} paused={','.join(c.paused) or '-'}"
        for c in conns
    ] or ["no connections"]
    result = [
        {
            "id": c.id,
            "peer": c.peer,
            "subject": c.subject,
            "age": round(c.age, 3),
            "lines": c.lines,
            "bytes": c.bytes,
            "paused": list(c.paused),
        }
        for c in conns
    ]
    return Answer(lines, result)


def dispatch(command: Command, target: IControlTarget) -> Answer | Deferred[Answer]:
    """
    Run one command against C{target}.

    C{drain} is not run here: it answers twice, which is the connection's
    business (L{ControlProtocol}).

    @return: the answer; a target that raises gives an error answer.
    """
    name, args = command.name, command.args
    try:
        if name == "help":
            return help_answer()
        if name == "show info":
            return _info_answer(target.info())
        if name == "show stats":
            values = dict(sorted(target.stats().items()))
            return Answer([f"{k} {v}" for k, v in values.items()], values)
        if name == "show connections":
            return _connections_answer(target.connections())
        if name in ("disable listener", "enable listener"):
            enabled = name == "enable listener"
            target.enable_listeners(enabled)
            word = "enabled" if enabled else "disabled"
            return Answer([f"listeners {word}"], {"listeners_enabled": enabled})
        if name == "set max-connections":
            (limit,) = args
            target.set_max_connections(limit)
            return Answer(
                [f"max-connections {_limit_text(limit)}"], {"max_connections": limit}
            )
        if name == "kill connection":
            (number,) = args
            if not target.kill_connection(number):
                return Answer.failed(f"no connection #{number}")
            return Answer([f"closing #{number}"], {"closing": number})
        if name == "reload":
            if target.reload():
                return Answer(["reloaded"], {"reloaded": True})
            return Answer.failed(
                "reload: a certificate or token file did not load; the "
                "previous one stays in use (see the log)"
            )
        if name == "reopen log":
            names = target.reopen_logs()
            return Answer(
                [f"reopened {n}" for n in names] or ["no log file to reopen"],
                {"reopened": names},
            )
    except Exception as error:
        log.failure("control command {command!r} failed", command=name)
        return Answer.failed(f"{name}: {error}")
    return Answer.failed(f"{name}: not handled here")


class ControlProtocol(LineOnlyReceiver):
    """
    One operator's connection: a command per line, an answer for each, in
    the order the commands came.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LENGTH
    factory: ControlFactory
    transport: Any

    def __init__(self) -> None:
        self._busy: Deferred[None] | None = None
        self._lines: list[bytes] = []
        self._gone = False

    @override
    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)
        if self._busy is None:
            self._next()

    def _next(self) -> None:
        while self._lines and self._busy is None and not self._gone:
            line = self._lines.pop(0)
            self._busy = self._run(line.rstrip(b"\r"))

    def _run(self, raw: bytes) -> Deferred[None] | None:
        as_json = (
            raw.split(None, 1)[:1] == [JSON_PREFIX.encode()]
            or raw[: len(JSON_PREFIX) + 1].lower() == (JSON_PREFIX + " ").encode()
        )
        try:
            command = parse(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._send(Answer.failed("commands are UTF-8 text"), as_json)
            return None
        except CommandError as error:
            self._send(Answer.failed(str(error)), as_json)
            return None
        log.info("control: {command}", command=raw.decode())
        if command.name == "drain":
            self._drain(command)
            return Deferred()  # nothing more is taken on this connection
        answer = dispatch(command, self.factory.target)
        if isinstance(answer, Answer):
            self._send(answer, command.json)
            return None
        done: Deferred[None] = answer.addCallback(self._send, command.json)
        done.addCallback(self._done)
        return done

    def _done(self, _: object) -> None:
        self._busy = None
        self._next()

    def _drain(self, command: Command) -> None:
        grace = command.args[0] if command.args else 0.0
        target = self.factory.target
        connections = len(target.connections())
        self._send(
            Answer(
                [f"draining: {connections} connection(s), grace {grace:g}s"],
                {"draining": True, "connections": connections, "grace": grace},
            ),
            command.json,
        )
        drained = maybeDeferred(target.drain, grace)

        def report(summary: str) -> None:
            self._send(Answer([summary], {"drained": summary}), command.json)

        def failed(reason: Failure) -> None:
            log.failure("drain failed", reason)
            why = reason.getErrorMessage()
            self._send(Answer.failed(f"drain: {why}"), command.json)

        drained.addCallbacks(report, failed)

    def _send(self, answer: Answer, as_json: bool) -> None:
        if not self._gone:
            self.transport.write(answer.render(as_json))

    @override
    def lineLengthExceeded(self, line: bytes) -> None:
        self._send(Answer.failed(f"command longer than {self.MAX_LENGTH} bytes"), False)
        self.transport.loseConnection()

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True


class ControlFactory(Factory):
    """
    Control connections, all acting on one target.
    """

    noisy = False

    def __init__(self, target: IControlTarget, stopped: Callable[[], None]) -> None:
        self.target = target
        self._stopped = stopped

    @override
    def buildProtocol(self, addr: Any) -> Protocol | None:
        protocol = ControlProtocol()
        protocol.factory = self
        return protocol

    @override
    def doStop(self) -> None:
        super().doStop()
        self._stopped()


def control_defaults(description: str) -> str:
    """
    A C{unix:} control socket without C{mode=} gets C{mode=600} (owner
    only: the file mode is its only guard); a TCP one without C{interface=}
    binds loopback, as every lineserver port does.
    """
    from lineserver.ports import with_defaults

    if description.lower().startswith("unix:") and "mode=" not in description:
        description += ":mode=600"
    return with_defaults(description, backlog=50)


class ControlService(SupervisedPort):
    """
    Serves the control socket on one endpoint, supervised like the line
    and metrics ports: retried with backoff when it cannot listen, a lost
    port reported to the supervisor.  Stopping it stops listening; open
    control connections stay (a C{drain} answers on its own after the stop).
    """

    verb = "serve the control socket on"
    noun = "control socket"

    def __init__(
        self,
        description: str,
        target: IControlTarget,
        reactor: Any,
        retry: Callable[[int], float] = DEFAULT_LISTEN_RETRY,
    ) -> None:
        super().__init__(description, reactor, retry)
        self.target = target

    @override
    def _factory(self, stopped: Callable[[], None]) -> IProtocolFactory:
        return ControlFactory(self.target, stopped)

    @override
    def _logger(self) -> Logger:
        return log

    @override
    def _listened_on(self, port: IListeningPort) -> None:
        log.info(
            "control socket on {endpoint} ({address})",
            endpoint=self.description,
            address=describe_address(port.getHost()),
        )


@implementer(IControlTarget)
class ServerControl:
    """
    The control target over one L{lineserver.server.LineServer}.

    @ivar exit: ends the process once the server has stopped (twistd:
        C{reactor.stop}, which exits with status 0).
    @ivar reopen: reopens the log files (L{lineserver.logs.reopen_logs}).
    """

    def __init__(
        self,
        server: Any,
        reactor: Any,
        mode: str = "sink",
        exit: Callable[[], object] | None = None,
        reopen: Callable[[], list[str]] | None = None,
        version: str = "",
    ) -> None:
        self.server = server
        self.reactor = reactor
        self.mode = mode
        self.exit = exit if exit is not None else self._stop_reactor
        self.reopen = reopen
        self.version = version
        self._started = time.monotonic()
        self._drain: Deferred[str] | None = None
        self._drain_waiters: list[Deferred[str]] = []

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def info(self) -> ServerInfo:
        server = self.server
        listeners = tuple(
            ListenerInfo(
                str(listener.name),
                describe_address(listener.port.getHost())
                if listener.port is not None
                else None,
                listener.gate is not None and not listener.gate.paused,
            )
            for listener in server.listeners
        )
        extra = {}
        metrics = server.metrics
        if metrics is not None:
            extra["metrics"] = metrics.description
        return ServerInfo(
            pid=os.getpid(),
            version=self.version,
            uptime=time.monotonic() - self._started,
            phase=server.phase.value,
            mode=self.mode,
            listeners_enabled=server.listeners_enabled,
            max_connections=server.registry.max_connections,
            connections=len(server.registry),
            listeners=listeners,
            extra=extra,
        )

    def stats(self) -> dict[str, int]:
        return dict(self.server.stats.snapshot())

    def connections(self) -> list[ConnectionInfo]:
        found = [
            ConnectionInfo(
                id=conn.number,
                peer=describe_address(conn.peer),
                subject=conn.tls_subject,
                age=conn.age,
                lines=conn.session.lines,
                bytes=conn.session.bytes,
                paused=tuple(sorted(reason.value for reason in conn.gate.reasons)),
            )
            for conn in self.server.registry
        ]
        return sorted(found, key=lambda c: c.id)

    def enable_listeners(self, enabled: bool) -> None:
        self.server.enable_listeners(enabled)

    def set_max_connections(self, limit: int | None) -> None:
        self.server.set_max_connections(limit)

    def kill_connection(self, number: int) -> bool:
        return bool(self.server.kill_connection(number))

    def reload(self) -> bool:
        return bool(self.server.reload())

    def reopen_logs(self) -> list[str]:
        return self.reopen() if self.reopen is not None else []

    def drain(self, grace: float) -> Deferred[str]:
        """
        Drain once: a second C{drain} (another operator) waits for the
        first one's end and gets the same summary.
        """
        if self._drain is not None:
            waiter: Deferred[str] = Deferred()
            self._drain_waiters.append(waiter)
            return waiter
        self._drain = self._drain_once(grace)
        self._drain.addBoth(self._drained)
        return self._drain

    def _drained(self, result: Any) -> Any:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return result

    def _drain_once(self, grace: float) -> Deferred[str]:
        server = self.server
        server.enable_listeners(False)
        left: Deferred[None] = server.registry.when_empty()
        if grace > 0:
            left.addTimeout(grace, self.reactor)
        else:
            left.cancel()
        left.addErrback(lambda _: None)

        def stop(_: object) -> Deferred[None]:
            stopped: Deferred[None] = server.stopService()
            return stopped

        def done(_: object) -> str:
            delivered = server.stats.get("lines.delivered")
            # After the answer is written: the reactor flushes it while it
            # shuts down, and the process exits with status 0.
            self.reactor.callLater(0, self.exit)
            return f"drained: {delivered} line(s) delivered; exiting with status 0"

        return left.addCallback(stop).addCallback(done)
