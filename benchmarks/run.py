"""C{make bench}: lineserver against a stock LineReceiver, in the same run.

The machine is small (2 cores) and shared, so absolute figures wander from
run to run; only the ratio to a baseline measured minutes apart on the same
machine means much.  So this script starts both servers as real processes,
runs every scenario in rounds that alternate the two servers (and which of
them goes first), keeps the best round of each, and prints each figure
beside the baseline's.  Each measurement is one L{benchmarks.loadgen}
process, so the load generator has the other core to itself.

    python -m benchmarks.run               # the full run, about 1.5 minutes
    python -m benchmarks.run --quick       # about 20 seconds, for CI
    python -m benchmarks.run --servers baseline --scenarios sink-1,echo-1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.loadgen import LINE_LENGTH, write_payload

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HOST = "127.0.0.1"

BASELINE = "baseline"
LINESERVER = "lineserver"


@dataclass(frozen=True)
class Scenario:
    """
    One figure: a mode, a connection count, and how many lines to send.

    Line counts are sized so the baseline takes about 2 seconds per round.
    """

    name: str
    mode: str
    connections: int
    lines: int


SCENARIOS = (
    Scenario("sink-1", "sink", 1, 1_200_000),
    Scenario("sink-16", "sink", 16, 1_200_000),
    Scenario("echo-1", "echo", 1, 600_000),
    Scenario("echo-16", "echo", 16, 1_000_000),
)

#: --quick sends this share of each scenario's lines, in fewer rounds.
QUICK_SCALE = 0.25


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


@dataclass
class ServerReport:
    """
    What one server process cost over a whole phase (one mode).
    """

    server: str
    mode: str
    command: list[str]
    peak_rss_kib: int
    cpu_seconds: float
    log: str


@dataclass
class Figure:
    """
    A scenario's summary for one server: its best and median rounds.
    """

    best_lines_per_second: float
    median_lines_per_second: float
    best_megabytes_per_second: float
    cpu_microseconds_per_line: float
    rounds: list[float] = field(default_factory=list)


def free_port() -> int:
    """
    A port that was free a moment ago (bind port 0, read it, release it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def proc_cpu_seconds(pid: int) -> float:
    """
    @return: user plus system CPU seconds of process C{pid}, all threads.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), counted after the command's ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """
    @return: CPU time the hypervisor gave to others, all CPUs, since boot;
        its growth during a round says the round was measured on a busy host.
    """
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    steal = int(fields[8]) if len(fields) > 8 else 0
    return steal / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_kib(pid: int) -> int:
    """
    @return: the process's peak resident set size (VmHWM) in KiB.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class ServerProcess:
    """
    A server under test, run as its own process with its log in a file.
    """

    def __init__(
        self,
        server: str,
        mode: str,
        command: list[str],
        log_path: Path,
        cpus: set[int] | None = None,
    ) -> None:
        self.server = server
        self.mode = mode
        self.command = command
        self.log_path = log_path
        self.cpus = cpus
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, port: int, timeout: float = 30.0) -> None:
        """
        Start the process and wait until C{port} accepts a connection.
        """
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            self.command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=pinning(self.cpus),
        )
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                socket.create_connection((HOST, port), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.server} did not accept on port {port} within "
                        f"{timeout:.0f} s; see {self.log_path}"
                    ) from None
                time.sleep(0.05)

    def check_alive(self) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            raise BenchError(
                f"{self.server} ({self.mode}) exited with status {code}; "
                f"see {self.log_path}"
            )

    def stop(self) -> ServerReport | None:
        """
        Read the peak RSS and CPU time, then stop with SIGTERM (SIGKILL if
        it does not exit in time).

        @return: the report, or None if the process was already gone.
        """
        if self._process is None:
            return None
        report = None
        if self._process.poll() is None:
            report = ServerReport(
                server=self.server,
                mode=self.mode,
                command=self.command,
                peak_rss_kib=proc_peak_rss_kib(self.pid),
                cpu_seconds=proc_cpu_seconds(self.pid),
                log=str(self.log_path),
            )
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
        self._process = None
        return report


class BenchError(Exception):
    """
    A server or the load generator failed; the run cannot go on.
    """


def pinning(cpus: set[int] | None) -> Callable[[], None] | None:
    """
    @return: a C{preexec_fn} that keeps a child (and the threads it will
        start) on C{cpus}, or None to let the kernel place it.
    """
    if cpus is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def twistd_path() -> str:
    """
    The twistd beside this interpreter (the project's virtualenv), else on
    C{PATH}.
    """
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found is None:
        raise BenchError("twistd not found beside the interpreter or on PATH")
    return found


def server_command(kind: str, mode: str, port: int, sink: Path) -> list[str]:
    """
    @param kind: L{BASELINE} or L{LINESERVER}.
    """
    options = ["--port", f"tcp:{port}:interface={HOST}", "--mode", mode]
    if mode == "sink":
        options += ["--sink", f"file:{sink}"]
    if kind == BASELINE:
        return [sys.executable, "-m", "benchmarks.baseline_server", *options]
    return [twistd_path(), "-n", "--pidfile=", "lineserver", *options]


def run_loadgen(
    scenario: Scenario,
    lines: int,
    port: int,
    payload: Path,
    sink: Path,
    window: int,
    timeout: float,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """
    Run one measurement in a fresh load generator process.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "--host",
        HOST,
        "--port",
        str(port),
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
        "--timeout",
        str(timeout),
    ]
    if scenario.mode == "sink":
        command += ["--sink-file", str(sink)]
    try:
        done = subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            timeout=timeout + 30,
            preexec_fn=pinning(cpus),
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"loadgen did not finish: {' '.join(command)}") from None
    if done.returncode != 0:
        raise BenchError(done.stderr.decode(errors="replace").strip())
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@dataclass
class Settings:
    servers: list[str]
    candidate: str
    scenarios: list[Scenario]
    rounds: int
    window: int
    timeout: float
    workdir: Path
    pin: bool = False

    def server_cpus(self) -> set[int] | None:
        return {0} if self.pin else None

    def loadgen_cpus(self) -> set[int] | None:
        return {1} if self.pin else None


def measure(
    settings: Settings,
    scenario: Scenario,
    server: ServerProcess,
    port: int,
    sink: Path,
    payload: Path,
    round_number: int,
    lines: int,
) -> Measurement:
    """
    One round: run the load generator, note the server's CPU, and empty the
    sink file (both servers append, so the next round starts from zero).
    """
    cpu_before = proc_cpu_seconds(server.pid)
    steal_before = steal_seconds()
    wall_before = time.monotonic()
    try:
        result = run_loadgen(
            scenario,
            lines,
            port,
            payload,
            sink,
            settings.window,
            settings.timeout,
            settings.loadgen_cpus(),
        )
    except BenchError as e:
        server.check_alive()
        raise BenchError(
            f"{scenario.name} against {server.server}: {e}; see {server.log_path}"
        ) from None
    cpu = proc_cpu_seconds(server.pid) - cpu_before
    stolen = steal_seconds() - steal_before
    wall = time.monotonic() - wall_before
    server.check_alive()
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
    settings: Settings, mode: str, payload: Path
) -> tuple[list[Measurement], list[ServerReport]]:
    """
    Start one server of each kind in C{mode}, warm them up, run the
    mode's scenarios in alternating rounds, and stop them.
    """
    scenarios = [s for s in settings.scenarios if s.mode == mode]
    measurements: list[Measurement] = []
    reports: list[ServerReport] = []
    with ExitStack() as stack:
        running: list[tuple[ServerProcess, int, Path]] = []
        for label in settings.servers:
            kind = settings.candidate if label == LINESERVER else BASELINE
            port = free_port()
            sink = settings.workdir / f"{label}-{mode}.log"
            sink.touch()
            server = ServerProcess(
                label,
                mode,
                server_command(kind, mode, port, sink),
                RESULTS / "logs" / f"{label}-{mode}.log",
                settings.server_cpus(),
            )

            def stop(server: ServerProcess = server) -> None:
                report = server.stop()
                if report is not None:
                    reports.append(report)

            stack.callback(stop)
            server.start(port)
            running.append((server, port, sink))
        for scenario in scenarios:
            warmup = max(scenario.connections, scenario.lines // 10)
            for server, port, sink in running:
                measure(settings, scenario, server, port, sink, payload, 0, warmup)
        for round_number in range(1, settings.rounds + 1):
            for scenario in scenarios:
                order = running if round_number % 2 else running[::-1]
                for server, port, sink in order:
                    m = measure(
                        settings,
                        scenario,
                        server,
                        port,
                        sink,
                        payload,
                        round_number,
                        scenario.lines,
                    )
                    measurements.append(m)
                    print(
                        f"  round {round_number}/{settings.rounds} "
                        f"{scenario.name:8} {server.server:10} "
                        f"{m.lines_per_second:>12,.0f} lines/s "
                        f"{m.megabytes_per_second:7.1f} MB/s "
                        f"(server CPU {m.server_cpu_seconds / m.seconds:4.0%}, "
                        f"loadgen CPU {m.loadgen_cpu_seconds / m.seconds:4.0%}, "
                        f"steal {m.steal:3.0%})",
                        flush=True,
                    )
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
        cpu_microseconds_per_line=statistics.median(
            m.server_cpu_seconds / m.lines * 1e6 for m in rounds
        ),
        rounds=rates,
    )


def paired_ratios(measurements: list[Measurement], scenario: str) -> list[float]:
    """
    lineserver over baseline for each round: the two ran seconds apart,
    so each ratio saw about the same machine.
    """
    by_round: dict[int, dict[str, float]] = {}
    for m in measurements:
        if m.scenario == scenario:
            by_round.setdefault(m.round, {})[m.server] = m.lines_per_second
    return [
        pair[LINESERVER] / pair[BASELINE]
        for _, pair in sorted(by_round.items())
        if LINESERVER in pair and BASELINE in pair
    ]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def build_rows(
    settings: Settings, measurements: list[Measurement], min_ratio: float
) -> list[dict[str, Any]]:
    rows = []
    for scenario in settings.scenarios:
        base = summarize(measurements, scenario.name, BASELINE)
        cand = summarize(measurements, scenario.name, LINESERVER)
        ratio = (
            cand.best_lines_per_second / base.best_lines_per_second
            if base is not None and cand is not None
            else None
        )
        rows.append(
            {
                "scenario": scenario.name,
                "mode": scenario.mode,
                "connections": scenario.connections,
                "lines": scenario.lines,
                "baseline": None if base is None else asdict(base),
                "lineserver": None if cand is None else asdict(cand),
                "ratio": ratio,
                "paired_ratios": paired_ratios(measurements, scenario.name),
                "meets_min_ratio": None if ratio is None else ratio >= min_ratio,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], min_ratio: float) -> str:
    header = (
        "scenario",
        "baseline lines/s",
        "lineserver lines/s",
        "ratio",
        "paired",
        "base MB/s",
        "ls MB/s",
        "CPU us/line b/ls",
        f">={min_ratio:g}x",
    )
    body = []
    for row in rows:
        base = row["baseline"] or {}
        cand = row["lineserver"] or {}
        paired = row["paired_ratios"]
        body.append(
            (
                row["scenario"],
                _rate(base.get("best_lines_per_second")),
                _rate(cand.get("best_lines_per_second")),
                "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
                f"{min(paired):.1f}-{max(paired):.1f}" if paired else "-",
                _number(base.get("best_megabytes_per_second"), ".1f"),
                _number(cand.get("best_megabytes_per_second"), ".1f"),
                f"{_number(base.get('cpu_microseconds_per_line'), '.2f')}"
                f" / {_number(cand.get('cpu_microseconds_per_line'), '.2f')}",
                {None: "-", True: "yes", False: "NO"}[row["meets_min_ratio"]],
            )
        )
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    lines = [
        " | ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in (header, *body)
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_servers(reports: list[ServerReport]) -> str:
    lines = ["server     | mode | peak RSS MiB | CPU s (whole phase)"]
    for r in sorted(reports, key=lambda r: (r.mode, r.server)):
        lines.append(
            f"{r.server:10} | {r.mode:4} | {r.peak_rss_kib / 1024:12.1f} | "
            f"{r.cpu_seconds:.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="lineserver against a stock Twisted LineReceiver baseline.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quarter of the lines and 3 rounds (about 20 s); for CI",
    )
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 5)")
    parser.add_argument(
        "--scenarios",
        default=",".join(names),
        help=f"comma-separated subset of {','.join(names)}",
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
    parser.add_argument("--min-ratio", type=float, default=3.0)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if any ratio is below --min-ratio",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on CPU 0, the load generator on CPU 1 (needs 2 CPUs)",
    )
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--workdir", type=Path, help="for sink files and payload")
    args = parser.parse_args(argv)
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
        Scenario(
            s.name,
            s.mode,
            s.connections,
            max(s.connections, int(s.lines * args.scale)),
        )
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
        settings = Settings(
            servers=args.servers,
            candidate=args.candidate,
            scenarios=scenarios,
            rounds=args.rounds,
            window=args.window,
            timeout=args.timeout,
            workdir=workdir,
            pin=args.pin,
        )
        payload = workdir / "payload.bin"
        write_payload(str(payload), max(s.lines for s in scenarios))
        try:
            for mode in ("sink", "echo"):
                if any(s.mode == mode for s in scenarios):
                    phase, phase_reports = run_phase(settings, mode, payload)
                    measurements += phase
                    reports += phase_reports
        except BenchError as e:
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 2
    rows = build_rows(settings, measurements, args.min_ratio)
    load_end = os.getloadavg()
    print()
    if args.candidate != LINESERVER:
        print("A/A check: the lineserver column is the baseline server again")
    print(format_table(rows, args.min_ratio))
    print()
    print(format_servers(reports))
    busy = [m for m in measurements if m.loadgen_cpu_seconds > 0.9 * m.seconds]
    if busy:
        print(
            f"\nnote: the load generator was over 90% busy in {len(busy)} rounds; "
            "their figures are lower bounds for the server"
        )
    elapsed = time.monotonic() - started
    print(
        f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} "
        f"{load_end[2]:.2f}; took {elapsed:.0f} s; lines are {LINE_LENGTH} bytes"
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
        },
        "scenarios": rows,
        "servers": [asdict(r) for r in reports],
        "measurements": [asdict(m) for m in measurements],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {args.json}")
    if args.strict and any(row["meets_min_ratio"] is False for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
