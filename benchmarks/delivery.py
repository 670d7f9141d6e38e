"""Delivery options against the plain file sink, in the same run.

What durability and acknowledgements cost: lineserver with the file sink
as it is by default (C{fsync=never}) is the baseline here, and each
L{Variant} (an fsync mode, C{--ack}, ...) runs as its own server process
beside it, in rounds that alternate their order.  Each row's ratio is the
median of the per-round ratios to the plain file sink (each round's
servers ran seconds apart).  Clients send 16 connections' worth of lines;
a C{--ack} variant's client (L{benchmarks.ackload}) reads its ACKs and
stops the clock at the last one, the others (L{benchmarks.loadgen}) stop
it when the file holds every line.

    python -m benchmarks.run --scenarios delivery --quick

To add a row, add a L{Variant} to L{VARIANTS}: its sink URL query, whether
it acknowledges, and any other server options.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import write_payload
from benchmarks.procs import (
    HOST,
    Harness,
    ServerProcess,
    ServerReport,
    alternating,
    free_port,
    progress,
    run_client,
    twistd_path,
)
from benchmarks.tables import cell, format_table, paired_ratios, spread

#: The scenario name that runs this phase.
DELIVERY = "delivery"
#: The row every other row is measured against.
PLAIN_FILE = "file"


@dataclass(frozen=True)
class Variant:
    """
    One row: lineserver's file sink with some delivery option.

    @ivar name: the row's label.
    @ivar query: the file sink URL's query (C{?fsync=batch}), or "".
    @ivar ack: run with C{--ack}; its client reads the ACKs.
    @ivar options: more server options; C{{workdir}} in one is replaced by
        a directory of this variant's own (for a spool, say).
    """

    name: str
    query: str = ""
    ack: bool = False
    options: tuple[str, ...] = ()

    def server_options(self, sink: Path, workdir: Path) -> list[str]:
        options = ["--sink", f"file:{sink}{self.query}"]
        if self.ack:
            options.append("--ack")
        return options + [o.replace("{workdir}", str(workdir)) for o in self.options]


VARIANTS: tuple[Variant, ...] = (
    Variant(PLAIN_FILE),
    Variant("fsync=interval", "?fsync=interval"),
    Variant("fsync=batch", "?fsync=batch"),
    Variant("ack", ack=True),
    Variant("ack fsync=batch", "?fsync=batch", ack=True),
)

CONNECTIONS = 16
#: Lines per round (times --scale).  fsync=interval keeps a batch counted
#: until its fsync, so with the default --high-watermark (4 MiB) and
#: fsync_interval (1 s) it takes about 4 MiB a second: its rounds are the
#: long ones, and this is sized for them.
LINES = 300_000


@dataclass
class DeliveryMeasurement:
    """
    One round of one variant.
    """

    scenario: str
    server: str
    round: int
    lines: int
    seconds: float
    lines_per_second: float
    megabytes_per_second: float
    server_cpu_seconds: float
    loadgen_cpu_seconds: float

    def figures(self) -> str:
        return (
            f"{self.lines_per_second:>12,.0f} lines/s "
            f"{self.megabytes_per_second:7.1f} MB/s "
            f"(server CPU {self.server_cpu_seconds / self.seconds:4.0%})"
        )


@dataclass
class DeliveryResult:
    measurements: list[DeliveryMeasurement] = field(default_factory=list)
    reports: list[ServerReport] = field(default_factory=list)


def _measure(
    harness: Harness,
    variant: Variant,
    server: ServerProcess,
    sink: Path,
    payload: Path,
    lines: int,
    round_number: int,
) -> DeliveryMeasurement:
    common = ["--connections", str(CONNECTIONS), "--lines", str(lines)]
    common += ["--payload", str(payload)]
    if variant.ack:
        module, options = "benchmarks.ackload", common
    else:
        module = "benchmarks.loadgen"
        options = ["--mode", "sink", *common, "--sink-file", str(sink)]
    result, cpu = run_client(harness, server, variant.name, module, options)
    os.truncate(sink, 0)
    return DeliveryMeasurement(
        scenario=variant.name,
        server=variant.name,
        round=round_number,
        lines=lines,
        seconds=result["seconds"],
        lines_per_second=result["lines_per_second"],
        megabytes_per_second=result["megabytes_per_second"],
        server_cpu_seconds=cpu,
        loadgen_cpu_seconds=result["cpu_seconds"],
    )


def run_delivery(
    harness: Harness,
    workdir: Path,
    scale: float,
    variants: Sequence[Variant] = VARIANTS,
) -> DeliveryResult:
    """
    Start one lineserver per variant, warm each up, measure them in
    alternating rounds, and stop them.
    """
    lines = max(CONNECTIONS, int(LINES * scale))
    payload = workdir / "delivery-payload.bin"
    write_payload(str(payload), lines)
    result = DeliveryResult()
    print("delivery options (lineserver, 16 connections):", flush=True)
    with ExitStack() as stack:
        running: list[tuple[Variant, ServerProcess, Path]] = []
        for index, variant in enumerate(variants):
            port = free_port()
            own = workdir / f"delivery-{index}"
            own.mkdir(exist_ok=True)
            sink = own / "lines.log"
            sink.touch()
            command = [
                twistd_path(),
                "-n",
                "--pidfile=",
                "lineserver",
                "--port",
                f"tcp:{port}:interface={HOST}",
                "--mode",
                "sink",
                *variant.server_options(sink, own),
            ]
            server = ServerProcess(
                variant.name,
                "sink",
                port,
                command,
                harness.logs / f"delivery-{index}.log",
                harness.server_cpus,
            )

            def stop(server: ServerProcess = server) -> None:
                report = server.stop()
                if report is not None:
                    result.reports.append(report)

            stack.callback(stop)
            server.start()
            running.append((variant, server, sink))
        for variant, server, sink in running:
            warmup = max(CONNECTIONS, lines // 10)
            _measure(harness, variant, server, sink, payload, warmup, 0)
        by_server = {server.server: (v, server, s) for v, server, s in running}
        servers = [server for _, server, _ in running]
        for round_number, order in alternating(servers, harness.rounds):
            for server in order:
                variant, _, sink = by_server[server.server]
                m = _measure(
                    harness, variant, server, sink, payload, lines, round_number
                )
                result.measurements.append(m)
                progress(harness, m)
    return result


def delivery_rows(
    result: DeliveryResult, variants: Sequence[Variant] = VARIANTS
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rates = [(m.round, m.server, m.lines_per_second) for m in result.measurements]
    for variant in variants:
        rounds = [m for m in result.measurements if m.server == variant.name]
        if not rounds:
            continue
        paired = paired_ratios(rates, over=PLAIN_FILE, server=variant.name)
        rows.append(
            {
                "variant": variant.name,
                "median_lines_per_second": statistics.median(
                    m.lines_per_second for m in rounds
                ),
                "median_megabytes_per_second": statistics.median(
                    m.megabytes_per_second for m in rounds
                ),
                "ratio_to_file": statistics.median(paired) if paired else None,
                "ratios": paired,
                "cpu_microseconds_per_line": statistics.median(
                    m.server_cpu_seconds / m.lines * 1e6 for m in rounds
                ),
            }
        )
    return rows


def format_delivery_rows(rows: list[dict[str, Any]]) -> str:
    header = ["file sink", "lines/s", "MB/s", "vs file", "spread", "CPU us/line"]
    body = [
        [
            row["variant"],
            cell(row["median_lines_per_second"], ",.0f"),
            cell(row["median_megabytes_per_second"], ".1f"),
            cell(row["ratio_to_file"], ".2f", suffix="x"),
            spread(row["ratios"]),
            cell(row["cpu_microseconds_per_line"], ".2f"),
        ]
        for row in rows
    ]
    return "\n".join(
        [
            "delivery options, medians of the rounds; 'vs file' is the median "
            "per-round ratio to the plain file sink (fsync=never):",
            *format_table(header, body),
        ]
    )
