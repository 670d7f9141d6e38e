"""LineProtocol, the glue, driven through random lives with Clock and StringTransport.

The session's own rules are property-tested in tests/test_session.py; this
checks that the glue carries its actions out faithfully, whatever happens
in between: data in any pieces, time passing, the sink pausing and resuming
the connection, a slot freeing up, half-closes, server closes and losses.

After every step: each data line reaches the handler at most once and in
order; at most one C{ERR} line is written; the per-connection ledger
balances.  Once the connection is lost: no timer of it is left on the
clock, the registry holds nothing of it, and no line was lost unaccounted.
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lineserver.admission import AdmissionPolicy
from lineserver.connections import ConnectionRegistry
from lineserver.flow import Pause
from lineserver.interfaces import IConnection, ILineHandler
from lineserver.protocol import LineFactory, LineProtocol, ProtocolSettings
from lineserver.session import Phase
from lineserver.stats import Stats

LIMIT = 24
PIECES = st.sampled_from(
    [b"data\n", b"pa", b"rt\r\n", b"\n", b"AUTH k\n", b"z" * (LIMIT + 3) + b"\n"]
)


@implementer(ILineHandler)
class Collect:
    def __init__(self, lines: list[bytes], connection: IConnection) -> None:
        self.lines = lines

    def lines_received(self, lines: list[bytes], raw: bytes) -> None:
        self.lines += lines

    def connection_lost(self) -> None:
        pass


class ProtocolMachine(RuleBasedStateMachine):
    @initialize(
        idle=st.sampled_from([None, 2.0]),
        line=st.sampled_from([None, 1.0]),
        tokens=st.booleans(),
        full=st.booleans(),
    )
    def connect(
        self, idle: float | None, line: float | None, tokens: bool, full: bool
    ) -> None:
        self.clock = Clock()
        self.stats = Stats()
        self.got: list[bytes] = []
        self.registry: ConnectionRegistry[LineProtocol] = ConnectionRegistry(
            max_connections=1, stats=self.stats
        )
        self.factory = LineFactory(
            lambda conn: Collect(self.got, conn),  # type: ignore[arg-type]
            self.registry,
            self.clock,
            ProtocolSettings(
                max_line_length=LIMIT, idle_timeout=idle, line_timeout=line
            ),
            self.stats,
            policy=AdmissionPolicy(check_token=b"k".__eq__ if tokens else None),
        )
        self.blocker: LineProtocol | None = None
        if full:
            self.blocker = self.open(40000)
        self.proto = self.open(40001)
        self.transport: StringTransport = self.proto.transport
        self.sink_paused = False
        self.label = 0
        self.gone = False

    def open(self, port: int) -> LineProtocol:
        peer = IPv4Address("TCP", "127.0.0.1", port)
        proto = self.factory.buildProtocol(peer)
        proto.makeConnection(StringTransport(peerAddress=peer))
        return proto

    @precondition(lambda self: not self.gone)
    @rule(pieces=st.lists(PIECES, min_size=1, max_size=5))
    def data(self, pieces: list[bytes]) -> None:
        chunks = []
        for piece in pieces:
            if piece == b"data\n":
                piece = b"d%d\n" % self.label
                self.label += 1
            chunks.append(piece)
        self.proto.dataReceived(b"".join(chunks))

    @rule(seconds=st.floats(0, 3))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: not self.gone)
    @rule()
    def sink_pauses_or_resumes(self) -> None:
        producer = self.proto.producer(Pause.SINK)
        if self.sink_paused:
            producer.resumeProducing()
        else:
            producer.pauseProducing()
        self.sink_paused = not self.sink_paused

    @precondition(lambda self: self.blocker is not None)
    @rule()
    def slot_frees(self) -> None:
        assert self.blocker is not None
        self.blocker.connectionLost(Failure(ConnectionDone()))
        self.blocker = None

    @precondition(lambda self: not self.gone)
    @rule()
    def half_close(self) -> None:
        self.proto.readConnectionLost()

    @precondition(lambda self: not self.gone)
    @rule()
    def server_closes(self) -> None:
        self.proto.close()

    @precondition(lambda self: not self.gone)
    @rule(clean=st.booleans())
    def lost(self, clean: bool) -> None:
        reason = ConnectionDone() if clean else ConnectionLost()
        self.proto.connectionLost(Failure(reason))
        self.gone = True
        mine = [
            call
            for call in self.clock.getDelayedCalls()
            if getattr(getattr(call, "func", None), "__self__", None) is self.proto
        ]
        assert mine == [], mine
        assert self.proto not in list(self.registry)
        session = self.proto.session
        assert session.phase is Phase.CLOSED
        assert session.held == 0

    @invariant()
    def each_line_once_in_order(self) -> None:
        labels = [int(line[1:]) for line in self.got if line[:1] == b"d"]
        assert labels == sorted(set(labels)), labels

    @invariant()
    def one_error_at_most(self) -> None:
        assert self.transport.value().count(b"ERR ") <= 1, self.transport.value()

    @invariant()
    def ledger(self) -> None:
        session = self.proto.session
        assert session.lines == (
            session.delivered + session.consumed + session.dropped + session.held
        )
        assert len(self.got) == session.delivered, (self.got, session.delivered)
        assert self.stats.get("lines.received") >= session.delivered


class ProtocolMachineTests(SynchronousTestCase):
    def test_random_lives(self) -> None:
        """
        Property: over random lives, the glue delivers what the session
        says, once, and leaves no timer or registry entry behind.
        """
        run_state_machine_as_test(
            ProtocolMachine,
            settings=settings(
                max_examples=int(os.environ.get("SESSION_EXAMPLES", "250")),
                stateful_step_count=25,
                deadline=None,
            ),
        )
