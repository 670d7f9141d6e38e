"""The control socket as a supervised port (C{--control}).

Only the socket's file mode guards it (docs/security.md): a C{unix:}
socket gets C{mode=600} unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from typing_extensions import override

from lineserver.control.dispatch import IControlTarget
from lineserver.control.protocol import ControlFactory
from lineserver.listener import DEFAULT_LISTEN_RETRY, SupervisedPort
from lineserver.ports import with_defaults
from lineserver.protocol import describe_address

log = Logger(namespace="lineserver.control")


def control_defaults(description: str) -> str:
    """
    A C{unix:} control socket without C{mode=} gets C{mode=600} (owner
    only: the file mode is its only guard); a TCP one without C{interface=}
    binds loopback, as every lineserver port does.
    """
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
