"""The Redis Cluster sink against a real three-node cluster, through twistd.

Lines of many clients are spread over C{lines:{0}}..C{lines:{N-1}}, each
client's lines in one key, in order; the keys sit on more than one node;
a node restarted mid-stream costs no line.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lineserver.sinks.redis_config import shard_key
from tests.redis_servers import RedisCluster, call, stream_lines, wait_for
from tests.support import ServerProcess, temp_dir
from tests.test_file_sink_ops import STOPPED, Sender, sequences

SHARDS = 6


def entries_by_key(cluster: RedisCluster) -> dict[str, list[bytes]]:
    """
    @return: each shard key's lines, read from the node the cluster says
        serves it.
    """
    found = {}
    for index in range(SHARDS):
        key = shard_key("lines", index)
        found[key] = [e[b"line"] for e in stream_lines(cluster.owner(key).port, key)]
    return found


def total_entries(cluster: RedisCluster) -> int:
    count = 0
    for index in range(SHARDS):
        key = shard_key("lines", index)
        try:
            reply = call(cluster.owner(key).port, "XLEN", key)
        except OSError:
            return -1
        count += reply if isinstance(reply, int) else 0
    return count


class ClusterTests(SynchronousTestCase):
    def start(self) -> tuple[RedisCluster, ServerProcess]:
        cluster = RedisCluster(self)
        server = ServerProcess(
            temp_dir(self),
            "--sink",
            f"redis+cluster://{cluster.seeds()}/?stream=lines&shards={SHARDS}",
        )
        self.addCleanup(server.kill)
        server.wait_listening()
        return cluster, server

    def check(self, cluster: RedisCluster, sent: dict[int, int]) -> int:
        """
        Every client's lines are in exactly one key, each line at least
        once, in the order sent; the keys are on more than one node.

        @return: how many duplicates there were.
        """
        by_key = entries_by_key(cluster)
        owners = {cluster.owner(key).port for key, lines in by_key.items() if lines}
        self.assertGreater(len(owners), 1, "lines on one node only")
        seen_clients: set[int] = set()
        duplicates = 0
        for key, lines in by_key.items():
            duplicates += len(lines) - len(set(lines))
            for client, numbers in sequences(list(dict.fromkeys(lines))).items():
                self.assertNotIn(client, seen_clients, f"client {client} in two keys")
                seen_clients.add(client)
                self.assertEqual(numbers, list(range(sent[client])), f"{key} {client}")
        self.assertEqual(seen_clients, set(sent))
        return duplicates

    def test_many_clients_spread_over_shards(self) -> None:
        cluster, server = self.start()
        senders = [Sender(server.port, client, 300) for client in range(30)]
        sent = {s.client: s.finish() for s in senders}
        total = sum(sent.values())
        wait_for(lambda: total_entries(cluster) == total, f"{total} entries")
        self.assertEqual(self.check(cluster, sent), 0)
        self.assertEqual(server.stop(), STOPPED)

    def test_node_restarted_mid_stream_loses_nothing(self) -> None:
        """
        One node is stopped while clients send and started again (its
        append-only file keeps what it had): every line is there.
        """
        cluster, server = self.start()
        senders = [Sender(server.port, client) for client in range(12)]
        wait_for(lambda: total_entries(cluster) > 3000, "lines flowing")
        victim = cluster.nodes[1]
        victim.stop()
        wait_for(
            lambda: "Redis" in server.log() and "retrying" in server.log(),
            "the outage logged",
        )
        victim.start()
        cluster.wait_ok()
        try:
            sent = {s.client: s.finish() for s in senders}
        except Exception:
            print(server.log()[-6000:])
            raise
        total = sum(sent.values())
        wait_for(
            lambda: total_entries(cluster) >= total, f"{total} entries", timeout=120
        )
        duplicates = self.check(cluster, sent)
        self.assertLess(duplicates, total // 2)
        self.assertEqual(server.stop(), STOPPED)
