"""Memory per idle connection, by allocation site: a diagnostic, not a benchmark.

RSS says how much an idle connection costs; this says where.  It runs the
server under C{tracemalloc} in its own process (a child that starts
C{tracemalloc}, then calls twistd's C{run()} with the fleet's guards, or
the stock C{LineReceiver} server with C{--server stock}), opens
C{--connections} idle connections over loopback sockets, and compares a
snapshot taken before with one taken after (each on C{SIGUSR2}, after a
C{gc.collect()}, pickled into a temporary directory).  It prints the
bytes per connection by allocation site, biggest first, and the total
over the connection count; beside them, from a first server run without
C{tracemalloc}, the RSS growth per connection and the seconds the fleet
took to be accepted::

    python -m benchmarks.conn_memory --connections 2000
    python -m benchmarks.conn_memory --connections 2000 --frames 4 --key traceback
    python -m benchmarks.conn_memory --server stock
    python -m benchmarks.conn_memory -- --ack     # more lineserver options

C{tracemalloc} counts the Python heap only (not the kernel's socket
buffers, nor pymalloc's free pools) and slows the server down; the RSS
line is the cost, the table its split.  Not part of C{make bench}.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import socket
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from benchmarks.fleet import BACKLOG, GUARDS, open_fleet, server_rss_kib
from benchmarks.procs import (
    BASELINE,
    HOST,
    LINESERVER,
    ServerProcess,
    free_port,
    raise_nofile,
    server_command,
)

#: The signal on which the child writes a snapshot (twistd and lineserver
#: leave it alone; SIGUSR1 reopens the logs).
SNAPSHOT_SIGNAL = signal.SIGUSR2


# -- the child: the server, under tracemalloc ----------------------------------


def serve(
    frames: int, snapshots: Path, command: list[str], checkout: str | None
) -> None:
    """
    Start C{tracemalloc}, then run C{command} (a twistd or stock server
    command line from L{server_command}) in this process; each
    L{SNAPSHOT_SIGNAL} writes C{snapshots/N.snap}, N counting from 0.

    @param checkout: a directory whose C{lineserver} to run instead of
        this tree's (another commit's checkout, to compare).
    """
    if checkout is not None:
        assert "lineserver" not in sys.modules
        sys.path.insert(0, checkout)
    taken = 0

    def snapshot(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        gc.collect()
        path = snapshots / f"{taken}.snap"
        taken += 1
        partial = path.with_suffix(".part")
        tracemalloc.take_snapshot().dump(str(partial))
        partial.rename(path)

    signal.signal(SNAPSHOT_SIGNAL, snapshot)
    if frames:
        tracemalloc.start(frames)
    if command[:2] == [sys.executable, "-m"]:
        # The stock server: python -m benchmarks.baseline_server ...
        from benchmarks.baseline_server import main

        main(command[3:])
        return
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *command[1:]]
    run()


# -- the parent: the fleet and the comparison ----------------------------------


def take_snapshot(
    server: ServerProcess, snapshots: Path, number: int, timeout: float = 120.0
) -> tracemalloc.Snapshot:
    """
    Ask the server for snapshot C{number} and load it (the dump of a big
    heap takes seconds).
    """
    path = snapshots / f"{number}.snap"
    os.kill(server.pid, SNAPSHOT_SIGNAL)
    deadline = time.monotonic() + timeout
    while not path.exists():
        server.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no snapshot from the server in {timeout:.0f} s")
        time.sleep(0.05)
    return tracemalloc.Snapshot.load(str(path))


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_accepted(server: ServerProcess, wanted: int, timeout: float) -> None:
    """
    Wait until the server holds C{wanted} descriptors: it accepted the fleet.
    """
    deadline = time.monotonic() + timeout
    while open_descriptors(server.pid) < wanted:
        server.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the server holds {open_descriptors(server.pid)} descriptors "
                f"after {timeout:.0f} s, not {wanted}"
            )
        time.sleep(0.05)


def site(stat: tracemalloc.StatisticDiff, key: str) -> str:
    """
    @return: where C{stat} was allocated: C{file:line}, the innermost frame
        first (with C{--key traceback}, every frame, joined by C{<}).
    """
    frames = list(stat.traceback)
    if key == "lineno":
        frames = frames[:1]
    return " < ".join(f"{_short(frame.filename)}:{frame.lineno}" for frame in frames)


def _short(filename: str) -> str:
    library = re.search(r"/(site-packages|lib/python3\.\d+)/", filename)
    if library is not None:
        return filename[library.end() :]
    try:
        return str(Path(filename).relative_to(Path.cwd()))
    except ValueError:
        return filename


def report(
    before: tracemalloc.Snapshot,
    after: tracemalloc.Snapshot,
    connections: int,
    key: str,
    top: int,
) -> tuple[list[str], float]:
    """
    @return: the table's lines (bytes and blocks per connection by site,
        biggest growth first) and the total heap growth per connection.
    """
    stats = after.compare_to(before, key)
    total = sum(stat.size_diff for stat in stats)
    lines = [f"{'B/conn':>8} {'blocks/conn':>11}  site"]
    for stat in stats[:top]:
        lines.append(
            f"{stat.size_diff / connections:8.1f} "
            f"{stat.count_diff / connections:11.2f}  {site(stat, key)}"
        )
    return lines, total / connections


def run_fleet(
    args: argparse.Namespace, traced: bool
) -> tuple[int, int, float, list[tracemalloc.Snapshot]]:
    """
    Start a server (under C{tracemalloc} if C{traced}), open the fleet,
    and read its RSS (and snapshots) before and after.

    @return: the RSS before and after in KiB, the seconds the fleet took
        to be accepted, and the two snapshots (none if not C{traced}).
    """
    connections: int = args.connections
    with tempfile.TemporaryDirectory(prefix="conn-memory-") as work:
        directory = Path(work)
        snapshots = directory / "snapshots"
        snapshots.mkdir()
        port = free_port()
        kind = BASELINE if args.server == "stock" else LINESERVER
        command = server_command(
            kind,
            "sink",
            port,
            directory / "lines.log",
            options_for_lineserver=() if kind == BASELINE else (*GUARDS, *args.extra),
        )
        # The fleet's backlog for both servers, as in benchmarks.fleet.
        command[command.index("--port") + 1] += f":backlog={BACKLOG}"
        child = [
            sys.executable,
            "-m",
            "benchmarks.conn_memory",
            "--serve",
            str(snapshots),
            "--frames",
            str(args.frames if traced else 0),
            *(("--checkout", args.checkout) if args.checkout else ()),
            "--",
            *command,
        ]
        server = ServerProcess(
            server=kind,
            mode="sink",
            port=port,
            command=child,
            log_path=directory / "server.log",
            nofile=connections + 200,
        )
        server.start()
        socks: list[socket.socket] = []
        taken: list[tracemalloc.Snapshot] = []
        try:
            time.sleep(args.settle)
            base_descriptors = open_descriptors(server.pid)
            rss_before = server_rss_kib(server.pid)
            if traced:
                taken.append(take_snapshot(server, snapshots, 0))
            started = time.monotonic()
            socks = open_fleet(HOST, port, connections, started + args.timeout)
            wait_accepted(server, base_descriptors + connections, args.timeout)
            accepted = time.monotonic() - started
            time.sleep(args.settle)
            rss_after = server_rss_kib(server.pid)
            if traced:
                taken.append(take_snapshot(server, snapshots, 1))
        finally:
            for sock in socks:
                sock.close()
            server.stop()
    return rss_before, rss_after, accepted, taken


def measure(args: argparse.Namespace) -> int:
    connections: int = args.connections
    raise_nofile(connections + 200)
    # RSS from a server without tracemalloc (its traces cost memory too).
    rss_before, rss_after, plain_accept, _ = run_fleet(args, traced=False)
    _, _, traced_accept, (before, after) = run_fleet(args, traced=True)
    lines, total = report(before, after, connections, args.key, args.top)
    print(
        f"{args.server}: {connections} idle connections "
        f"(tracemalloc, {args.frames} frame(s), by {args.key})"
    )
    print("\n".join(lines))
    print(f"Python heap growth: {total:.0f} B per connection (tracemalloc)")
    print(
        f"RSS growth without tracemalloc: "
        f"{(rss_after - rss_before) / connections:.2f} KiB per connection "
        f"({rss_before} -> {rss_after} KiB)"
    )
    print(f"accepted in {plain_accept:.2f} s ({traced_accept:.2f} s under tracemalloc)")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.conn_memory",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--server",
        choices=("lineserver", "stock"),
        default="lineserver",
        help="lineserver with the fleet's guards, or stock LineReceiver",
    )
    parser.add_argument(
        "--frames", type=int, default=1, help="frames kept per allocation"
    )
    parser.add_argument(
        "--key",
        choices=("lineno", "traceback"),
        default="lineno",
        help="group by the innermost line, or by the whole kept traceback",
    )
    parser.add_argument("--top", type=int, default=25, help="sites listed")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds before each snapshot"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to connect the fleet"
    )
    parser.add_argument(
        "--checkout",
        metavar="DIR",
        help="run the lineserver of this checkout (another commit's) instead",
    )
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="more lineserver options, after --")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve is not None:
        serve(args.frames, Path(args.serve), args.extra, args.checkout)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
