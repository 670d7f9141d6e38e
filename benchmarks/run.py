"""C{make bench}: lineserver against a stock LineReceiver, in the same run.

The machine is small (2 cores) and shared, so absolute figures wander from
run to run; only the ratio to a baseline measured minutes apart on the same
machine means much.  So this script starts both servers as real processes,
runs every scenario in rounds that alternate the two servers (and which of
them goes first), and prints each server's median round beside the
baseline's.  The headline ratio is the median of the per-round ratios (each
round's two servers ran seconds apart, on about the same machine); the
ratio of the best rounds is printed beside it, for reference only: a best
round is the luckiest one, and a ratio of two lucky rounds flatters
whichever was luckier.  Each measurement is one L{benchmarks.loadgen}
process, so the load generator has the other core to itself.

    python -m benchmarks.run               # the full run, about 9 minutes
    python -m benchmarks.run --quick       # about 5 minutes (fleets not scaled)
    python -m benchmarks.run --servers baseline --scenarios sink-1,echo-1
    python -m benchmarks.run --scenarios long-1M,long-8M
    python -m benchmarks.run --scenarios delivery --quick

The C{delivery} scenario (L{benchmarks.delivery}) runs lineserver's file
sink with C{fsync=interval}, C{fsync=batch} and C{--ack} beside the plain
file sink, in the same rounds: what durability and acknowledgements cost.

The C{long-*} scenarios (L{benchmarks.longlines}) echo lines of 1 to
16 MiB through both servers with a 16 MiB line limit, in MiB/s: the cost of
a large line limit, linear for lineserver, quadratic for C{LineReceiver}.

The C{tls-*} scenarios run both servers on C{ssl:} ports (a certificate
made at the start of the run) and, in the same rounds, lineserver on a
plain port: the ratio to the baseline over TLS, and what TLS costs
lineserver.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.delivery import (
    DELIVERY,
    DeliveryResult,
    delivery_rows,
    format_delivery_rows,
    run_delivery,
)
from benchmarks.fleet import (
    FLEET_SCENARIOS,
    FleetMeasurement,
    build_fleet_rows,
    format_fleet_table,
    run_fleet_phase,
)
from benchmarks.latency import (
    LATENCY_SCENARIOS,
    LatencyMeasurement,
    build_latency_rows,
    format_latency_table,
    run_latency_phase,
)
from benchmarks.loadgen import LINE_LENGTH, write_payload
from benchmarks.longlines import (
    LONG_SCENARIOS,
    QUICK_LONG_SCENARIOS,
    LongMeasurement,
    LongServerReport,
    LongSettings,
    build_long_rows,
    format_long_servers,
    format_long_table,
    run_long_phase,
)
from benchmarks.procs import (
    BASELINE,
    LINESERVER,
    MIB,
    PLAIN,
    REPO,
    BenchError,
    Harness,
    ServerProcess,
    ServerReport,
    TLSFiles,
    alternating,
    checkout_kind,
    columns,
    make_tls_files,
    progress,
    run_client,
    running_servers,
    steal_seconds,
)
from benchmarks.spool import SCENARIO as SPOOL_SCENARIO
from benchmarks.spool import SpoolFigures, format_spool_table, run_spool_phase
from benchmarks.tables import cell, format_table, paired_ratios, spread

RESULTS = REPO / "benchmarks" / "results"
#: Lines sent through the spool scenario (times --scale).
SPOOL_LINES = 200_000


@dataclass(frozen=True)
class Scenario:
    """
    One figure: a mode, a connection count, and how many lines to send.

    Line counts are sized so the baseline takes about 2 seconds per round.

    @ivar tls: over TLS (C{ssl:} ports), with lineserver on a plain port
        beside the two (L{PLAIN}).
    """

    name: str
    mode: str
    connections: int
    lines: int
    tls: bool = False


SCENARIOS = (
    Scenario("sink-1", "sink", 1, 1_200_000),
    Scenario("sink-16", "sink", 16, 1_200_000),
    Scenario("echo-1", "echo", 1, 600_000),
    Scenario("echo-16", "echo", 16, 1_000_000),
    Scenario("tls-sink-16", "sink", 16, 1_000_000, tls=True),
    Scenario("tls-echo-1", "echo", 1, 600_000, tls=True),
    Scenario("tls-echo-16", "echo", 16, 1_000_000, tls=True),
    # For the report's lines/s against connections (make bench-report).
    Scenario("sink-4", "sink", 4, 1_200_000),
    Scenario("sink-64", "sink", 64, 1_200_000),
)

#: Scenarios only run when named (by make bench-report), not by default.
REPORT_ONLY = frozenset({"sink-4", "sink-64", "slow-100", "slow-3k"})

#: Rounds of the many-slow-clients scenarios (a fresh server each), at most.
FLEET_ROUNDS = 3

#: --quick sends this share of each scenario's lines, in fewer rounds.
QUICK_SCALE = 0.25

#: A long-lines round sends at most this many bytes (times --scale) and
#: starts no new line after this many seconds; lineserver reaches the byte
#: budget first, the baseline on long lines the time cap.
LONG_BUDGET = 256 * MIB
LONG_SECONDS = 3.0
QUICK_LONG_SECONDS = 1.5


@dataclass
class Measurement:
    """
    One round of one scenario against one server.

    @ivar server_cpu_seconds: the server's CPU time (all threads) over the
        round.
    @ivar steal: the share of the machine's CPU time taken by the hypervisor
        for others during the round (0 to 1).
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
    steal: float

    def figures(self) -> str:
        return (
            f"{self.lines_per_second:>12,.0f} lines/s "
            f"{self.megabytes_per_second:7.1f} MB/s "
            f"(server CPU {self.server_cpu_seconds / self.seconds:4.0%}, "
            f"loadgen CPU {self.loadgen_cpu_seconds / self.seconds:4.0%}, "
            f"steal {self.steal:3.0%})"
        )


@dataclass
class Figure:
    """
    A scenario's summary for one server: its best and median rounds.
    """

    best_lines_per_second: float
    median_lines_per_second: float
    best_megabytes_per_second: float
    median_megabytes_per_second: float
    cpu_microseconds_per_line: float
    rounds: list[float] = field(default_factory=list)


def loadgen_options(
    scenario: Scenario,
    lines: int,
    payload: Path,
    sink: Path,
    window: int,
    tls: TLSFiles | None = None,
) -> list[str]:
    """
    The load generator's options for one measurement (L{benchmarks.loadgen}).

    @param tls: the run's TLS files, for a TLS scenario against a TLS
        server.
    """
    options = [
        "--mode",
        scenario.mode,
        "--connections",
        str(scenario.connections),
        "--lines",
        str(lines),
        "--payload",
        str(payload),
        "--window",
        str(window),
    ]
    if scenario.mode == "sink":
        options += ["--sink-file", str(sink)]
    if tls is not None:
        options += ["--tls-ca", str(tls.ca)]
    return options


@dataclass
class Settings:
    """
    @ivar tls: the certificate and key of the TLS scenarios, if any runs.
    """

    harness: Harness
    scenarios: list[Scenario]
    window: int
    workdir: Path
    tls: TLSFiles | None = None


def measure(
    settings: Settings,
    scenario: Scenario,
    server: ServerProcess,
    sink: Path,
    payload: Path,
    round_number: int,
    lines: int,
) -> Measurement:
    """
    One round: run the load generator, note the server's CPU, and empty the
    sink file (both servers append, so the next round starts from zero).
    """
    steal_before = steal_seconds()
    wall_before = time.monotonic()
    tls = settings.tls if server.tls else None
    options = loadgen_options(scenario, lines, payload, sink, settings.window, tls)
    result, cpu = run_client(
        settings.harness, server, scenario.name, "benchmarks.loadgen", options
    )
    stolen = steal_seconds() - steal_before
    wall = time.monotonic() - wall_before
    if scenario.mode == "sink":
        os.truncate(sink, 0)
    return Measurement(
        scenario=scenario.name,
        server=server.server,
        round=round_number,
        lines=lines,
        seconds=result["seconds"],
        lines_per_second=result["lines_per_second"],
        megabytes_per_second=result["megabytes_per_second"],
        server_cpu_seconds=cpu,
        loadgen_cpu_seconds=result["cpu_seconds"],
        steal=stolen / (wall * (os.cpu_count() or 1)),
    )


def run_phase(
    settings: Settings, mode: str, payload: Path, tls: bool = False
) -> tuple[list[Measurement], list[ServerReport]]:
    """
    Start one server of each kind in C{mode}, warm them up, run the
    mode's scenarios in alternating rounds, and stop them.

    @param tls: run the mode's TLS scenarios: the servers on C{ssl:}
        ports, and lineserver on a plain port as well (L{PLAIN}).
    """
    harness = settings.harness
    scenarios = [s for s in settings.scenarios if s.mode == mode and s.tls == tls]
    measurements: list[Measurement] = []
    reports: list[ServerReport] = []
    name = f"tls-{mode}" if tls else mode
    servers = columns(harness, settings.tls if tls else None)
    sinks = {c.label: settings.workdir / f"{c.label}-{name}.log" for c in servers}
    for sink in sinks.values():
        sink.touch()

    def stopped(server: ServerProcess, report: ServerReport) -> None:
        reports.append(report)

    with running_servers(
        harness,
        mode,
        name,
        stopped,
        sinks if mode == "sink" else None,
        servers=servers,
    ) as running:
        for scenario in scenarios:
            warmup = max(scenario.connections, scenario.lines // 10)
            for server in running:
                sink = sinks[server.server]
                measure(settings, scenario, server, sink, payload, 0, warmup)
        for round_number, order in alternating(running, harness.rounds):
            for scenario in scenarios:
                for server in order:
                    m = measure(
                        settings,
                        scenario,
                        server,
                        sinks[server.server],
                        payload,
                        round_number,
                        scenario.lines,
                    )
                    measurements.append(m)
                    progress(harness, m)
    return measurements, reports


def summarize(
    measurements: list[Measurement], scenario: str, server: str
) -> Figure | None:
    rounds = [m for m in measurements if m.scenario == scenario and m.server == server]
    if not rounds:
        return None
    best = max(rounds, key=lambda m: m.lines_per_second)
    rates = [m.lines_per_second for m in rounds]
    return Figure(
        best_lines_per_second=best.lines_per_second,
        median_lines_per_second=statistics.median(rates),
        best_megabytes_per_second=best.megabytes_per_second,
        median_megabytes_per_second=statistics.median(
            m.megabytes_per_second for m in rounds
        ),
        cpu_microseconds_per_line=statistics.median(
            m.server_cpu_seconds / m.lines * 1e6 for m in rounds
        ),
        rounds=rates,
    )


def best_ratio(top: Figure | None, bottom: Figure | None) -> float | None:
    """
    @return: C{top}'s best rate over C{bottom}'s, or None without both.
    """
    if top is None or bottom is None:
        return None
    return top.best_lines_per_second / bottom.best_lines_per_second


def median_ratio(
    top: Figure | None, bottom: Figure | None, paired: list[float]
) -> float | None:
    """
    The headline ratio: the median of the per-round C{paired} ratios, or,
    without pairs, C{top}'s median rate over C{bottom}'s.

    @return: None without both servers' figures.
    """
    if top is None or bottom is None:
        return None
    if paired:
        return statistics.median(paired)
    return top.median_lines_per_second / bottom.median_lines_per_second


def build_rows(
    settings: Settings, measurements: list[Measurement], min_ratio: float
) -> list[dict[str, Any]]:
    """
    One row a scenario: each server's figures, lineserver over the
    baseline; for a TLS scenario also lineserver on its plain port
    (C{lineserver_plain}) and lineserver over TLS against it
    (C{tls_over_plain}: 0.6 means TLS keeps 60% of the plain rate).
    """
    rows = []
    for scenario in settings.scenarios:
        base = summarize(measurements, scenario.name, BASELINE)
        cand = summarize(measurements, scenario.name, LINESERVER)
        rates = [
            (m.round, m.server, m.lines_per_second)
            for m in measurements
            if m.scenario == scenario.name
        ]
        paired = paired_ratios(rates)
        ratio = median_ratio(cand, base, paired)
        row: dict[str, Any] = {
            "scenario": scenario.name,
            "mode": scenario.mode,
            "connections": scenario.connections,
            "lines": scenario.lines,
            "baseline": None if base is None else asdict(base),
            "lineserver": None if cand is None else asdict(cand),
            "ratio": ratio,
            "best_ratio": best_ratio(cand, base),
            "paired_ratios": paired,
            "meets_min_ratio": None if ratio is None else ratio >= min_ratio,
            "tls": scenario.tls,
        }
        if scenario.tls:
            plain = summarize(measurements, scenario.name, PLAIN)
            paired_plain = paired_ratios(rates, over=PLAIN)
            row["lineserver_plain"] = None if plain is None else asdict(plain)
            row["tls_over_plain"] = median_ratio(cand, plain, paired_plain)
            row["best_tls_over_plain"] = best_ratio(cand, plain)
            row["paired_tls_over_plain"] = paired_plain
        rows.append(row)
    return rows


def side_by_side(
    first: dict[str, Any],
    second: dict[str, Any],
    ratio: float | None,
    paired: list[float],
    best: float | None,
) -> tuple[tuple[str, str, str, str, str], str]:
    """
    The cells that set two servers' figures (L{Figure} as a dict, empty
    if missing) beside each other: their median lines/s, the ratio of the
    second to the first (the median of the paired ratios), the paired
    range, the ratio of the best rounds; and their CPU per line.
    """
    rates = (
        cell(first.get("median_lines_per_second"), ",.0f"),
        cell(second.get("median_lines_per_second"), ",.0f"),
        cell(ratio, ".2f", suffix="x"),
        spread(paired),
        cell(best, ".2f", suffix="x"),
    )
    cpu = (
        f"{cell(first.get('cpu_microseconds_per_line'), '.2f')}"
        f" / {cell(second.get('cpu_microseconds_per_line'), '.2f')}"
    )
    return rates, cpu


def format_rows(rows: list[dict[str, Any]], min_ratio: float) -> str:
    header = (
        "scenario",
        "baseline lines/s",
        "lineserver lines/s",
        "ratio",
        "paired",
        "best/best",
        "base MB/s",
        "ls MB/s",
        "CPU us/line b/ls",
        f">={min_ratio:g}x",
    )
    body = []
    for row in rows:
        base = row[BASELINE] or {}
        cand = row[LINESERVER] or {}
        rates, cpu = side_by_side(
            base, cand, row["ratio"], row["paired_ratios"], row["best_ratio"]
        )
        body.append(
            (
                row["scenario"],
                *rates,
                cell(base.get("median_megabytes_per_second"), ".1f"),
                cell(cand.get("median_megabytes_per_second"), ".1f"),
                cpu,
                {None: "-", True: "yes", False: "NO"}[row["meets_min_ratio"]],
            )
        )
    lines = format_table(header, body)
    lines.append(
        "lines/s and MB/s: each server's median round; ratio: the median of "
        "the paired (same-round) ratios; best/best: ratio of the best rounds"
    )
    if any(row["tls"] for row in rows):
        lines.append(
            f"tls-*: both servers over TLS; the {min_ratio:g}x bar is set for plain "
            "TCP, --strict does not fail on these rows"
        )
    return "\n".join(lines)


def format_tls_rows(rows: list[dict[str, Any]]) -> str:
    """
    What TLS costs lineserver: each TLS scenario's lineserver over TLS
    beside lineserver on a plain port, measured in the same rounds.
    """
    header = (
        "scenario",
        "plain lines/s",
        "TLS lines/s",
        "TLS/plain",
        "paired",
        "best/best",
        "CPU us/line plain/TLS",
    )
    body = []
    for row in rows:
        rates, cpu = side_by_side(
            row["lineserver_plain"] or {},
            row[LINESERVER] or {},
            row["tls_over_plain"],
            row["paired_tls_over_plain"],
            row["best_tls_over_plain"],
        )
        body.append((row["scenario"], *rates, cpu))
    lines = format_table(header, body)
    lines.append(
        "TLS cost: lineserver over TLS against lineserver on a plain port, "
        "same rounds; handshakes before the clock starts"
    )
    return "\n".join(lines)


def format_servers(reports: list[ServerReport]) -> str:
    """
    Each server process's peak RSS and CPU time, by phase: the plain ones,
    then the TLS ones (with lineserver on its plain port, L{PLAIN}).
    """
    modes = [f"tls-{r.mode}" if r.tls else r.mode for r in reports]
    sw = max([10, *(len(r.server) for r in reports)])
    mw = max([4, *(len(m) for m in modes)])
    lines = [f"{'server':{sw}} | {'mode':{mw}} | peak RSS MiB | CPU s (whole phase)"]
    for r, mode in sorted(
        zip(reports, modes, strict=True),
        key=lambda p: (p[0].tls or p[0].server == PLAIN, p[0].mode, p[0].server),
    ):
        lines.append(
            f"{r.server:{sw}} | {mode:{mw}} | {r.peak_rss_kib / 1024:12.1f} | "
            f"{r.cpu_seconds:.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = (
        [s.name for s in SCENARIOS]
        + [s.name for s in LONG_SCENARIOS]
        + [s.name for s in FLEET_SCENARIOS]
        + [s.name for s in LATENCY_SCENARIOS]
    )
    names.append(SPOOL_SCENARIO)
    names.append(DELIVERY)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="lineserver against a stock Twisted LineReceiver baseline.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quarter of the bulk lines and 3 rounds, long lines up to 8 MiB "
        "(about 5 minutes with the fleets)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 5)")
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also the Redis rows (benchmarks/redis_rows.py) after the rest",
    )
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of {','.join(names)} "
        "(default: all; --quick leaves out long-16M)",
    )
    parser.add_argument(
        "--servers",
        default=f"{BASELINE},{LINESERVER}",
        help="comma-separated subset of baseline,lineserver",
    )
    parser.add_argument(
        "--candidate",
        choices=[LINESERVER, BASELINE],
        default=LINESERVER,
        help="what runs in the lineserver column; 'baseline' is an A/A check "
        "of the harness (every ratio should be near 1)",
    )
    parser.add_argument(
        "--scale", type=float, help="multiply every scenario's line count"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1000,
        help="echo: lines in flight per connection (0: all at once)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="put lineserver from the checkout DIR (e.g. a git worktree of the "
        "previous commit) in the baseline column: a before/after run",
    )
    parser.add_argument("--min-ratio", type=float, default=3.0)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if any plain-TCP ratio is below --min-ratio",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on CPU 0, the load generator on CPU 1 (needs 2 CPUs)",
    )
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--no-workers",
        dest="workers",
        action="store_false",
        help="leave out the --workers section (benchmarks.workers), which "
        "runs only when no --scenarios are named",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--workdir", type=Path, help="for sink files and payload")
    args = parser.parse_args(argv)
    # The --workers section is part of the whole run, not of a named subset.
    args.workers = args.workers and args.scenarios is None
    if args.scenarios is None:
        skip = {s.name for s in LONG_SCENARIOS} - set(QUICK_LONG_SCENARIOS)
        args.scenarios = ",".join(
            n for n in names if not (args.quick and n in skip) and n not in REPORT_ONLY
        )
    chosen = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = set(chosen) - set(names)
    if unknown or not chosen:
        parser.error(f"--scenarios: choose from {', '.join(names)}")
    args.scenarios = chosen
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or set(servers) - {BASELINE, LINESERVER}:
        parser.error("--servers: choose from baseline, lineserver")
    args.servers = [s for s in (BASELINE, LINESERVER) if s in servers]
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs 2 CPUs")
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    return args


@contextmanager
def working_directory(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="lineserver-bench-") as made:
        yield Path(made)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scenarios = [
        replace(s, lines=max(s.connections, int(s.lines * args.scale)))
        for s in SCENARIOS
        if s.name in args.scenarios
    ]
    load_start = os.getloadavg()
    started = time.monotonic()
    print(
        f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f} on {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds, best round kept",
        flush=True,
    )
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    measurements: list[Measurement] = []
    reports: list[ServerReport] = []
    with working_directory(args.workdir) as workdir:
        harness = Harness(
            servers=args.servers,
            candidate=args.candidate,
            rounds=args.rounds,
            timeout=args.timeout,
            logs=RESULTS / "logs",
            server_cpus={0} if args.pin else None,
            client_cpus={1} if args.pin else None,
            baseline=BASELINE if args.before is None else checkout_kind(args.before),
        )
        settings = Settings(
            harness=harness,
            scenarios=scenarios,
            window=args.window,
            workdir=workdir,
        )
        long_settings = LongSettings(
            harness=harness,
            scenarios=[s for s in LONG_SCENARIOS if s.name in args.scenarios],
            seconds=QUICK_LONG_SECONDS if args.quick else LONG_SECONDS,
            budget=int(LONG_BUDGET * args.scale),
        )
        spool_figures: SpoolFigures | None = None
        fleet_scenarios = [s for s in FLEET_SCENARIOS if s.name in args.scenarios]
        fleet_measurements: list[FleetMeasurement] = []
        latency_scenarios = [s for s in LATENCY_SCENARIOS if s.name in args.scenarios]
        latency_measurements: list[LatencyMeasurement] = []
        long_measurements: list[LongMeasurement] = []
        long_reports: list[LongServerReport] = []
        delivery = DeliveryResult()
        payload = workdir / "payload.bin"
        if scenarios:
            write_payload(str(payload), max(s.lines for s in scenarios))
        if any(s.tls for s in scenarios):
            settings.tls = make_tls_files(workdir / "tls")
        try:
            for tls in (False, True):
                for mode in ("sink", "echo"):
                    if any(s.mode == mode and s.tls == tls for s in scenarios):
                        phase, phase_reports = run_phase(settings, mode, payload, tls)
                        measurements += phase
                        reports += phase_reports
            if long_settings.scenarios:
                print("long lines:", flush=True)
                long_measurements, long_reports = run_long_phase(long_settings)
            if SPOOL_SCENARIO in args.scenarios:
                print("spool:", flush=True)
                spool_figures = run_spool_phase(
                    max(1000, int(SPOOL_LINES * args.scale)), args.rounds, workdir
                )
            if DELIVERY in args.scenarios:
                delivery = run_delivery(harness, workdir, args.scale)
            if fleet_scenarios:
                print("many slow clients:", flush=True)
                fleet_measurements = run_fleet_phase(
                    harness,
                    fleet_scenarios,
                    workdir,
                    min(args.rounds, FLEET_ROUNDS),
                )
            if latency_scenarios:
                print("latency:", flush=True)
                latency_measurements = run_latency_phase(
                    harness, latency_scenarios, args.rounds
                )
        except BenchError as e:
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 2
    rows = build_rows(settings, measurements, args.min_ratio)
    long_rows = build_long_rows(long_settings, long_measurements, long_reports)
    fleet_rows = build_fleet_rows(fleet_scenarios, fleet_measurements)
    latency_rows = build_latency_rows(latency_scenarios, latency_measurements)
    load_end = os.getloadavg()
    print()
    if args.candidate != LINESERVER:
        print("A/A check: the lineserver column is the baseline server again")
    if args.before is not None:
        print(f"before/after: the baseline column is lineserver from {args.before}")
    if rows:
        print(format_rows(rows, args.min_ratio))
        tls_rows = [row for row in rows if row["tls"]]
        if any(row["lineserver_plain"] for row in tls_rows):
            print()
            print(format_tls_rows(tls_rows))
        print()
        print(format_servers(reports))
    if long_rows:
        if rows:
            print()
        print(format_long_table(long_rows))
        print()
        print(format_long_servers(long_reports))
    if spool_figures is not None:
        print()
        print(format_spool_table(spool_figures))
    delivery_table = delivery_rows(delivery)
    if delivery_table:
        print()
        print(format_delivery_rows(delivery_table))
    if fleet_rows:
        print()
        print(format_fleet_table(fleet_rows))
    if latency_rows:
        print()
        print(format_latency_table(latency_rows))
    busy = [m for m in measurements if m.loadgen_cpu_seconds > 0.9 * m.seconds]
    if busy:
        print(
            f"\nnote: the load generator was over 90% busy in {len(busy)} rounds; "
            "their figures are lower bounds for the server"
        )
    elapsed = time.monotonic() - started
    sized = f"; lines are {LINE_LENGTH} bytes" if rows else ""
    print(
        f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} "
        f"{load_end[2]:.2f}; took {elapsed:.0f} s{sized}"
    )
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": elapsed,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": load_end,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            "rounds": args.rounds,
            "scale": args.scale,
            "window": args.window,
            "candidate": args.candidate,
            "line_length": LINE_LENGTH,
            "min_ratio": args.min_ratio,
            "pin": args.pin,
            "before": None if args.before is None else str(args.before),
        },
        "scenarios": rows,
        "servers": [asdict(r) for r in reports],
        "measurements": [asdict(m) for m in measurements],
        "spool": None if spool_figures is None else asdict(spool_figures),
        "delivery": {
            "scenarios": delivery_table,
            "servers": [asdict(r) for r in delivery.reports],
            "measurements": [asdict(m) for m in delivery.measurements],
        },
        "long_lines": {
            "seconds_cap": long_settings.seconds,
            "budget_bytes": long_settings.budget,
            "scenarios": long_rows,
            "servers": [asdict(r) for r in long_reports],
            "measurements": [asdict(m) for m in long_measurements],
        },
        "many_slow_clients": {
            "scenarios": fleet_rows,
            "measurements": [asdict(m) for m in fleet_measurements],
        },
        "latency": {
            "scenarios": latency_rows,
            "measurements": [asdict(m) for m in latency_measurements],
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {args.json}")
    if args.workers:
        # --workers: spread over workers, CPU per line with 1 and 2 (its own
        # module and output; figures in docs/workers.md).
        from benchmarks import workers

        print()
        workers.main(["--quick"] if args.quick else [])
    if args.redis:
        from benchmarks.redis_rows import main as redis_rows

        redis_rows(["--lines", str(max(10_000, int(400_000 * args.scale)))])
    if args.strict and any(
        row["meets_min_ratio"] is False for row in rows if not row["tls"]
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
