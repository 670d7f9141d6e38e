"""The connections: temporary children, tracked, limited, never restarted.

The registry is shared by every listener, so limits hold across ports.  It
never calls into a connection: L{ConnectionRegistry.admit} answers with a
verdict, and L{ConnectionRegistry.remove} returns the waiting connections
that a freed slot lets in, for the caller to start.

At the connection limit, in C{wait} mode, the listeners stop reading their
sockets (new clients wait in the kernel's backlog, as with Ranch) and read
again as soon as a connection closes; clients that one accept batch took
past the limit wait, paused, for a free slot, so the listener never wedges
and never refuses a client it could serve a moment later.  In C{reject}
mode the listeners keep accepting, so that a client past the limit gets
its C{ERR too-many-connections} at once instead of silence in the backlog;
the descriptor watermark stays the hard stop.
"""

from __future__ import annotations

import ipaddress
import sys
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Literal, Protocol, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from lineserver.errors import ErrorCode
from lineserver.flow import BaseGate, Pause, PauseGate
from lineserver.stats import Stats

log = Logger(namespace="lineserver.connections")

Overflow = Literal["wait", "reject"]
OVERFLOW_CHOICES: tuple[Overflow, ...] = ("wait", "reject")
LIMIT_REASON = Pause.CONNECTION_LIMIT


class Tracked(Hashable, Protocol):
    """
    What the registry reads of a connection: whether it is paused (for the
    C{connections.paused} gauge).
    """

    @property
    def gate(self) -> BaseGate: ...


Conn = TypeVar("Conn", bound=Tracked)


class Slot(Enum):
    """
    The registry's verdict on a connection it admits.
    """

    #: Serve it now.
    SERVE = "serve"
    #: Past the limit: the caller pauses it until L{ConnectionRegistry.remove}
    #: or L{ConnectionRegistry.stop_accepting} hands it back.
    WAIT = "wait"


@dataclass(frozen=True)
class Refusal:
    """
    The registry's verdict on a connection it will not serve.

    @ivar why: for the log line.
    """

    code: ErrorCode
    why: str


#: The peer keys of recent hosts, so that a fleet from few addresses is
#: not parsed once per connection (C{ipaddress} was a fifth of accepting);
#: emptied when it reaches L{_PEER_KEYS_MAX} entries.
_peer_keys: dict[str, str] = {}
_PEER_KEYS_MAX = 4096


def peer_key(host: str) -> str:
    """
    @return: the address that counts as one peer: C{::ffff:1.2.3.4} (an
        IPv4 client on a dual-stack socket) is C{1.2.3.4}.
    """
    key = _peer_keys.get(host)
    if key is None:
        if len(_peer_keys) >= _PEER_KEYS_MAX:
            _peer_keys.clear()
        key = _peer_keys[host] = _parse_peer_key(host)
    return key


def _parse_peer_key(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return sys.intern(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return sys.intern(str(address.ipv4_mapped))
    # Interned: the registry keeps one per connection, and a fleet's
    # connections come from few peers (one string each, not per connection).
    return sys.intern(str(address))


class ConnectionRegistry(Generic[Conn]):
    """
    Tracks every live connection and admits it, queues it, or refuses it.

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
        self.waiting: deque[Conn] = deque()
        self.accepting = True
        #: An operator stopped accepting (C{disable listener}): the
        #: listener gates are held, as at the limit, until enabled again.
        self.listeners_held = False
        #: Every tracked connection, with its peer key when it counts
        #: against --max-connections-per-peer (one dict, not a set and a
        #: dict: an entry per connection fewer).
        self._all: dict[Conn, str | None] = {}
        #: The tracked connections that are not active (waiting, or
        #: refused and closing): few, so that the many active ones cost
        #: no entry of their own (a set of them did, ~50-65 B each).
        self._inactive: dict[Conn, None] = {}
        #: How many connections are active (being served).
        self._active = 0
        self._per_peer: Counter[str] = Counter()
        self._gates: list[PauseGate] = []
        self._empty: list[Deferred[None]] = []
        #: Called after every admission and removal (the fd watermark).
        self.watchers: list[Callable[[], object]] = []
        self.stats.add_gauge("connections.active", lambda: self._active)
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

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self._all))

    @property
    def active(self) -> frozenset[Conn]:
        """
        The connections being served (made on each call: for tests and
        reports, not a hot path).
        """
        inactive = self._inactive
        return frozenset(conn for conn in self._all if conn not in inactive)

    @property
    def active_count(self) -> int:
        """
        How many connections are being served.
        """
        return self._active

    @property
    def full(self) -> bool:
        limit = self.max_connections
        return limit is not None and self._active >= limit

    @property
    def _holds_listeners(self) -> bool:
        """
        Should the listeners stop accepting?  At the limit in C{wait} mode.
        """
        return self.listeners_held or (self.full and self.overflow == "wait")

    def add_listener_gate(self, gate: PauseGate) -> None:
        """
        A listener's accept gate, held while the registry is full.
        """
        self._gates.append(gate)
        if self._holds_listeners:
            gate.hold(LIMIT_REASON)

    def remove_listener_gate(self, gate: PauseGate) -> None:
        if gate in self._gates:
            self._gates.remove(gate)
            gate.release(LIMIT_REASON)

    def admit(self, conn: Conn, host: str | None) -> Slot | Refusal:
        """
        A new connection, from C{host} (None for a unix socket): serve it,
        queue it, or refuse it.  It is tracked until L{remove} either way.
        """
        self._all[conn] = None
        self._inactive[conn] = None  # until activated below
        self.stats.incr("connections.opened")
        self._notify()
        if not self.accepting:
            return Refusal(ErrorCode.SHUTTING_DOWN, "shutting down")
        if self.max_per_peer is not None and host is not None:
            peer = peer_key(host)
            count = self._per_peer[peer]
            if count >= self.max_per_peer:
                self.stats.incr("connections.refused.peer")
                return Refusal(
                    ErrorCode.TOO_MANY_CONNECTIONS_FROM_PEER,
                    f"{count} connections from {peer} already",
                )
            self._per_peer[peer] = count + 1
            self._all[conn] = peer
        if self.full:
            if self.overflow == "reject":
                self.stats.incr("connections.refused.limit")
                return Refusal(ErrorCode.TOO_MANY_CONNECTIONS, "connection limit")
            self.waiting.append(conn)
            return Slot.WAIT
        self._activate(conn)
        return Slot.SERVE

    def _count_active(self, conn: Conn) -> None:
        self._inactive.pop(conn, None)
        self._active += 1

    def _activate(self, conn: Conn) -> None:
        self._count_active(conn)
        if self._holds_listeners:
            for gate in self._gates:
                gate.hold(LIMIT_REASON)

    def remove(self, conn: Conn) -> list[Conn]:
        """
        A connection is gone.

        @return: the waiting connections its slot lets in, now active; the
            caller starts serving them (and releases their pause).
        """
        if conn not in self._all:
            return []  # refused before admission (not allowed by address)
        peer = self._all.pop(conn)
        if peer is not None:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]
        self.stats.incr("connections.closed")
        promoted: list[Conn] = []
        inactive = self._inactive
        if conn in inactive:
            del inactive[conn]
            if conn in self.waiting:
                self.waiting.remove(conn)
        else:
            self._active -= 1
            while self.waiting and not self.full and self.accepting:
                waiter = self.waiting.popleft()
                self._activate(waiter)
                promoted.append(waiter)
            if not self._holds_listeners:
                for gate in self._gates:
                    gate.release(LIMIT_REASON)
        self._notify()
        if not self._all:
            empty_waiters, self._empty = self._empty, []
            for empty in empty_waiters:
                empty.callback(None)
        return promoted

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

    def stop_accepting(self) -> list[Conn]:
        """
        From now on, refuse new connections with C{ERR shutting-down}.

        @return: the connections that were waiting for a slot, now active
            past the limit, for the caller to start serving: their clients
            may have sent lines already, and the ordered stop drains those
            like any other.
        """
        self.accepting = False
        promoted = list(self.waiting)
        self.waiting.clear()
        for conn in promoted:
            self._count_active(conn)
        return promoted

    def hold_listeners(self, held: bool) -> None:
        """
        Stop (True) or resume (False) accepting on every listener, the
        ports left open: clients wait in the kernel's backlog meanwhile.
        Resuming at the limit (in C{wait} mode) keeps them held.
        """
        self.listeners_held = held
        self._update_gates()

    def set_max_connections(self, limit: int | None) -> list[Conn]:
        """
        Change the limit (None: none).  Connections already served stay
        served above a lowered limit; new ones wait (or are refused).

        @return: the waiting connections a raised limit lets in, now
            active; the caller starts serving them.
        """
        self.max_connections = limit
        promoted: list[Conn] = []
        while self.waiting and not self.full and self.accepting:
            waiter = self.waiting.popleft()
            self._count_active(waiter)
            promoted.append(waiter)
        self._update_gates()
        return promoted

    def _update_gates(self) -> None:
        for gate in self._gates:
            if self._holds_listeners:
                gate.hold(LIMIT_REASON)
            else:
                gate.release(LIMIT_REASON)

    def find(self, number: int) -> Conn | None:
        """
        @return: the tracked connection whose C{number} is C{number}.
        """
        for conn in self._all:
            if getattr(conn, "number", None) == number:
                return conn
        return None

    def start_accepting(self) -> None:
        """
        Accept again (a server started again after a stop).
        """
        self.accepting = True
