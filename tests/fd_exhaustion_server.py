"""A guarded echo port under a lowered descriptor limit, for a subprocess test.

Usage: python -m tests.fd_exhaustion_server LIMIT

Lowers the soft C{RLIMIT_NOFILE} to LIMIT, listens on 127.0.0.1:0 with the
accept guard in place, prints the port number on its own line, logs to
stderr, and echoes every byte until SIGTERM.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogBeginner, textFileLogObserver
from typing_extensions import override

from lineserver.accept_guard import AcceptThrottle, guard_port
from lineserver.flow import PauseGate


class Echo(Protocol):
    @override
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def main(limit: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    port = reactor.listenTCP(
        0, Factory.forProtocol(Echo), backlog=128, interface="127.0.0.1"
    )
    gate = PauseGate(port.stopReading, port.startReading)
    throttle = AcceptThrottle(reactor, gate, name="echo")
    guard_port(port, throttle)
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
