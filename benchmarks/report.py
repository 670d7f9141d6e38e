"""C{make bench-report}: docs/performance.md and its plots, from one run.

It runs C{benchmarks.run} with the scenarios the plots need, then the
stalling-sink soak (L{benchmarks.soak}), and writes the page and its PNGs
(matplotlib, the C{bench} extra) with every figure beside the stock
C{LineReceiver} baseline measured in the same run, the machine and the
date:

    python -m benchmarks.report                      # full: ~25 min, 10 min soak
    python -m benchmarks.report --size reduced --soak-seconds 120

C{--size reduced} is C{benchmarks.run --quick} (a quarter of the bulk
lines) and 2 rounds of each scenario; the page says which size ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import run as bench_run
from benchmarks.fleet import CPU_TARGET, MEMORY_TARGET_KIB
from benchmarks.procs import BASELINE, LINESERVER, REPO, BenchError, Harness
from benchmarks.soak import SOAK_CONNECTIONS, SOAK_RATE, TMPFS_BYTES, run_soak

DOCS = REPO / "docs"
IMAGES = DOCS / "img"

CONNECTION_SWEEP = ("sink-1", "sink-4", "sink-16", "sink-64")
LENGTH_SWEEP = ("echo-1", "long-1M", "long-4M", "long-8M")
TLS_ROWS = ("tls-sink-16", "tls-echo-1", "tls-echo-16")
FLEET_SWEEP = ("slow-100", "slow-1k", "slow-10k")

COLOURS = {BASELINE: "#888888", LINESERVER: "#1f77b4"}
LABELS = {BASELINE: "stock LineReceiver", LINESERVER: "lineserver"}


def machine() -> dict[str, str]:
    """
    What the figures were measured on.
    """
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import OpenSSL

    import twisted

    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
    }


def run_benchmarks(size: str, json_path: Path) -> tuple[list[str], dict[str, Any]]:
    """
    C{benchmarks.run} with the report's scenarios.

    @return: its command line and its JSON result.
    """
    scenarios = [
        *CONNECTION_SWEEP,
        *LENGTH_SWEEP,
        *TLS_ROWS,
        *FLEET_SWEEP,
        "latency-echo",
    ]
    argv = ["--scenarios", ",".join(scenarios), "--json", str(json_path)]
    if size == "reduced":
        argv += ["--quick", "--rounds", "2"]
    if bench_run.main(argv) != 0:
        raise BenchError("benchmarks.run failed")
    return argv, json.loads(json_path.read_text())


def _rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["scenario"]: row for row in result["scenarios"]}


def plot_connections(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = _rows(result)
    names = [n for n in CONNECTION_SWEEP if n in rows]
    counts = [rows[n]["connections"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for server in (BASELINE, LINESERVER):
        rates = [rows[n][server]["median_lines_per_second"] / 1e6 for n in names]
        ax.plot(counts, rates, "o-", color=COLOURS[server], label=LABELS[server])
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("connections (bulk senders, file sink)")
    ax.set_ylabel("million lines/s (90-byte lines)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def length_points(
    result: dict[str, Any], server: str
) -> list[tuple[int, float, float]]:
    """
    @return: (line bytes, lines/s, MiB/s) of the echo over one
        connection: 90-byte lines (C{echo-1}) and the long lines.
    """
    points = []
    rows = _rows(result)
    if "echo-1" in rows:
        rate = rows["echo-1"][server]["median_lines_per_second"]
        points.append((90, rate, rate * 90 / (1 << 20)))
    for row in result["long_lines"]["scenarios"]:
        mib = row[server]["median_mib_per_second"]
        size = row["line_bytes"]
        points.append((size, mib * (1 << 20) / size, mib))
    return sorted(points)


def plot_lengths(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for server in (BASELINE, LINESERVER):
        points = length_points(result, server)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "o-",
            color=COLOURS[server],
            label=LABELS[server],
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("line length, bytes (echo, one connection)")
    ax.set_ylabel("lines/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fleet_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = result["many_slow_clients"]["scenarios"]
    return sorted(rows, key=lambda row: int(row["connections"]))


def plot_fleet(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = fleet_rows(result)
    counts = [row["connections"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for server in (BASELINE, LINESERVER):
        left.plot(
            counts,
            [row[server]["cpu_us_per_line"] for row in rows],
            "o-",
            color=COLOURS[server],
            label=LABELS[server],
        )
        right.plot(
            counts,
            [row[server]["idle_kib_per_connection"] for row in rows],
            "o-",
            color=COLOURS[server],
            label=LABELS[server],
        )
    for ax, key in ((left, "cpu_us_per_line"), (right, "idle_kib_per_connection")):
        floors = [(row.get("floor") or {}).get(key) for row in rows]
        if rows and all(floor is not None for floor in floors):
            ax.plot(
                counts,
                floors,
                "o:",
                color="#2ca02c",
                label="Twisted floor (bare Protocol, drops its reads)",
            )
    right.axhline(MEMORY_TARGET_KIB, color="#d62728", ls="--", lw=1, label="target")
    for ax, label in (
        (left, "server CPU µs per line"),
        (right, "KiB per idle connection"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("connections, one 30-byte line/s each")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["latency"]["scenarios"]
    keys = ("p50_us", "p90_us", "p99_us", "p999_us")
    names = ("p50", "p90", "p99", "p99.9")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for row in rows[:1]:
        for k, server in enumerate((BASELINE, LINESERVER)):
            values = [row[server][key] / 1000 for key in keys]
            ax.bar(
                [i + (k - 0.5) * width for i in range(len(keys))],
                values,
                width,
                color=COLOURS[server],
                label=LABELS[server],
            )
        ax.set_title(
            f"echo round trip, {row['connections']} connections, "
            f"{row['rate']:,.0f} lines/s",
            fontsize=10,
        )
    ax.set_xticks(range(len(keys)), names)
    ax.set_ylabel("milliseconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_soak(soak: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for series in soak:
        server = series["server"]
        ax.plot(
            series["seconds"],
            [kib / 1024 for kib in series["rss_kib"]],
            color=COLOURS[server],
            label=LABELS[server],
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_page(
    out: Path,
    images: Path,
    size: str,
    commands: dict[str, str],
    facts: dict[str, str],
    result: dict[str, Any],
    soak: list[dict[str, Any]],
    soak_seconds: float,
    stall_period: float,
    started: str,
) -> None:
    rows = _rows(result)
    rel = os.path.relpath(images, out.parent)
    lines = [
        "# Performance",
        "",
        "Every figure here was measured in one run of `make bench-report`",
        "(`python -m benchmarks.report`), lineserver beside a stock Twisted",
        "`LineReceiver` server (`benchmarks/baseline_server.py`) measured in the",
        "same run on the same machine; absolute numbers move with the machine,",
        "the comparison is what holds. `benchmarks/README.md` (in the repository)",
        "says what each scenario does.",
        "",
        f"- Run: {started}, size **{size}**"
        + (
            " (`--quick`: a quarter of the bulk lines, 2 rounds of each"
            " scenario; the full report, `make bench-report`, runs 5 rounds"
            " (3 of the fleets) of every line count)."
            if size == "reduced"
            else " (5 rounds, 3 of the fleets)."
        ),
        f"- Commands: `{commands['report']}`, which ran `{commands['run']}` "
        "and the soak.",
        f"- Machine: {facts['cores']} cores ({facts['cpu']}), shared with the load "
        f"generator and other work; kernel {facts['kernel']}; Python "
        f"{facts['python']}; Twisted {facts['twisted']}; pyOpenSSL "
        f"{facts['pyopenssl']}, {facts['openssl']}.",
        f"- Load average {result['machine']['load_average_start'][0]:.2f} at the "
        f"start, {result['machine']['load_average_end'][0]:.2f} at the end of the "
        "benchmark run.",
        "",
        "## Lines per second against connections",
        "",
        f"![lines/s against connections]({rel}/perf-connections.png)",
        "",
        "| connections | stock lines/s | lineserver lines/s | ratio (paired median) |",
        "| --- | --- | --- | --- |",
    ]
    for name in CONNECTION_SWEEP:
        if name in rows:
            row = rows[name]
            lines.append(
                f"| {row['connections']} | "
                f"{row[BASELINE]['median_lines_per_second']:,.0f} | "
                f"{row[LINESERVER]['median_lines_per_second']:,.0f} | "
                f"{_f(row['ratio'], '.2f')}x |"
            )
    lines += [
        "",
        "90-byte lines sent as fast as the server takes them into a file sink",
        "(`sink-N` scenarios).",
        "",
        "## Lines per second against line length",
        "",
        f"![lines/s against line length]({rel}/perf-line-length.png)",
        "",
        "| line length | stock lines/s | "
        "lineserver lines/s | stock MiB/s | lineserver MiB/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    base_points = length_points(result, BASELINE)
    mine_points = length_points(result, LINESERVER)
    for b, m in zip(base_points, mine_points, strict=True):
        lines.append(
            f"| {b[0]:,} B | {_rate(b[1])} | {_rate(m[1])} | {b[2]:.1f} | {m[2]:.1f} |"
        )
    lines += [
        "",
        "Echo over one connection: 90-byte lines with up to 1000 in flight",
        "(`echo-1`), and lines of 1 to 8 MiB with up to 2 in flight, both",
        "servers with a 16 MiB line limit (`long-*`). Stock `LineReceiver`",
        "re-splits its whole buffer on every read, so its rate falls",
        "quadratically with the line length.",
        "",
        "## Many slow clients: CPU per line and memory per connection",
        "",
        f"![CPU per line and memory per connection]({rel}/perf-fleet.png)",
        "",
        "| connections | CPU µs/line stock | lineserver | "
        "ratio | Twisted floor | floor/stock | KiB/idle conn stock | lineserver |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in fleet_rows(result):
        b, m = row[BASELINE], row[LINESERVER]
        floor = row.get("floor") or {}
        lines.append(
            f"| {row['connections']:,} | {b['cpu_us_per_line']:.1f} | "
            f"{m['cpu_us_per_line']:.1f} | {_f(row['cpu_ratio'], '.2f')}x | "
            f"{_f(floor.get('cpu_us_per_line'), '.1f')} | "
            f"{_f(row.get('floor_cpu_ratio'), '.2f')}x | "
            f"{b['idle_kib_per_connection']:.2f} | {m['idle_kib_per_connection']:.2f} |"
        )
    guards = " ".join(result["many_slow_clients"]["scenarios"][0]["guards"])
    lines += [
        "",
        "N connections each send one 30-byte line a second for 5 seconds into a",
        "file sink; the CPU is the server process's own (user + system, all",
        "threads, from `/proc`) over the sending phase, per line; the memory is",
        "its RSS growth from before the fleet connected to the fleet connected",
        "and idle, per connection; a fresh server per round. lineserver runs with",
        f"every guard on: `{guards}`, the default line limit, watermarks and TCP",
        f"keepalive. The issue's targets: CPU per line at most {CPU_TARGET:g}x",
        f"stock, at most {MEMORY_TARGET_KIB:g} KiB per idle connection. The",
        "Twisted floor is a bare `Protocol` that drops what it reads, run in",
        "the same rounds: what Twisted's reactor and TCP transport alone cost",
        "per read, below which no server on them goes. Where",
        "lineserver's time and memory go per read and per connection, from a",
        'profile: `benchmarks/README.md`, section "Many slow clients: where',
        'the CPU and the memory go".',
        "",
        "## Echo latency",
        "",
        f"![latency percentiles]({rel}/perf-latency.png)",
        "",
        "| percentile | stock µs | lineserver µs |",
        "| --- | --- | --- |",
    ]
    for row in result["latency"]["scenarios"][:1]:
        for key, name in (
            ("p50_us", "p50"),
            ("p90_us", "p90"),
            ("p99_us", "p99"),
            ("p999_us", "p99.9"),
        ):
            lines.append(
                f"| {name} | {row[BASELINE][key]:,.0f} | {row[LINESERVER][key]:,.0f} |"
            )
        lines += [
            "",
            f"{row['connections']} connections share an open-loop load of "
            f"{row['rate']:,.0f} lines/s for {row['seconds']:g} s (after 1 s not",
            "counted); latency is from the `send` of a line to the `recv` that",
            "returned its echo, on the client's clock (`benchmarks/latency.py`),",
            "median of each percentile over the rounds (each round's figures are",
            "in the run's progress lines and JSON). The tail moves a lot from",
            "round to round on a 2-core machine shared with the client.",
        ]
    lines += [
        "",
        "## TLS",
        "",
        "| scenario | stock over TLS lines/s | "
        "lineserver over TLS | lineserver plain | TLS/plain |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in TLS_ROWS:
        if name in rows:
            row = rows[name]
            lines.append(
                f"| {name} | {row[BASELINE]['median_lines_per_second']:,.0f} | "
                f"{row[LINESERVER]['median_lines_per_second']:,.0f} | "
                f"{row['lineserver_plain']['median_lines_per_second']:,.0f} | "
                f"{_f(row['tls_over_plain'], '.2f')}x |"
            )
    lines += [
        "",
        "## RSS over a soak with a stalling sink",
        "",
        f"![RSS over the soak]({rel}/perf-soak.png)",
        "",
        f"Both servers ran side by side for {soak_seconds:g} s in sink mode, each",
        f"fed {SOAK_RATE:,} 90-byte lines a second over {SOAK_CONNECTIONS}",
        "connections by its own client (`benchmarks/soak.py`), each with its",
        f"sink file alone on a {TMPFS_BYTES >> 20} MiB tmpfs: it fills within",
        f"seconds, and every {stall_period:g} s the file is emptied (as",
        "`copytruncate` would), so the sink alternates between writing and",
        "stalling on a full disk.",
        "",
        "| server | RSS start MiB | RSS peak MiB | "
        "RSS end MiB | lines sent | not taken | reconnects |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for series in soak:
        rss = series["rss_kib"]
        client = series["client"]
        lines.append(
            f"| {LABELS[series['server']]} | {rss[0] / 1024:.1f} | "
            f"{max(rss) / 1024:.1f} | {rss[-1] / 1024:.1f} | {client['sent']:,} | "
            f"{client['dropped']:,} | {client['reconnects']:,} |"
        )
    lines += [
        "",
        "lineserver holds what it has while the disk is full, pauses its",
        "clients at the high watermark (their lines then wait in the kernel:",
        '"not taken" counts lines the client\'s socket would not accept) and',
        "writes them once there is room; the stock server's `write` raises on",
        "the full disk, which drops the connection and its lines (the client",
        "reconnects).",
        "",
    ]
    out.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Write docs/performance.md and its plots from one benchmark run.",
    )
    parser.add_argument("--size", choices=["reduced", "full"], default="full")
    parser.add_argument(
        "--soak-seconds", type=float, default=600.0, help="default 600 (10 min)"
    )
    parser.add_argument("--stall-period", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=DOCS / "performance.md")
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--json", type=Path, default=bench_run.RESULTS / "report.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report_command = "python -m benchmarks.report " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    try:
        run_argv, result = run_benchmarks(args.size, args.json)
        print(f"soak: {args.soak_seconds:g} s", flush=True)
        harness = Harness(
            servers=[BASELINE, LINESERVER],
            candidate=LINESERVER,
            rounds=1,
            timeout=60.0,
            logs=bench_run.RESULTS / "logs",
        )
        soak = [
            asdict(s) for s in run_soak(harness, args.soak_seconds, args.stall_period)
        ]
    except (BenchError, subprocess.CalledProcessError) as e:
        print(f"report failed: {e}", file=sys.stderr)
        return 2
    result["soak"] = soak
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.images.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    plot_connections(result, args.images / "perf-connections.png")
    plot_lengths(result, args.images / "perf-line-length.png")
    plot_fleet(result, args.images / "perf-fleet.png")
    plot_latency(result, args.images / "perf-latency.png")
    plot_soak(soak, args.images / "perf-soak.png")
    write_page(
        args.out,
        args.images,
        args.size,
        {
            "report": report_command.strip(),
            "run": "python -m benchmarks.run " + shlex.join(run_argv),
        },
        machine(),
        result,
        soak,
        args.soak_seconds,
        args.stall_period,
        started,
    )
    print(f"wrote {args.out} and its plots in {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
