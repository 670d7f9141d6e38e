"""C{--workers}: how evenly connections spread, and what a worker costs.

Three measurements, each with real processes:

  - spread: 1,000 short connections (8 clients at a time) to N worker
    processes, counting the connections each worker accepted, for the two
    ways workers can share a port: one listening socket inherited by all
    (what lineserver does) and one C{SO_REUSEPORT} socket per worker.  The
    workers here are minimal Twisted processes (accept, count, close) so
    that only the kernel's and the reactor's way of handing out
    connections is measured; then the same count for C{twistd lineserver
    --workers N} itself, from its log.
  - CPU per line: C{twistd lineserver --mode echo --workers W} for W = 1
    and 2, driven by L{benchmarks.loadgen}: bulk (16 connections, 1,000
    lines in flight each) and chatty (64 connections, one line in flight
    each, so one line per read: the fleet's case); the CPU seconds of the
    parent and every worker, over the lines echoed.  It does
    not depend on how many cores there are, so it is the honest figure on a
    machine too small to show scaling.
  - throughput, with the load generator pinned (C{taskset}) to the last
    core and one worker pinned to the others, beside two unpinned workers.

    python -m benchmarks.workers                # about a minute
    python -m benchmarks.workers --quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import REPO, free_port, proc_cpu_seconds, twistd_path

HOST = "127.0.0.1"


# -- spread -----------------------------------------------------------------


def _spread_worker(fd: int) -> None:
    """
    A minimal worker: adopt the listening socket C{fd}, accept and close
    connections, print how many on SIGTERM.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    accepted = [0]

    class Count(Protocol):
        def connectionMade(self) -> None:
            accepted[0] += 1
            assert self.transport is not None
            self.transport.loseConnection()

    family = socket.socket(fileno=os.dup(fd)).family
    reactor.adoptStreamPort(fd, family, Factory.forProtocol(Count))  # type: ignore[attr-defined]

    def report() -> None:
        print(accepted[0], flush=True)

    reactor.addSystemEventTrigger("before", "shutdown", report)  # type: ignore[attr-defined]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


def _listening(reuseport: bool, port: int) -> socket.socket:
    skt = socket.socket()
    skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    skt.bind((HOST, port))
    skt.listen(1024)
    skt.setblocking(False)
    return skt


def _clients(port: int, connections: int, concurrency: int) -> None:
    """
    C{connections} short connections, C{concurrency} at a time: connect,
    send a line, wait for the close.
    """
    per_thread = connections // concurrency

    def run() -> None:
        for _ in range(per_thread):
            with socket.create_connection((HOST, port), timeout=10) as client:
                client.sendall(b"x\n")
                client.recv(16)

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def measure_spread(
    mode: str, workers: int, connections: int, concurrency: int = 8
) -> list[int]:
    """
    @param mode: C{"shared"} (one inherited socket) or C{"reuseport"}.
    @return: connections accepted by each worker.
    """
    port = free_port()
    sockets = [_listening(mode == "reuseport", port)]
    if mode == "reuseport":
        sockets += [_listening(True, port) for _ in range(workers - 1)]
    procs = []
    for index in range(workers):
        skt = sockets[index % len(sockets)]
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "benchmarks.workers", "--spread-worker"),
                    str(skt.fileno()),
                ],
                pass_fds=[skt.fileno()],
                stdout=subprocess.PIPE,
                cwd=REPO,
                text=True,
            )
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            proc.stdout.readline()
        _clients(port, connections, concurrency)
        time.sleep(0.5)
        counts = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
            counts.append(int(out.split()[-1]))
        return counts
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for skt in sockets:
            skt.close()


class Lineserver:
    """
    C{twistd -n lineserver --workers N}, echo mode, quiet or not.
    """

    def __init__(
        self, directory: Path, workers: int, *extra: str, pin: str | None = None
    ) -> None:
        self.port = free_port()
        self.log = directory / f"workers-{workers}-{self.port}.log"
        command = [
            twistd_path(),
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "lineserver",
            "--port",
            f"tcp:{self.port}:interface={HOST}",
            "--mode",
            "echo",
            "--workers",
            str(workers),
            *extra,
        ]
        if pin is not None:
            command = ["taskset", "-c", pin, *command]
        self.workers = workers
        self.proc = subprocess.Popen(command, cwd=directory)
        deadline = time.monotonic() + 60
        while self.text().count("listening on ") < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lineserver did not start:\n{self.text()[-2000:]}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def pids(self) -> list[int]:
        """
        @return: the parent and its workers (they are its children).
        """
        try:
            children = Path(
                f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
            ).read_text()
        except OSError:
            children = ""
        return [self.proc.pid, *(int(p) for p in children.split())]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def per_worker_closes(self) -> list[int]:
        counts: dict[str, int] = {}
        for match in re.finditer(r"worker (\d+) \[\d+\]: .*closed", self.text()):
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
        return [counts.get(str(i), 0) for i in range(self.workers)]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def lineserver_spread(
    directory: Path, workers: int, connections: int, mode: str
) -> list[int]:
    server = Lineserver(directory, workers, "--worker-sockets", mode)
    try:
        _clients(server.port, connections, 8)
        deadline = time.monotonic() + 20
        while sum(server.per_worker_closes()) < connections:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return server.per_worker_closes()
    finally:
        server.stop()


# -- CPU per line and throughput ---------------------------------------------


@dataclass(frozen=True)
class Echo:
    """
    One echo scenario of L{benchmarks.loadgen}: C{window} lines in flight
    per connection (1: every line is its own read, the fleet's case).
    """

    name: str
    connections: int
    lines: int
    window: int


ECHO = (Echo("bulk", 16, 3_000_000, 1000), Echo("chatty", 64, 60_000, 1))
QUICK_ECHO = (Echo("bulk", 16, 600_000, 1000), Echo("chatty", 64, 15_000, 1))


def echo_run(
    directory: Path,
    scenario: Echo,
    workers: int,
    server_cpus: str | None = None,
    client_cpus: str | None = None,
) -> dict[str, Any]:
    """
    Echo the scenario's lines; CPU of the whole server (parent and workers).
    """
    server = Lineserver(directory, workers, "--quiet-connections", pin=server_cpus)
    try:
        command = [sys.executable, "-m", "benchmarks.loadgen", "--port"]
        command += [str(server.port), "--mode", "echo"]
        command += ["--connections", str(scenario.connections)]
        command += ["--lines", str(scenario.lines), "--window", str(scenario.window)]
        command += ["--payload", str(directory / "payload"), "--timeout", "240"]
        if client_cpus is not None:
            command = ["taskset", "-c", client_cpus, *command]
        before = server.cpu_seconds()
        out = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=300, check=True
        ).stdout
        cpu = server.cpu_seconds() - before
        result = json.loads(out)
        return {
            "scenario": scenario.name,
            "workers": workers,
            "lines_per_second": result["lines_per_second"],
            "cpu_us_per_line": cpu / scenario.lines * 1e6,
            "server_cpus": server_cpus or "any",
            "client_cpus": client_cpus or "any",
        }
    finally:
        server.stop()


def echo_phase(directory: Path, rounds: int, scenarios: Sequence[Echo]) -> None:
    """
    Per scenario and round: 1 worker, 2 workers, and (with 2 cores or more)
    1 worker pinned apart from the load generator; medians printed.
    """
    cores = len(os.sched_getaffinity(0))
    setups: list[tuple[int, str | None, str | None]] = [
        (1, None, None),
        (2, None, None),
    ]
    if cores >= 2:
        rest = f"0-{cores - 2}" if cores > 2 else "0"
        setups.append((1, rest, str(cores - 1)))
    for scenario in scenarios:
        print(
            f"\n## echo {scenario.name}: {scenario.connections} connections, "
            f"{scenario.lines} lines of 90 bytes, window {scenario.window}, "
            f"median of {rounds}"
        )
        results: dict[tuple[int, str | None, str | None], list[dict[str, Any]]] = {}
        for _ in range(rounds):
            for setup in setups:
                run = echo_run(directory, scenario, *setup)
                results.setdefault(setup, []).append(run)
        for (workers, server_cpus, client_cpus), runs in results.items():
            rate = statistics.median(r["lines_per_second"] for r in runs)
            cpu = statistics.median(r["cpu_us_per_line"] for r in runs)
            print(
                f"workers {workers}  server cpus {server_cpus or 'any':>4}  "
                f"loadgen cpus {client_cpus or 'any':>4}  "
                f"{rate / 1e3:8.1f} k lines/s  {cpu:6.2f} us CPU/line"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spread-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.spread_worker is not None:
        _spread_worker(args.spread_worker)
        return 0
    cores = len(os.sched_getaffinity(0))
    connections = 304 if args.quick else 1000
    rounds = 1 if args.quick else args.rounds
    print(f"# workers benchmark, {cores} core(s), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"\n## spread of {connections} short connections over 2 workers")
    for mode in ("shared", "reuseport"):
        for _ in range(rounds):
            counts = measure_spread(mode, 2, connections)
            skew = max(counts) / (sum(counts) / len(counts))
            print(f"{mode:>10}: {counts}  (max/mean {skew:.2f})")
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        directory = Path(tmp)
        for mode in ("shared", "reuseport"):
            for _ in range(rounds):
                counts = lineserver_spread(directory, 2, connections, mode)
                print(f"lineserver --worker-sockets {mode}: {counts}  (from its log)")
        echo_phase(directory, rounds, QUICK_ECHO if args.quick else ECHO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
