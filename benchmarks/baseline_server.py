"""The baseline: the line server a Twisted developer would write naively.

A stock C{LineReceiver} made by a C{ServerFactory}: one Python call per
line, C{sendLine} per echoed line, a plain buffered C{file.write} per sunk
line.  lineserver's figures are only meaningful as ratios against this,
measured in the same run on the same machine, so it deliberately has no
tricks.  It takes the same command line shape as C{twistd lineserver}:

    python -m benchmarks.baseline_server --port tcp:4040:interface=127.0.0.1 \\
        --mode sink --sink file:lines.log

C{--max-line-length} sets C{MAX_LENGTH} (default 65536); the long-lines
scenarios raise it to 16 MiB, as a developer would to accept such lines.
The TLS scenarios give it Twisted's own C{ssl:} endpoint,
C{--port ssl:4443:privateKey=KEY:certKey=CERT:interface=127.0.0.1}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import IO, Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from typing_extensions import override

#: The baseline's MAX_LENGTH unless told otherwise: lineserver's default limit.
DEFAULT_MAX_LENGTH = 65536


class SinkLineReceiver(LineReceiver):
    """
    Appends each line, LF-terminated, to the factory's open file.

    The file is flushed when a connection closes, so that a client that has
    sent everything and closed can see its bytes in the file.
    """

    delimiter = b"\n"
    MAX_LENGTH = DEFAULT_MAX_LENGTH
    factory: BaselineFactory

    @override
    def lineReceived(self, line: bytes) -> None:
        sink = self.factory.sink
        assert sink is not None
        sink.write(line + b"\n")

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        sink = self.factory.sink
        if sink is not None:
            sink.flush()


class EchoLineReceiver(LineReceiver):
    """
    Writes each line straight back with C{sendLine}.
    """

    delimiter = b"\n"
    MAX_LENGTH = DEFAULT_MAX_LENGTH

    @override
    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line)


class DiscardProtocol(Protocol):
    """
    Reads and drops every byte: no framing, no sink.  The fleet scenarios'
    floor: what Twisted's reactor and TCP transport alone cost per read,
    which no server on them can go below (C{--mode discard}).
    """

    @override
    def dataReceived(self, data: bytes) -> None:
        pass


class BaselineFactory(ServerFactory[Protocol]):
    """
    Builds the mode's protocol; in sink mode it owns the one open file.

    @ivar sink: the sink file, or None in echo mode.
    """

    def __init__(
        self, mode: str, sink: IO[bytes] | None, max_length: int = DEFAULT_MAX_LENGTH
    ) -> None:
        """
        @param max_length: each protocol's C{MAX_LENGTH}, the plain way a
            Twisted developer raises the line limit.
        """
        self.protocol: type[Protocol]
        if mode == "sink":
            self.protocol = SinkLineReceiver
        elif mode == "discard":
            self.protocol = DiscardProtocol
        else:
            self.protocol = EchoLineReceiver
        self.sink = sink
        self.max_length = max_length

    @override
    def buildProtocol(self, addr: Any) -> Protocol | None:
        protocol = super().buildProtocol(addr)
        if isinstance(protocol, LineReceiver):
            protocol.MAX_LENGTH = self.max_length
        return protocol


def sink_path(url: str) -> str:
    """
    @return: the path of a C{file:PATH} sink URL.
    @raise ValueError: for any other kind of sink.
    """
    scheme, _, path = url.partition(":")
    if scheme != "file" or not path:
        raise ValueError(f"only file:PATH sinks are supported, got {url!r}")
    return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baseline_server",
        description="A stock Twisted LineReceiver server: the benchmark baseline.",
    )
    parser.add_argument(
        "--port", default="tcp:4040:interface=127.0.0.1", help="endpoint to serve"
    )
    parser.add_argument(
        "--mode",
        choices=["sink", "echo", "discard"],
        default="sink",
        help="discard: a bare Protocol that drops what it reads (the fleet floor)",
    )
    parser.add_argument("--sink", default="file:lines.log", help="file:PATH")
    parser.add_argument(
        "--max-line-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="LineReceiver.MAX_LENGTH in bytes (the long-lines scenarios: 16 MiB)",
    )
    return parser.parse_args(argv)


def run(reactor: Any, args: argparse.Namespace) -> None:
    """
    Listen on C{args.port} and serve until the reactor stops.
    """
    sink: IO[bytes] | None = None
    if args.mode == "sink":
        sink = open(sink_path(args.sink), "ab")  # noqa: SIM115 (closed at shutdown)
        reactor.addSystemEventTrigger("after", "shutdown", sink.close)
    factory = BaselineFactory(args.mode, sink, args.max_line_length)
    listening = serverFromString(reactor, args.port).listen(factory)

    def failed(reason: Failure) -> None:
        print(f"baseline: could not listen: {reason.getErrorMessage()}", flush=True)
        reactor.stop()

    listening.addErrback(failed)
    print(f"baseline: {args.mode} on {args.port}", flush=True)
    reactor.run()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor

    run(reactor, args)


if __name__ == "__main__":
    main()
