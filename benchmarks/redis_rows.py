"""Lines/s into Redis beside the file sink, and beside redis-benchmark's limit.

One run, on this machine, four rows:

  - C{file}: twistd lineserver with C{--sink file:...}: clients send, and
    the clock stops when the file holds every line (the baseline);
  - C{redis}: the same with C{--sink redis://...} to one redis-server:
    the clock stops when C{XLEN} counts every line;
  - C{redis-cluster}: C{redis+cluster://} to three local nodes, 6 shards;
  - C{redis-benchmark}: redis-benchmark's own pipelined C{XADD} (C{-P}),
    the most that redis-server takes here: the limit of the rows above.

    python -m benchmarks.redis_rows [--lines 400000] [--connections 8]
    python -m benchmarks.run --redis        # after the other rows, same run

Needs redis-server, redis-cli and redis-benchmark (C{make system-tools}).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lineserver.sinks.redis_config import shard_key
from lineserver.sinks.redis_resp import Reply, ReplyParser, encode_command
from lineserver.sinks.redis_slots import parse_slots

TWISTD = Path(sys.executable).parent / "twistd"
LINE = 100


def free_port(cluster: bool = False) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not cluster or port <= 55535:
            return port


def call(port: int, *args: bytes | str | int) -> Reply:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(encode_command(args))
        parser = ReplyParser()
        while not (replies := parser.feed(sock.recv(1 << 20))):
            pass
        return replies[0]


def wait(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


class Procs:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str, cwd: str | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            cwd=cwd or self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def redis(self, port: int, *args: str) -> None:
        directory = Path(self.directory, f"redis{port}")
        directory.mkdir()
        self.start(
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--dir", str(directory), *args,
        )  # fmt: skip
        wait(lambda: call(port, "PING") == b"PONG")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def payload(client: int, lines: int) -> bytes:
    head = b"c%d " % client
    return b"".join(
        head + b"%08d " % n + b"x" * (LINE - len(head) - 10) + b"\n"
        for n in range(lines)
    )


def drive(
    procs: Procs, sink: str, lines: int, connections: int, done: Callable[[int], bool]
) -> float:
    """
    Start a lineserver with C{sink}, send C{lines} lines over
    C{connections}, and @return: lines/s until C{done(lines)}.
    """
    port = free_port()
    log = Path(procs.directory, f"lineserver{port}.log")
    server = procs.start(
        str(TWISTD), "-n", "--pidfile=", f"--logfile={log}", "lineserver",
        "--port", f"tcp:{port}:interface=127.0.0.1", "--sink", sink,
    )  # fmt: skip
    wait(lambda: log.exists() and "listening on" in log.read_text())
    each = lines // connections
    data = [payload(c, each) for c in range(connections)]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    started = time.monotonic()
    threads = [
        threading.Thread(target=sock.sendall, args=(chunk,))
        for sock, chunk in zip(socks, data, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait(lambda: done(each * connections), timeout=600)
    elapsed = time.monotonic() - started
    for sock in socks:
        sock.close()
    procs.stop(server)
    return each * connections / elapsed


def file_row(procs: Procs, lines: int, connections: int) -> float:
    path = Path(procs.directory, "lines.log")

    def done(total: int) -> bool:
        return path.exists() and path.stat().st_size >= total * LINE

    return drive(procs, f"file:{path}", lines, connections, done)


def redis_row(procs: Procs, lines: int, connections: int) -> float:
    port = free_port()
    procs.redis(port)

    def done(total: int) -> bool:
        return call(port, "XLEN", "lines") == total

    return drive(
        procs, f"redis://127.0.0.1:{port}/?stream=lines", lines, connections, done
    )


def cluster_ok(port: int) -> bool:
    info = call(port, "CLUSTER", "INFO")
    return isinstance(info, bytes) and b"cluster_state:ok" in info


def cluster_row(procs: Procs, lines: int, connections: int) -> float:
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port(cluster=True)
        if port not in ports:
            ports.append(port)
    for port in ports:
        procs.redis(
            port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
        )
    subprocess.run(
        [
            *("redis-cli", "--cluster", "create"),
            *(f"127.0.0.1:{p}" for p in ports),
            *("--cluster-replicas", "0", "--cluster-yes"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait(lambda: all(cluster_ok(p) for p in ports))
    slots = parse_slots(call(ports[0], "CLUSTER", "SLOTS"), "127.0.0.1")
    keys = [shard_key("lines", n) for n in range(6)]

    def done(total: int) -> bool:
        count = 0
        for key in keys:
            slot = call(ports[0], "CLUSTER", "KEYSLOT", key)
            assert isinstance(slot, int)
            reply = call(slots[slot][1], "XLEN", key)
            count += reply if isinstance(reply, int) else 0
        return count == total

    seeds = ",".join(f"127.0.0.1:{p}" for p in ports)
    return drive(
        procs,
        f"redis+cluster://{seeds}/?stream=lines&shards=6",
        lines,
        connections,
        done,
    )


def redis_benchmark_row(procs: Procs, lines: int) -> float:
    port = free_port()
    procs.redis(port)
    out = subprocess.run(
        [
            *("redis-benchmark", "-p", str(port), "-n", str(lines), "-P", "1000"),
            *("-c", "4", "--csv", "XADD", "bench", "*", "line", "x" * (LINE - 1)),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    last = [row for row in out.splitlines() if row.startswith('"XADD')][-1]
    return float(last.split(",")[1].strip('"'))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=400_000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    for tool in ("redis-server", "redis-cli", "redis-benchmark"):
        if shutil.which(tool) is None:
            print(f"redis rows skipped: no {tool} (make system-tools)")
            return 1
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="lineserver-redis-bench-") as directory:
        procs = Procs(directory)
        try:
            rows.append(("file", file_row(procs, args.lines, args.connections)))
            rows.append(("redis", redis_row(procs, args.lines, args.connections)))
            rows.append(
                ("redis-cluster", cluster_row(procs, args.lines, args.connections))
            )
            rows.append(
                ("redis-benchmark XADD -P 1000", redis_benchmark_row(procs, args.lines))
            )
        finally:
            procs.close()
    base = rows[0][1]
    print(f"{args.lines} lines of {LINE} bytes over {args.connections} connections")
    print(f"{'sink':<30} {'lines/s':>12} {'vs file':>8}")
    for name, rate in rows:
        print(f"{name:<30} {rate:>12,.0f} {rate / base:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
