"""Acknowledgements (--ack): the pure counter, the handler and its close."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from lineserver.ack import AckCounter, ack_line
from lineserver.flow import Batch, IAckOwner, SinkQueue
from lineserver.handlers import (
    AckSinkHandler,
    AckSinkHandlerFactory,
    IAcknowledging,
)
from lineserver.interfaces import ILineHandler
from lineserver.protocol import ProtocolSettings
from lineserver.sinks.file import FileSinkFactory, Fsync
from tests.support import Peer, start_server, temp_dir
from tests.test_protocol import connect

# -- the pure counter ------------------------------------------------------------


class AckCounterTests(SynchronousTestCase):
    def test_new_number_only(self) -> None:
        """
        A confirmation that moves the number yields it; one of no lines
        yields nothing.
        """
        counter = AckCounter()
        counter.put(3)
        self.assertEqual(counter.durable(2), 2)
        self.assertIsNone(counter.durable(0))
        self.assertEqual(counter.durable(1), 3)
        self.assertEqual(counter.waiting, 0)

    def test_repeat_while_waiting(self) -> None:
        """
        A repeat tick gives the latest number while lines wait (0 before
        any ACK), and None once every line is acknowledged.
        """
        counter = AckCounter()
        counter.put(2)
        self.assertEqual(counter.repeat(), 0)
        counter.durable(1)
        self.assertEqual(counter.repeat(), 1)
        counter.durable(1)
        self.assertIsNone(counter.repeat())

    def test_more_than_delivered_is_a_bug(self) -> None:
        """
        The sink cannot confirm lines the connection never delivered.
        """
        counter = AckCounter()
        counter.put(1)
        self.assertRaises(ValueError, counter.durable, 2)

    def test_wire_form(self) -> None:
        self.assertEqual(ack_line(120), b"ACK 120\n")

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["put", "durable", "repeat"]),
                st.integers(min_value=0, max_value=50),
            ),
            max_size=60,
        )
    )
    def test_numbers_monotonic_and_bounded(self, ops: list[tuple[str, int]]) -> None:
        """
        Over any sequence of puts, confirmations (never more than
        outstanding) and repeat ticks: every ACK number sent is at least
        the one before, never more than the lines delivered, and once the
        sink has confirmed everything the last number sent equals the
        lines delivered.
        """
        counter = AckCounter()
        sent: list[int] = []
        for op, amount in ops:
            if op == "put":
                counter.put(amount)
            elif op == "durable":
                outstanding = counter.delivered - counter.confirmed
                number = counter.durable(min(amount, outstanding))
                if number is not None:
                    sent.append(number)
            else:
                number = counter.repeat()
                if number is not None:
                    self.assertLess(number, counter.delivered)
                    sent.append(number)
            self.assertLessEqual(counter.confirmed, counter.delivered)
        self.assertEqual(sent, sorted(sent))
        self.assertTrue(all(n <= counter.delivered for n in sent))
        final = counter.durable(counter.delivered - counter.confirmed)
        if final is not None:
            sent.append(final)
        if counter.delivered:
            self.assertEqual(sent[-1], counter.delivered)
        self.assertIsNone(counter.repeat())


# -- the handler, with StringTransport and Clock ----------------------------------


def ack_handlers(queue: SinkQueue, interval: float = 2.0) -> Any:
    """
    A handler factory like L{AckSinkHandlerFactory}'s, on the test
    protocol's own Clock (which L{connect} makes).
    """
    return lambda conn: AckSinkHandler(conn, queue, conn.factory.clock, interval)


def ack_connection(
    interval: float = 2.0, **settings: Any
) -> tuple[Any, Any, Any, SinkQueue]:
    queue = SinkQueue(1 << 20, 1 << 10)
    settings.setdefault("max_line_length", 16)
    proto, transport, _, clock = connect(
        ack_handlers(queue, interval), ProtocolSettings(**settings)
    )
    return proto, transport, clock, queue


def confirm_all(queue: SinkQueue) -> Batch:
    batch = queue.take(1 << 30)
    queue.confirm_batch(batch)
    return batch


class AckHandlerTests(SynchronousTestCase):
    def test_provides(self) -> None:
        proto, _, _, _ = ack_connection()
        handler = proto.handler
        assert isinstance(handler, AckSinkHandler)
        verifyObject(ILineHandler, handler)
        verifyObject(IAckOwner, handler)
        verifyObject(IAcknowledging, handler)

    def test_one_ack_per_confirmed_batch(self) -> None:
        """
        Three reads merged into one sink batch get one ACK, the total.
        """
        proto, transport, _, queue = ack_connection()
        proto.dataReceived(b"a\nb\n")
        proto.dataReceived(b"c\n")
        proto.dataReceived(b"d\r\n")
        self.assertEqual(transport.value(), b"")
        batch = confirm_all(queue)
        self.assertEqual(batch.lines, [b"a", b"b", b"c", b"d"])
        self.assertEqual(transport.value(), b"ACK 4\n")

    def test_batches_of_two_connections(self) -> None:
        """
        A batch that merges two connections' lines acknowledges each of
        them, with its own count.
        """
        queue = SinkQueue(1 << 20, 1 << 10)
        one, t1, _, _ = connect(ack_handlers(queue))
        two, t2, _, _ = connect(ack_handlers(queue))
        one.dataReceived(b"a\n")
        two.dataReceived(b"b\nc\n")
        one.dataReceived(b"d\n")
        confirm_all(queue)
        self.assertEqual((t1.value(), t2.value()), (b"ACK 2\n", b"ACK 2\n"))
        two.dataReceived(b"e\n")
        confirm_all(queue)
        self.assertEqual((t1.value(), t2.value()), (b"ACK 2\n", b"ACK 2\nACK 3\n"))

    def test_repeat_while_waiting(self) -> None:
        """
        Lines the sink does not confirm get the latest ACK repeated every
        interval (ACK 0 before any), and the repeats stop once they are
        all acknowledged.
        """
        proto, transport, clock, queue = ack_connection(interval=2.0)
        proto.dataReceived(b"a\n")
        clock.advance(1.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.1)
        self.assertEqual(transport.value(), b"ACK 0\n")
        confirm_all(queue)
        proto.dataReceived(b"b\n")
        transport.clear()
        clock.advance(2.0)
        self.assertEqual(transport.value(), b"ACK 1\n")
        clock.advance(2.0)
        self.assertEqual(transport.value(), b"ACK 1\nACK 1\n")
        confirm_all(queue)
        transport.clear()
        clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_repeat_counts_from_the_last_ack(self) -> None:
        """
        A fresh ACK postpones the next repeat by a whole interval.
        """
        proto, transport, clock, queue = ack_connection(interval=2.0)
        proto.dataReceived(b"a\n")
        clock.advance(1.5)
        confirm_all(queue)
        proto.dataReceived(b"b\n")
        proto.dataReceived(b"c\n")
        batch = queue.take(1)  # b alone
        queue.confirm_batch(batch)
        self.assertEqual(transport.value(), b"ACK 1\nACK 2\n")
        clock.advance(1.9)
        self.assertEqual(transport.value(), b"ACK 1\nACK 2\n")
        clock.advance(0.1)
        self.assertEqual(transport.value(), b"ACK 1\nACK 2\nACK 2\n")

    def test_no_ack_after_the_connection_is_gone(self) -> None:
        """
        A batch confirmed after its connection closed writes nothing, and
        no repeat timer is left behind.
        """
        proto, transport, clock, queue = ack_connection()
        proto.dataReceived(b"a\n")
        proto.connectionLost()
        confirm_all(queue)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_err_after_the_ack(self) -> None:
        """
        Lines before an over-long one are acknowledged before the ERR line
        when the sink confirms them within the close deadline; the close
        waits for that.
        """
        proto, transport, clock, queue = ack_connection(close_timeout=4.0)
        proto.dataReceived(b"a\nb\n" + b"x" * 40)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        clock.advance(1.0)
        confirm_all(queue)
        self.assertEqual(transport.value(), b"ACK 2\nERR line-too-long limit 16\n")
        self.assertTrue(transport.disconnecting)

    def test_err_without_waiting_forever(self) -> None:
        """
        A sink that does not confirm within half the close timeout: the
        ERR goes out without the ACK (the lines may or may not be written;
        the client sends them again), and the connection closes.
        """
        proto, transport, clock, queue = ack_connection(
            interval=10.0, close_timeout=4.0
        )
        proto.dataReceived(b"a\n" + b"x" * 40)
        clock.advance(1.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.1)
        self.assertEqual(transport.value(), b"ERR line-too-long limit 16\n")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost()
        confirm_all(queue)  # too late: nothing more is written
        self.assertEqual(transport.value(), b"ERR line-too-long limit 16\n")

    def test_err_at_once_when_all_acknowledged(self) -> None:
        proto, transport, _, queue = ack_connection()
        proto.dataReceived(b"a\n")
        confirm_all(queue)
        proto.dataReceived(b"x" * 40)
        self.assertEqual(transport.value(), b"ACK 1\nERR line-too-long limit 16\n")
        self.assertTrue(transport.disconnecting)

    def test_half_close_waits_for_acks(self) -> None:
        """
        A client that sends and shuts its write side gets its ACK before
        the server closes.
        """
        proto, transport, _, queue = ack_connection()
        proto.dataReceived(b"a\nb\n")
        proto.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        confirm_all(queue)
        self.assertEqual(transport.value(), b"ACK 2\n")
        self.assertTrue(transport.disconnecting)

    def test_interval_must_be_positive(self) -> None:
        self.assertRaises(ValueError, AckSinkHandlerFactory, SinkQueue(2, 1), None, 0)


# -- through real sockets, in process ----------------------------------------------


class AckLoopbackTests(TestCase):
    @inlineCallbacks
    def test_ack_through_a_file_sink(self) -> Generator[Any, Any, None]:
        """
        A client on a real loopback socket, with the file sink (fsync
        every batch) in this process: it reads ACKs until C{ACK N}, and
        then every line is in the file.
        """
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        directory = temp_dir(self)
        path = f"{directory}/lines.log"
        sink = FileSinkFactory(path, reactor, fsync=Fsync.BATCH)
        server = yield start_server(self, sink=sink, ack=True)
        port = server.port_numbers()[0]
        total = 3000
        lines = b"".join(b"line %d\n" % i for i in range(total))

        def client() -> bytes:
            peer = Peer(port, send=lines)
            try:
                peer.read_until(lambda: peer.received.endswith(b"ACK %d\n" % total), 20)
                return peer.received
            finally:
                peer.close()

        received = yield deferToThread(client)
        self.assertTrue(received.endswith(b"ACK %d\n" % total), received[-100:])
        with open(path, "rb") as written:
            self.assertEqual(written.read(), lines)


class EmbeddingTests(SynchronousTestCase):
    def test_ack_needs_the_sink_handler(self) -> None:
        """
        Embedding with C{ack=True} and the echo handler is refused.
        """
        from lineserver.server import LineServer, ServerConfig
        from tests.support import reactor

        error = self.assertRaises(
            ValueError, LineServer, ServerConfig(ack=True), reactor, "echo"
        )
        self.assertIn("sink handler", str(error))
