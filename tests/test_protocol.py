"""LineProtocol with StringTransport and Clock: batches, errors, failing handlers."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lineserver.admission import AdmissionPolicy
from lineserver.connections import ConnectionRegistry
from lineserver.flow import Pause, SinkQueue
from lineserver.handlers import (
    EchoHandlerFactory,
    LineFailed,
    OriginLine,
    PerLineHandler,
    SinkHandlerFactory,
)
from lineserver.interfaces import IConnection, ILineHandler
from lineserver.protocol import (
    LineFactory,
    LineProtocol,
    ProtocolSettings,
    describe_address,
)
from lineserver.stats import Stats

PEER = IPv4Address("TCP", "127.0.0.1", 5555)


@implementer(ILineHandler)
class Recorder:
    """
    A handler that records batches; fails on lines that start with b"boom".
    """

    built = 0

    def __init__(self, log: list[list[bytes]], connection: IConnection) -> None:
        self.log = log
        self.connection = connection
        self.lost = False
        Recorder.built += 1
        self.generation = Recorder.built

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        if any(line.startswith(b"boom") for line in lines):
            raise RuntimeError("boom")
        self.log.append(lines)

    def connection_lost(self) -> None:
        self.lost = True


class PerLine(PerLineHandler):
    def __init__(self, log: list[bytes]) -> None:
        self.log = log

    def line_received(self, line: bytes) -> None:
        if line == b"bad":
            raise ValueError("bad line")
        self.log.append(line)


def connect(
    handler_factory: Any,
    settings: ProtocolSettings | None = None,
    protocol_class: Any = None,
    registry: ConnectionRegistry[LineProtocol] | None = None,
) -> tuple[LineProtocol, StringTransport, LineFactory, Clock]:
    clock = Clock()
    stats = Stats()
    factory = LineFactory(
        handler_factory,
        registry or ConnectionRegistry(stats=stats),
        clock,
        settings or ProtocolSettings(max_line_length=16),
        stats,
        protocol_class,
    )
    proto = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    return proto, transport, factory, clock


class BatchTests(SynchronousTestCase):
    def test_is_a_connection(self) -> None:
        """
        The protocol provides IConnection, named after its peer.
        """
        proto, *_ = connect(EchoHandlerFactory())
        verifyObject(IConnection, proto)
        self.assertEqual(proto.identity, "#1 127.0.0.1:5555")

    def test_one_call_per_read(self) -> None:
        """
        All lines a read completes reach the handler in one call.
        """
        log: list[list[bytes]] = []
        proto, _, factory, _ = connect(lambda conn: Recorder(log, conn))
        proto.dataReceived(b"a\nb\r\nc")
        proto.dataReceived(b"\nd")
        self.assertEqual(log, [[b"a", b"b"], [b"c"]])
        self.assertEqual(factory.stats.get("lines.received"), 3)

    def test_echo_keeps_terminators(self) -> None:
        """
        Echo writes back exactly the complete lines, CRLF or LF as sent.
        """
        proto, transport, *_ = connect(EchoHandlerFactory())
        proto.dataReceived(b"one\r\ntwo\nthr")
        self.assertEqual(transport.value(), b"one\r\ntwo\n")

    def test_output_producer_registered(self) -> None:
        """
        The transport pauses reading when the client does not read echoes:
        the protocol registers a streaming producer that holds "output".
        """
        proto, transport, *_ = connect(EchoHandlerFactory())
        self.assertTrue(transport.streaming)
        assert transport.producer is not None
        transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(proto.gate.reasons, {Pause.OUTPUT})
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_sink_handler_feeds_queue(self) -> None:
        """
        In sink mode lines go to the queue, costing their raw size, and a
        full queue pauses the connection.
        """
        queue = SinkQueue(high_watermark=8, low_watermark=2)
        proto, transport, *_ = connect(SinkHandlerFactory(queue))
        proto.dataReceived(b"abc\r\nde\n")
        self.assertEqual(queue.take(100), ([b"abc", b"de"], 8))
        self.assertEqual(transport.producerState, "paused")
        queue.confirm(8)
        self.assertEqual(transport.producerState, "producing")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(queue.producers, 0)

    def test_sink_handler_tags_origin(self) -> None:
        """
        For a sink that wants origins, each line put is an L{OriginLine}
        naming its connection and peer; the bytes are unchanged, and a full
        queue pauses that connection too.
        """
        queue = SinkQueue(high_watermark=7, low_watermark=2)
        proto, transport, *_ = connect(SinkHandlerFactory(queue, origin=True))
        proto.dataReceived(b"abc\nde\n")
        lines, cost = queue.take(100)
        self.assertEqual((lines, cost), ([b"abc", b"de"], 7))
        for line in lines:
            assert isinstance(line, OriginLine)
            self.assertEqual(line.connection, proto.identity)
            self.assertEqual(line.peer, "127.0.0.1:5555")
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(proto.gate.reasons, {Pause.SINK})
        queue.confirm(7)
        self.assertEqual(transport.producerState, "producing")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(queue.producers, 0)

    def test_sink_handler_lines_plain(self) -> None:
        """
        Without origins the queue gets the framer's own lines, plain bytes.
        """
        queue = SinkQueue(high_watermark=100, low_watermark=2)
        proto, *_ = connect(SinkHandlerFactory(queue))
        proto.dataReceived(b"abc\n")
        (line,), _ = queue.take(100)
        self.assertIs(type(line), bytes)


class ErrorTests(SynchronousTestCase):
    def test_line_too_long(self) -> None:
        """
        An over-long line gets ERR line-too-long and the close; the lines
        before it in the same read are delivered.
        """
        log: list[list[bytes]] = []
        proto, transport, factory, _ = connect(lambda conn: Recorder(log, conn))
        proto.dataReceived(b"fine\n" + b"x" * 17 + b"\nafter\n")
        self.assertEqual(log, [[b"fine"]])
        self.assertEqual(transport.value(), b"ERR line-too-long limit 16\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.stats.get("errors.line-too-long"), 1)
        proto.dataReceived(b"more\n")
        self.assertEqual(log, [[b"fine"]], "nothing is framed after the error")

    def test_abort_after_close_timeout(self) -> None:
        """
        A connection closed with an error is aborted if it has not gone
        after the close timeout (a peer that does not read).
        """
        proto, transport, factory, clock = connect(
            EchoHandlerFactory(), ProtocolSettings(max_line_length=4, close_timeout=3)
        )
        proto.dataReceived(b"toolong\n")
        clock.advance(2.9)
        self.assertFalse(transport.disconnected)
        clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        self.assertEqual(factory.stats.get("connections.aborted"), 1)

    def test_closed_in_time_cancels_abort(self) -> None:
        """
        A connection that goes in time leaves no timer behind.
        """
        proto, _, _, clock = connect(
            EchoHandlerFactory(), ProtocolSettings(max_line_length=4)
        )
        proto.dataReceived(b"toolong\n")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_partial_tail_discarded_and_counted(self) -> None:
        """
        An unterminated tail at disconnect is not delivered, and is counted.
        """
        log: list[list[bytes]] = []
        proto, _, factory, _ = connect(lambda conn: Recorder(log, conn))
        proto.dataReceived(b"whole\npart")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(log, [[b"whole"]])
        self.assertEqual(factory.stats.get("lines.partial_discarded"), 1)


class FailingHandlerTests(SynchronousTestCase):
    def test_handler_recreated(self) -> None:
        """
        A handler that raises is replaced by a fresh one; the batch is
        counted as failed, logged with the connection's identity, and the
        connection goes on.
        """
        log: list[list[bytes]] = []
        proto, transport, factory, _ = connect(lambda conn: Recorder(log, conn))
        first = proto.handler
        proto.dataReceived(b"boom\n")
        self.assertIsNot(proto.handler, first)
        assert isinstance(first, Recorder)
        self.assertTrue(first.lost)
        proto.dataReceived(b"next\n")
        self.assertEqual(log, [[b"next"]])
        self.assertEqual(factory.stats.get("lines.failed"), 1)
        self.assertEqual(factory.stats.get("handler.failures"), 1)
        self.assertFalse(transport.disconnecting)
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)

    def test_line_failed_names_one_line(self) -> None:
        """
        A per-line handler that fails on one line: lines before it were
        handled, that line is counted, the lines after it go to the fresh
        handler.
        """
        seen: list[bytes] = []
        proto, _, factory, _ = connect(lambda conn: PerLine(seen))
        proto.dataReceived(b"a\nbad\nc\nd\n")
        self.assertEqual(seen, [b"a", b"c", b"d"])
        self.assertEqual(factory.stats.get("lines.failed"), 1)
        self.flushLoggedErrors(ValueError)

    def test_line_failed_is_exception(self) -> None:
        """
        LineFailed carries the index and the reason.
        """
        error = LineFailed(2, KeyError("k"))
        self.assertEqual(error.index, 2)
        self.assertIsInstance(error.reason, KeyError)


class ClassicSubclass(LineProtocol):
    """
    A classic LineReceiver subclass: one lineReceived call per line.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.got: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.got.append(line)
        if line == b"pause":
            self.pauseProducing()
        if line == b"raise":
            raise KeyError(line)


class ClassicSubclassTests(SynchronousTestCase):
    def test_pause_at_line_boundary(self) -> None:
        """
        A subclass overriding lineReceived gets one call per line, and a
        pause stops delivery at the line boundary until resumeProducing.
        """
        proto, transport, *_ = connect(
            EchoHandlerFactory(), protocol_class=ClassicSubclass
        )
        assert isinstance(proto, ClassicSubclass)
        proto.dataReceived(b"a\npause\nb\nc\n")
        self.assertEqual(proto.got, [b"a", b"pause"])
        self.assertEqual(transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(proto.got, [b"a", b"pause", b"b", b"c"])
        self.assertEqual(transport.producerState, "producing")

    def test_exception_costs_one_line(self) -> None:
        """
        An exception from lineReceived is logged and counted; the next
        lines are still delivered.
        """
        proto, _, factory, _ = connect(
            EchoHandlerFactory(), protocol_class=ClassicSubclass
        )
        assert isinstance(proto, ClassicSubclass)
        proto.dataReceived(b"raise\nok\n")
        self.assertEqual(proto.got, [b"raise", b"ok"])
        self.assertEqual(factory.stats.get("lines.failed"), 1)
        self.flushLoggedErrors(KeyError)


class ShortLines(LineProtocol):
    """
    A subclass that sets its own MAX_LENGTH and a CRLF delimiter.
    """

    MAX_LENGTH = 5
    delimiter = b"\r\n"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.got: list[bytes] = []
        self.exceeded: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.got.append(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.exceeded.append(line)


class RawSwitch(LineProtocol):
    """
    A subclass that switches to raw mode after a C{RAW} line, as
    C{LineReceiver} protocols do for a length-prefixed body, and back to
    lines after C{n} raw bytes.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.got: list[bytes] = []
        self.raw: list[bytes] = []
        self.want = 0

    def lineReceived(self, line: bytes) -> None:
        self.got.append(line)
        if line.startswith(b"RAW "):
            self.want = int(line[4:])
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        body, rest = data[: self.want], data[self.want :]
        self.raw.append(body)
        self.want -= len(body)
        if self.want == 0:
            self.setLineMode(rest)


class LineReceiverContractTests(SynchronousTestCase):
    """
    What a LineReceiver subclass may set or call is honoured, not
    silently overridden.
    """

    def test_subclass_max_length_and_delimiter(self) -> None:
        """
        A subclass's MAX_LENGTH wins over the configured limit, and its
        delimiter is taken exactly: a bare LF is data, CRLF ends a line
        (also split across reads), and sendLine ends with it.
        """
        proto, transport, *_ = connect(
            EchoHandlerFactory(),
            settings=ProtocolSettings(max_line_length=1000),
            protocol_class=ShortLines,
        )
        assert isinstance(proto, ShortLines)
        self.assertEqual(proto.MAX_LENGTH, 5)
        proto.dataReceived(b"a\nb\r\nabcde\r")
        proto.dataReceived(b"\ntoolong\r\n")
        self.assertEqual(proto.got, [b"a\nb", b"abcde"])
        self.assertEqual(transport.value(), b"ERR line-too-long limit 5\r\n")
        self.assertEqual(proto.exceeded, [b""])  # its hook heard of it

    def test_configured_limit_without_override(self) -> None:
        """
        Without a subclass MAX_LENGTH, the configured limit applies.
        """
        proto, *_ = connect(
            EchoHandlerFactory(), settings=ProtocolSettings(max_line_length=1000)
        )
        self.assertEqual(proto.MAX_LENGTH, 1000)

    def test_raw_mode(self) -> None:
        """
        setRawMode in lineReceived hands what follows that line (in the same
        read and later ones) to rawDataReceived; setLineMode hands the rest
        back to lines.
        """
        proto, *_ = connect(EchoHandlerFactory(), protocol_class=RawSwitch)
        assert isinstance(proto, RawSwitch)
        proto.dataReceived(b"a\nRAW 6\nxy\nz")
        self.assertEqual((proto.got, proto.raw), ([b"a", b"RAW 6"], [b"xy\nz"]))
        proto.dataReceived(b"wvb\nc\n")
        self.assertEqual(proto.raw, [b"xy\nz", b"wv"])
        self.assertEqual(proto.got, [b"a", b"RAW 6", b"b", b"c"])


class AddressTests(SynchronousTestCase):
    def test_describe(self) -> None:
        """
        IPv4 as host:port, IPv6 bracketed.
        """
        self.assertEqual(describe_address(PEER), "127.0.0.1:5555")
        self.assertEqual(describe_address(IPv6Address("TCP", "::1", 7)), "[::1]:7")


class StartTLSTransport(StringTransport):
    """
    Records the context a STARTTLS upgrade started TLS with.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.tls: list[object] = []

    def startTLS(self, context: object) -> None:  # noqa: N802
        self.tls.append(context)


class ScreeningTests(SynchronousTestCase):
    def starttls_connection(
        self, **policy: Any
    ) -> tuple[LineProtocol, StartTLSTransport, list[list[bytes]]]:
        log: list[list[bytes]] = []
        clock = Clock()
        stats = Stats()
        factory = LineFactory(
            lambda conn: Recorder(log, conn),  # type: ignore[arg-type]
            ConnectionRegistry(stats=stats),
            clock,
            ProtocolSettings(),
            stats,
            policy=AdmissionPolicy(**policy, starttls_context=(context := object())),
        )
        proto = factory.buildProtocol(PEER)
        transport = StartTLSTransport()
        proto.makeConnection(transport)
        self.context = context
        return proto, transport, log

    def test_lines_then_starttls_in_one_read(self) -> None:
        """
        On a STARTTLS port, plaintext lines in the same read as a final
        STARTTLS are delivered first, then the upgrade starts.
        """
        proto, transport, log = self.starttls_connection(starttls=True)
        proto.dataReceived(b"one\r\ntwo\nSTARTTLS\n")
        self.assertEqual(log, [[b"one", b"two"]])
        self.assertEqual(transport.value(), b"OK starttls\n")
        self.assertEqual(transport.tls, [self.context])
        self.assertEqual(proto.factory.stats.get("lines.received"), 2)

    def test_starttls_later_and_never_data(self) -> None:
        """
        Lines flow in plaintext read after read; a later STARTTLS still
        upgrades and is never delivered; bytes after it are refused.
        """
        proto, transport, log = self.starttls_connection(starttls=True)
        proto.dataReceived(b"a\n")
        proto.dataReceived(b"b\nc\n")
        proto.dataReceived(b"d\nSTARTTLS\ninjected\n")
        self.assertEqual(log, [[b"a"], [b"b", b"c"], [b"d"]])
        self.assertEqual(transport.tls, [])
        self.assertTrue(
            transport.value().startswith(b"ERR protocol-error"), transport.value()
        )

    def test_no_rule_every_line_is_data(self) -> None:
        """
        Where no admission rule applies (no --starttls, --require-tls or
        --auth-tokens), a first line STARTTLS or AUTH is data, unchanged.
        """
        proto, transport, log = self.starttls_connection()
        proto.dataReceived(b"STARTTLS\nAUTH x\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(log, [[b"STARTTLS", b"AUTH x"]])
        self.assertEqual(transport.tls, [])

    def test_not_offered_where_rules_apply(self) -> None:
        """
        Where a rule applies but STARTTLS is not offered (tokens on a plain
        port), STARTTLS as a first line is refused; once lines flow, it is
        data.
        """
        proto, transport, log = self.starttls_connection(check_token=b"t".__eq__)
        proto.dataReceived(b"STARTTLS\n")
        self.assertEqual(transport.value(), b"ERR tls-unavailable\n")
        self.assertEqual(log, [])
        proto, transport, log = self.starttls_connection(check_token=b"t".__eq__)
        proto.dataReceived(b"AUTH t\nx\n")
        proto.dataReceived(b"STARTTLS\ny\n")
        self.assertEqual(log, [[b"x"], [b"STARTTLS", b"y"]])
        self.assertEqual(transport.value(), b"")


class CloseTests(SynchronousTestCase):
    def test_close_twice(self) -> None:
        """
        A refused client that then shuts its write side is closed once:
        the output producer is unregistered once, before the close.
        """
        proto, transport, *_ = connect(EchoHandlerFactory())
        proto.dataReceived(b"x" * 20 + b"\n")
        self.assertTrue(transport.value().startswith(b"ERR line-too-long"))
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)
        proto.readConnectionLost()
        self.assertTrue(transport.disconnecting)
