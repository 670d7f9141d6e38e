"""Shared pieces for tests through real loopback sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory

reactor: Any = _reactor


class Client(Protocol):
    """
    A test client: collects what it receives, tells when it is gone.
    """

    def __init__(self) -> None:
        self.received = b""
        self.gone: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._waits: list[tuple[int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        still = []
        for size, waiter in self._waits:
            if len(self.received) >= size:
                waiter.callback(self.received)
            else:
                still.append((size, waiter))
        self._waits = still

    def wait_for(self, size: int, timeout: float = 10.0) -> Deferred[bytes]:
        """
        @return: a Deferred that fires once C{size} bytes have arrived.
        """
        waiter: Deferred[bytes] = Deferred()
        waiter.addTimeout(timeout, reactor)
        self._waits.append((size, waiter))
        self._check()
        return waiter

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.gone.callback(None)


def connect(port: int) -> Deferred[Client]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return endpoint.connect(Factory.forProtocol(Client))  # type: ignore[return-value]


def later(seconds: float, value: Any = None) -> Deferred[Any]:
    waiter: Deferred[Any] = Deferred()
    reactor.callLater(seconds, waiter.callback, value)
    return waiter


@implementer(ISink)
class MemorySink:
    """
    Keeps lines in memory; each write takes C{delay} seconds of reactor
    time (0: synchronous), to play a slow sink.
    """

    def __init__(self, store: list[bytes], delay: float = 0.0) -> None:
        self.store = store
        self.delay = delay
        self.closed = False

    def open(self) -> Deferred[None]:
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        if not self.delay:
            self.store.extend(lines)
            return succeed(None)
        done: Deferred[None] = Deferred()

        def finish() -> None:
            self.store.extend(lines)
            done.callback(None)

        reactor.callLater(self.delay, finish)
        return done

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(ISinkFactory)
class MemorySinkFactory:
    description = "memory:"

    def __init__(self, delay: float = 0.0) -> None:
        self.store: list[bytes] = []
        self.delay = delay
        self.sinks: list[MemorySink] = []

    def __call__(self) -> MemorySink:
        sink = MemorySink(self.store, self.delay)
        self.sinks.append(sink)
        return sink
