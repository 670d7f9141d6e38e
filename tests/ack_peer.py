"""A small real server speaking the server side of C{--ack}, for client tests.

It listens on 127.0.0.1 in the test's reactor, reads lines, and answers
each read with C{ACK <n>} (n counted per connection, as docs/protocol.md
says), unless told to stall.  It can drop a connection after a given
number of lines (before acknowledging them), refuse with an C{ERR} line,
or go away and come back on the same port (a restart).

It records what a real server would have made durable: C{acknowledged}
is the concatenation, over connections, of the lines it acknowledged;
C{received} is every line read, duplicates included.  A dropped connection
is aborted, which throws away the ACKs still in its write buffer, as a
reset does: the client never saw them and sends those lines again, so
after a drop C{acknowledged} may hold a line twice (at least once, as
with a real server); L{first_arrivals} is then the stream as it arrived.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from tests.support import reactor


class AckPeerProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20
    transport: Any

    def __init__(self, peer: AckPeer) -> None:
        self.peer = peer
        self.lines: list[bytes] = []
        self.acked = 0
        self.auth_pending = peer.auth_token is not None
        # abortConnection does not set transport.disconnecting: keep our own.
        self.aborted = False

    def connectionMade(self) -> None:
        self.peer.connections.append(self)
        if self.peer.refuse is not None:
            self.sendLine(self.peer.refuse)
            self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if self.aborted:
            return
        if self.auth_pending:
            self.auth_pending = False
            if line != b"AUTH " + (self.peer.auth_token or b""):
                self.sendLine(b"ERR unauthorized")
                self.transport.loseConnection()
            return
        self.lines.append(line)
        self.peer.received.append(line)
        drop = self.peer.drop_after
        if drop is not None and len(self.peer.received) >= drop:
            self.peer.drop_after = None
            self.peer.dropped += 1
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not self.transport.disconnecting:
            self.ack()

    def abort(self) -> None:
        self.aborted = True
        self.transport.abortConnection()

    def ack(self) -> None:
        if self.aborted or self.peer.stalled or self.acked == len(self.lines):
            return
        self.peer.acknowledged.extend(self.lines[self.acked :])
        self.acked = len(self.lines)
        self.sendLine(b"ACK %d" % self.acked)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.peer.connections.remove(self)
        self.peer.closed += 1


class AckPeer:
    """
    The server; see the module docstring.

    @ivar stalled: while true, nothing is acknowledged.
    @ivar drop_after: abort the connection once this many lines (in all)
        were read, before acknowledging the last read; then reset to None.
    @ivar refuse: a line (C{ERR ...}) sent to each new connection, which
        is then closed.
    @ivar auth_token: if set, the first line must be C{AUTH <token>}.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.acknowledged: list[bytes] = []
        self.connections: list[AckPeerProtocol] = []
        self.closed = 0
        self.dropped = 0
        self.stalled = False
        self.drop_after: int | None = None
        self.refuse: bytes | None = None
        self.auth_token: bytes | None = None
        self.port = 0
        self._listening: IListeningPort | None = None

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: AckPeerProtocol(self))

    async def start(self) -> int:
        endpoint = TCP4ServerEndpoint(
            reactor, self.port, interface="127.0.0.1", backlog=50
        )
        self._listening = await endpoint.listen(self.factory())
        address: Any = self._listening.getHost()
        self.port = address.port
        return self.port

    def resume(self) -> None:
        """
        Stop stalling, and acknowledge what was read meanwhile.
        """
        self.stalled = False
        for connection in list(self.connections):
            connection.ack()

    async def stop(self) -> None:
        """
        Stop listening and abort every connection (a crash, not a drain).
        """
        if self._listening is not None:
            await maybeDeferred(self._listening.stopListening)
            self._listening = None
        for connection in list(self.connections):
            connection.abort()
        waiting: Deferred[None] = Deferred()
        reactor.callLater(0.05, waiting.callback, None)
        await waiting

    def connected(self) -> int:
        return len(self.connections)


def peer_cleanup(peer: AckPeer) -> Any:
    return Deferred.fromCoroutine(peer.stop())


def first_arrivals(lines: list[bytes]) -> list[bytes]:
    """
    @return: C{lines} without repeats, each at its first place.
    """
    seen: set[bytes] = set()
    first: list[bytes] = []
    for line in lines:
        if line not in seen:
            seen.add(line)
            first.append(line)
    return first
