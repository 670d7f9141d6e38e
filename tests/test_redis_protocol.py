"""The Redis sinks' pure parts: RESP, URLs, slots and redirections."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lineserver.interfaces import ISink
from lineserver.sinks import (
    IPipelinedSink,
    IWantsOrigin,
    SinkURL,
    SinkURLError,
    sink_factory_from_url,
)
from lineserver.sinks.redis import RedisSinkFactory, encode_transaction
from lineserver.sinks.redis_config import RedisConfig, parse_redis_url, shard_key
from lineserver.sinks.redis_resp import (
    ProtocolError,
    RedisError,
    Reply,
    ReplyParser,
    encode_command,
)
from lineserver.sinks.redis_slots import crc16, key_slot, parse_redirect, parse_slots


def encode_reply(reply: Reply) -> bytes:
    """
    The server's side of RESP2, to feed the parser what Redis would send.
    """
    if isinstance(reply, RedisError):
        return b"-" + reply.message.encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(encode_reply(r) for r in reply)


replies = st.recursive(
    st.one_of(
        st.binary(max_size=40),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.none(),
        st.builds(
            RedisError, st.from_regex(r"[A-Z]{2,8} [a-z ]{0,20}", fullmatch=True)
        ),
    ),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


class ReplyParserTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        sent=st.lists(replies, max_size=8),
        cuts=st.lists(st.integers(min_value=0, max_value=2000)),
    )
    def test_any_cutting_gives_the_same_replies(
        self, sent: list[Reply], cuts: list[int]
    ) -> None:
        """
        However the bytes are cut into reads, the parser returns every
        reply once, whole and in order.
        """
        data = b"".join(encode_reply(r) for r in sent)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        parser = ReplyParser()
        got: list[Reply] = []
        for start, end in itertools.pairwise(points):
            got += parser.feed(data[start:end])
        self.assertEqual(got, sent)

    def test_simple_string_and_error(self) -> None:
        parsed = ReplyParser().feed(b"+QUEUED\r\n-OOM command not allowed\r\n")
        self.assertEqual(parsed, [b"QUEUED", RedisError("OOM command not allowed")])
        error = parsed[1]
        assert isinstance(error, RedisError)
        self.assertEqual(error.code, "OOM")

    def test_not_resp(self) -> None:
        with self.assertRaises(ProtocolError):
            ReplyParser().feed(b"HTTP/1.1 200 OK\r\n")

    @given(st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=10))))
    def test_command_is_an_array_of_bulk_strings(self, args: list[bytes | str]) -> None:
        """
        A command encodes as the array of bulk strings its arguments are,
        read back by the same parser.
        """
        wanted = [a.encode() if isinstance(a, str) else a for a in args]
        self.assertEqual(ReplyParser().feed(encode_command(args)), [wanted])


class TransactionEncodingTests(SynchronousTestCase):
    @given(
        lines=st.lists(st.binary(max_size=50), min_size=1, max_size=20),
        maxlen=st.one_of(st.none(), st.integers(min_value=1, max_value=10**6)),
    )
    def test_same_as_one_command_per_line(
        self, lines: list[bytes], maxlen: int | None
    ) -> None:
        """
        The fast encoding of MULTI/XADD.../EXEC is byte for byte what
        encoding each command on its own gives.
        """
        config = RedisConfig(nodes=(("127.0.0.1", 6379),), maxlen=maxlen)
        trim: list[bytes | str | int] = ["MAXLEN", "~", maxlen] if maxlen else []
        slow = [encode_command(["MULTI"])]
        slow += [
            encode_command(["XADD", "k", *trim, "*", "line", line]) for line in lines
        ]
        slow.append(encode_command(["EXEC"]))
        self.assertEqual(encode_transaction(config, "k", lines), b"".join(slow))


class URLTests(SynchronousTestCase):
    def parse(self, text: str) -> RedisConfig:
        return parse_redis_url(SinkURL.parse(text))

    def test_full_single_node_url(self) -> None:
        config = self.parse(
            "redis://alice:s%40cret@127.0.0.1:6380/2?stream=app&maxlen=1000&wait=1"
            "&fields=peer,time"
        )
        self.assertEqual(config.nodes, (("127.0.0.1", 6380),))
        self.assertEqual((config.username, config.password), ("alice", "s@cret"))
        self.assertEqual((config.db, config.stream, config.maxlen), (2, "app", 1000))
        self.assertEqual((config.wait, config.fields), (1, ("peer", "time")))
        self.assertFalse(config.tls)
        self.assertEqual(config.keys(), ["app"])
        self.assertNotIn("s@cret", config.describe())

    def test_password_only_and_defaults(self) -> None:
        config = self.parse("rediss://:pw@[::1]/")
        self.assertEqual(config.nodes, (("::1", 6379),))
        self.assertEqual((config.username, config.password), (None, "pw"))
        self.assertTrue(config.tls)
        self.assertEqual((config.stream, config.db, config.maxlen), ("lines", 0, None))

    def test_cluster(self) -> None:
        config = self.parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/?shards=4")
        self.assertTrue(config.cluster)
        self.assertEqual(len(config.nodes), 2)
        self.assertEqual(config.keys(), [shard_key("lines", i) for i in range(4)])
        self.assertEqual(config.keys()[0], "lines:{0}")

    @given(st.text(min_size=1, max_size=30))
    def test_one_connection_one_key(self, origin: str) -> None:
        """
        Every line of one connection goes to one key, whatever else.
        """
        config = self.parse("redis+cluster://h:1/?shards=5")
        key = config.key_for(origin, 0)
        self.assertEqual({config.key_for(origin, n) for n in range(5)}, {key})
        self.assertIn(key, config.keys())

    def test_refused(self) -> None:
        for text in [
            "redis:127.0.0.1:6379",
            "redis://a:1,b:2/",
            "redis://h:99999/",
            "redis://h:1/x",
            "redis://h:1/?shards=2",
            "redis+cluster://h:1/3",
            "redis://h:1/?maxlen=many",
            "redis://h:1/?fields=colour",
            "redis://h:1/?inflight=0",
            "redis://h:1/?ca=/etc/hostname",
            "rediss://h:1/?ca=/no/such/file.pem",
            "rediss://h:1/?cert=/etc/hostname",
        ]:
            with self.assertRaises(SinkURLError, msg=text):
                self.parse(text)

    def test_unknown_option_is_a_usage_error(self) -> None:
        with self.assertRaises(SinkURLError):
            sink_factory_from_url("redis://h:1/?stream=a&maxlne=3", None)

    def test_scheme_registered(self) -> None:
        for scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            factory = sink_factory_from_url(f"{scheme}://127.0.0.1:1/", None)
            self.assertIsInstance(factory, RedisSinkFactory)
        single = sink_factory_from_url("redis://h:1/", None)
        cluster = sink_factory_from_url("redis+cluster://h:1/", None)
        assert isinstance(single, RedisSinkFactory)
        assert isinstance(cluster, RedisSinkFactory)
        self.assertFalse(IWantsOrigin.providedBy(single))
        self.assertTrue(IWantsOrigin.providedBy(cluster))

    def test_sink_provides_its_contracts(self) -> None:
        sink = RedisSinkFactory(self.parse("redis://h:1/"), object())()
        verifyObject(ISink, sink)
        verifyObject(IPipelinedSink, sink)
        self.assertEqual(sink.max_in_flight, 4)


class SlotTests(SynchronousTestCase):
    def test_crc16_reference(self) -> None:
        """
        The check value of CRC16/XMODEM, and slots Redis itself reports
        (C{CLUSTER KEYSLOT}).
        """
        self.assertEqual(crc16(b"123456789"), 0x31C3)
        self.assertEqual(key_slot(b"foo"), 12182)
        self.assertEqual(key_slot(b"lines:{0}"), key_slot(b"0"))
        self.assertEqual(key_slot(b"a{}b"), crc16(b"a{}b") % 16384)

    def test_redirects(self) -> None:
        moved = parse_redirect("MOVED 3999 127.0.0.1:6381", "10.0.0.9")
        assert moved is not None
        self.assertEqual(
            (moved.ask, moved.slot, moved.node), (False, 3999, ("127.0.0.1", 6381))
        )
        ask = parse_redirect("ASK 1 ::1:7000", "10.0.0.9")
        assert ask is not None
        self.assertEqual((ask.ask, ask.node), (True, ("::1", 7000)))
        self.assertIsNone(parse_redirect("OOM command not allowed", "10.0.0.9"))

    def test_redirect_to_an_unknown_endpoint_is_the_host_asked(self) -> None:
        """
        C{-MOVED 3999 :6381} (Redis does not know the target's address)
        means the host that replied, on that port.
        """
        moved = parse_redirect("MOVED 3999 :6381", "10.0.0.9")
        assert moved is not None
        self.assertEqual(moved.node, ("10.0.0.9", 6381))

    @given(
        st.sampled_from(["MOVED", "ASK"]),
        st.integers(0, 16383),
        st.sampled_from(["127.0.0.1", "::1", "redis-2.example", ""]),
        st.integers(1, 65535),
    )
    def test_any_redirect_round_trips(
        self, kind: str, slot: int, host: str, port: int
    ) -> None:
        redirect = parse_redirect(f"{kind} {slot} {host}:{port}", "10.0.0.9")
        assert redirect is not None
        self.assertEqual(
            (redirect.ask, redirect.slot, redirect.node),
            (kind == "ASK", slot, (host or "10.0.0.9", port)),
        )

    def test_not_redirects(self) -> None:
        for message in [
            "MOVED 16384 127.0.0.1:7000",
            "MOVED 3999 127.0.0.1",
            "MOVED x 127.0.0.1:7000",
            "ASK 1 127.0.0.1:port",
            "MOVED 1",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
        ]:
            self.assertIsNone(parse_redirect(message, "10.0.0.9"), message)

    def test_slots_reply(self) -> None:
        reply: Reply = [[0, 2, [b"", 7000, b"id"]], [3, 3, [b"10.0.0.2", 7001, b"id"]]]
        self.assertEqual(
            parse_slots(reply, "127.0.0.1"),
            {
                0: ("127.0.0.1", 7000),
                1: ("127.0.0.1", 7000),
                2: ("127.0.0.1", 7000),
                3: ("10.0.0.2", 7001),
            },
        )
