"""Long lines: what a 16 MiB line limit costs, lineserver against LineReceiver.

Stock C{LineReceiver} appends every read to its buffer and re-splits the
whole buffer (C{self._buffer += data}, then C{split}), so a line of L bytes
that arrives in reads of r bytes costs about L*L/r bytes of copying and
scanning: quadratic in the line.  With C{MAX_LENGTH} raised to 16 MiB
(needed to accept such lines at all) an 8 MiB line costs it hundreds of
megabytes of memory traffic.  lineserver's framer keeps the unterminated
tail as a list of chunks and joins it once, so its cost is linear.

This module is the client of that measurement.  One connection sends lines
of C{--line-bytes} bytes (LF included) in ordinary 64 KiB C{send} calls, so
the server sees many reads per line, keeps at most C{--window} lines in
flight, reads the echoes as they come, and stops starting new lines after
C{--seconds} (or C{--lines} lines).  It waits for the lines in flight, then
checks the echoed bytes (count and CRC-32) against those sent and prints
one JSON object:

    python -m benchmarks.longlines --port 4040 --line-bytes 8M --seconds 3

C{python -m benchmarks.run} starts the servers (both in echo mode with a
16 MiB limit, a fresh pair per line size so each peak RSS belongs to one
size) and runs this client against each in alternating rounds.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.procs import (
    BASELINE,
    LINESERVER,
    MIB,
    Harness,
    ServerProcess,
    ServerReport,
    alternating,
    client_main,
    client_parser,
    progress,
    run_client,
    running_servers,
)
from benchmarks.tables import cell, format_table, paired_ratios, spread

#: The line limit both servers are given: the issue's 16 MiB.
MAX_LINE = 16 * MIB

#: Bytes per C{send}: an ordinary socket-sized write.
CHUNK = 64 * 1024

#: Bytes per C{recv}.
RECEIVE = 1 * MIB


class LongLineError(Exception):
    """
    The server did not echo the lines as sent, or not in time.
    """


def parse_size(text: str) -> int:
    """
    C{8388608}, C{512K}, C{8M}: bytes with binary multiples.
    """
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def make_line(size: int) -> bytes:
    """
    @return: a line of exactly C{size} bytes, LF included, with no other
        LF or CR in it (printable filler that is not one repeated byte).
    """
    if size < 1:
        raise ValueError(f"a line needs at least 1 byte, got {size}")
    pattern = bytes(range(33, 127))
    body = (pattern * (size // len(pattern) + 1))[: size - 1]
    return body + b"\n"


@dataclass
class LongLineResult:
    """
    One measurement, as printed in JSON.

    @ivar lines: lines sent and echoed back whole.
    @ivar seconds: first byte sent to the last echoed byte.
    @ivar capped: stopped by C{--seconds} before C{--lines}.
    @ivar cpu_seconds: this process's CPU time over the measurement.
    """

    line_bytes: int
    lines: int
    bytes: int
    seconds: float
    cpu_seconds: float
    lines_per_second: float
    mib_per_second: float
    capped: bool
    verified: bool


def drive(
    host: str,
    port: int,
    line_bytes: int,
    max_lines: int,
    seconds: float,
    window: int = 2,
    timeout: float = 120.0,
) -> LongLineResult:
    """
    Send lines of C{line_bytes} over one connection, at most C{window} in
    flight, until C{max_lines} are sent or C{seconds} have passed (at least
    one line either way); wait for every echo (up to C{timeout} seconds in
    all) and check it.
    """
    if max_lines < 1 or window < 1:
        raise ValueError("need max_lines >= 1 and window >= 1")
    line = memoryview(make_line(line_bytes))
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = time.monotonic() + timeout
    sent_lines = 0  # lines begun
    sending = False  # a line is partly sent
    offset = 0  # bytes of that line sent
    received = 0
    crc = 0
    capped = False
    finished = started
    writing = False
    try:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            if not sending:
                more = sent_lines < max_lines and not capped
                late = time.perf_counter() - started >= seconds
                if more and sent_lines and late:
                    capped, more = True, False
                if more and sent_lines - received // line_bytes < window:
                    sent_lines += 1
                    sending, offset = True, 0
            if sending:
                try:
                    while offset < line_bytes:
                        offset += sock.send(line[offset : offset + CHUNK])
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise LongLineError(f"send failed: {e}") from e
                if offset == line_bytes:
                    sending = False
                    continue  # perhaps begin the next line at once
            elif (sent_lines >= max_lines or capped) and (
                received == sent_lines * line_bytes
            ):
                break
            if sending != writing:
                writing = sending
                write = selectors.EVENT_WRITE if writing else 0
                selector.modify(sock, selectors.EVENT_READ | write)
            if time.monotonic() > deadline:
                raise LongLineError(
                    f"timed out: {received} of {sent_lines * line_bytes} bytes "
                    f"echoed after {timeout:.0f} s"
                )
            for _key, events in selector.select(1.0):
                if not events & selectors.EVENT_READ:
                    continue
                try:
                    data = sock.recv(RECEIVE)
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise LongLineError(f"receive failed: {e}") from e
                if not data:
                    raise LongLineError(f"server closed after echoing {received} bytes")
                received += len(data)
                crc = zlib.crc32(data, crc)
                if received > sent_lines * line_bytes:
                    raise LongLineError("server echoed more than was sent")
                finished = time.perf_counter()
        cpu = time.process_time() - cpu_started
    finally:
        selector.close()
        sock.close()
    expected = 0
    for _ in range(sent_lines):
        expected = zlib.crc32(line, expected)
    if crc != expected:
        raise LongLineError("echoed bytes differ from the bytes sent")
    elapsed = finished - started
    total = sent_lines * line_bytes
    return LongLineResult(
        line_bytes=line_bytes,
        lines=sent_lines,
        bytes=total,
        seconds=elapsed,
        cpu_seconds=cpu,
        lines_per_second=sent_lines / elapsed,
        mib_per_second=total / elapsed / MIB,
        capped=capped,
        verified=True,
    )


# -- the harness: servers, rounds, figures ----------------------------------


@dataclass(frozen=True)
class LongScenario:
    """
    One figure: lines of C{line_bytes} bytes (LF included) over one
    connection.
    """

    name: str
    line_bytes: int


LONG_SCENARIOS = tuple(LongScenario(f"long-{n}M", n * MIB) for n in (1, 4, 8, 16))

#: What C{--quick} runs of them: the 16 MiB baseline takes seconds a line.
QUICK_LONG_SCENARIOS = ("long-1M", "long-4M", "long-8M")


@dataclass
class LongSettings:
    """
    @ivar seconds: a round starts no new line after this long.
    @ivar budget: a round sends at most this many bytes (at least a line).
    """

    harness: Harness
    scenarios: list[LongScenario]
    seconds: float
    budget: int


@dataclass
class LongMeasurement:
    """
    One round of one scenario against one server.
    """

    scenario: str
    server: str
    round: int
    line_bytes: int
    lines: int
    seconds: float
    mib_per_second: float
    lines_per_second: float
    server_cpu_seconds: float
    capped: bool

    def figures(self) -> str:
        return (
            f"{self.mib_per_second:8.1f} MiB/s {self.lines:4} lines "
            f"in {self.seconds:5.2f} s{' (capped)' if self.capped else ''} "
            f"(server CPU {self.server_cpu_seconds / self.seconds:4.0%})"
        )


@dataclass
class LongServerReport:
    """
    One server process, started fresh for one scenario: its resident memory
    once started and its peak over the scenario (warm-up and all rounds).
    """

    scenario: str
    server: str
    command: list[str]
    start_rss_kib: int
    peak_rss_kib: int
    cpu_seconds: float
    log: str


def run_long_phase(
    settings: LongSettings,
) -> tuple[list[LongMeasurement], list[LongServerReport]]:
    """
    For each scenario: start a fresh server of each kind (so its peak RSS
    belongs to that line size), warm each up with one line, run the
    rounds alternating the servers and which goes first, and stop them.
    """
    harness = settings.harness
    measurements: list[LongMeasurement] = []
    reports: list[LongServerReport] = []
    for scenario in settings.scenarios:
        lines = max(1, settings.budget // scenario.line_bytes)

        def stopped(
            server: ServerProcess,
            report: ServerReport,
            scenario: LongScenario = scenario,
        ) -> None:
            reports.append(_long_report(scenario, report, server.start_rss_kib))

        with running_servers(
            harness, "echo", scenario.name, stopped, max_line=MAX_LINE
        ) as running:
            for server in running:
                _measure(settings, scenario, server, 0, 1, 0.0)
            for round_number, order in alternating(running, harness.rounds):
                for server in order:
                    m = _measure(
                        settings,
                        scenario,
                        server,
                        round_number,
                        lines,
                        settings.seconds,
                    )
                    measurements.append(m)
                    progress(harness, m)
    return measurements, reports


def _long_report(
    scenario: LongScenario, report: ServerReport, start_rss_kib: int
) -> LongServerReport:
    return LongServerReport(
        scenario=scenario.name,
        server=report.server,
        command=report.command,
        start_rss_kib=start_rss_kib,
        peak_rss_kib=report.peak_rss_kib,
        cpu_seconds=report.cpu_seconds,
        log=report.log,
    )


def _measure(
    settings: LongSettings,
    scenario: LongScenario,
    server: ServerProcess,
    round_number: int,
    lines: int,
    seconds: float,
) -> LongMeasurement:
    """
    One round in a fresh client process (L{main}).
    """
    options = [
        "--line-bytes",
        str(scenario.line_bytes),
        "--lines",
        str(lines),
        "--seconds",
        str(seconds),
    ]
    result, cpu = run_client(
        settings.harness, server, scenario.name, "benchmarks.longlines", options
    )
    return LongMeasurement(
        scenario=scenario.name,
        server=server.server,
        round=round_number,
        line_bytes=scenario.line_bytes,
        lines=result["lines"],
        seconds=result["seconds"],
        mib_per_second=result["mib_per_second"],
        lines_per_second=result["lines_per_second"],
        server_cpu_seconds=cpu,
        capped=result["capped"],
    )


def build_long_rows(
    settings: LongSettings,
    measurements: list[LongMeasurement],
    reports: list[LongServerReport],
) -> list[dict[str, Any]]:
    """
    Per scenario and server: the best and median MiB/s, the server's CPU
    milliseconds per MiB (median), its peak RSS; and the headline ratio
    (the median of the per-round ratios), the per-round ratios, and the
    ratio of the bests.
    """
    rows = []
    for scenario in settings.scenarios:
        row: dict[str, Any] = {
            "scenario": scenario.name,
            "line_bytes": scenario.line_bytes,
        }
        for server in (BASELINE, LINESERVER):
            rounds = [
                m
                for m in measurements
                if m.scenario == scenario.name and m.server == server
            ]
            report = next(
                (
                    r
                    for r in reports
                    if r.scenario == scenario.name and r.server == server
                ),
                None,
            )
            if not rounds:
                row[server] = None
                continue
            row[server] = {
                "best_mib_per_second": max(m.mib_per_second for m in rounds),
                "median_mib_per_second": statistics.median(
                    m.mib_per_second for m in rounds
                ),
                "best_lines_per_second": max(m.lines_per_second for m in rounds),
                "cpu_ms_per_mib": statistics.median(
                    m.server_cpu_seconds * 1000 / (m.lines * m.line_bytes / MIB)
                    for m in rounds
                ),
                "capped_rounds": sum(m.capped for m in rounds),
                "rounds": [m.mib_per_second for m in rounds],
                "start_rss_kib": None if report is None else report.start_rss_kib,
                "peak_rss_kib": None if report is None else report.peak_rss_kib,
            }
        base, cand = row[BASELINE], row[LINESERVER]
        paired = paired_ratios(
            (m.round, m.server, m.mib_per_second)
            for m in measurements
            if m.scenario == scenario.name
        )
        row["paired_ratios"] = paired
        if base and cand:
            row["ratio"] = (
                statistics.median(paired)
                if paired
                else cand["median_mib_per_second"] / base["median_mib_per_second"]
            )
            row["best_ratio"] = (
                cand["best_mib_per_second"] / base["best_mib_per_second"]
            )
        else:
            row["ratio"] = row["best_ratio"] = None
        rows.append(row)
    return rows


def format_long_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "scenario",
        "baseline MiB/s",
        "lineserver MiB/s",
        "ratio",
        "paired",
        "best/best",
        "CPU ms/MiB b/ls",
        "peak RSS MiB b/ls",
    )
    body = []
    for row in rows:
        base = row[BASELINE] or {}
        cand = row[LINESERVER] or {}
        capped = "*" if base.get("capped_rounds") else ""
        body.append(
            (
                row["scenario"],
                cell(base.get("median_mib_per_second"), ".1f", suffix=capped),
                cell(cand.get("median_mib_per_second"), ".1f"),
                cell(row["ratio"], ".1f", suffix="x"),
                spread(row["paired_ratios"]),
                cell(row["best_ratio"], ".1f", suffix="x"),
                f"{cell(base.get('cpu_ms_per_mib'), '.1f')}"
                f" / {cell(cand.get('cpu_ms_per_mib'), '.1f')}",
                f"{cell(base.get('peak_rss_kib'), '.0f', 1024)}"
                f" / {cell(cand.get('peak_rss_kib'), '.0f', 1024)}",
            )
        )
    lines = format_table(header, body)
    lines.append(
        "one connection, lines sent in 64 KiB writes, echoed; both servers "
        "with a 16 MiB line limit; MiB/s: each server's median round; ratio: "
        "the median of the paired (same-round) ratios; best/best: of the best "
        "rounds"
    )
    if any(row[BASELINE] and row[BASELINE]["capped_rounds"] for row in rows):
        lines.append("* baseline rounds stopped by the time cap (rate achieved)")
    growth = _cost_growth(rows)
    if growth:
        lines.append(growth)
    return "\n".join(lines)


def _cost_growth(rows: list[dict[str, Any]]) -> str:
    """
    How the server's CPU per MiB grows from the shortest to the longest
    line: about 1x is linear work, about the size ratio is quadratic.
    """
    if len(rows) < 2:
        return ""
    first, last = rows[0], rows[-1]
    parts = []
    for server in (BASELINE, LINESERVER):
        a, b = first[server], last[server]
        if a and b and a["cpu_ms_per_mib"] > 0:
            parts.append(f"{server} x{b['cpu_ms_per_mib'] / a['cpu_ms_per_mib']:.1f}")
    if not parts:
        return ""
    sizes = last["line_bytes"] // first["line_bytes"]
    return (
        f"CPU per MiB, {last['scenario']} over {first['scenario']} "
        f"({sizes}x longer lines): {', '.join(parts)}"
    )


def format_long_servers(reports: list[LongServerReport]) -> str:
    lines = ["server     | scenario | RSS at start MiB | peak RSS MiB | CPU s"]
    for r in reports:
        lines.append(
            f"{r.server:10} | {r.scenario:8} | {r.start_rss_kib / 1024:16.1f} | "
            f"{r.peak_rss_kib / 1024:12.1f} | {r.cpu_seconds:.2f}"
        )
    return "\n".join(lines)


# -- the client's command line ------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = client_parser(
        "python -m benchmarks.longlines",
        "Echo long lines through a line server once; print JSON.",
        timeout=120.0,
    )
    parser.add_argument(
        "--line-bytes", type=parse_size, default=8 * MIB, help="LF included; 8M"
    )
    parser.add_argument("--lines", type=int, default=1000, help="at most this many")
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="start no new line after this long (lines in flight finish)",
    )
    parser.add_argument("--window", type=int, default=2, help="lines in flight")
    args = parser.parse_args(argv)
    if not 1 <= args.line_bytes <= MAX_LINE + 1:
        parser.error(f"--line-bytes must be in 1..{MAX_LINE + 1}")
    if args.lines < 1 or args.window < 1:
        parser.error("--lines and --window must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def measure() -> LongLineResult:
        return drive(
            args.host,
            args.port,
            args.line_bytes,
            args.lines,
            args.seconds,
            args.window,
            args.timeout,
        )

    return client_main("longlines", measure, LongLineError)


if __name__ == "__main__":
    sys.exit(main())
