r"""Embed lineserver with acknowledgements (``--ack``) and a disk spool.

Run it as written:

    .venv/bin/python docs/examples/ack_spool_app.py \
        tcp:4043:interface=127.0.0.1 spool lines.log

Lines sent to 127.0.0.1:4043 are appended to ``lines.log`` and fsynced, and
each connection is told ``ACK <n>`` once its first n lines are durable.
While the file cannot take them (a full disk, a slow one), they are fsynced
in ``spool/`` instead, acknowledged from there, and replayed to the file in
order (see docs/embedding.md, docs/delivery.md).  Stop it with Ctrl-C or
SIGTERM: what was read is written, or stays in the spool for the next start.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver

from lineserver import (
    LineServer,
    ServerConfig,
    SpoolingSinkFactory,
    sink_factory_from_url,
)


def main(
    reactor: Any,
    endpoint: str = "tcp:4043:interface=127.0.0.1",
    spool: str = "spool",
    path: str = "lines.log",
) -> Deferred[None]:
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    # The file sink, fsynced per batch so that an ACK means "on disk",
    # wrapped in the spool (the directory is created if missing).
    sink = SpoolingSinkFactory(
        sink_factory_from_url(f"file:{path}?fsync=batch", reactor),
        spool,
        reactor,
        max_bytes=1 << 30,
    )
    server = LineServer(
        ServerConfig(ports=[endpoint], ack=True, ack_interval=2.0, shutdown_timeout=5),
        reactor,
        sink=sink,
    )
    app = MultiService()  # stands for your application's own service tree
    server.setServiceParent(app)
    app.startService()
    reactor.addSystemEventTrigger("before", "shutdown", app.stopService)
    return Deferred()  # run until stopped (SIGINT/SIGTERM)


if __name__ == "__main__":
    react(main, sys.argv[1:])
