"""Sink throughput through the disk spool, beside the plain file sink.

Each round starts real C{twistd lineserver} processes one after the other
and sends the same payload (L{benchmarks.loadgen.build_payload}) on one
connection to each:

  - C{file}: C{--sink file:...}, the baseline of the rows below;
  - C{spool pass-through}: the same with C{--spool}, the sink keeping up
    (batches go straight to it: what the wrapper costs);
  - C{spool in}: with C{--spool} and the sink down (its path a symlink to
    C{/proc/self/clear_refs}, which refuses every line): every batch is
    appended and fsynced to the spool, timed until the spool holds the
    whole payload;
  - C{spool out}: then the symlink is pointed at a regular file, and the
    replay is timed from its first line in the file until the file holds
    the whole payload (the retry delay before it is not throughput).

Each figure is lines per second, until the lines are where they are
promised (in the file, or fsynced in the spool); the ratio is to the
plain file sink in the same round.  The headline is the median round.

    python -m benchmarks.spool                 # 200 000 lines, 3 rounds
    python -m benchmarks.spool --lines 50000 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import LINE_LENGTH, build_payload
from benchmarks.procs import HOST, BenchError, free_port, twistd_path
from lineserver.spool import MAGIC, SUFFIX, decode

SCENARIO = "spool"
ROWS = ("file", "spool pass-through", "spool in", "spool out")


@dataclass
class SpoolFigures:
    """
    Lines per second of each row, one list entry per round.
    """

    lines: int
    rates: dict[str, list[float]] = field(default_factory=dict)

    def add(self, row: str, seconds: float) -> None:
        self.rates.setdefault(row, []).append(self.lines / seconds)


def _wait(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _spooled_lines(directory: Path) -> int:
    count = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        for _, _, lines in decode(path.read_bytes(), len(MAGIC)).records:
            count += len(lines)
    return count


class _Server:
    def __init__(self, workdir: Path, port: int, *options: str) -> None:
        self.log = workdir / f"server-{port}.log"
        self.port = port
        self.process = subprocess.Popen(
            [
                twistd_path(),
                "-n",
                "--pidfile=",
                f"--logfile={self.log}",
                "lineserver",
                "--port",
                f"tcp:{port}:interface={HOST}",
                *options,
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(
            lambda: self.log.exists() and "listening on" in self.log.read_text(),
            "the server to listen",
            30,
        )

    def send(self, payload: bytes) -> None:
        with socket.create_connection((HOST, self.port), 10) as sock:
            sock.sendall(payload)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _timed_file(workdir: Path, payload: bytes, spool: bool) -> float:
    target = workdir / "plain.log"
    target.unlink(missing_ok=True)
    options = ["--sink", f"file:{target}"]
    if spool:
        options += ["--spool", str(workdir / "spool-through")]
    server = _Server(workdir, free_port(), *options)
    try:
        started = time.monotonic()
        server.send(payload)
        _wait(lambda: _size(target) == len(payload), "the file", 300)
        return time.monotonic() - started
    finally:
        server.stop()


def _timed_spool(workdir: Path, payload: bytes, lines: int) -> tuple[float, float]:
    link = workdir / "down.log"
    working = workdir / "working.log"
    spool = workdir / "spool"
    for path in (link, working):
        path.unlink(missing_ok=True)
    os.symlink("/proc/self/clear_refs", link)
    server = _Server(
        workdir, free_port(), "--sink", f"file:{link}", "--spool", str(spool)
    )
    try:
        started = time.monotonic()
        server.send(payload)
        _wait(lambda: _spooled_lines(spool) == lines, "the spool", 300)
        spooled = time.monotonic() - started
        os.symlink(working, workdir / "next.log")
        os.replace(workdir / "next.log", link)
        # Timed from the first replayed line: before it, the spool waits
        # out its retry delay (up to 6 s), which is not throughput.
        _wait(lambda: _size(working) > 0, "the sink to come back", 30)
        started = time.monotonic()
        _wait(lambda: _size(working) == len(payload), "the replay", 300)
        replayed = time.monotonic() - started
        _wait(lambda: not list(spool.iterdir()), "an empty spool", 30)
        return spooled, replayed
    finally:
        server.stop()


def run_spool_phase(lines: int, rounds: int, workdir: Path) -> SpoolFigures:
    """
    Measure every row, C{rounds} times, alternating which goes first.
    """
    payload = build_payload(lines)
    figures = SpoolFigures(lines)
    for number in range(rounds):
        order = [False, True] if number % 2 == 0 else [True, False]
        for spool in order:
            seconds = _timed_file(workdir, payload, spool)
            figures.add("spool pass-through" if spool else "file", seconds)
        spooled, replayed = _timed_spool(workdir, payload, lines)
        figures.add("spool in", spooled)
        figures.add("spool out", replayed)
        print(f"  spool round {number + 1}/{rounds} done", flush=True)
    return figures


def format_spool_table(figures: SpoolFigures) -> str:
    """
    One row per way through, median lines/s and the median of the
    per-round ratios to the plain file sink.
    """
    base = figures.rates.get("file", [])
    out = [
        f"sink throughput through the spool ({figures.lines} lines of "
        f"{LINE_LENGTH} bytes, one connection, median of "
        f"{len(base)} round(s))",
        f"{'path':<20} {'lines/s':>12} {'x file':>8}",
    ]
    for row in ROWS:
        rates = figures.rates.get(row, [])
        if not rates:
            continue
        ratios = [rate / b for rate, b in zip(rates, base, strict=False)]
        out.append(
            f"{row:<20} {statistics.median(rates):>12,.0f} "
            f"{statistics.median(ratios):>8.2f}"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spool")
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="lineserver-bench-spool-") as made:
        try:
            figures = run_spool_phase(args.lines, args.rounds, Path(made))
        except BenchError as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 2
    print(format_spool_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
