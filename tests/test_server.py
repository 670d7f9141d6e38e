"""LineServer through real loopback sockets: echo, sink, limits, faults, stop."""

from __future__ import annotations

import socket
import time
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lineserver.flow import Pause, SinkQueue
from lineserver.handlers import EchoHandler
from lineserver.interfaces import IConnection, ILineHandler, ISink, ISinkFactory
from lineserver.protocol import ProtocolSettings
from lineserver.server import LineServer, ServerConfig
from tests.support import MemorySinkFactory, connect, later, reactor, start_server

LOCAL = "tcp:0:interface=127.0.0.1"


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

        def tracking_put(lines: list[bytes], cost: int) -> None:
            put(lines, cost)
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
        yield later(0.2)
        yield server.stopService()
        self.assertEqual(len(sink.store), 1500)
        self.assertTrue(sink.sinks[0].closed)
        for client in clients:
            yield client.gone
        self.assertEqual(len(server.registry), 0)

    @inlineCallbacks
    def test_sink_that_never_opens_escalates(self) -> Generator[Any, Any, None]:
        """
        A sink that fails every time is restarted until the restart
        intensity is exceeded; then the server escalates.
        """
        escalated: Deferred[list[Failure]] = Deferred()
        factory = FailingSinkFactory()
        server = LineServer(
            ServerConfig(ports=[LOCAL], max_restarts=2, restart_period=30),
            reactor,
            sink=factory,
            on_escalate=lambda reason: escalated.callback([reason]),
        )
        server.startService()
        self.addCleanup(server.stopService)
        escalated.addTimeout(10, reactor)
        (reason,) = yield escalated
        self.assertEqual(factory.built, 3)
        self.assertTrue(server.escalated)
        self.assertIsInstance(reason, Failure)
        self.flushLoggedErrors(OSError)


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

        def fragile(queue: SinkQueue) -> Any:
            return lambda conn: Fragile(conn)

        server = yield self.start(handler=fragile)
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
        yield later(0.05)
        self.assertIn(Pause.CONNECTION_LIMIT, server.listeners[0].gate.reasons)
        third = yield connect(port)  # completes in the kernel's backlog
        third.transport.write(b"waiting\n")
        yield later(0.2)
        self.assertEqual(third.received, b"")
        first.transport.loseConnection()
        data = yield third.wait_for(8, timeout=5)
        self.assertEqual(data, b"waiting\n")
        for client in (second, third):
            client.transport.loseConnection()
            yield client.gone

    @inlineCallbacks
    def test_over_limit_reject(self) -> Generator[Any, Any, None]:
        """
        With overflow "reject", a client over the limit accepted in the same
        accept batch gets ERR too-many-connections.
        """
        server = yield self.start(handler="echo", max_connections=1, overflow="reject")
        registry = server.registry
        port = server.port_numbers()[0]
        first = yield connect(port)
        yield later(0.05)
        server.listeners[0].gate.release(Pause.CONNECTION_LIMIT)  # let one slip in
        second = yield connect(port)
        yield second.gone
        self.assertEqual(second.received, b"ERR too-many-connections\n")
        self.assertEqual(server.stats.get("connections.refused.limit"), 1)
        self.assertEqual(len(registry.active), 1)
        first.transport.loseConnection()
        yield first.gone

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
        yield later(0.5)
        self.assertTrue(
            any(m.startswith(f"could not listen on tcp:{port}") for m in messages),
            messages,
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
        import errno

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
