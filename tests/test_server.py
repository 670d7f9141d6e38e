"""LineServer through real loopback sockets: echo, sink, limits, faults, stop."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lineserver.flow import IAckOwner, Pause, SinkQueue
from lineserver.handlers import EchoHandler, SinkHandlerFactory
from lineserver.interfaces import IConnection, ILineHandler, ISink, ISinkFactory
from lineserver.protocol import ProtocolSettings
from lineserver.server import LineServer, Phase, ServerConfig
from tests.support import (
    MemorySinkFactory,
    connect,
    free_port,
    later,
    reactor,
    start_server,
)

LOCAL = "tcp:0:interface=127.0.0.1"


def until(
    check: Callable[[], bool], what: str, timeout: float = 10.0
) -> Deferred[None]:
    """
    Poll C{check} every 20 ms from the reactor (a test's own reactor must
    keep running to serve, so L{tests.support.wait_until} cannot be used).

    @return: a Deferred that fires once C{check()} is true, or fails naming
        C{what} after C{timeout} seconds.
    """

    async def poll() -> None:
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await later(0.02)

    return Deferred.fromCoroutine(poll())


def numbered(prefix: bytes, count: int) -> list[bytes]:
    return [b"%s %06d" % (prefix, i) for i in range(count)]


class ServerTestCase(TestCase):
    def start(
        self,
        handler: Any = "sink",
        sink: ISinkFactory | None = None,
        **config: Any,
    ) -> Deferred[LineServer]:
        return start_server(self, handler, sink, **config)


class EchoTests(ServerTestCase):
    @inlineCallbacks
    def test_round_trip_keeps_terminator(self) -> Generator[Any, Any, None]:
        """
        Echo replies byte for byte: CRLF lines with CRLF, LF lines with LF.
        """
        server = yield self.start(handler="echo")
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"one\r\ntwo\n\x00\xff\n")
        data = yield client.wait_for(12)
        self.assertEqual(data, b"one\r\ntwo\n\x00\xff\n")
        client.transport.loseConnection()
        yield client.gone

    @inlineCallbacks
    def test_client_that_does_not_read(self) -> Generator[Any, Any, None]:
        """
        A client that sends but never reads is paused: the server stops
        reading from it instead of buffering its echoes without limit.
        """
        server = yield self.start(handler="echo")
        port = server.port_numbers()[0]
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.setblocking(False)
        self.addCleanup(raw.close)
        chunk = b"x" * 1000 + b"\n"
        sent = 0
        stalled_since = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sent < 200 << 20:
            try:
                sent += raw.send(chunk * 64)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.3:
                    break
            yield later(0)
        self.assertIsNotNone(stalled_since, "the server never stopped reading")
        (conn,) = server.registry.active
        self.assertIn(Pause.OUTPUT, conn.gate.reasons)
        buffered = len(conn.transport.dataBuffer) + sum(
            map(len, conn.transport._tempDataBuffer)
        )
        self.assertLess(buffered, 1 << 20)
        self.assertLess(sent, 50 << 20)


@implementer(ISinkFactory)
class FailingSinkFactory:
    description = "failing:"

    def __init__(self) -> None:
        self.built = 0

    def __call__(self) -> ISink:
        self.built += 1
        return FailingSink()


@implementer(ISink)
class FailingSink:
    def open(self) -> Deferred[None]:
        return fail(OSError("cannot open"))

    def write(self, lines: list[bytes]) -> Deferred[None]:
        raise AssertionError("never opened")

    def close(self) -> Deferred[None]:
        return fail(OSError("never opened"))


class SinkTests(ServerTestCase):
    @inlineCallbacks
    def test_many_clients_all_lines(self) -> Generator[Any, Any, None]:
        """
        Lines from many concurrent clients all reach the sink, each client's
        in order.
        """
        sink = MemorySinkFactory()
        server = yield self.start(sink=sink)
        port = server.port_numbers()[0]
        clients = yield Deferred.fromCoroutine(_connect_many(port, 10))
        for n, client in enumerate(clients):
            client.transport.write(b"\n".join(numbered(b"c%d" % n, 1000)) + b"\n")
            client.transport.loseConnection()
        for client in clients:
            yield client.gone
        yield server.registry.when_empty()
        yield server.sink_service.flushed()
        self.assertEqual(len(sink.store), 10_000)
        for n in range(10):
            mine = [line for line in sink.store if line.startswith(b"c%d " % n)]
            self.assertEqual(mine, numbered(b"c%d" % n, 1000))

    @inlineCallbacks
    def test_slow_sink_bounded_no_loss(self) -> Generator[Any, Any, None]:
        """
        A slow sink pauses the client: the queue never holds more than the
        high watermark plus one read per connection, and every line arrives,
        in order.
        """
        sink = MemorySinkFactory(delay=0.003)
        server = yield self.start(
            sink=sink,
            high_watermark=64 << 10,
            low_watermark=16 << 10,
            max_batch_bytes=16 << 10,
        )
        queue: SinkQueue = server.queue
        peak = [0]
        put = queue.put

        def tracking_put(
            lines: list[bytes],
            cost: int,
            owner: IAckOwner | None = None,
            count: int | None = None,
        ) -> None:
            put(lines, cost, owner, count)
            peak[0] = max(peak[0], queue.buffered)

        queue.put = tracking_put  # type: ignore[method-assign]
        client = yield connect(server.port_numbers()[0])
        lines = numbered(b"position lat=52.520008 lon=13.404954 speed=42.1", 40_000)
        client.transport.write(b"\n".join(lines) + b"\n")
        client.transport.loseConnection()
        yield client.gone
        yield server.registry.when_empty()
        yield server.sink_service.flushed()
        self.assertEqual(sink.store, lines)
        self.assertGreaterEqual(queue.pauses, 1)
        self.assertLessEqual(peak[0], (64 << 10) + (64 << 10))

    @inlineCallbacks
    def test_stop_flushes_then_closes(self) -> Generator[Any, Any, None]:
        """
        stopService with clients still connected: their lines reach the
        sink, the sink is closed, then the connections are closed.
        """
        sink = MemorySinkFactory(delay=0.001)
        server = yield self.start(sink=sink, shutdown_timeout=5)
        clients = yield Deferred.fromCoroutine(
            _connect_many(server.port_numbers()[0], 3)
        )
        for n, client in enumerate(clients):
            client.transport.write(b"\n".join(numbered(b"s%d" % n, 500)) + b"\n")
        yield until(
            lambda: server.stats.get("lines.received") == 1500, "lines received"
        )
        yield server.stopService()
        self.assertEqual(len(sink.store), 1500)
        self.assertTrue(sink.sinks[0].closed)
        for client in clients:
            yield client.gone
        self.assertEqual(len(server.registry), 0)


async def _connect_many(port: int, count: int) -> list[Any]:
    return [await connect(port) for _ in range(count)]


@implementer(ILineHandler)
class Fragile(EchoHandler):
    """
    Echo that raises on the line b"boom".
    """

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        if b"boom" in lines:
            raise RuntimeError("boom")
        super().lines_received(lines, raw)


class FaultTests(ServerTestCase):
    @inlineCallbacks
    def test_handler_failure_costs_nothing_else(self) -> Generator[Any, Any, None]:
        """
        A handler exception on one connection: that connection goes on with
        a fresh handler, the other connection is untouched.
        """

        server = yield self.start(handler=fragile_handlers)
        port = server.port_numbers()[0]
        bad = yield connect(port)
        good = yield connect(port)
        bad.transport.write(b"boom\n")
        good.transport.write(b"hello\n")
        yield good.wait_for(6)
        bad.transport.write(b"still here\n")
        data = yield bad.wait_for(11)
        self.assertEqual(data, b"still here\n")
        self.assertEqual(server.stats.get("handler.failures"), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        for client in (bad, good):
            client.transport.loseConnection()
            yield client.gone

    @inlineCallbacks
    def test_connection_limit_waits_then_serves(self) -> Generator[Any, Any, None]:
        """
        At --max-connections the listener stops reading its socket; a client
        past the limit is served as soon as a slot frees up.
        """
        server = yield self.start(handler="echo", max_connections=2)
        port = server.port_numbers()[0]
        first = yield connect(port)
        second = yield connect(port)
        gate = server.listeners[0].gate
        yield until(
            lambda: Pause.CONNECTION_LIMIT in gate.reasons, "the listener pausing"
        )
        third = yield connect(port)  # completes in the kernel's backlog
        third.transport.write(b"waiting\n")
        # A round trip on a served connection: the server has been through
        # its loop since the third connected, and still does not serve it.
        second.transport.write(b"ping\n")
        yield second.wait_for(5)
        self.assertEqual(third.received, b"")
        self.assertEqual(len(server.registry), 2)
        first.transport.loseConnection()
        data = yield third.wait_for(8, timeout=5)
        self.assertEqual(data, b"waiting\n")
        for client in (second, third):
            client.transport.loseConnection()
            yield client.gone

    @inlineCallbacks
    def test_listen_retries_until_port_frees(self) -> Generator[Any, Any, None]:
        """
        A busy port is logged as "could not listen on ..." and retried with
        backoff; the server listens once the port frees up.
        """
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        messages: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.error:
                messages.append(event["log_format"].format(**event))

        globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[arg-type]
        server = LineServer(
            ServerConfig(ports=[f"tcp:{port}:interface=127.0.0.1"]),
            reactor,
            handler="echo",
        )
        server.startService()
        self.addCleanup(server.stopService)
        yield until(
            lambda: any(
                m.startswith(f"could not listen on tcp:{port}") for m in messages
            ),
            "the listen failure log",
        )
        self.assertIn("Address already in use", messages[0])
        blocker.close()
        listening = server.when_listening()
        listening.addTimeout(5, reactor)
        yield listening
        client = yield connect(port)
        client.transport.write(b"up\n")
        yield client.wait_for(3)
        client.transport.loseConnection()
        yield client.gone


@implementer(ILineHandler)
class _Unused:
    def __init__(self, connection: IConnection) -> None:
        pass

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        pass

    def connection_lost(self) -> None:
        pass


class SettingsTests(ServerTestCase):
    @inlineCallbacks
    def test_line_too_long_over_socket(self) -> Generator[Any, Any, None]:
        """
        Through a socket: ERR line-too-long, the close, earlier lines kept.
        """
        sink = MemorySinkFactory()
        server = yield self.start(
            sink=sink, settings=ProtocolSettings(max_line_length=10)
        )
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"short\n" + b"y" * 11 + b"\n")
        yield client.gone
        self.assertEqual(client.received, b"ERR line-too-long limit 10\n")
        yield server.sink_service.flushed()
        self.assertEqual(sink.store, [b"short"])


class AcceptFaultTests(ServerTestCase):
    @inlineCallbacks
    def test_injected_enfile_recovers(self) -> Generator[Any, Any, None]:
        """
        With accept() failing ENFILE (injected through the listener's guard),
        an existing client is still served, the counter shows the errors,
        and a client that connected during the fault is served by itself
        once the fault clears.
        """

        server = yield self.start(handler="echo")
        port = server.port_numbers()[0]
        existing = yield connect(port)
        listener = server.listeners[0]
        assert listener.guard is not None
        listener.guard.inject(errno.ENFILE, 5)
        waiting = yield connect(port)  # completes in the kernel's backlog
        waiting.transport.write(b"queued\n")
        existing.transport.write(b"alive\n")
        data = yield existing.wait_for(6)
        self.assertEqual(data, b"alive\n")
        echoed = yield waiting.wait_for(7, timeout=5)
        self.assertEqual(echoed, b"queued\n")
        self.assertEqual(server.stats.get("accept.errors.ENFILE"), 5)
        for client in (existing, waiting):
            client.transport.loseConnection()
            yield client.gone


def captured_logs(case: TestCase) -> list[str]:
    """
    @return: a list that receives every log event, formatted, until the
        end of the test.
    """
    messages: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    case.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[arg-type]
    return messages


@implementer(ISink)
class GatedSink:
    """
    A sink whose open and writes wait for the test: C{opened} and each
    Deferred in C{writes} fire when the test fires them.
    """

    def __init__(self, open_now: bool) -> None:
        self.opened: Deferred[None] = succeed(None) if open_now else Deferred()
        self.writes: list[tuple[list[bytes], Deferred[None]]] = []
        self.closes = 0

    def open(self) -> Deferred[None]:
        return self.opened

    def write(self, lines: list[bytes]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.writes.append((lines, done))
        return done

    def close(self) -> Deferred[None]:
        self.closes += 1
        return succeed(None)


@implementer(ISinkFactory)
class GatedSinkFactory:
    description = "gated:"

    def __init__(self, open_now: bool = True) -> None:
        self.open_now = open_now
        self.sinks: list[GatedSink] = []

    def __call__(self) -> GatedSink:
        sink = GatedSink(self.open_now)
        self.sinks.append(sink)
        return sink


class SinkBug(Exception):
    """
    A bug in a sink (not an outage, which an OSError would be).
    """


@implementer(ISinkFactory)
class FlakySinkFactory:
    """
    The first sink opens, then fails its first write with a bug; every
    later one fails to open with a bug.
    """

    description = "flaky:"

    def __init__(self) -> None:
        self.built = 0

    def __call__(self) -> ISink:
        self.built += 1
        sink = GatedSink(open_now=self.built == 1)
        if self.built > 1:
            sink.opened.errback(SinkBug("cannot open"))
        sink.write = lambda lines: fail(SinkBug("bug in write"))  # type: ignore[method-assign]
        return sink


def fragile_handlers(queue: SinkQueue) -> Any:
    return lambda conn: Fragile(conn)


class ConstructionTests(TestCase):
    def test_sink_handler_needs_a_sink(self) -> None:
        """
        The sink handler without a sink would pause every client forever at
        the watermark: it is a ValueError at construction, whether the
        handler is named or given.
        """
        for handler in ("sink", SinkHandlerFactory):
            error = self.assertRaises(
                ValueError, LineServer, ServerConfig(ports=[LOCAL]), reactor, handler
            )
            self.assertIn("needs a sink", str(error))
        error = self.assertRaises(ValueError, LineServer, ServerConfig(), reactor)
        self.assertIn("handler='echo'", str(error))

    def test_echo_and_own_handlers_need_no_sink(self) -> None:
        """
        Echo and a handler builder of one's own build without a sink.
        """
        LineServer(ServerConfig(ports=[LOCAL]), reactor, "echo")
        LineServer(ServerConfig(ports=[LOCAL]), reactor, fragile_handlers)


class StartTests(ServerTestCase):
    def server(self, sink: ISinkFactory, port: int, **config: Any) -> LineServer:
        config.setdefault("max_restarts", 2)
        config.setdefault("restart_period", 30)
        server = LineServer(
            ServerConfig(ports=[f"tcp:{port}:interface=127.0.0.1"], **config),
            reactor,
            sink=sink,
            on_start_failed=self.start_failures.append,
            on_escalate=self.escalations.append,
        )
        self.addCleanup(server.stopService)
        return server

    def setUp(self) -> None:
        self.start_failures: list[Failure] = []
        self.escalations: list[Failure] = []

    @inlineCallbacks
    def test_listens_only_once_sink_is_open(self) -> Generator[Any, Any, None]:
        """
        While the sink opens, the port refuses connections; once it is
        open, the server listens and lines flow.
        """
        sink = GatedSinkFactory(open_now=False)
        port = free_port()
        server = self.server(sink, port)
        server.startService()
        self.assertIs(server.phase, Phase.STARTING)
        yield self.assertFailure(connect(port), ConnectionRefusedError)
        sink.sinks[0].opened.callback(None)
        yield server.when_listening()
        client = yield connect(port)
        client.transport.write(b"after open\n")
        yield until(lambda: bool(sink.sinks[0].writes), "a write")
        self.assertEqual(sink.sinks[0].writes[0][0], [b"after open"])
        sink.sinks[0].writes[0][1].callback(None)
        client.transport.loseConnection()
        yield client.gone

    @inlineCallbacks
    def test_sink_that_cannot_open_fails_start(self) -> Generator[Any, Any, None]:
        """
        A sink that fails to open at start fails the start: the reason is
        logged as "could not open sink <url>: <reason>", the server stops,
        on_start_failed is called once, the sink is not restarted, and the
        port refused connections throughout.
        """
        messages = captured_logs(self)
        sink = GatedSinkFactory(open_now=False)
        port = free_port()
        server = self.server(sink, port)
        server.startService()
        yield self.assertFailure(connect(port), ConnectionRefusedError)
        sink.sinks[0].opened.errback(OSError(13, "Permission denied"))
        yield until(lambda: bool(self.start_failures), "on_start_failed")
        self.assertEqual(len(self.start_failures), 1)
        self.assertIsInstance(self.start_failures[0].value, OSError)
        self.assertEqual(self.escalations, [])
        self.assertFalse(server.running)
        self.assertIs(server.phase, Phase.STOPPED)
        self.assertIs(server.start_failure, self.start_failures[0])
        self.assertIn("could not open sink gated:: Permission denied", messages)
        self.assertEqual(len(sink.sinks), 1)
        self.assertEqual(server.restarts, 0)
        yield self.assertFailure(connect(port), ConnectionRefusedError)
        self.assertFalse(any(m.startswith("listening on") for m in messages))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @inlineCallbacks
    def test_first_sink_outage_is_one_warning(
        self,
    ) -> Generator[Any, Any, None]:
        """
        An outage of the sink the server started with (its write fails with
        an OSError) is reported as every later one is: the supervisor's
        warning, which says what waits, and no logged failure with a
        traceback; the rebuilt sink gets the batch again.
        """
        messages = captured_logs(self)
        sink = GatedSinkFactory()
        port = free_port()
        server = self.server(sink, port)
        server.startService()
        yield server.when_listening()
        client = yield connect(port)
        client.transport.write(b"kept\n")
        yield until(lambda: bool(sink.sinks[0].writes), "a write")
        sink.sinks[0].writes[0][1].errback(
            OSError(errno.ECONNREFUSED, "Connection refused")
        )
        yield until(lambda: len(sink.sinks) == 2, "a rebuilt sink", timeout=10)
        yield until(lambda: bool(sink.sinks[1].writes), "the batch again")
        self.assertEqual(sink.sinks[1].writes[0][0], [b"kept"])
        sink.sinks[1].writes[0][1].callback(None)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(
            any(
                m.startswith("child sink is down (an outage, not a crash)")
                and "1 line(s) wait in the queue" in m
                for m in messages
            ),
            messages,
        )
        client.transport.loseConnection()
        yield client.gone

    @inlineCallbacks
    def test_stop_while_sink_opens(self) -> Generator[Any, Any, None]:
        """
        A stop while the sink is still opening ends; a sink that opens
        after it starts nothing: the port stays closed and the sink is
        closed.
        """
        sink = GatedSinkFactory(open_now=False)
        port = free_port()
        server = self.server(sink, port, shutdown_timeout=5)
        server.startService()
        stopped = server.stopService()
        sink.sinks[0].opened.callback(None)
        yield stopped
        self.assertIs(server.phase, Phase.STOPPED)
        self.assertEqual(sink.sinks[0].closes, 1)
        yield self.assertFailure(connect(port), ConnectionRefusedError)
        self.assertEqual(self.start_failures, [])

    @inlineCallbacks
    def test_sink_crash_after_start_escalates(self) -> Generator[Any, Any, None]:
        """
        After a good start, a sink that fails is restarted as before; one
        that keeps failing exceeds the restart intensity and the server
        escalates (not a start failure).
        """
        factory = FlakySinkFactory()
        port = free_port()
        server = self.server(factory, port)
        server.startService()
        yield server.when_listening()
        client = yield connect(port)
        client.transport.write(b"one line\n")
        yield until(lambda: bool(self.escalations), "escalation")
        self.assertEqual(factory.built, 3)
        self.assertTrue(server.escalated)
        self.assertEqual(self.start_failures, [])
        yield client.gone
        self.flushLoggedErrors(SinkBug)


class BindTests(ServerTestCase):
    @inlineCallbacks
    def test_bound_in_privileged_start_listens_in_start(
        self,
    ) -> Generator[Any, Any, None]:
        """
        privilegedStartService (what twistd calls before dropping
        privileges) binds the port without listening: it is taken, yet
        refuses connections; startService then listens on that very socket.
        """
        port = free_port()
        server = LineServer(
            ServerConfig(ports=[f"tcp:{port}:interface=127.0.0.1"]), reactor, "echo"
        )
        server.privilegedStartService()
        self.addCleanup(server.stopService)
        other = socket.socket()
        self.addCleanup(other.close)
        error = self.assertRaises(OSError, other.bind, ("127.0.0.1", port))
        self.assertEqual(error.errno, errno.EADDRINUSE)
        yield self.assertFailure(connect(port), ConnectionRefusedError)
        server.startService()
        yield server.when_listening()
        self.assertEqual(server.port_numbers(), [port])
        client = yield connect(port)
        client.transport.write(b"bound early\n")
        data = yield client.wait_for(12)
        self.assertEqual(data, b"bound early\n")
        client.transport.loseConnection()
        yield client.gone


class StopTests(ServerTestCase):
    @inlineCallbacks
    def send_and_hold(
        self, server: LineServer, sink: GatedSinkFactory, count: int
    ) -> Generator[Any, Any, Any]:
        """
        A client sends C{count} lines; the first batch is in the sink's
        hands (its write pending), the rest queued.
        """
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"\n".join(numbered(b"held", count // 2)) + b"\n")
        yield until(lambda: bool(sink.sinks[0].writes), "the first write")
        client.transport.write(b"\n".join(numbered(b"late", count // 2)) + b"\n")
        yield until(
            lambda: server.stats.get("lines.received") == count, "every line received"
        )
        return client

    @inlineCallbacks
    def test_hanging_sink_stop_meets_deadline(self) -> Generator[Any, Any, None]:
        """
        A sink that never finishes its write does not hold the stop up: it
        ends within the shutdown timeout plus a small margin, with one log
        line counting the lines left unwritten; the client is disconnected.
        The sink gets no more writes, and is closed once its write ends.
        """
        messages = captured_logs(self)
        sink = GatedSinkFactory()
        server = yield self.start(sink=sink, shutdown_timeout=1.0)
        client = yield self.send_and_hold(server, sink, 200)
        began = reactor.seconds()
        yield server.stopService()
        took = reactor.seconds() - began
        self.assertGreaterEqual(took, 0.9)
        self.assertLess(took, 1.0 + 1.0)
        unwritten = [m for m in messages if "left unwritten" in m]
        self.assertEqual(len(unwritten), 1, messages)
        self.assertIn("sink gated: did not flush within", unwritten[0])
        self.assertIn(": 200 line(s) (", unwritten[0])
        yield client.gone
        (held,) = sink.sinks
        self.assertEqual(held.closes, 0)
        held.writes[0][1].callback(None)
        self.assertEqual(held.closes, 1)
        self.assertEqual(len(held.writes), 1)

    @inlineCallbacks
    def test_sink_bug_in_final_flush(self) -> Generator[Any, Any, None]:
        """
        A sink whose write fails with a bug (not an outage) during the
        final flush ends the stop at once (no wait for the deadline), is
        not restarted, and one log line counts the lines left unwritten,
        with the reason.
        """
        messages = captured_logs(self)
        sink = GatedSinkFactory()
        server = yield self.start(sink=sink, shutdown_timeout=30)
        client = yield self.send_and_hold(server, sink, 200)
        began = reactor.seconds()
        service = server.sink_service
        stopped = server.stopService()
        yield until(lambda: not service.running, "the stop to reach the sink")
        sink.sinks[0].writes[0][1].errback(RuntimeError("the sink has a bug"))
        yield stopped
        self.assertLess(reactor.seconds() - began, 10)
        unwritten = [m for m in messages if "left unwritten" in m]
        self.assertEqual(len(unwritten), 1, messages)
        self.assertIn(
            "sink gated: failed (the sink has a bug): 200 line(s) (",
            unwritten[0],
        )
        self.assertEqual(len(sink.sinks), 1)
        self.assertEqual(sink.sinks[0].closes, 1)
        self.assertEqual(server.restarts, 0)
        self.assertEqual(server.stats.get("lines.dropped.sink_failed"), 200)
        yield client.gone
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_sink_outage_in_final_flush(self) -> Generator[Any, Any, None]:
        """
        A sink whose write fails with an outage (a full disk) during the
        final flush is not given up at once: fresh sinks are tried until
        the shutdown deadline; one that hangs too is given up there, and
        the lines are counted as dropped for the deadline.
        """
        messages = captured_logs(self)
        sink = GatedSinkFactory()
        server = yield self.start(sink=sink, shutdown_timeout=2.0)
        client = yield self.send_and_hold(server, sink, 200)
        began = reactor.seconds()
        service = server.sink_service
        stopped = server.stopService()
        yield until(lambda: not service.running, "the stop to reach the sink")
        sink.sinks[0].writes[0][1].errback(OSError(28, "No space left on device"))
        yield stopped
        took = reactor.seconds() - began
        self.assertGreaterEqual(took, 1.5)
        self.assertLess(took, 2.0 + 1.0)
        self.assertTrue(any("is down at the stop: 200 line(s)" in m for m in messages))
        unwritten = [m for m in messages if "left unwritten" in m]
        self.assertEqual(len(unwritten), 1, messages)
        self.assertIn("sink gated: was down until the shutdown deadline", unwritten[0])
        # The fresh sink took the lines and hung; it is closed once its
        # write ends, and was never restarted by the supervisor.
        self.assertEqual(len(sink.sinks), 2)
        self.assertEqual(len(sink.sinks[1].writes), 1)
        self.assertEqual(server.restarts, 0)
        self.assertEqual(server.stats.get("lines.dropped.shutdown_timeout"), 200)
        yield client.gone
        sink.sinks[1].writes[0][1].callback(None)
        self.assertEqual(sink.sinks[1].closes, 1)
        self.flushLoggedErrors(OSError)

    @inlineCallbacks
    def test_stop_then_start_again(self) -> Generator[Any, Any, None]:
        """
        stopService then startService on the same server: it listens on its
        port again, a fresh sink opens (the old one stays closed), new
        clients are accepted, and their lines reach the sink.
        """
        sink = MemorySinkFactory()
        port = free_port()
        server = yield self.start(
            sink=sink, ports=[f"tcp:{port}:interface=127.0.0.1"], shutdown_timeout=5
        )
        first = yield connect(port)
        first.transport.write(b"before\n")
        yield until(lambda: sink.store == [b"before"], "the first line")
        yield server.stopService()
        yield first.gone
        self.assertTrue(sink.sinks[0].closed)
        yield self.assertFailure(connect(port), ConnectionRefusedError)
        server.startService()
        yield server.when_listening()
        self.assertEqual(server.port_numbers(), [port])
        second = yield connect(port)
        second.transport.write(b"after\n")
        yield until(lambda: sink.store == [b"before", b"after"], "the second line")
        self.assertEqual(second.received, b"")
        self.assertEqual(len(sink.sinks), 2)
        self.assertFalse(sink.sinks[1].closed)
        yield server.stopService()
        yield second.gone
        self.assertTrue(sink.sinks[1].closed)
