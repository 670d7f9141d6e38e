"""The connections: temporary children, tracked, limited, never restarted.

The registry is shared by every listener, so limits hold across ports.  At
the connection limit the listeners stop reading their sockets (new clients
wait in the kernel's backlog, as with Ranch) and read again as soon as a
connection closes; clients that one accept batch took past the limit wait,
paused, for a free slot, so the listener never wedges and never refuses a
client it could serve a moment later.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from lineserver.errors import ErrorCode
from lineserver.flow import Pause, PauseGate
from lineserver.stats import Stats

if TYPE_CHECKING:
    from lineserver.protocol import LineProtocol

log = Logger(namespace="lineserver.connections")

Overflow = Literal["wait", "reject"]
OVERFLOW_CHOICES: tuple[Overflow, ...] = ("wait", "reject")
LIMIT_REASON = Pause.CONNECTION_LIMIT


class ConnectionRegistry:
    """
    Tracks every live connection and admits it, queues it, or refuses it.

    @ivar active: connections being served.
    @ivar waiting: connections accepted past the limit, paused, first in
        first out.
    """

    def __init__(
        self,
        max_connections: int | None = None,
        max_per_peer: int | None = None,
        overflow: Overflow = "wait",
        stats: Stats | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.overflow = overflow
        self.stats = stats if stats is not None else Stats()
        self.active: set[LineProtocol] = set()
        self.waiting: deque[LineProtocol] = deque()
        self.accepting = True
        self._all: set[LineProtocol] = set()
        self._per_peer: Counter[str] = Counter()
        self._counted: set[LineProtocol] = set()
        self._gates: list[PauseGate] = []
        self._empty: list[Deferred[None]] = []
        #: Called after every admission and removal (the fd watermark).
        self.watchers: list[Callable[[], object]] = []
        self.stats.add_gauge("connections.active", lambda: len(self.active))
        self.stats.add_gauge("connections.waiting", lambda: len(self.waiting))
        self.stats.add_gauge(
            "connections.paused",
            lambda: sum(1 for conn in self._all if conn.gate.paused),
        )

    def __len__(self) -> int:
        """
        @return: every tracked connection: active, waiting, or closing.
        """
        return len(self._all)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._all))

    @property
    def full(self) -> bool:
        limit = self.max_connections
        return limit is not None and len(self.active) >= limit

    def add_listener_gate(self, gate: PauseGate) -> None:
        """
        A listener's accept gate, held while the registry is full.
        """
        self._gates.append(gate)
        if self.full:
            gate.hold(LIMIT_REASON)

    def remove_listener_gate(self, gate: PauseGate) -> None:
        if gate in self._gates:
            self._gates.remove(gate)
            gate.release(LIMIT_REASON)

    def admit(self, conn: LineProtocol) -> None:
        """
        Called by a new connection: serve it, queue it, or refuse it.
        """
        self._all.add(conn)
        self.stats.incr("connections.opened")
        self._notify()
        if not self.accepting:
            conn.send_error(ErrorCode.SHUTTING_DOWN)
            return
        host = getattr(conn.peer, "host", None)
        if self.max_per_peer is not None and host is not None:
            if self._per_peer[host] >= self.max_per_peer:
                self.stats.incr("connections.refused.peer")
                log.info(
                    "refusing {conn}: {n} connections from {host} already",
                    conn=conn.identity,
                    n=self._per_peer[host],
                    host=host,
                )
                conn.send_error(ErrorCode.TOO_MANY_CONNECTIONS_FROM_PEER)
                return
            self._per_peer[host] += 1
            self._counted.add(conn)
        if self.full:
            if self.overflow == "reject":
                self.stats.incr("connections.refused.limit")
                log.info("refusing {conn}: connection limit", conn=conn.identity)
                conn.send_error(ErrorCode.TOO_MANY_CONNECTIONS)
                return
            conn.gate.hold(Pause.WAITING)
            self.waiting.append(conn)
            return
        self._activate(conn)

    def _activate(self, conn: LineProtocol) -> None:
        self.active.add(conn)
        conn.start_serving()
        if self.full:
            for gate in self._gates:
                gate.hold(LIMIT_REASON)

    def remove(self, conn: LineProtocol) -> None:
        """
        Called by a connection that is gone.
        """
        if conn not in self._all:
            return  # refused before admission (not allowed by address)
        self._all.discard(conn)
        if conn in self._counted:
            self._counted.discard(conn)
            host = conn.peer.host  # type: ignore[attr-defined]
            self._per_peer[host] -= 1
            if self._per_peer[host] <= 0:
                del self._per_peer[host]
        self.stats.incr("connections.closed")
        if conn in self.active:
            self.active.discard(conn)
            while self.waiting and not self.full and self.accepting:
                waiter = self.waiting.popleft()
                self._activate(waiter)
                waiter.gate.release(Pause.WAITING)
            if not self.full:
                for gate in self._gates:
                    gate.release(LIMIT_REASON)
        elif conn in self.waiting:
            self.waiting.remove(conn)
        self._notify()
        if not self._all:
            empty_waiters, self._empty = self._empty, []
            for empty in empty_waiters:
                empty.callback(None)

    def _notify(self) -> None:
        """
        Tell the watchers a connection came or went; one that fails is
        logged and never stops admission or removal.
        """
        for watch in self.watchers:
            try:
                watch()
            except Exception:
                log.failure("connection watcher {watch!r} failed", watch=watch)

    def when_empty(self) -> Deferred[None]:
        """
        @return: a Deferred that fires when no connection is left.
        """
        if not self._all:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._empty.append(waiter)
        return waiter

    def stop_accepting(self) -> None:
        """
        From now on, refuse new connections with C{ERR shutting-down}.

        Connections still waiting for a slot are served now, past the
        limit: their clients may have sent lines already, and the ordered
        stop drains those like any other.
        """
        self.accepting = False
        while self.waiting:
            conn = self.waiting.popleft()
            self.active.add(conn)
            conn.start_serving()
            conn.gate.release(Pause.WAITING)
