"""Real Redis servers for the tests: one node, a replica, a three-node cluster.

Every server is a C{redis-server} process on a free loopback port, in a
temporary directory, stopped (by its own PID) after the test.  The tests
talk to them with L{call}, a blocking RESP client on our own parser.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from lineserver.sinks.redis_resp import RedisError, Reply, ReplyParser, encode_command
from lineserver.sinks.redis_slots import parse_slots
from tests.support import free_port, in_ci, temp_dir, wait_until

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def need_redis() -> None:
    """
    @raise SkipTest: without redis-server on a developer's machine
        (C{make test} installs it).
    @raise AssertionError: without it in CI, where it must be installed.
    """
    if REDIS_SERVER and REDIS_CLI:
        return
    if in_ci():
        raise AssertionError("CI=true and no redis-server/redis-cli (see Makefile)")
    raise SkipTest("redis-server not installed (make system-tools)")


def call(port: int, *args: bytes | str | int, password: str | None = None) -> Reply:
    """
    Run one command on the server at 127.0.0.1:C{port}.
    """
    return pipeline(port, [list(args)], password=password)[-1]


def pipeline(
    port: int, commands: list[list[bytes | str | int]], password: str | None = None
) -> list[Reply]:
    if password is not None:
        commands = [["AUTH", password], *commands]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(encode_command(c) for c in commands))
        parser = ReplyParser()
        replies: list[Reply] = []
        while len(replies) < len(commands):
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("Redis closed the connection")
            replies += parser.feed(data)
    return replies


def stream_lines(
    port: int, key: str, password: str | None = None
) -> list[dict[bytes, bytes]]:
    """
    @return: every entry of stream C{key}, as its field map, in order.
    """
    reply = call(port, "XRANGE", key, "-", "+", password=password)
    assert isinstance(reply, list), reply
    entries = []
    for entry in reply:
        assert isinstance(entry, list)
        flat = entry[1]
        assert isinstance(flat, list)
        entries.append({flat[i]: flat[i + 1] for i in range(0, len(flat), 2)})  # type: ignore[misc]
    return entries  # type: ignore[return-value]


class RedisServer:
    """
    One C{redis-server} on 127.0.0.1, in its own directory.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        *args: str,
        port: int | None = None,
        directory: str | None = None,
    ) -> None:
        need_redis()
        self.port = port or free_port()
        self.directory = directory or temp_dir(case)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        case.addCleanup(self.stop)
        self.start()

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory,
                "--save",
                "",
                "--logfile",
                str(Path(self.directory, "redis.log")),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log()[-2000:]}")
            try:
                reply = call(self.port, "PING")
            except OSError:
                return False
            # PONG, or NOAUTH: either way it serves.
            return reply == b"PONG" or isinstance(reply, RedisError)

        wait_until(answers, f"redis-server on {self.port}", timeout=timeout)

    def log(self) -> str:
        path = Path(self.directory, "redis.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def ephemeral_low() -> int:
    """
    @return: the lowest port the kernel hands out for bind(0) and outgoing
        connections (32768 if it cannot be read).
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def cluster_port() -> int:
    """
    @return: a free port whose cluster bus port (10000 above) is free too,
        both below the kernel's ephemeral range: there, no other test's
        free port or outgoing connection can take them between this check
        and redis-server's bind (which happened once under trial -j2).
    """
    high = min(55535, ephemeral_low() - 10000 - 1)
    for _ in range(200):
        port = random.randint(min(10000, high), high)
        try:
            with socket.socket() as one, socket.socket() as two:
                one.bind(("127.0.0.1", port))
                two.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise AssertionError("no free pair of ports for a cluster node")


class RedisCluster:
    """
    Three masters with C{--cluster-enabled yes}, joined by C{redis-cli
    --cluster create}; append-only, so a node restarted keeps its data.
    """

    def __init__(self, case: SynchronousTestCase, nodes: int = 3) -> None:
        need_redis()
        root = temp_dir(case)
        self.nodes: list[RedisServer] = []
        for index in range(nodes):
            directory = os.path.join(root, f"node{index}")
            os.mkdir(directory)
            self.nodes.append(
                RedisServer(
                    case,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-require-full-coverage",
                    "no",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    port=cluster_port(),
                    directory=directory,
                )
            )
        assert REDIS_CLI is not None
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = 60.0) -> None:
        def ok() -> bool:
            for node in self.nodes:
                try:
                    info = call(node.port, "CLUSTER", "INFO")
                except OSError:
                    return False
                if not isinstance(info, bytes) or b"cluster_state:ok" not in info:
                    return False
            return True

        wait_until(ok, "the cluster's state to be ok", timeout=timeout)

    def seeds(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def owner(self, key: str) -> RedisServer:
        """
        @return: the node that serves C{key}'s slot, by the cluster's word
            (C{CLUSTER KEYSLOT} and C{CLUSTER SLOTS}).
        """
        slot = call(self.nodes[0].port, "CLUSTER", "KEYSLOT", key)
        slots = parse_slots(call(self.nodes[0].port, "CLUSTER", "SLOTS"), "127.0.0.1")
        assert isinstance(slot, int), slot
        _, port = slots[slot]
        for node in self.nodes:
            if node.port == port:
                return node
        raise AssertionError(f"no node serves {key}")

    def node_id(self, node: RedisServer) -> bytes:
        reply = call(node.port, "CLUSTER", "MYID")
        assert isinstance(reply, bytes), reply
        return reply

    def slot_of(self, key: str) -> int:
        slot = call(self.nodes[0].port, "CLUSTER", "KEYSLOT", key)
        assert isinstance(slot, int), slot
        return slot

    def begin_migration(
        self, slot: int, source: RedisServer, target: RedisServer
    ) -> None:
        """
        The first steps of a reshard (what C{redis-cli --cluster reshard}
        does per slot): C{target} IMPORTING, then C{source} MIGRATING.
        From now on C{source} answers C{-ASK} for a key of C{slot} it no
        longer has.
        """
        ok = call(
            target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source)
        )
        assert ok == b"OK", ok
        ok = call(
            source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target)
        )
        assert ok == b"OK", ok

    def migrate_keys(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """
        C{MIGRATE} every key of C{slot} from C{source} to C{target}.

        @return: how many keys moved.
        """
        moved = 0
        for _ in range(1000):
            keys = call(source.port, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            assert isinstance(keys, list), keys
            if not keys:
                return moved
            reply = call(
                source.port,
                "MIGRATE",
                "127.0.0.1",
                target.port,
                "",
                0,
                30000,
                "KEYS",
                *(k for k in keys if isinstance(k, bytes)),
            )
            assert reply == b"OK", reply
            moved += len(keys)
        raise AssertionError(f"slot {slot} still has keys on {source.port}")

    def finish_migration(self, slot: int, target: RedisServer) -> None:
        """
        The last step: every master learns that C{target} serves C{slot}
        (the target first, as redis-cli does).
        """
        owner = self.node_id(target)
        for node in sorted(self.nodes, key=lambda n: n is not target):
            ok = call(node.port, "CLUSTER", "SETSLOT", slot, "NODE", owner)
            assert ok == b"OK", ok

    def move_slot(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """
        Move C{slot} and its keys from C{source} to C{target}.
        """
        self.begin_migration(slot, source, target)
        self.migrate_keys(slot, source, target)
        self.finish_migration(slot, target)

    def slots_of(self, node: RedisServer) -> list[int]:
        """
        @return: the slots C{node} serves, by its own word, ascending.
        """
        slots = parse_slots(call(node.port, "CLUSTER", "SLOTS"), "127.0.0.1")
        return sorted(slot for slot, (_, port) in slots.items() if port == node.port)

    def reshard(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """
        Move C{source}'s slots up to C{slot} to C{target} the operator's
        way, C{redis-cli --cluster reshard} (it moves a source's slots in
        ascending order).

        @return: how many slots moved.
        """
        count = self.slots_of(source).index(slot) + 1
        assert REDIS_CLI is not None
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "reshard",
                f"127.0.0.1:{source.port}",
                "--cluster-from",
                self.node_id(source).decode(),
                "--cluster-to",
                self.node_id(target).decode(),
                "--cluster-slots",
                str(count),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=300,
        )
        return count


def info_counts(port: int, section: str) -> dict[str, dict[str, int]]:
    """
    @return: the C{INFO} section's C{name:k=v,...} lines as numbers, e.g.
        C{info_counts(port, "errorstats")["errorstat_ASK"]["count"]}.
    """
    reply = call(port, "INFO", section)
    assert isinstance(reply, bytes), reply
    found: dict[str, dict[str, int]] = {}
    for text in reply.decode().splitlines():
        name, colon, values = text.partition(":")
        if not colon or "=" not in values:
            continue
        found[name] = {}
        for pair in values.split(","):
            field, _, value = pair.partition("=")
            if value.isdigit():
                found[name][field] = int(value)
    return found


def error_count(port: int, code: str) -> int:
    """
    @return: how many C{-CODE} error replies the node has sent
        (C{INFO errorstats}), e.g. C{ASK} or C{MOVED}.
    """
    return info_counts(port, "errorstats").get(f"errorstat_{code}", {}).get("count", 0)


def wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    """
    L{wait_until} with the long default a loaded machine needs.
    """
    deadline = time.monotonic() + timeout
    wait_until(check, what, timeout=max(0.1, deadline - time.monotonic()))
