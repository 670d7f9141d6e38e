"""One operator's connection to the control socket: a command per line, an
answer for each, in order; C{drain} answers twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.control.answers import Answer
from lineserver.control.commands import (
    JSON_PREFIX,
    MAX_COMMAND_LENGTH,
    Command,
    CommandError,
    parse,
)
from lineserver.control.dispatch import IControlTarget, dispatch

log = Logger(namespace="lineserver.control")


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
