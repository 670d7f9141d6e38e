"""The load generator for C{--ack}: send lines, read ACKs until all are in.

Like L{benchmarks.loadgen}'s sink mode, it sends a payload over N
connections; then each connection shuts its write side and reads the
server's C{ACK <n>} lines until the server closes it.  The clock stops
when the last connection's last line is acknowledged, so the figure is
what a client that waits for its acknowledgements sees.  Each
connection's last ACK must equal its lines, or the run fails.

    python -m benchmarks.ackload --port 4040 --connections 16 \\
        --lines 600000 --payload /tmp/payload.bin
"""

from __future__ import annotations

import contextlib
import mmap
import selectors
import socket
import sys
import time
from collections.abc import Sequence

from benchmarks.loadgen import (
    CHUNK,
    LINE_LENGTH,
    LoadError,
    LoadResult,
    _connect,
    _result,
    _shares,
)
from benchmarks.procs import client_main, client_parser


class _Acked:
    """
    One connection: its share, how much is sent, and the ACKs read.
    """

    def __init__(self, sock: socket.socket, share: memoryview) -> None:
        self.sock = sock
        self.share = share
        self.lines = len(share) // LINE_LENGTH
        self.sent = 0
        self.acked = 0
        self.acks = 0
        self.ended = False
        self._tail = b""

    def take(self, chunk: bytes) -> None:
        *complete, self._tail = (self._tail + chunk).split(b"\n")
        for text in complete:
            if not text.startswith(b"ACK "):
                raise LoadError(f"not an ACK line: {text[:80]!r}")
            number = int(text[4:])
            if number < self.acked:
                raise LoadError(f"ACK went back from {self.acked} to {number}")
            self.acked = number
            self.acks += 1


def run_ack(
    host: str, port: int, payload: memoryview, connections: int, timeout: float
) -> LoadResult:
    socks = _connect(host, port, connections, timeout)
    conns = [
        _Acked(s, p) for s, p in zip(socks, _shares(payload, connections), strict=True)
    ]
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = time.monotonic() + timeout
    sent_at = started
    try:
        open_ = len(conns)
        while open_:
            if time.monotonic() > deadline:
                acked = sum(c.acked for c in conns)
                raise LoadError(f"timed out: {acked} of {len(payload) // LINE_LENGTH}")
            for key, events in selector.select(1.0):
                conn = key.data
                if events & selectors.EVENT_READ:
                    chunk = conn.sock.recv(CHUNK)
                    if chunk:
                        conn.take(chunk)
                    else:
                        conn.ended = True
                        selector.unregister(conn.sock)
                        open_ -= 1
                        continue
                if events & selectors.EVENT_WRITE and conn.sent < len(conn.share):
                    with contextlib.suppress(BlockingIOError):
                        conn.sent += conn.sock.send(
                            conn.share[conn.sent : conn.sent + CHUNK]
                        )
                    if conn.sent == len(conn.share):
                        # All sent: the server acknowledges, then closes.
                        conn.sock.shutdown(socket.SHUT_WR)
                        selector.modify(conn.sock, selectors.EVENT_READ, conn)
                        sent_at = time.perf_counter()
        finished = time.perf_counter()
    finally:
        selector.close()
        for conn in conns:
            conn.sock.close()
    cpu = time.process_time() - cpu_started
    for conn in conns:
        if conn.acked != conn.lines:
            raise LoadError(f"a connection sent {conn.lines} lines, ACK {conn.acked}")
    return _result(
        "ack", connections, payload, finished - started, sent_at - started, cpu
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = client_parser("python -m benchmarks.ackload", __doc__ or "", 60.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--lines", type=int, required=True)
    parser.add_argument("--payload", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def measure() -> LoadResult:
        with open(args.payload, "rb") as source:
            mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                view = memoryview(mapped)[: args.lines * LINE_LENGTH]
                try:
                    return run_ack(
                        args.host, args.port, view, args.connections, args.timeout
                    )
                finally:
                    view.release()
            finally:
                mapped.close()

    return client_main("ackload", measure, LoadError)


if __name__ == "__main__":
    sys.exit(main())
