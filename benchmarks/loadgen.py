"""The load generator: drives one line server over C connections, once.

It runs in its own process (on the second core) and must never be the
bottleneck, so it does as little per byte as Python allows: the payload is
built once into a file of fixed-length lines and mapped into memory, it is
sent in large non-blocking C{send} calls from one selector loop, and in
echo mode replies are only counted and checksummed (C{zlib.crc32}).

Two measurements:

  - sink: time from the first byte sent until the sink file has grown by
    exactly the payload's size (end-to-end ingestion); then the new bytes
    are checked to be the payload's lines, each once, in any order (a
    multiset digest of the lines, L{LineDigest}).
  - echo: every connection keeps up to C{window} lines in flight; time from
    the first byte sent until every line has come back, byte for byte.

With C{--tls-ca CA.pem} every connection speaks TLS (1.2 at the least),
trusting that CA alone and checking no host name; the handshakes are done
before the clock starts, so the figures are the steady state's.

The result is one JSON object on stdout:

    python -m benchmarks.loadgen --port 4040 --mode sink --connections 16 \\
        --lines 1000000 --payload /tmp/payload.bin --sink-file lines.log
"""

from __future__ import annotations

import argparse
import functools
import mmap
import operator
import os
import selectors
import socket
import ssl
import sys
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.procs import client_main, client_parser

#: Every line is exactly this long, LF included; fixed-length lines make
#: line boundaries plain arithmetic for windows, shares and verification.
LINE_LENGTH = 90

#: Bytes handed to one C{send} call, and asked of one C{recv} call.
CHUNK = 256 * 1024

#: Lines per template block; the payload is the block with its 4-digit
#: block number filled in, so building it costs one C{replace} per block.
_BLOCK_LINES = 1000
_MARK = b"@@@@"
_MAX_LINES = _BLOCK_LINES * 10_000


class LoadError(Exception):
    """
    The server did not take or return the load as it should have.
    """


def _template() -> bytes:
    fmt = (
        b"vehicle=%04d lat=52.%06d lon=13.%06d speed=%02d.%d hdg=%03d"
        b" ts=170000@@@@.%03d seq=@@@@%03d\n"
    )
    block = b"".join(
        fmt
        % (
            k * 7919 % 10000,
            k * 104729 % 1000000,
            k * 7727 % 1000000,
            k % 97,
            k % 10,
            k * 7 % 360,
            k,
            k,
        )
        for k in range(_BLOCK_LINES)
    )
    assert len(block) == _BLOCK_LINES * LINE_LENGTH
    return block


def build_payload(lines: int) -> bytes:
    """
    @return: C{lines} distinct telemetry-like lines of L{LINE_LENGTH} bytes,
        like C{vehicle=7919 lat=52.104729 ... seq=0000001\\n}.
    """
    if not 0 < lines <= _MAX_LINES:
        raise ValueError(f"lines must be in 1..{_MAX_LINES}, got {lines}")
    block = _template()
    blocks = -(-lines // _BLOCK_LINES)
    payload = b"".join(block.replace(_MARK, b"%04d" % j) for j in range(blocks))
    return payload[: lines * LINE_LENGTH]


def write_payload(path: str, lines: int) -> None:
    """
    Write a payload of C{lines} lines to C{path}, unless one at least that
    long is there (a run's scenarios share the longest one's file).
    """
    if os.path.exists(path) and os.path.getsize(path) >= lines * LINE_LENGTH:
        return
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as out:
        out.write(build_payload(lines))
    os.replace(temporary, path)


@dataclass
class LoadResult:
    """
    One measurement, as printed in JSON.

    @ivar seconds: first byte sent to last byte stored (sink) or echoed.
    @ivar send_seconds: first byte sent to last byte handed to the kernel.
    @ivar cpu_seconds: this process's CPU time over C{seconds}; near
        C{seconds} means the generator, not the server, set the pace.
    """

    mode: str
    connections: int
    lines: int
    bytes: int
    seconds: float
    send_seconds: float
    cpu_seconds: float
    lines_per_second: float
    megabytes_per_second: float
    verified: bool


class _Connection:
    """
    One socket and its share of the payload, for the selector loop.
    """

    def __init__(self, sock: socket.socket, share: memoryview) -> None:
        self.sock = sock
        self.share = share
        self.sent = 0
        self.received = 0
        self.crc = 0
        self.writing = False

    def done_sending(self) -> bool:
        return self.sent == len(self.share)

    def done_receiving(self) -> bool:
        return self.received == len(self.share)


#: What a non-blocking socket raises when it can take or give nothing now;
#: a TLS socket's OpenSSL may want to read before it can write, or back.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def tls_context(ca_file: str) -> ssl.SSLContext:
    """
    A client context for the benchmark's servers: TLS 1.2 at the least,
    the server's certificate must chain to C{ca_file} (nothing else is
    trusted), and its names are not checked.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.load_verify_locations(cafile=ca_file)
    return context


def _connect(
    host: str,
    port: int,
    count: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> list[socket.socket]:
    """
    Open C{count} connections, each with its TLS handshake done if C{tls}
    is given, and make them non-blocking.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout=timeout)
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = socks[-1] = tls.wrap_socket(sock, server_hostname=host)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _shares(payload: memoryview, count: int) -> list[memoryview]:
    """
    Split the payload into C{count} runs of whole lines.
    """
    lines = len(payload) // LINE_LENGTH
    bounds = [lines * i // count * LINE_LENGTH for i in range(count + 1)]
    return [payload[bounds[i] : bounds[i + 1]] for i in range(count)]


def _send_some(conn: _Connection, limit: int) -> bool:
    """
    Send from C{conn}'s share up to byte C{limit}.

    @return: True if the socket took less than offered (wait for writable).
    """
    while conn.sent < limit:
        offered = min(limit - conn.sent, CHUNK)
        try:
            n = conn.sock.send(conn.share[conn.sent : conn.sent + offered])
        except _WOULD_BLOCK:
            # A TLS socket that took part of the data wants the same bytes
            # (or more) offered again: conn.sent stays, so they are.
            return True
        except OSError as e:
            raise LoadError(f"send failed after {conn.sent} bytes: {e}") from e
        conn.sent += n
        if n < offered:
            return True
    return False


def _want_write(
    selector: selectors.BaseSelector, conn: _Connection, want: bool, reading: bool
) -> None:
    if want == conn.writing:
        return
    conn.writing = want
    events = (selectors.EVENT_READ if reading else 0) | (
        selectors.EVENT_WRITE if want else 0
    )
    if events == 0:
        selector.unregister(conn.sock)
    elif want and not reading:
        selector.register(conn.sock, events, conn)
    else:
        selector.modify(conn.sock, events, conn)


def _finish_sending(sock: socket.socket) -> None:
    """
    A connection's share is out: let the server see the end of it (so a
    server that flushes on close does so).

    A plain socket is closed.  A TLS socket is only shut for writing: the
    server's unread session tickets would make a close send a reset, which
    could cut off the tail of the share the server has not yet read.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.shutdown(socket.SHUT_WR)
    else:
        sock.close()


def _send_all(conns: list[_Connection], deadline: float) -> None:
    """
    Push every share into its socket, ending each connection once its share
    is out (L{_finish_sending}).
    """
    selector = selectors.DefaultSelector()
    try:
        pending = list(conns)
        while pending:
            for conn in pending:
                blocked = _send_some(conn, len(conn.share))
                _want_write(selector, conn, blocked, reading=False)
            for conn in [c for c in pending if c.done_sending()]:
                _finish_sending(conn.sock)
            pending = [c for c in pending if not c.done_sending()]
            if pending:
                if time.monotonic() > deadline:
                    raise LoadError("timed out sending")
                selector.select(1.0)
    finally:
        selector.close()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


#: Bytes digested at a time (cut at a line's end), to bound the memory.
_DIGEST_CHUNK = 8 << 20


@dataclass(frozen=True)
class LineDigest:
    """
    A multiset digest of LF-terminated lines: the same for the same lines
    in any order, and (but for a 2**-64 chance) different if a line is
    lost, doubled, cut, merged with another or changed.

    Each line is hashed with Python's own C{hash} of bytes (SipHash, keyed
    per process: both sides of a comparison must be digested in the same
    process); the digest is the count of lines and the sum and the XOR of
    their hashes.  That is a few C-speed passes over the lines, about
    0.2 s per million lines, in chunks of a few MiB.

    @ivar tail: the hash of the bytes after the last LF (0 if none).
    """

    count: int
    total: int
    mixed: int
    tail: int

    @classmethod
    def of(cls, data: bytes | memoryview) -> LineDigest:
        view = memoryview(data)
        count = total = mixed = 0
        carry = b""
        for start in range(0, len(view), _DIGEST_CHUNK):
            chunk = carry + bytes(view[start : start + _DIGEST_CHUNK])
            cut = chunk.rfind(b"\n") + 1
            carry = chunk[cut:]
            lines = chunk[: max(cut - 1, 0)].split(b"\n") if cut else []
            hashes = list(map(hash, lines))
            count += len(hashes)
            total += sum(hashes)
            mixed = functools.reduce(operator.xor, hashes, mixed)
        return cls(count, total, mixed, hash(carry) if carry else 0)


def _verify_lines(path: str, start: int, payload: memoryview) -> None:
    """
    The bytes the server appended are the payload's lines, each exactly
    once, whatever their order: none lost, doubled, split, merged or
    changed.

    @raise LoadError: saying how many lines differ, with examples.
    """
    with open(path, "rb") as stored:
        stored.seek(start)
        data = stored.read(len(payload) + 1)
    stored_digest = LineDigest.of(data)
    sent_digest = LineDigest.of(payload)
    if stored_digest == sent_digest and len(data) == len(payload):
        return
    # Slow, and only on failure: which lines?
    sent = Counter(bytes(payload).split(b"\n"))
    got = Counter(data.split(b"\n"))
    missing, extra = sent - got, got - sent
    raise LoadError(
        f"the sink file does not hold the payload's lines once each: "
        f"{stored_digest.count} lines stored, {sent_digest.count} sent; "
        f"{sum(missing.values())} missing (e.g. {list(missing)[:2]!r}), "
        f"{sum(extra.values())} extra or changed (e.g. {list(extra)[:2]!r})"
    )


def run_sink(
    host: str,
    port: int,
    payload: memoryview,
    connections: int,
    sink_file: str,
    timeout: float = 60.0,
    verify: bool = True,
    tls: ssl.SSLContext | None = None,
) -> LoadResult:
    """
    Send the payload over C{connections} and time it into C{sink_file}.
    """
    start_size = _file_size(sink_file)
    target = start_size + len(payload)
    socks = _connect(host, port, connections, timeout, tls)
    conns = [
        _Connection(s, p)
        for s, p in zip(socks, _shares(payload, connections), strict=True)
    ]
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = time.monotonic() + timeout
    try:
        _send_all(conns, deadline)
        sent = time.perf_counter()
        size = _file_size(sink_file)
        while size < target:
            if time.monotonic() > deadline:
                raise LoadError(
                    f"timed out: sink file grew by {size - start_size} of "
                    f"{len(payload)} bytes"
                )
            time.sleep(0.0005)
            size = _file_size(sink_file)
        finished = time.perf_counter()
    finally:
        for conn in conns:
            conn.sock.close()
    cpu = time.process_time() - cpu_started
    if size != target:
        raise LoadError(f"sink file grew by {size - start_size}, not {len(payload)}")
    if verify:
        _verify_lines(sink_file, start_size, payload)
    return _result(
        "sink", connections, payload, finished - started, sent - started, cpu
    )


def run_echo(
    host: str,
    port: int,
    payload: memoryview,
    connections: int,
    window: int = 1000,
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> LoadResult:
    """
    Send the payload over C{connections}, with at most C{window} lines in
    flight on each (0: no limit), and time until all of it has come back.
    """
    socks = _connect(host, port, connections, timeout, tls)
    conns = [
        _Connection(s, p)
        for s, p in zip(socks, _shares(payload, connections), strict=True)
    ]
    window_bytes = window * LINE_LENGTH if window > 0 else len(payload)
    # Refill a window once half of it has come back: large sends, and the
    # pipe never runs dry.
    refill = window_bytes // 2
    selector = selectors.DefaultSelector()
    sent_at = 0.0
    try:
        for conn in conns:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        started = time.perf_counter()
        cpu_started = time.process_time()
        deadline = time.monotonic() + timeout
        active = list(conns)
        while active:
            for conn in active:
                if conn.writing or conn.done_sending():
                    continue
                if conn.sent - conn.received <= refill:
                    limit = min(len(conn.share), conn.received + window_bytes)
                    if _send_some(conn, limit):
                        _want_write(selector, conn, True, reading=True)
                    elif conn.done_sending() and all(c.done_sending() for c in conns):
                        sent_at = time.perf_counter()
            if time.monotonic() > deadline:
                raise LoadError("timed out waiting for echoes")
            for key, events in selector.select(1.0):
                conn = key.data
                if events & selectors.EVENT_WRITE:
                    _want_write(selector, conn, False, reading=True)
                if events & selectors.EVENT_READ:
                    _receive(conn)
                    while _pending(conn.sock):
                        _receive(conn)
            active = [c for c in conns if not c.done_receiving()]
        finished = time.perf_counter()
        cpu = time.process_time() - cpu_started
    finally:
        selector.close()
        for conn in conns:
            conn.sock.close()
    for conn in conns:
        if conn.crc != zlib.crc32(conn.share):
            raise LoadError("echoed bytes differ from the bytes sent")
    return _result(
        "echo", connections, payload, finished - started, sent_at - started, cpu
    )


def _receive(conn: _Connection) -> None:
    try:
        data = conn.sock.recv(CHUNK)
    except _WOULD_BLOCK:
        return
    except OSError as e:
        raise LoadError(f"receive failed after {conn.received} bytes: {e}") from e
    if not data:
        raise LoadError(
            f"server closed after echoing {conn.received} of {len(conn.share)} bytes"
        )
    conn.received += len(data)
    if conn.received > len(conn.share):
        raise LoadError(f"server echoed more than sent: {data[:200]!r}")
    conn.crc = zlib.crc32(data, conn.crc)


def _pending(sock: socket.socket) -> bool:
    """
    @return: OpenSSL holds decrypted bytes of C{sock} that the selector
        cannot see (never for a plain socket).
    """
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _result(
    mode: str,
    connections: int,
    payload: memoryview,
    seconds: float,
    send: float,
    cpu: float,
) -> LoadResult:
    lines = len(payload) // LINE_LENGTH
    return LoadResult(
        mode=mode,
        connections=connections,
        lines=lines,
        bytes=len(payload),
        seconds=seconds,
        send_seconds=send,
        cpu_seconds=cpu,
        lines_per_second=lines / seconds,
        megabytes_per_second=len(payload) / seconds / 1e6,
        verified=True,
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = client_parser(
        "python -m benchmarks.loadgen",
        "Drive a line server once; print the measurement as JSON.",
        timeout=60.0,
    )
    parser.add_argument("--mode", choices=["sink", "echo"], required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument(
        "--payload", help="payload file to map (built here if missing or stale)"
    )
    parser.add_argument("--sink-file", help="the server's sink file (sink mode)")
    parser.add_argument(
        "--window", type=int, default=1000, help="echo: lines in flight (0: all)"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="sink: skip checking the lines"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="speak TLS, trusting this CA alone (host names are not checked)",
    )
    args = parser.parse_args(argv)
    if args.mode == "sink" and not args.sink_file:
        parser.error("--mode sink needs --sink-file")
    if args.connections < 1 or args.lines < args.connections:
        parser.error("need 1 <= --connections <= --lines")
    return args


def run(args: argparse.Namespace) -> LoadResult:
    if args.payload is None:
        payload = memoryview(build_payload(args.lines))
    else:
        write_payload(args.payload, args.lines)
        with open(args.payload, "rb") as source:
            mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
        payload = memoryview(mapped)[: args.lines * LINE_LENGTH]
    tls = None if args.tls_ca is None else tls_context(args.tls_ca)
    if args.mode == "sink":
        return run_sink(
            args.host,
            args.port,
            payload,
            args.connections,
            args.sink_file,
            args.timeout,
            not args.no_verify,
            tls,
        )
    return run_echo(
        args.host,
        args.port,
        payload,
        args.connections,
        args.window,
        args.timeout,
        tls,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return client_main("loadgen", lambda: run(args), LoadError)


if __name__ == "__main__":
    sys.exit(main())
