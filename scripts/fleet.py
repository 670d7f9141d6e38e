"""Run the fleet of docs/deployment.md on loopback, and count every line.

    HAProxy (send-proxy) -> two lineservers (haproxy: ports)
                         -> one Redis stream -> a consumer-group reader

Clients connect to HAProxy and send numbered lines, a batch per
connection; half-way, the first lineserver is taken out of HAProxy (its
runtime API: disable server) and stopped with SIGTERM, and
HAProxy sends the clients' next connections to the other.  A client whose
connection breaks before the server closed it cleanly, or that got an ERR
line (a stopping server refuses a connection it accepted as it stopped),
sends that batch again (as a log shipper would), so a line may come twice,
never zero times.  At the end the reader must have every line.

Usage (from the checkout, after `make .venv/.installed-stamp`):

    .venv/bin/python scripts/fleet.py [--clients 20] [--batches 20] [--lines 100]

It prints one JSON object with what it counted and exits 0 when every
line was read, 1 otherwise.  Needs redis-server and haproxy (`make
system-tools` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lineserver.sinks.redis_resp import Reply, ReplyParser, encode_command  # noqa: E402

TWISTD = Path(sys.executable).parent / "twistd"
STREAM = "lines"
GROUP = "readers"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connectable(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def redis(port: int, *args: bytes | str | int) -> Reply:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(encode_command(args))
        parser = ReplyParser()
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("Redis closed the connection")
            replies = parser.feed(data)
            if replies:
                return replies[0]


def wait_until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


HAPROXY_CFG = """\
global
    maxconn 2000
    stats socket {socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch

frontend lines
    bind 127.0.0.1:{front}
    default_backend lineservers

backend lineservers
    balance roundrobin
    default-server send-proxy check check-send-proxy inter 200ms fall 1 rise 2
    server ls1 127.0.0.1:{one}
    server ls2 127.0.0.1:{two}
"""


class Fleet:
    """
    The processes of the fleet, each started here and stopped by its PID.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_port = free_port()
        self.front = free_port()
        self.ports = [free_port(), free_port()]
        self.lineservers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if not redis_server or not haproxy:
            raise RuntimeError("needs redis-server and haproxy: run make system-tools")
        self._spawn(
            [
                *(redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--dir", self.directory),
            ]
        )
        wait_until(lambda: redis(self.redis_port, "PING") == b"PONG", "redis-server")
        redis(self.redis_port, "XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
        url = f"redis://127.0.0.1:{self.redis_port}/0?stream={STREAM}&fields=peer"
        for index, port in enumerate(self.ports):
            log = Path(self.directory, f"lineserver{index + 1}.log")
            self.lineservers.append(
                self._spawn(
                    [
                        *(str(TWISTD), "-n", "--pidfile=", f"--logfile={log}"),
                        *("lineserver", "--sink", url),
                        *("--port", f"haproxy:tcp:{port}:interface=127.0.0.1"),
                    ]
                )
            )
        for index in range(2):
            log = Path(self.directory, f"lineserver{index + 1}.log")
            wait_until(
                lambda log=log: log.exists() and "listening on" in log.read_text(),
                f"lineserver {index + 1}",
            )
        config = Path(self.directory, "haproxy.cfg")
        config.write_text(
            HAPROXY_CFG.format(
                front=self.front,
                one=self.ports[0],
                two=self.ports[1],
                socket=Path(self.directory, "haproxy.sock"),
            )
        )
        self._spawn([haproxy, "-db", "-f", str(config)])
        wait_until(
            lambda: connectable(self.front),
            "haproxy",
        )

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(self.directory, "stderr.log"), "ab"),  # noqa: SIM115
        )
        self.procs.append(proc)
        return proc

    def haproxy(self, command: str) -> str:
        """
        Run one command on HAProxy's runtime API (its stats socket).
        """
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(Path(self.directory, "haproxy.sock")))
            sock.sendall(command.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        return answer.decode()

    def stop_lineserver(self, index: int) -> int:
        """
        SIGTERM one lineserver and wait for its ordered stop.

        @return: its exit status (-15: it re-raised SIGTERM after a clean stop).
        """
        # Take it out of HAProxy first, so that no new connection reaches
        # its port as it closes: a connection still waiting in the
        # kernel's backlog then is reset, and HAProxy closes its client
        # cleanly, which a client without --ack takes for delivered.
        self.haproxy(f"disable server lineservers/ls{index + 1}")
        time.sleep(0.5)  # what HAProxy had already sent there is accepted
        proc = self.lineservers[index]
        os.kill(proc.pid, signal.SIGTERM)
        return proc.wait(60)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def line(client: int, number: int) -> bytes:
    return b"c%d %08d fleet\n" % (client, number)


class Client(threading.Thread):
    """
    Sends C{batches} batches of C{size} lines, one connection each; a batch
    whose connection was not closed cleanly by the server goes again.
    """

    def __init__(
        self, port: int, client: int, batches: int, size: int, pause: float
    ) -> None:
        super().__init__(daemon=True)
        self.pause = pause
        self.done = 0
        self.port = port
        self.client = client
        self.batches = batches
        self.size = size
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for batch in range(self.batches):
                data = b"".join(
                    line(self.client, batch * self.size + n) for n in range(self.size)
                )
                for attempt in range(20):
                    if self._send(data):
                        break
                    self.resent += 1
                    time.sleep(0.1 * (attempt + 1))
                else:
                    raise RuntimeError(
                        f"client {self.client}: batch {batch} never went"
                    )
                self.done += 1
                time.sleep(self.pause)
        except BaseException as error:
            self.error = error

    def _send(self, data: bytes) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                # The server closes after it has read our end-of-file: a
                # clean EOF says it took every line; a reset, or an ERR line
                # (a server that is stopping refuses new connections with
                # one), says maybe not.
                replies = b""
                while chunk := sock.recv(4096):
                    replies += chunk
                return b"ERR" not in replies
        except OSError:
            return False


class Reader(threading.Thread):
    """
    The downstream: one consumer of the consumer group, acknowledging
    (XACK) every entry it reads.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.lines: list[bytes] = []
        self.peers: Counter[bytes] = Counter()
        self.seen: set[bytes] = set()
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        # After a broken connection, first the entries this consumer was
        # given and did not acknowledge (ID 0: its pending list), then new
        # ones (">"); an entry is counted once, by its ID.
        start = ">"
        while not self.stopping.is_set():
            try:
                got = self._read(start)
            except OSError as error:
                self.errors.append(repr(error))
                start = "0"
                time.sleep(0.1)
                continue
            if start == "0" and not got:
                start = ">"

    def _read(self, start: str) -> int:
        reply = redis(
            self.port, "XREADGROUP", "GROUP", GROUP, "reader-1",
            "COUNT", 5000, "BLOCK", 200, "STREAMS", STREAM, start,
        )  # fmt: skip
        if not isinstance(reply, list):
            return 0
        streams: Any = reply
        ids = []
        for _, entries in streams:
            for entry_id, fields in entries:
                ids.append(entry_id)
                if entry_id in self.seen or fields is None:
                    continue
                self.seen.add(entry_id)
                pairs = dict(zip(fields[::2], fields[1::2], strict=True))
                self.lines.append(pairs[b"line"])
                self.peers[pairs.get(b"peer", b"").rpartition(b":")[0]] += 1
        if ids:
            redis(self.port, "XACK", STREAM, GROUP, *ids)
        return len(ids)


def delivered(log: str) -> int:
    """
    @return: the lines a lineserver said it delivered when it stopped.
    """
    found = re.findall(r"stopped: (\d+) line\(s\) delivered", log)
    return int(found[-1]) if found else -1


def run(
    clients: int, batches: int, size: int, directory: str, pause: float = 0.05
) -> dict[str, Any]:
    """
    Run the fleet, stop one lineserver mid-stream, read everything.

    @return: what was counted; C{ok} says whether every line was read.
    """
    fleet = Fleet(directory)
    try:
        fleet.start()
        reader = Reader(fleet.redis_port)
        reader.start()
        senders = [Client(fleet.front, c, batches, size, pause) for c in range(clients)]
        for sender in senders:
            sender.start()
        total = clients * batches * size
        wait_until(
            lambda: sum(s.done for s in senders) >= clients * batches // 3,
            "a third of the batches sent",
        )
        batches_before = sum(s.done for s in senders)
        status = fleet.stop_lineserver(0)
        for sender in senders:
            sender.join(300)
        errors = [str(s.error) for s in senders if s.error is not None]
        with contextlib.suppress(RuntimeError):  # what is missing is reported
            wait_until(lambda: len(set(reader.lines)) >= total, "every line", 120)
        reader.stopping.set()
        reader.join(10)
        os.kill(fleet.lineservers[1].pid, signal.SIGTERM)
        fleet.lineservers[1].wait(60)
        counts = Counter(reader.lines)
        logs = [
            Path(directory, f"lineserver{i}.log").read_text(errors="replace")
            for i in (1, 2)
        ]
        return {
            "sent": total,
            "read": len(reader.lines),
            "distinct": len(counts),
            "duplicates": len(reader.lines) - len(counts),
            "missing": total - len(counts),
            "missing_sample": [
                text.decode()
                for text in sorted(
                    {
                        line(c, n).rstrip(b"\n")
                        for c in range(clients)
                        for n in range(batches * size)
                    }
                    - set(counts)
                )[:5]
            ],
            "resent_batches": sum(s.resent for s in senders),
            "stopped_exit_status": status,
            "client_errors": errors,
            "reader_errors": reader.errors,
            "peers": sorted(p.decode() for p in reader.peers),
            "batches_before_the_stop": batches_before,
            "delivered_per_lineserver": [delivered(log) for log in logs],
            "xlen": redis(fleet.redis_port, "XLEN", STREAM),
            "ok": not errors
            and len(counts) == total
            and batches_before < clients * batches,
        }
    finally:
        fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--lines", type=int, default=100, help="lines per batch")
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds between batches"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="lineserver-fleet-")
    try:
        result = run(args.clients, args.batches, args.lines, directory, args.pause)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    result["directory"] = directory if args.keep else None
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
