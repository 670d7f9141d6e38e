"""Embed lineserver in your own Twisted program: a custom handler and sink.

Run it as written:

    .venv/bin/python docs/examples/uppercase_app.py tcp:4041:interface=127.0.0.1

then `hello` sent to 127.0.0.1:4041 (see docs/embedding.md) prints `HELLO` on this
program's standard output.  Stop it with Ctrl-C: lines already received are
written before it exits.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from zope.interface import implementer

from lineserver import (
    IConnection,
    ILineHandler,
    ISink,
    ISinkFactory,
    LineServer,
    ServerConfig,
    SinkQueue,
)


@implementer(ILineHandler)
class Uppercase:
    """
    A handler: upper-cases each line and hands the batch to the sink queue.
    Registering the connection as a producer makes a slow sink pause it.
    """

    def __init__(self, connection: IConnection, queue: SinkQueue) -> None:
        self.queue = queue
        self.producer = connection.producer("sink")
        queue.register(self.producer)

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        self.queue.put([line.upper() for line in lines], len(raw))

    def connection_lost(self) -> None:
        self.queue.unregister(self.producer)


@implementer(ISink)
class PrintSink:
    """
    A sink: prints each line; a real one would write to a database.
    """

    def open(self) -> Deferred[None]:
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        for line in lines:
            sys.stdout.write(line.decode("utf-8", "replace") + "\n")
        sys.stdout.flush()
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(ISinkFactory)
class PrintSinkFactory:
    description = "print:"

    def __call__(self) -> ISink:
        return PrintSink()


def main(
    reactor: Any, endpoint: str = "tcp:4041:interface=127.0.0.1"
) -> Deferred[None]:
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    app = MultiService()  # stands for your application's own service tree
    server = LineServer(
        ServerConfig(ports=[endpoint], shutdown_timeout=5),
        reactor,
        handler=lambda queue: lambda conn: Uppercase(conn, queue),
        sink=PrintSinkFactory(),
    )
    server.setServiceParent(app)
    app.startService()
    reactor.addSystemEventTrigger("before", "shutdown", app.stopService)
    return Deferred()  # run until stopped (SIGINT/SIGTERM)


if __name__ == "__main__":
    react(main, sys.argv[1:])
