"""The many-slow-clients client: a fleet of devices, one short line each now and then.

Bulk figures say little about a fleet of thousands of devices that each
send one ~30-byte line a second: there every read holds one line, and the
server's per-read and per-connection costs are what it pays.  This client
opens C{--connections} sockets from one process (a non-blocking connect
loop, at most L{CONNECT_BATCH} connects in flight so the listen backlog
never overflows), lets them sit idle, then has each send one
L{FLEET_LINE_LENGTH}-byte line every C{--interval} seconds for
C{--seconds} seconds, the sends spread evenly over each interval.

It reads the server's own figures from C{/proc} (the server runs on the
same machine; give its C{--server-pid}):

  - C{idle_kib_per_connection}: the server's RSS with every connection
    open and idle (after a settle) minus its RSS before, over the count;
  - C{active_kib_per_connection}: the same once each has sent lines;
  - C{cpu_us_per_line}: the server's CPU time (user + system, all threads)
    over the sending phase, plus L{SETTLE} seconds for the last lines, per
    line sent.  Not wall time: the server mostly sleeps.

In sink mode it then closes every connection and, given the C{--sink-file},
waits until it has grown by exactly the lines sent; in echo mode
(C{--mode echo}) it waits for every line to come back first.  Sockets
close with a reset (C{SO_LINGER} 0) so 10,000 of them leave no
C{TIME_WAIT} ports behind for the next round.

    python -m benchmarks.fleet --port 4040 --server-pid PID --connections 1000 \\
        --seconds 5 --sink-file lines.log
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.procs import (
    BASELINE,
    LINESERVER,
    Harness,
    ServerProcess,
    alternating,
    client_main,
    client_parser,
    free_port,
    proc_cpu_seconds,
    proc_status_kib,
    progress,
    raise_nofile,
    run_client,
    server_command,
)
from benchmarks.tables import cell, format_table, paired_ratios, spread

#: Every fleet line is this long, LF included (L{fleet_line}).
FLEET_LINE_LENGTH = 30

#: Connects in flight at once: well under any listen backlog (Twisted's
#: default is 50), so no SYN is dropped and retried a second later.
CONNECT_BATCH = 40

#: Seconds after connecting (and after the last line) before the server's
#: RSS and CPU time are read: time for it to accept, read and settle.
SETTLE = 1.0


class FleetError(Exception):
    """
    The server did not take the fleet or its lines as it should have.
    """


def fleet_line(device: int, seq: int) -> bytes:
    """
    @return: device C{device}'s line number C{seq}, exactly
        L{FLEET_LINE_LENGTH} bytes: C{dev=00042 seq=000003 v=12.345\\n}.
    """
    value = (device * 7919 + seq * 104729) % 100_000
    line = b"dev=%05d seq=%06d v=%02d.%03d\n" % (
        device % 100_000,
        seq % 1_000_000,
        value // 1000 % 100,
        value % 1000,
    )
    assert len(line) == FLEET_LINE_LENGTH
    return line


_LINGER_RESET = struct.pack("ii", 1, 0)


def open_fleet(
    host: str, port: int, count: int, deadline: float
) -> list[socket.socket]:
    """
    Open C{count} non-blocking connections, L{CONNECT_BATCH} in flight at
    a time.
    """
    selector = selectors.DefaultSelector()
    connected: list[socket.socket] = []
    in_flight = 0
    started = 0
    try:
        while len(connected) < count:
            while started < count and in_flight < CONNECT_BATCH:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                code = sock.connect_ex((host, port))
                if code not in (0, errno.EINPROGRESS):
                    sock.close()
                    raise FleetError(
                        f"connect {started + 1} of {count}: {os.strerror(code)}"
                    )
                selector.register(sock, selectors.EVENT_WRITE)
                started += 1
                in_flight += 1
            for key, _ in selector.select(1.0):
                sock = key.fileobj  # type: ignore[assignment]
                selector.unregister(sock)
                in_flight -= 1
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    sock.close()
                    raise FleetError(
                        f"connect failed after {len(connected)} of {count}: "
                        f"{os.strerror(code)}"
                    )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connected.append(sock)
            if time.monotonic() > deadline:
                raise FleetError(f"only {len(connected)} of {count} connected in time")
    except BaseException:
        for sock in connected:
            sock.close()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        raise
    finally:
        selector.close()
    return connected


def send_rounds(
    socks: list[socket.socket], rounds: int, interval: float, deadline: float
) -> int:
    """
    Each socket sends one line per C{interval}, C{rounds} times, the
    sends spread evenly over each interval.

    @return: the lines sent.
    """
    count = len(socks)
    step = interval / count
    lines = [fleet_line(i, 0) for i in range(count)]
    sent = 0
    start = time.monotonic()
    for seq in range(rounds):
        for i, sock in enumerate(socks):
            due = start + seq * interval + i * step
            now = time.monotonic()
            if due - now > 0.002:
                time.sleep(due - now)
            if now > deadline:
                raise FleetError(f"timed out after {sent} lines")
            line = lines[i] if seq == 0 else fleet_line(i, seq)
            try:
                if sock.send(line) != len(line):
                    raise FleetError(f"connection {i}: a short send of a short line")
            except OSError as e:
                raise FleetError(f"connection {i}, line {seq}: {e}") from e
            sent += 1
    return sent


def drain_echoes(socks: list[socket.socket], expected: int, deadline: float) -> int:
    """
    Read until every connection has had C{expected} bytes back.

    @return: the bytes received.
    """
    selector = selectors.DefaultSelector()
    got = dict.fromkeys(range(len(socks)), 0)
    for i, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, i)
    total = 0
    waiting = len(socks)
    try:
        while waiting:
            if time.monotonic() > deadline:
                raise FleetError(
                    f"echo: {waiting} connections still short of their lines"
                )
            for key, _ in selector.select(0.5):
                i = key.data
                try:
                    data = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise FleetError(f"connection {i} closed by the server")
                got[i] += len(data)
                total += len(data)
                if got[i] >= expected:
                    selector.unregister(socks[i])
                    waiting -= 1
    finally:
        selector.close()
    return total


def wait_for_sink(path: str, size: int, deadline: float) -> None:
    """
    Wait until the sink file at C{path} is C{size} bytes long.
    """
    while True:
        try:
            now = os.path.getsize(path)
        except FileNotFoundError:
            now = 0
        if now == size:
            return
        if now > size or time.monotonic() > deadline:
            raise FleetError(f"sink file has {now} bytes, expected {size}")
        time.sleep(0.01)


def server_rss_kib(pid: int) -> int:
    return proc_status_kib(pid, "VmRSS")


@dataclass
class FleetResult:
    """
    One fleet measurement, as printed in JSON.
    """

    connections: int
    lines: int
    seconds: float
    lines_per_second: float
    server_cpu_seconds: float
    cpu_us_per_line: float
    rss_before_kib: int
    rss_idle_kib: int
    rss_active_kib: int
    idle_kib_per_connection: float
    active_kib_per_connection: float
    connect_seconds: float
    cpu_seconds: float


def run(
    host: str,
    port: int,
    server_pid: int,
    connections: int,
    seconds: int,
    interval: float,
    timeout: float,
    mode: str,
    sink_file: str | None,
) -> FleetResult:
    cpu_start = time.process_time()
    deadline = time.monotonic() + timeout
    raise_nofile(connections + 64)
    sink_start = os.path.getsize(sink_file) if sink_file else 0
    rss_before = server_rss_kib(server_pid)
    t0 = time.monotonic()
    socks = open_fleet(host, port, connections, deadline)
    connect_seconds = time.monotonic() - t0
    try:
        time.sleep(SETTLE)
        rss_idle = server_rss_kib(server_pid)
        cpu_before = proc_cpu_seconds(server_pid)
        started = time.monotonic()
        sent = send_rounds(socks, seconds, interval, deadline)
        sending = time.monotonic() - started
        if mode == "echo":
            drain_echoes(socks, seconds * FLEET_LINE_LENGTH, deadline)
        else:
            time.sleep(SETTLE)
        cpu = proc_cpu_seconds(server_pid) - cpu_before
        rss_active = server_rss_kib(server_pid)
    finally:
        for sock in socks:
            sock.close()
    if sink_file is not None:
        wait_for_sink(sink_file, sink_start + sent * FLEET_LINE_LENGTH, deadline)
    return FleetResult(
        connections=connections,
        lines=sent,
        seconds=sending,
        lines_per_second=sent / sending,
        server_cpu_seconds=cpu,
        cpu_us_per_line=cpu / sent * 1e6,
        rss_before_kib=rss_before,
        rss_idle_kib=rss_idle,
        rss_active_kib=rss_active,
        idle_kib_per_connection=(rss_idle - rss_before) / connections,
        active_kib_per_connection=(rss_active - rss_before) / connections,
        connect_seconds=connect_seconds,
        cpu_seconds=time.process_time() - cpu_start,
    )


# -- the phase of benchmarks.run ------------------------------------------------


@dataclass(frozen=True)
class FleetScenario:
    """
    C{connections} devices, one line each per C{interval} for C{seconds}
    intervals, into a file sink.
    """

    name: str
    connections: int
    seconds: int = 5
    interval: float = 1.0


FLEET_SCENARIOS = (
    FleetScenario("slow-1k", 1000),
    FleetScenario("slow-10k", 10_000),
    # For the report's CPU per line against clients (make bench-report).
    FleetScenario("slow-100", 100),
    FleetScenario("slow-3k", 3000),
)

#: lineserver's guards in the fleet scenarios, all on: deadlines for a
#: silent connection and for an unfinished line, connection limits (well
#: above the fleet, so they count but never refuse), the default line limit,
#: watermarks (flow control) and TCP keepalive.
GUARDS = (
    "--idle-timeout",
    "60",
    "--line-timeout",
    "30",
    "--max-connections",
    "20000",
    "--max-connections-per-peer",
    "20000",
)

#: The fleet scenarios' third column: a bare Twisted C{Protocol} that drops
#: what it reads (C{baseline_server --mode discard}), run beside the stock
#: server when it is the baseline.  Its CPU per line is what Twisted's
#: reactor and TCP transport alone cost a fleet: no server on them goes
#: below it, so a target under it cannot be met by work in the server.
FLOOR = "twisted-floor"

#: The listen backlog of both servers in the fleet scenarios.
BACKLOG = 1024

#: The issue's targets: lineserver's CPU per line at most this share of the
#: baseline's, and at most this many KiB per idle connection.
CPU_TARGET = 0.8
MEMORY_TARGET_KIB = 1.5


@dataclass
class FleetMeasurement:
    """
    One round of a fleet scenario against one fresh server.
    """

    scenario: str
    server: str
    round: int
    result: dict[str, Any]

    def figures(self) -> str:
        r = self.result
        return (
            f"{r['cpu_us_per_line']:6.1f} us CPU/line "
            f"{r['idle_kib_per_connection']:5.2f} KiB/idle conn "
            f"({r['lines']} lines, connect {r['connect_seconds']:.1f} s)"
        )


def fleet_server(
    harness: Harness, label: str, scenario: FleetScenario, sink: Path
) -> ServerProcess:
    """
    A fresh server for one round (its RSS growth is then the fleet's
    alone), with room for the fleet's descriptors and, for lineserver,
    every guard on (L{GUARDS}).
    """
    kind = harness.candidate if label == LINESERVER else harness.baseline
    port = free_port()
    if label == FLOOR:
        command = server_command(BASELINE, "discard", port)
    else:
        command = server_command(
            kind,
            "sink",
            port,
            sink,
            options_for_lineserver=GUARDS if kind != BASELINE else (),
        )
    # Both listen with lineserver's default backlog: Twisted's own (50)
    # made the baseline's fleet take seconds to connect.
    endpoint = command.index("--port") + 1
    command[endpoint] += f":backlog={BACKLOG}"
    return ServerProcess(
        label,
        "sink",
        port,
        command,
        harness.logs / f"{label}-{scenario.name}.log",
        harness.server_cpus,
        nofile=scenario.connections * 2 + 256,
    )


def run_fleet_phase(
    harness: Harness, scenarios: list[FleetScenario], workdir: Path, rounds: int
) -> list[FleetMeasurement]:
    """
    Each scenario in C{rounds} rounds, the servers alternating; a fresh
    server process per round and server.
    """
    measurements = []
    servers = list(harness.servers)
    if BASELINE in servers and harness.baseline == BASELINE:
        servers.append(FLOOR)
    for scenario in scenarios:
        for round_number, order in alternating(servers, rounds):
            for label in order:
                sink = workdir / f"{label}-{scenario.name}.log"
                sink.write_bytes(b"")
                server = fleet_server(harness, label, scenario, sink)
                try:
                    server.start()
                    result, _ = run_client(
                        harness,
                        server,
                        scenario.name,
                        "benchmarks.fleet",
                        [
                            "--server-pid",
                            str(server.pid),
                            "--connections",
                            str(scenario.connections),
                            "--seconds",
                            str(scenario.seconds),
                            "--interval",
                            str(scenario.interval),
                            # The floor keeps no lines to wait for.
                            *(() if label == FLOOR else ("--sink-file", str(sink))),
                        ],
                    )
                finally:
                    server.stop()
                    sink.unlink(missing_ok=True)
                m = FleetMeasurement(scenario.name, label, round_number, result)
                measurements.append(m)
                progress(replace(harness, rounds=rounds), m)
    return measurements


def _median(
    measurements: list[FleetMeasurement], scenario: str, server: str, key: str
) -> float | None:
    values = [
        m.result[key]
        for m in measurements
        if m.scenario == scenario and m.server == server
    ]
    return statistics.median(values) if values else None


def build_fleet_rows(
    scenarios: list[FleetScenario], measurements: list[FleetMeasurement]
) -> list[dict[str, Any]]:
    """
    One row a scenario: each server's median CPU per line and KiB per idle
    and per active connection; lineserver's CPU over the baseline's
    (median of the paired rounds).
    """
    rows = []
    for scenario in scenarios:
        mine = [m for m in measurements if m.scenario == scenario.name]
        cpu = [(m.round, m.server, m.result["cpu_us_per_line"]) for m in mine]
        paired = paired_ratios(cpu)
        floor_paired = paired_ratios(cpu, server=FLOOR)
        figures = {
            server: {
                key: _median(mine, scenario.name, server, key)
                for key in (
                    "cpu_us_per_line",
                    "idle_kib_per_connection",
                    "active_kib_per_connection",
                    "lines",
                )
            }
            for server in (BASELINE, LINESERVER, FLOOR)
        }
        rows.append(
            {
                "scenario": scenario.name,
                **asdict(scenario),
                "baseline": figures[BASELINE],
                "lineserver": figures[LINESERVER],
                "floor": figures[FLOOR],
                "cpu_ratio": statistics.median(paired) if paired else None,
                "paired_cpu_ratios": paired,
                "floor_cpu_ratio": (
                    statistics.median(floor_paired) if floor_paired else None
                ),
                "paired_floor_cpu_ratios": floor_paired,
                "guards": list(GUARDS),
            }
        )
    return rows


def format_fleet_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "scenario",
        "CPU us/line b/ls",
        "ls/b",
        "paired",
        f"<={CPU_TARGET:g}x",
        "KiB/idle conn b/ls",
        f"<={MEMORY_TARGET_KIB:g}",
        "KiB/active conn b/ls",
        "floor us/line",
        "floor/b",
    )
    body = []
    for row in rows:
        base, mine = row[BASELINE], row[LINESERVER]
        floor = row.get("floor") or {}
        ratio = row["cpu_ratio"]
        idle = mine["idle_kib_per_connection"]
        body.append(
            (
                row["scenario"],
                f"{cell(base['cpu_us_per_line'], '.1f')} / "
                f"{cell(mine['cpu_us_per_line'], '.1f')}",
                cell(ratio, ".2f", suffix="x"),
                spread(row["paired_cpu_ratios"]),
                "-" if ratio is None else ("yes" if ratio <= CPU_TARGET else "NO"),
                f"{cell(base['idle_kib_per_connection'], '.2f')} / {cell(idle, '.2f')}",
                "-" if idle is None else ("yes" if idle <= MEMORY_TARGET_KIB else "NO"),
                f"{cell(base['active_kib_per_connection'], '.2f')} / "
                f"{cell(mine['active_kib_per_connection'], '.2f')}",
                cell(floor.get("cpu_us_per_line"), ".1f"),
                cell(row.get("floor_cpu_ratio"), ".2f", suffix="x"),
            )
        )
    lines = format_table(header, body)
    lines.append(
        f"slow-*: N connections, one {FLEET_LINE_LENGTH}-byte line each per second, "
        "file sink; CPU from /proc over the sending phase; KiB: server RSS growth "
        "over N; a fresh server per round; lineserver with " + " ".join(GUARDS)
    )
    lines.append(
        "floor: a bare Twisted Protocol that drops what it reads, in the same "
        "rounds (floor/b: its CPU per line over the baseline's, paired): no "
        "server on Twisted's reactor costs less"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = client_parser(
        "python -m benchmarks.fleet",
        "Many slow clients: N connections, one short line each per interval.",
        timeout=120.0,
    )
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=5, help="lines per connection")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--mode", choices=["sink", "echo"], default="sink")
    parser.add_argument(
        "--sink-file", help="sink mode: the server's sink file, checked at the end"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return client_main(
        "fleet",
        lambda: run(
            args.host,
            args.port,
            args.server_pid,
            args.connections,
            args.seconds,
            args.interval,
            args.timeout,
            args.mode,
            args.sink_file,
        ),
        FleetError,
    )


if __name__ == "__main__":
    sys.exit(main())
