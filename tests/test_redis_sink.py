"""The Redis Streams sink against a real redis-server, through a real twistd.

Every failure the docs promise to survive is made for real: Redis down at
start, killed mid-stream, a wrong password, a missing ACL permission, an
OOM under C{maxmemory}; each is a log line and held lines, then every line
in the stream once Redis takes them again.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.sinks import sink_factory_from_url
from lineserver.sinks.redis import RedisStreamSink
from tests.certs import make_pki
from tests.redis_servers import RedisServer, call, stream_lines, wait_for
from tests.support import ServerProcess, eventually, free_port, later, temp_dir
from tests.test_ack_twistd import AckClient
from tests.test_file_sink_ops import STOPPED, Sender, sequences


def xlen(port: int, key: str = "lines", password: str | None = None) -> int:
    reply = call(port, "XLEN", key, password=password)
    assert isinstance(reply, int), reply
    return reply


def replica_up(port: int) -> bool:
    info = call(port, "INFO", "replication")
    return isinstance(info, bytes) and b"master_link_status:up" in info


def stalled(sender: Sender, seconds: float = 1.0) -> bool:
    """
    @return: whether C{sender} sent nothing for C{seconds}.
    """
    before = sender.sent
    time.sleep(seconds)
    return sender.sent == before


def lineserver(case: SynchronousTestCase, url: str, *args: str) -> ServerProcess:
    server = ServerProcess(temp_dir(case), "--sink", url, *args)
    case.addCleanup(server.kill)
    return server.wait_listening()


def send_all(port: int, clients: int, each: int) -> int:
    senders = [Sender(port, client, each) for client in range(clients)]
    return sum(sender.finish() for sender in senders)


def check_every_line(
    test: SynchronousTestCase, entries: list[bytes], clients: int, each: int
) -> None:
    """
    Every client's lines are there, in the order it sent them, each once.
    """
    got = sequences(entries)
    test.assertEqual(sorted(got), list(range(clients)))
    for client, numbers in got.items():
        test.assertEqual(numbers, list(range(each)), f"client {client}")


class AckTests(SynchronousTestCase):
    """
    C{--ack} with the Redis sink: an ACK means Redis confirmed the XADDs.
    """

    def test_ack_only_for_what_redis_confirmed(self) -> None:
        """
        Every ACK number is at most the stream's length when it is read;
        while redis-server is stopped (SIGSTOP) the ACK stays where it was
        (repeated, not advanced), and once it runs again every line is
        acknowledged and in the stream.
        """
        redis = RedisServer(self)
        server = lineserver(
            self,
            f"redis://127.0.0.1:{redis.port}/0?stream=lines",
            "--ack",
            "--ack-interval",
            "0.5",
        )
        client = AckClient(server.port, client=0)
        self.addCleanup(client.close)
        client.exchange(client.lines(2000))
        self.assertEqual(client.acked, 2000)
        self.assertEqual(xlen(redis.port), 2000)

        assert redis.proc is not None
        pid = redis.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            client.exchange_for(client.lines(1000), seconds=2.5)
            # Repeated (the interval is 0.5 s), never past what Redis has.
            self.assertGreaterEqual(client.acks.count(2000), 2, client.acks[-10:])
            self.assertEqual(client.acked, 2000)
        finally:
            os.kill(pid, signal.SIGCONT)
        client.exchange(b"")
        self.assertEqual(client.acked, 3000)
        self.assertEqual(xlen(redis.port), 3000)
        check_every_line(
            self, [e[b"line"] for e in stream_lines(redis.port, "lines")], 1, 3000
        )
        self.assertEqual(server.stop(), STOPPED)


class SingleNodeTests(SynchronousTestCase):
    def test_many_clients_every_line_once_in_order(self) -> None:
        """
        Twenty clients' lines are one entry each in the stream, with the
        fields asked for: the line, the client's address, the receive
        time and the connection.
        """
        redis = RedisServer(self)
        server = lineserver(
            self, f"redis://127.0.0.1:{redis.port}/0?stream=lines&fields=peer,time,conn"
        )
        total = send_all(server.port, 20, 500)
        wait_for(lambda: xlen(redis.port) == total, f"{total} entries")
        entries = stream_lines(redis.port, "lines")
        check_every_line(self, [e[b"line"] for e in entries], 20, 500)
        first = entries[0]
        self.assertTrue(first[b"peer"].startswith(b"127.0.0.1:"))
        self.assertGreater(float(first[b"time"]), 1.7e9)
        self.assertTrue(first[b"conn"].startswith(b"#"))
        self.assertEqual(server.stop(), STOPPED)

    def test_database_and_maxlen(self) -> None:
        """
        C{/DB} selects the database; C{maxlen} trims the stream (about:
        C{MAXLEN ~}, whole macro nodes) to near N.
        """
        redis = RedisServer(self)
        server = lineserver(
            self, f"redis://127.0.0.1:{redis.port}/3?stream=s&maxlen=1000"
        )
        total = send_all(server.port, 4, 2500)
        self.assertEqual(server.stop(), STOPPED)
        self.assertEqual(xlen(redis.port, "s"), 0)  # not in database 0
        length = call(
            redis.port,
            "EVAL",
            "redis.call('SELECT', 3) return redis.call('XLEN', 's')",
            0,
        )
        added = call(
            redis.port,
            "EVAL",
            "redis.call('SELECT', 3) return redis.call('XINFO', 'STREAM', 's')[12]",
            0,
        )
        assert isinstance(length, int)
        self.assertLess(length, total)
        self.assertGreaterEqual(length, 1000)
        self.assertEqual(str(added), str(total))

    def test_down_at_start_then_every_line(self) -> None:
        """
        Redis is not there when the server starts: the server starts,
        takes lines, logs that Redis is unreachable, and writes every line
        once Redis is up.
        """
        port = free_port()
        server = lineserver(self, f"redis://127.0.0.1:{port}/")
        total = send_all(server.port, 5, 200)
        wait_for(lambda: "unreachable" in server.log(), "the outage in the log")
        redis = RedisServer(self, port=port)
        wait_for(lambda: xlen(redis.port) == total, f"{total} entries")
        check_every_line(
            self, [e[b"line"] for e in stream_lines(port, "lines")], 5, 200
        )
        self.assertIn("lines held, retrying", server.log())
        self.assertEqual(server.stop(), STOPPED)

    def test_killed_mid_stream_loses_nothing(self) -> None:
        """
        Redis is SIGKILLed while clients send and started again on its
        append-only file: every line is in the stream; the only
        duplicates are whole transactions whose EXEC reply was lost.
        """
        redis = RedisServer(self, "--appendonly", "yes", "--appendfsync", "always")
        server = lineserver(self, f"redis://127.0.0.1:{redis.port}/")
        senders = [Sender(server.port, client) for client in range(8)]
        wait_for(lambda: xlen(redis.port) > 2000, "lines flowing")
        redis.stop(signal.SIGKILL)
        wait_for(
            lambda: "lost" in server.log() or "unreachable" in server.log(),
            "the loss logged",
        )
        redis.start()
        sent = {sender.client: sender.finish() for sender in senders}
        total = sum(sent.values())
        wait_for(lambda: xlen(redis.port) >= total, f"{total} entries", timeout=120)
        entries = [e[b"line"] for e in stream_lines(redis.port, "lines")]
        counts = Counter(entries)
        self.assertEqual(len(counts), total, "every line, at least once")
        duplicates = len(entries) - total
        self.assertLess(duplicates, total // 2)
        for client, numbers in sequences(list(dict.fromkeys(entries))).items():
            self.assertEqual(sorted(set(numbers)), list(range(sent[client])))
        self.assertEqual(server.stop(), STOPPED)

    def test_wrong_password_is_held_then_written(self) -> None:
        """
        A wrong password is a log line naming Redis's refusal and lines
        held; once the password is right (here: Redis's changes), they
        are written.
        """
        redis = RedisServer(self, "--requirepass", "right")
        server = lineserver(self, f"redis://:wrong@127.0.0.1:{redis.port}/")
        total = send_all(server.port, 3, 100)
        wait_for(lambda: "WRONGPASS" in server.log(), "the refusal logged")
        self.assertEqual(xlen(redis.port, password="right"), 0)
        self.assertEqual(
            call(redis.port, "CONFIG", "SET", "requirepass", "wrong", password="right"),
            b"OK",
        )
        wait_for(lambda: xlen(redis.port, password="wrong") == total, "every line")
        self.assertNotIn("wrong@", server.log())
        self.assertEqual(server.stop(), STOPPED)

    def test_missing_acl_permission_is_held_then_written(self) -> None:
        """
        An ACL user without XADD: NOPERM in the log, lines held; granted
        XADD, every line goes in, once.
        """
        redis = RedisServer(self)
        call(
            redis.port, "ACL", "SETUSER", "writer", "on", ">pw", "~*", "+@all", "-xadd"
        )
        server = lineserver(self, f"redis://writer:pw@127.0.0.1:{redis.port}/")
        total = send_all(server.port, 3, 100)
        wait_for(lambda: "NOPERM" in server.log(), "the refusal logged")
        self.assertEqual(xlen(redis.port), 0)
        call(redis.port, "ACL", "SETUSER", "writer", "+xadd")
        wait_for(lambda: xlen(redis.port) == total, "every line")
        check_every_line(
            self, [e[b"line"] for e in stream_lines(redis.port, "lines")], 3, 100
        )
        self.assertEqual(server.stop(), STOPPED)

    def test_out_of_memory_is_backpressure(self) -> None:
        """
        Under C{maxmemory} with C{noeviction} Redis refuses XADD with OOM:
        a log line, nothing written, the clients paused (they cannot send
        more than the queue holds); memory raised, every line goes in.
        """
        redis = RedisServer(self, "--maxmemory-policy", "noeviction")
        call(redis.port, "CONFIG", "SET", "maxmemory", "1")
        server = lineserver(
            self,
            f"redis://127.0.0.1:{redis.port}/",
            "--high-watermark",
            "64K",
            "--low-watermark",
            "16K",
        )
        sender = Sender(server.port, 0, 200_000)
        wait_for(lambda: "OOM" in server.log(), "the refusal logged")
        self.assertEqual(xlen(redis.port), 0)
        wait_for(lambda: stalled(sender), "the client paused")
        # Paused: the kernel buffers fill and the client stops, far short
        # of its 200,000 lines (20 MB).
        self.assertLess(sender.sent, 100_000)
        call(redis.port, "CONFIG", "SET", "maxmemory", "0")
        total = sender.finish(timeout=120)
        self.assertEqual(total, 200_000)
        wait_for(lambda: xlen(redis.port) == total, "every line", timeout=120)
        self.assertEqual(server.stop(), STOPPED)

    def test_wait_for_a_replica(self) -> None:
        """
        With C{wait=1} the lines are on the replica too once written.
        """
        redis = RedisServer(self)
        replica = RedisServer(self, "--replicaof", "127.0.0.1", str(redis.port))
        wait_for(lambda: replica_up(replica.port), "the replica in sync")
        server = lineserver(
            self, f"redis://127.0.0.1:{redis.port}/?wait=1&wait_timeout=2000"
        )
        total = send_all(server.port, 4, 250)
        wait_for(lambda: xlen(redis.port) == total, "every line")
        wait_for(lambda: xlen(replica.port) == total, "every line on the replica")
        self.assertEqual(server.stop(), STOPPED)


class SinkContractTests(TestCase):
    """
    The sink itself, in this process: its Deferreds say what Redis did.
    """

    timeout = 120

    @inlineCallbacks
    def test_write_fires_only_once_redis_has_the_lines(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        Under OOM, C{write}'s Deferred waits; it fires once Redis took
        the batch, and then every line is in the stream, in order.
        """
        redis = RedisServer(self, "--maxmemory-policy", "noeviction")
        call(redis.port, "CONFIG", "SET", "maxmemory", "1")
        sink = sink_factory_from_url(
            f"redis://127.0.0.1:{redis.port}/?stream=k", reactor
        )()
        assert isinstance(sink, RedisStreamSink)
        self.addCleanup(lambda: sink.close().cancel())
        yield sink.open()
        lines = [b"line %d" % n for n in range(100)]
        written = sink.write(lines)
        yield later(1.0)
        self.assertFalse(written.called)
        self.assertEqual(xlen(redis.port, "k"), 0)
        call(redis.port, "CONFIG", "SET", "maxmemory", "0")
        yield written
        self.assertEqual([e[b"line"] for e in stream_lines(redis.port, "k")], lines)
        yield sink.close()


class TLSTests(SynchronousTestCase):
    def test_rediss_with_client_certificate(self) -> None:
        """
        C{rediss://} to a redis-server on a TLS port that requires a
        client certificate: checked against C{ca=}, ours from C{cert=}
        and C{key=}; every line goes in.
        """
        pki = make_pki(temp_dir(self))
        redis = RedisServer(self)
        tls_port = free_port()
        call(redis.port, "CONFIG", "SET", "tls-cert-file", str(pki.server_cert))
        call(redis.port, "CONFIG", "SET", "tls-key-file", str(pki.server_key))
        call(redis.port, "CONFIG", "SET", "tls-ca-cert-file", str(pki.ca_cert))
        self.assertEqual(
            call(redis.port, "CONFIG", "SET", "tls-port", str(tls_port)), b"OK"
        )
        server = lineserver(
            self,
            f"rediss://127.0.0.1:{tls_port}/?ca={pki.ca_cert}"
            f"&cert={pki.client_cert}&key={pki.client_key}",
        )
        total = send_all(server.port, 3, 300)
        wait_for(lambda: xlen(redis.port) == total, "every line over TLS")
        check_every_line(
            self, [e[b"line"] for e in stream_lines(redis.port, "lines")], 3, 300
        )
        self.assertEqual(server.stop(), STOPPED)

    def test_rediss_refuses_an_unknown_server_certificate(self) -> None:
        """
        A server certificate from another CA is an outage logged (the
        handshake fails), not a connection that sends lines.
        """
        pki = make_pki(temp_dir(self))
        redis = RedisServer(self)
        tls_port = free_port()
        call(redis.port, "CONFIG", "SET", "tls-cert-file", str(pki.server_cert))
        call(redis.port, "CONFIG", "SET", "tls-key-file", str(pki.server_key))
        call(redis.port, "CONFIG", "SET", "tls-auth-clients", "no")
        call(redis.port, "CONFIG", "SET", "tls-port", str(tls_port))
        server = lineserver(
            self, f"rediss://127.0.0.1:{tls_port}/?ca={pki.other_ca_cert}"
        )
        send_all(server.port, 1, 10)
        wait_for(lambda: "lines held, retrying" in server.log(), "the refusal logged")
        self.assertEqual(xlen(redis.port), 0)
        self.assertEqual(server.stop(), STOPPED)


class WaitContractTests(TestCase):
    """
    C{wait=N} in this process: what a shortfall of replicas does.
    """

    timeout = 120

    @inlineCallbacks
    def test_wait_shortfall_holds_without_resending(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        With C{wait=1} and no replica, the batch is in Redis but its
        Deferred waits; once a replica is there it fires, and the lines
        were not sent twice (only the WAIT was asked again).
        """
        redis = RedisServer(self)
        url = f"redis://127.0.0.1:{redis.port}/?stream=w&wait=1&wait_timeout=100"
        sink = sink_factory_from_url(url, reactor)()
        assert isinstance(sink, RedisStreamSink)
        self.addCleanup(lambda: sink.close().cancel())
        yield sink.open()
        lines = [b"w %d" % n for n in range(50)]
        written = sink.write(lines)
        yield eventually(lambda: xlen(redis.port, "w") == 50, "the lines in Redis")
        yield later(1.0)
        self.assertFalse(written.called)
        replica = RedisServer(self, "--replicaof", "127.0.0.1", str(redis.port))
        yield written
        self.assertEqual([e[b"line"] for e in stream_lines(redis.port, "w")], lines)
        self.assertEqual(xlen(replica.port, "w"), 50)
        yield sink.close()
