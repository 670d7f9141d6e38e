"""The client core: reading server lines, the window of unacknowledged lines,
and the engine over real loopback connections.

The window is property-tested against a model server: whatever the
interleaving of new lines, sends, reads, ACKs and disconnects, the lines
the server acknowledged, concatenated over its connections, are exactly
the stream's first lines, once each and in order; what is resent after a
reconnect is exactly what was not acknowledged, in order.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.client import (
    LineSenderProtocol,
    ProtocolViolation,
    Reply,
    ReplyKind,
    Sender,
    SenderFactory,
    SendWindow,
    parse_reply,
)
from tests.ack_peer import AckPeer, first_arrivals, peer_cleanup
from tests.support import eventually, reactor


class ParseReplyTests(SynchronousTestCase):
    def test_ack(self) -> None:
        self.assertEqual(parse_reply(b"ACK 120"), Reply(ReplyKind.ACK, count=120))
        self.assertEqual(parse_reply(b"ACK 0\r"), Reply(ReplyKind.ACK, count=0))

    def test_bad_ack(self) -> None:
        for line in (b"ACK", b"ACK -1", b"ACK 1 2", b"ACK x", "ACK \u0663".encode()):
            with self.subTest(line=line):
                self.assertRaises(ProtocolViolation, parse_reply, line)

    def test_err(self) -> None:
        reply = parse_reply(b"ERR unauthorized")
        self.assertEqual(
            (reply.kind, reply.code, reply.detail), (ReplyKind.ERR, "unauthorized", "")
        )
        self.assertTrue(reply.permanent)
        busy = parse_reply(b"ERR too-many-connections limit 10")
        self.assertEqual((busy.code, busy.detail), ("too-many-connections", "limit 10"))
        self.assertFalse(busy.permanent)

    def test_other(self) -> None:
        self.assertEqual(
            parse_reply(b"OK starttls"), Reply(ReplyKind.OTHER, detail="OK starttls")
        )


class SendWindowTests(SynchronousTestCase):
    def test_numbering_across_connections(self) -> None:
        """
        ACK n counts the lines of one connection; after a reconnect line 1
        is the first unacknowledged line.
        """
        window = SendWindow(10)
        for line in (b"a", b"b", b"c"):
            window.take(line)
        self.assertEqual(window.connection_made(), [b"a", b"b", b"c"])
        self.assertEqual(window.ack(2), 2)
        window.connection_lost()
        self.assertEqual(window.connection_made(), [b"c"])
        window.take(b"d")
        self.assertEqual(window.next_to_send(), [b"d"])
        self.assertEqual(window.ack(1), 1)
        self.assertEqual(
            (window.acknowledged, window.unacknowledged_lines()), (3, [b"d"])
        )

    def test_impossible_acks(self) -> None:
        window = SendWindow(10)
        window.take(b"a")
        self.assertRaises(ProtocolViolation, window.ack, 1)  # not connected
        window.connection_made()
        self.assertRaises(ProtocolViolation, window.ack, 2)  # never sent
        window.ack(1)
        self.assertEqual(window.ack(1), 0)  # repeated: nothing more
        self.assertRaises(ProtocolViolation, window.ack, 0)  # goes back

    def test_cap(self) -> None:
        window = SendWindow(2)
        window.take(b"a")
        self.assertFalse(window.full)
        window.take(b"b")
        self.assertTrue(window.full)
        window.connection_made()
        window.ack(1)
        self.assertFalse(window.full)
        self.assertRaises(ValueError, SendWindow, 0)


class WindowMachine(RuleBasedStateMachine):
    """
    The window against a model server: per connection, the lines on the
    wire, how many the server read, and how many it acknowledged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.window = SendWindow(8)
        self.stream: list[bytes] = []
        self.wire: list[bytes] | None = None  # sent on this connection
        self.read = 0
        self.server_acked = 0
        self.durable: list[bytes] = []  # what the server acknowledged, in all

    @rule(count=st.integers(1, 5))
    def take(self, count: int) -> None:
        for _ in range(count):
            line = b"%d" % len(self.stream)
            self.stream.append(line)
            self.window.take(line)

    @precondition(lambda self: self.wire is None)
    @rule()
    def connect(self) -> None:
        resent = self.window.connection_made()
        assert resent == self.stream[len(self.durable) :], (resent, self.durable)
        self.wire = list(resent)
        self.read = self.server_acked = 0

    @precondition(lambda self: self.wire is not None)
    @rule()
    def send(self) -> None:
        assert self.wire is not None
        self.wire += self.window.next_to_send()

    @precondition(lambda self: self.wire is not None)
    @rule(count=st.integers(0, 6))
    def server_reads(self, count: int) -> None:
        assert self.wire is not None
        self.read = min(len(self.wire), self.read + count)

    @precondition(lambda self: self.wire is not None)
    @rule(repeat=st.booleans())
    def server_acks(self, repeat: bool) -> None:
        assert self.wire is not None
        before = self.window.acknowledged
        if repeat:
            released = self.window.ack(self.server_acked)
            assert released == 0
            return
        released = self.window.ack(self.read)
        self.durable += self.wire[self.server_acked : self.read]
        self.server_acked = self.read
        assert released == self.window.acknowledged - before

    @precondition(lambda self: self.wire is not None)
    @rule()
    def disconnect(self) -> None:
        self.window.connection_lost()
        self.wire = None

    @invariant()
    def acknowledged_is_a_prefix_once(self) -> None:
        assert self.durable == self.stream[: self.window.acknowledged]
        assert self.window.unacknowledged_lines() == self.stream[len(self.durable) :]
        assert self.window.taken == len(self.stream)

    @invariant()
    def wire_is_in_order(self) -> None:
        if self.wire is not None:
            start = self.window.base
            assert self.wire == self.stream[start : start + len(self.wire)]

    def teardown(self) -> None:
        # Whatever happened, one more connection that the server reads and
        # acknowledges to the end acknowledges every line exactly once.
        if self.wire is not None:
            self.disconnect()
        self.connect()
        self.send()
        self.server_reads(len(self.wire or []))
        self.server_acks(False)
        assert self.durable == self.stream
        assert self.window.unacknowledged == 0


class WindowPropertyTests(SynchronousTestCase):
    def test_any_interleaving(self) -> None:
        run_state_machine_as_test(
            WindowMachine,
            settings=settings(max_examples=300, stateful_step_count=40, deadline=None),
        )


class SenderLoopbackTests(TestCase):
    """
    The engine through real sockets to L{AckPeer}, with C{ClientService}.
    """

    timeout = 60

    async def _service(self, sender: Sender, peer: AckPeer) -> ClientService:
        service = ClientService(
            TCP4ClientEndpoint(reactor, "127.0.0.1", peer.port),
            SenderFactory(sender),
            retryPolicy=backoffPolicy(initialDelay=0.05, maxDelay=0.5),
            clock=reactor,
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def test_drop_mid_stream_resends_unacknowledged(self) -> None:
        """
        The server drops the connection after reading lines it did not
        acknowledge: they are sent again on the next connection, and the
        server acknowledges every line exactly once, in order.
        """
        peer = AckPeer()
        await peer.start()
        self.addCleanup(peer_cleanup, peer)
        peer.drop_after = 1500
        sender = Sender(ack=True, window=100_000)
        await self._service(sender, peer)
        lines = [b"line %d" % i for i in range(5000)]
        last = sender.send(lines)
        await sender.when_done(last)
        # In order; a line twice only where the drop threw away its ACK.
        self.assertEqual(first_arrivals(peer.acknowledged), lines)
        self.assertEqual(sender.window.acknowledged, len(lines))
        self.assertEqual(peer.dropped, 1)
        # The lines read but not acknowledged when it dropped came again.
        self.assertGreaterEqual(len(peer.received), len(lines))
        self.assertEqual(sorted(set(peer.received)), sorted(lines))

    async def test_restart_while_stalled(self) -> None:
        """
        The server reads but does not acknowledge, then restarts: nothing
        is released before the ACK, and everything is resent after.
        """
        peer = AckPeer()
        await peer.start()
        self.addCleanup(peer_cleanup, peer)
        peer.stalled = True
        sender = Sender(ack=True)
        await self._service(sender, peer)
        lines = [b"x%d" % i for i in range(300)]
        done = sender.when_done(sender.send(lines))
        await eventually(lambda: len(peer.received) == 300, "the lines read")
        self.assertNoResult(done)
        self.assertEqual(sender.window.unacknowledged, 300)
        await peer.stop()
        peer.stalled = False
        await peer.start()
        await done
        self.assertEqual(peer.acknowledged, lines)
        self.assertEqual(len(peer.received), 600)

    async def test_without_ack_done_when_written(self) -> None:
        """
        Without ACKs a batch is done once written to a connected transport.
        """
        peer = AckPeer()
        peer.stalled = True  # it sends no ACKs at all
        await peer.start()
        self.addCleanup(peer_cleanup, peer)
        sender = Sender(ack=False)
        done = sender.when_done(sender.send([b"a", b"b"]))
        self.assertNoResult(done)  # no connection yet
        await self._service(sender, peer)
        await done
        await eventually(lambda: peer.received == [b"a", b"b"], "the lines")


class SenderMachine(RuleBasedStateMachine):
    """
    The engine and its protocol glue, over StringTransports: the model
    server reads what the glue wrote and answers C{ACK <n>} through
    C{dataReceived}.  A batch's Deferred fires exactly when the server's
    acknowledged count passes its last line, never before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sender = Sender(ack=True)
        self.factory = SenderFactory(self.sender)
        self.protocol: LineSenderProtocol | None = None
        self.transport: StringTransport | None = None
        self.stream: list[bytes] = []
        self.read = 0  # lines of this connection the server read
        self.acked = 0  # lines of this connection the server acknowledged
        self.base = 0  # lines acknowledged before this connection
        self.batches: list[tuple[int, list[bool]]] = []

    def _on_wire(self) -> list[bytes]:
        assert self.transport is not None
        data: bytes = self.transport.value()
        return data.split(b"\n")[:-1]

    @rule(count=st.integers(1, 4))
    def send(self, count: int) -> None:
        lines = [b"%d" % (len(self.stream) + i) for i in range(count)]
        self.stream += lines
        fired: list[bool] = []
        self.sender.when_done(self.sender.send(lines)).addCallback(
            lambda _: fired.append(True)
        )
        self.batches.append((len(self.stream), fired))

    @precondition(lambda self: self.protocol is None)
    @rule()
    def connect(self) -> None:
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.read = self.acked = 0
        self.base = self.sender.window.acknowledged

    @precondition(lambda self: self.protocol is not None)
    @rule(count=st.integers(0, 6))
    def server_reads(self, count: int) -> None:
        self.read = min(len(self._on_wire()), self.read + count)

    @precondition(lambda self: self.protocol is not None)
    @rule()
    def server_acks(self) -> None:
        assert self.protocol is not None
        durable = self.stream[: self.base + self.acked]
        assert self._on_wire()[: self.acked] == durable[self.base :]
        self.acked = self.read
        self.protocol.dataReceived(b"ACK %d\n" % self.acked)

    @precondition(lambda self: self.protocol is not None)
    @rule()
    def disconnect(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.protocol = self.transport = None

    @invariant()
    def fired_exactly_when_acknowledged(self) -> None:
        done = self.sender.window.acknowledged
        for last, fired in self.batches:
            assert bool(fired) == (last <= done), (last, done, fired)

    @invariant()
    def wire_resends_in_order(self) -> None:
        if self.protocol is not None:
            wire = self._on_wire()
            assert wire == self.stream[self.base : self.base + len(wire)]


class SenderPropertyTests(SynchronousTestCase):
    def test_any_interleaving(self) -> None:
        run_state_machine_as_test(
            SenderMachine,
            settings=settings(max_examples=200, stateful_step_count=40, deadline=None),
        )
