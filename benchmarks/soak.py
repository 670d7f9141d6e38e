"""A soak under load with a stalling sink: the servers' memory over time.

A sink that stalls (a full disk) must not make a server's memory grow
without bound: lineserver holds the lines it has, pauses its clients once
its queue reaches the high watermark, and resumes when the disk has room.
This phase runs both servers side by side, each with its sink file alone
on a small tmpfs (L{TMPFS_BYTES}, mounted here: it needs root, as the
test suite's disk-full tests do) and each fed by its own client process at
a steady rate.  The disk fills within seconds; every C{stall_period}
seconds the files are emptied (C{truncate}, as C{copytruncate} would), so
the sink alternates between writing and stalling.  The servers' RSS is read
every second.

The client (C{python -m benchmarks.soak --port P ...}) sends C{--rate}
90-byte lines a second over C{--connections} connections, dropping (and
counting) a line a socket will not take, and reconnecting a connection the
server closed (the baseline drops a connection whose C{write} fails).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import build_payload
from benchmarks.procs import (
    LINESERVER,
    REPO,
    BenchError,
    Harness,
    ServerProcess,
    client_main,
    client_parser,
    free_port,
    proc_cpu_seconds,
    proc_status_kib,
    server_command,
)

#: Each server's sink filesystem: full in seconds at the soak's rate.
TMPFS_BYTES = 4 << 20

#: Lines per second and connections of each server's client.
SOAK_RATE = 5000
SOAK_CONNECTIONS = 100


#: Lines a client sends in one go at most.
MAX_BURST = 200


class SoakError(Exception):
    """
    The soak client could not keep connecting.
    """


@dataclass
class SoakClientResult:
    sent: int
    dropped: int
    reconnects: int
    seconds: float
    cpu_seconds: float


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setblocking(False)
    return sock


def run_client_loop(
    host: str, port: int, connections: int, rate: float, seconds: float
) -> SoakClientResult:
    cpu_start = time.process_time()
    lines = build_payload(1000)
    line_length = len(lines) // 1000
    socks = [_connect(host, port) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, i)
    sent = dropped = reconnects = 0
    start = time.monotonic()
    turn = 0
    try:
        while (now := time.monotonic()) < start + seconds:
            # At most a tick's worth at once: a client that fell behind
            # (reconnecting to a server that keeps dropping it) must still
            # stop on time.
            due = min(int((now - start) * rate) - sent - dropped, MAX_BURST)
            for _ in range(due):
                i = turn
                turn = (turn + 1) % connections
                k = (sent + dropped) % 1000
                try:
                    socks[i].send(lines[k * line_length : (k + 1) * line_length])
                    sent += 1
                except BlockingIOError:
                    dropped += 1
                except OSError:
                    dropped += 1
                    selector.unregister(socks[i])
                    socks[i].close()
                    socks[i] = _connect(host, port)
                    selector.register(socks[i], selectors.EVENT_READ, i)
                    reconnects += 1
            for key, _ in selector.select(0.005):
                i = key.data
                try:
                    data = socks[i].recv(65536)
                except (BlockingIOError, ConnectionError):
                    data = b"" if socks[i].fileno() < 0 else b"x"
                if not data:
                    selector.unregister(socks[i])
                    socks[i].close()
                    socks[i] = _connect(host, port)
                    selector.register(socks[i], selectors.EVENT_READ, i)
                    reconnects += 1
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return SoakClientResult(
        sent=sent,
        dropped=dropped,
        reconnects=reconnects,
        seconds=time.monotonic() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )


# -- the phase ------------------------------------------------------------------


@dataclass
class SoakSeries:
    """
    One server's soak: RSS (KiB) and CPU seconds, sampled every second.
    """

    server: str
    command: list[str]
    seconds: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    sink_bytes: list[int] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)


def _mount(directory: Path) -> None:
    if os.geteuid() != 0:
        raise BenchError(
            "the soak mounts a small tmpfs for its stalling sink: run as root"
        )
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(directory)],
        check=True,
    )


def run_soak(
    harness: Harness, seconds: float, stall_period: float = 30.0
) -> list[SoakSeries]:
    """
    Both servers in sink mode, each on its own full-in-seconds tmpfs and
    fed by its own soak client for C{seconds}; RSS read every second;
    the sink files emptied every C{stall_period} seconds.
    """
    with tempfile.TemporaryDirectory(prefix="lineserver-soak-") as top:
        mounts = {}
        servers = {}
        series = {}
        clients: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for label in harness.servers:
                directory = Path(top) / label
                directory.mkdir()
                _mount(directory)
                mounts[label] = directory
                sink = directory / "lines.log"
                kind = harness.candidate if label == LINESERVER else harness.baseline
                port = free_port()
                server = ServerProcess(
                    label,
                    "sink",
                    port,
                    server_command(kind, "sink", port, sink),
                    harness.logs / f"{label}-soak.log",
                    harness.server_cpus,
                )
                server.start()
                servers[label] = server
                series[label] = SoakSeries(label, server.command)
            for label, server in servers.items():
                clients[label] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.soak",
                        "--port",
                        str(server.port),
                        "--seconds",
                        str(seconds),
                    ],
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                )
            start = time.monotonic()
            next_empty = start + stall_period
            while any(c.poll() is None for c in clients.values()):
                time.sleep(1.0)
                now = time.monotonic()
                for label, server in servers.items():
                    server.check_alive()
                    s = series[label]
                    s.seconds.append(now - start)
                    s.rss_kib.append(proc_status_kib(server.pid, "VmRSS"))
                    s.cpu_seconds.append(proc_cpu_seconds(server.pid))
                    s.sink_bytes.append(os.path.getsize(mounts[label] / "lines.log"))
                if now >= next_empty:
                    next_empty += stall_period
                    for directory in mounts.values():
                        os.truncate(directory / "lines.log", 0)
                if now > start + seconds + 60:
                    raise BenchError("the soak clients did not finish")
            for label, client in clients.items():
                out, _ = client.communicate()
                if client.returncode != 0:
                    raise BenchError(f"soak client against {label} failed")
                series[label].client = json.loads(out)
        finally:
            for client in clients.values():
                if client.poll() is None:
                    client.kill()
                    client.wait()
            for server in servers.values():
                server.stop()
            for directory in mounts.values():
                subprocess.run(["umount", str(directory)], check=False)
    return list(series.values())


def main(argv: list[str] | None = None) -> int:
    parser = client_parser(
        "python -m benchmarks.soak",
        "A steady load of 90-byte lines that drops what a socket will not take.",
        timeout=0,
    )
    parser.add_argument("--connections", type=int, default=SOAK_CONNECTIONS)
    parser.add_argument("--rate", type=float, default=SOAK_RATE)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return client_main(
        "soak",
        lambda: run_client_loop(
            args.host, args.port, args.connections, args.rate, args.seconds
        ),
        SoakError,
    )


if __name__ == "__main__":
    sys.exit(main())
