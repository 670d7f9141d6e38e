"""Round-trip latency under a steady load: the latency client and its phase.

Throughput figures hide what one device waits for its reply.  This client
opens C{--connections} sockets and sends C{--rate} lines per second in
all, spread over the connections in turn, at an even pace (paced every
L{TICK} seconds), for C{--seconds} seconds after C{--warmup} seconds that
are not counted.  Each line's send time is kept, per connection, in order;
each reply ends the wait of the oldest line still waiting on its
connection:

  - C{--replies echo} (C{--mode echo}): every line comes back, one reply
    line per line sent;
  - C{--replies ack} (C{--mode sink --ack}, see docs/protocol.md,
    "Acknowledgements"): C{ACK <n>} ends the wait of every line up to the
    n-th, so its latency is the time until the sink made the line durable.

Latency is from the C{send} call of a line to the C{recv} that returned
its reply, on the client's monotonic clock.  The client is an open-loop
load (a reply never holds back the next line), so a server that stalls
shows up in the tail rather than in a lower rate.  It prints one JSON
object with the percentiles (p50, p90, p99, p99.9, max) in microseconds:

    python -m benchmarks.latency --port 4040 --connections 50 --rate 5000
"""

from __future__ import annotations

import selectors
import socket
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

from benchmarks.procs import (
    BASELINE,
    LINESERVER,
    Harness,
    alternating,
    client_main,
    client_parser,
    columns,
    progress,
    run_client,
    running_servers,
)
from benchmarks.tables import cell, format_table

#: Seconds between two rounds of sends.
TICK = 0.001

#: The line each connection sends, LF last (the 90-byte bulk line's length
#: would do as well; a latency probe need not be long).
LATENCY_LINE = b"vehicle=7919 lat=52.104729 lon=13.007727 speed=01.1 hdg=007\n"

#: The percentiles reported.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LatencyError(Exception):
    """
    The server did not reply as it should have, or not in time.
    """


def percentile(sorted_values: list[float], p: float) -> float:
    """
    The C{p}-th percentile of C{sorted_values}, nearest rank.
    """
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.waiting: deque[float] = deque()
        self.acked = 0
        self.sent_lines = 0
        self.buffer = b""


def _replies(conn: _Conn, data: bytes, mode: str) -> int:
    """
    Feed C{data} from C{conn}'s socket; @return: how many of its oldest
    lines the complete replies in it answer.
    """
    buffer = conn.buffer + data
    cut = buffer.rfind(b"\n") + 1
    conn.buffer = buffer[cut:]
    if mode == "echo":
        return buffer.count(b"\n", 0, cut)
    answered = 0
    for line in buffer[:cut].split(b"\n")[:-1]:
        if line.startswith(b"ACK "):
            n = int(line[4:])
            answered += max(0, n - conn.acked)
            conn.acked = max(conn.acked, n)
        else:
            raise LatencyError(f"unexpected reply {line[:80]!r}")
    return answered


@dataclass
class LatencyResult:
    """
    One latency measurement, as printed in JSON (microseconds).
    """

    connections: int
    rate: float
    achieved_rate: float
    lines: int
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    cpu_seconds: float


def run(
    host: str,
    port: int,
    connections: int,
    rate: float,
    seconds: float,
    warmup: float,
    mode: str,
    timeout: float,
) -> LatencyResult:
    cpu_start = time.process_time()
    conns = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(connections):
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = _Conn(sock)
            conns.append(conn)
            selector.register(sock, selectors.EVENT_READ, conn)
        samples: list[float] = []
        start = time.monotonic()
        counted_from = start + warmup
        stop_sending = counted_from + seconds
        deadline = start + timeout
        sent = 0
        turn = 0
        while True:
            now = time.monotonic()
            if now < stop_sending:
                due = int((now - start) * rate) - sent
                for _ in range(due):
                    conn = conns[turn]
                    turn = (turn + 1) % connections
                    try:
                        conn.sock.send(LATENCY_LINE)
                    except BlockingIOError:
                        raise LatencyError(
                            "a socket would not take a line: the server "
                            "stopped reading; lower --rate"
                        ) from None
                    conn.waiting.append(time.monotonic())
                    sent += 1
            elif not any(c.waiting for c in conns):
                break
            if now > deadline:
                raise LatencyError(f"timed out with {sent} lines sent")
            for key, _ in selector.select(TICK):
                conn = key.data
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise LatencyError("the server closed a connection")
                arrived = time.monotonic()
                for _ in range(_replies(conn, data, mode)):
                    sent_at = conn.waiting.popleft()
                    if sent_at >= counted_from:
                        samples.append(arrived - sent_at)
    finally:
        selector.close()
        for conn in conns:
            conn.sock.close()
    if not samples:
        raise LatencyError("no line answered in the counted period")
    samples.sort()
    us = [s * 1e6 for s in samples]
    return LatencyResult(
        connections=connections,
        rate=rate,
        achieved_rate=len(samples) / seconds,
        lines=len(samples),
        p50_us=percentile(us, 50),
        p90_us=percentile(us, 90),
        p99_us=percentile(us, 99),
        p999_us=percentile(us, 99.9),
        max_us=us[-1],
        mean_us=statistics.fmean(us),
        cpu_seconds=time.process_time() - cpu_start,
    )


# -- the phase of benchmarks.run ------------------------------------------------


@dataclass(frozen=True)
class LatencyScenario:
    """
    C{rate} lines per second over C{connections} connections.

    @ivar replies: C{echo}; C{ack} for a C{--ack} sink (C{latency-ack}).
    @ivar server_options: more options for lineserver only.  The stock
        server has no C{--ack}: an C{ack} scenario runs lineserver alone,
        beside the baseline's C{latency-echo} figures.
    """

    name: str
    connections: int
    rate: float
    seconds: float = 5.0
    mode: str = "echo"
    replies: str = "echo"
    server_options: tuple[str, ...] = ()


LATENCY_SCENARIOS = (
    LatencyScenario("latency-echo", 50, 5_000),
    # The time until a line is durable and its ACK is back: the file sink
    # with fsync=never (written), beside the stock server's echo figures.
    LatencyScenario(
        "latency-ack", 50, 5_000, mode="sink", replies="ack", server_options=("--ack",)
    ),
)


@dataclass
class LatencyMeasurement:
    scenario: str
    server: str
    round: int
    result: dict[str, Any]

    def figures(self) -> str:
        r = self.result
        return (
            f"p50 {r['p50_us']:7.0f} us  p99 {r['p99_us']:7.0f} us  "
            f"p99.9 {r['p999_us']:7.0f} us  ({r['achieved_rate']:,.0f} lines/s)"
        )


def run_latency_phase(
    harness: Harness, scenarios: list[LatencyScenario], rounds: int
) -> list[LatencyMeasurement]:
    """
    Both servers of each scenario's mode, started once, warmed up with a
    2-second run each, measured in alternating rounds.
    """
    measurements = []
    shown = replace(harness, rounds=rounds)
    for scenario in scenarios:
        servers = [
            column
            for column in columns(harness)
            if scenario.replies != "ack" or column.kind != BASELINE
        ]
        with running_servers(
            harness,
            scenario.mode,
            scenario.name,
            lambda *_: None,
            servers=servers,
            options_for_lineserver=scenario.server_options,
        ) as running:
            # A warm-up, not counted: a fresh lineserver's first seconds
            # had tails of tens of milliseconds that later rounds did not.
            for server in running:
                run_client(
                    harness,
                    server,
                    scenario.name,
                    "benchmarks.latency",
                    [
                        "--connections",
                        str(scenario.connections),
                        "--rate",
                        str(scenario.rate),
                        "--seconds",
                        "2",
                        "--replies",
                        scenario.replies,
                    ],
                )
            for round_number, order in alternating(running, rounds):
                for server in order:
                    result, _ = run_client(
                        harness,
                        server,
                        scenario.name,
                        "benchmarks.latency",
                        [
                            "--connections",
                            str(scenario.connections),
                            "--rate",
                            str(scenario.rate),
                            "--seconds",
                            str(scenario.seconds),
                            "--replies",
                            scenario.replies,
                        ],
                    )
                    m = LatencyMeasurement(
                        scenario.name, server.server, round_number, result
                    )
                    measurements.append(m)
                    progress(shown, m)
    return measurements


def build_latency_rows(
    scenarios: list[LatencyScenario], measurements: list[LatencyMeasurement]
) -> list[dict[str, Any]]:
    """
    One row a scenario: each server's median over rounds of each
    percentile.
    """
    rows = []
    for scenario in scenarios:
        row: dict[str, Any] = {"scenario": scenario.name, **asdict(scenario)}
        for server in (BASELINE, LINESERVER):
            mine = [
                m.result
                for m in measurements
                if m.scenario == scenario.name and m.server == server
            ]
            row[server] = (
                {
                    key: statistics.median(r[key] for r in mine)
                    for key in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")
                }
                if mine
                else None
            )
        rows.append(row)
    return rows


def format_latency_table(rows: list[dict[str, Any]]) -> str:
    header = ("scenario", "p50 us b/ls", "p90 us b/ls", "p99 us b/ls", "p99.9 us b/ls")
    body = []
    for row in rows:
        base, mine = row[BASELINE] or {}, row[LINESERVER] or {}
        body.append(
            (
                row["scenario"],
                *(
                    f"{cell(base.get(k), '.0f')} / {cell(mine.get(k), '.0f')}"
                    for k in ("p50_us", "p90_us", "p99_us", "p999_us")
                ),
            )
        )
    lines = format_table(header, body)
    lines.append(
        "latency-*: round trip from send to reply, open-loop load at the given "
        "rate; median over rounds of each percentile"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = client_parser(
        "python -m benchmarks.latency",
        "Round-trip latency percentiles under a steady open-loop load.",
        timeout=60.0,
    )
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=float, default=5_000, help="lines/s in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--replies", choices=["echo", "ack"], default="echo")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return client_main(
        "latency",
        lambda: run(
            args.host,
            args.port,
            args.connections,
            args.rate,
            args.seconds,
            args.warmup,
            args.replies,
            args.timeout,
        ),
        LatencyError,
    )


if __name__ == "__main__":
    sys.exit(main())
