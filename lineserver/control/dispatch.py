"""The control target's contract (L{IControlTarget}), and a parsed command
run against it (L{dispatch}).

Pure but for what the target does.  The target is an interface so that a
parent process of several workers could implement it by asking each
worker and adding their answers up (a fan-out), with the parsing, the
wire format and C{lineserver-ctl} unchanged.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface

from lineserver.control.answers import (
    Answer,
    ConnectionInfo,
    ServerInfo,
    connections_answer,
    help_answer,
    info_answer,
    limit_text,
)
from lineserver.control.commands import Command

log = Logger(namespace="lineserver.control")


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
            return info_answer(target.info())
        if name == "show stats":
            values = dict(sorted(target.stats().items()))
            return Answer([f"{k} {v}" for k, v in values.items()], values)
        if name == "show connections":
            return connections_answer(target.connections())
        if name in ("disable listener", "enable listener"):
            enabled = name == "enable listener"
            target.enable_listeners(enabled)
            word = "enabled" if enabled else "disabled"
            return Answer([f"listeners {word}"], {"listeners_enabled": enabled})
        if name == "set max-connections":
            (limit,) = args
            target.set_max_connections(limit)
            return Answer(
                [f"max-connections {limit_text(limit)}"], {"max_connections": limit}
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
