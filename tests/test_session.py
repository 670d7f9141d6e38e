"""The pure connection session: its table, and properties over random events.

The state machine test feeds a L{Session} the events its glue can produce,
in any order hypothesis finds (data of every kind, PROXY headers, TLS
handshakes, registry verdicts, deadlines at any time, closes, losses), and
checks after every step the promises of docs/architecture.md:

  - nothing is delivered before the connection is served, nor after an
    error line was sent;
  - nothing is delivered before TLS is on where TLS is required;
  - every armed deadline is disarmed once the connection is lost;
  - every complete line received is delivered exactly once and in order,
    or counted as consumed (AUTH) or dropped (its client was refused).
"""

from __future__ import annotations

import os
from typing import Any

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
from twisted.trial.unittest import SynchronousTestCase

from lineserver.admission import AdmissionPolicy
from lineserver.errors import ErrorCode
from lineserver.framing import LineFramer
from lineserver.session import (
    TRANSITIONS,
    Abort,
    Action,
    Arm,
    AskSlot,
    Authenticated,
    Close,
    CloseReason,
    Deadline,
    Deliver,
    Disarm,
    Event,
    Phase,
    ProtocolSettings,
    Refuse,
    Send,
    Serve,
    Session,
    SessionError,
    StartTLS,
)

TOKEN = b"sesame"
LIMIT = 32
ALLOWED = "10.0.0.1"
DENIED = "10.9.9.9"

#: What a client may send, in pieces that hypothesis joins and splits.
PIECES = st.sampled_from(
    [
        b"data\n",
        b"STARTTLS\n",
        b"AUTH sesame\n",
        b"AUTH wrong\n",
        b"part",
        b"ial\r\n",
        b"\n",
        b"x" * (LIMIT + 5) + b"\n",
        b"y" * 20,
    ]
)


def labelled(pieces: list[bytes], start: int) -> tuple[bytes, int]:
    """
    Number each C{data} line (C{data} becomes C{d<n>}), so that a line
    delivered twice or out of order shows.
    """
    out = []
    n = start
    for piece in pieces:
        if piece == b"data\n":
            out.append(b"d%d\n" % n)
            n += 1
        else:
            out.append(piece)
    return b"".join(out), n


class SessionMachine(RuleBasedStateMachine):
    """
    One connection's session, driven as its glue would drive it.
    """

    @initialize(
        tls=st.booleans(),
        proxy=st.booleans(),
        starttls=st.booleans(),
        require_tls=st.booleans(),
        tokens=st.booleans(),
        allow_list=st.booleans(),
        idle=st.sampled_from([None, 1.0, 5.0]),
        line=st.sampled_from([None, 1.0, 3.0]),
        handshake=st.sampled_from([None, 2.0]),
    )
    def connect(
        self,
        tls: bool,
        proxy: bool,
        starttls: bool,
        require_tls: bool,
        tokens: bool,
        allow_list: bool,
        idle: float | None,
        line: float | None,
        handshake: float | None,
    ) -> None:
        # STARTTLS is offered on plain ports only.
        starttls = starttls and not tls
        self.policy = AdmissionPolicy(
            starttls=starttls,
            require_tls=require_tls,
            check_token=TOKEN.__eq__ if tokens else None,
            allow=(lambda host: host != DENIED) if allow_list else None,
        )
        self.settings = ProtocolSettings(
            max_line_length=LIMIT,
            idle_timeout=idle,
            line_timeout=line,
            handshake_timeout=handshake,
        )
        self.session = Session(self.settings, self.policy, LineFramer(LIMIT))
        self.now = 0.0
        self.armed: set[Deadline] = set()
        self.delivered: list[bytes] = []
        self.served = False
        self.refused = False
        self.secure = False  # a TLS handshake completed
        self.authenticated = False
        self.header_sent = False
        self.next_label = 0
        self.behind_proxy = proxy
        self.perform(self.session.connected(tls, proxy, ALLOWED, self.now))

    # -- the glue's side -----------------------------------------------------

    def perform(self, actions: list[Action], verdict: str = "serve") -> None:
        """
        Check each action against the promises, and answer what the glue
        answers at once (the registry's verdict).
        """
        for action in actions:
            if isinstance(action, Deliver):
                assert self.served, "delivered before the connection was served"
                assert not self.refused, "delivered after an error line"
                if self.policy.require_tls:
                    assert self.secure, "delivered before TLS was on"
                if self.policy.check_token is not None:
                    # Later AUTH lines are data; the first must be accepted.
                    assert self.authenticated, "delivered before AUTH"
                assert action.raw.replace(b"\r\n", b"\n") == b"".join(
                    line + b"\n" for line in action.lines
                ), action
                self.delivered += action.lines
            elif isinstance(action, Refuse):
                self.refused = True
            elif isinstance(action, Serve):
                assert not self.served, "served twice"
                self.served = True
            elif isinstance(action, Arm):
                assert action.delay > 0, action
                self.armed.add(action.kind)
            elif isinstance(action, Disarm):
                assert action.kind in self.armed, f"disarmed {action.kind} unarmed"
                self.armed.discard(action.kind)
            elif isinstance(action, AskSlot):
                if verdict == "serve":
                    self.perform(self.session.served(self.now))
                elif verdict == "wait":
                    self.perform(self.session.queued())
                else:
                    self.perform(
                        self.session.refused(ErrorCode.TOO_MANY_CONNECTIONS, "limit")
                    )
            elif isinstance(action, Authenticated):
                self.authenticated = True
            elif isinstance(action, StartTLS):
                assert self.policy.starttls
            else:
                assert isinstance(action, Send | Close | Abort), action

    # -- events --------------------------------------------------------------

    @precondition(lambda self: self.session.phase is Phase.PROXY)
    @rule(denied=st.booleans(), verdict=st.sampled_from(["serve", "wait", "refuse"]))
    def proxy_header(self, denied: bool, verdict: str) -> None:
        self.header_sent = True
        host = DENIED if denied else ALLOWED
        self.perform(self.session.proxy_header(host, self.now), verdict)

    @precondition(lambda self: self.session.handshaking)
    @rule(denied=st.booleans(), verdict=st.sampled_from(["serve", "wait", "refuse"]))
    def handshake_done(self, denied: bool, verdict: str) -> None:
        self.secure = True
        host = DENIED if denied and self.behind_proxy else ALLOWED
        self.perform(self.session.handshake_done(host, self.now), verdict)

    @precondition(lambda self: self.session.phase is Phase.WAITING)
    @rule()
    def slot_granted(self) -> None:
        self.perform(self.session.slot_granted(self.now))

    @precondition(
        lambda self: (
            self.session.phase
            not in (Phase.NEW, Phase.PROXY, Phase.HANDSHAKE, Phase.UPGRADING)
        )
    )
    @rule(pieces=st.lists(PIECES, min_size=1, max_size=6), wait=st.floats(0, 2))
    def data(self, pieces: list[bytes], wait: float) -> None:
        self.now += wait
        data, self.next_label = labelled(pieces, self.next_label)
        self.perform(self.session.data(data, self.now))

    @precondition(lambda self: bool(self.session.armed))
    @rule(pick=st.integers(0, 4), wait=st.floats(0, 6), paused=st.booleans())
    def deadline(self, pick: int, wait: float, paused: bool) -> None:
        kinds = sorted(self.session.armed, key=lambda kind: kind.value)
        kind = kinds[pick % len(kinds)]
        self.now += wait
        self.armed.discard(kind)  # the glue's timer fired: it is gone
        self.perform(self.session.expired(kind, self.now, paused))

    @precondition(lambda self: self.session.phase is not Phase.NEW)
    @rule(clean=st.booleans())
    def close(self, clean: bool) -> None:
        reason = CloseReason.CLEAN if clean else CloseReason.SERVER
        self.perform(self.session.close(reason))

    @precondition(lambda self: self.served)
    @rule()
    def handler_error(self) -> None:
        self.perform(self.session.refuse("custom-error", "from a handler"))

    @precondition(lambda self: self.session.phase is not Phase.CLOSED)
    @rule(clean=st.booleans())
    def lost(self, clean: bool) -> None:
        self.perform(self.session.lost(clean))
        assert self.session.phase is Phase.CLOSED
        assert not self.armed, f"armed after the connection was lost: {self.armed}"
        assert self.session.reason is not None
        assert self.session.held == 0

    # -- what holds after every step -----------------------------------------

    @invariant()
    def armed_agrees(self) -> None:
        assert self.armed == self.session.armed, (self.armed, self.session.armed)

    @invariant()
    def ledger_balances(self) -> None:
        session = self.session
        assert session.lines == (
            session.delivered + session.consumed + session.dropped + session.held
        ), (session.lines, session.delivered, session.consumed, session.dropped)
        assert session.delivered == len(self.delivered)

    @invariant()
    def delivered_once_in_order(self) -> None:
        labels = [
            int(line[1:])
            for line in self.delivered
            if line.startswith(b"d") and line[1:].isdigit()
        ]
        assert labels == sorted(set(labels)), labels

    @invariant()
    def closed_is_final(self) -> None:
        session = self.session
        if session.phase is Phase.CLOSED:
            assert session.data(b"late\n", self.now) == []
            assert session.close() == []
            assert session.lost(True) == []


class SessionStateMachineTests(SynchronousTestCase):
    def test_random_lives(self) -> None:
        """
        Property: over random sequences of events, every promise of the
        module docstring holds after every step.
        """
        run_state_machine_as_test(
            SessionMachine,
            settings=settings(
                max_examples=int(os.environ.get("SESSION_EXAMPLES", "400")),
                stateful_step_count=30,
                deadline=None,
            ),
        )


class TransitionTableTests(SynchronousTestCase):
    def test_every_phase_but_closed_can_close_and_be_lost(self) -> None:
        """
        From every phase but CLOSED, a close and a loss are legal moves; from
        CLOSED, none is.
        """
        for phase in Phase:
            has = (phase, Event.LOST) in TRANSITIONS
            self.assertEqual(has, phase is not Phase.CLOSED, phase)
            self.assertEqual(
                (phase, Event.CLOSE) in TRANSITIONS, phase is not Phase.CLOSED, phase
            )

    def test_every_phase_reachable(self) -> None:
        """
        Every phase is reachable from NEW through the table.
        """
        seen = {Phase.NEW}
        frontier = [Phase.NEW]
        while frontier:
            phase = frontier.pop()
            for (source, _), target in TRANSITIONS.items():
                if source is phase and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        self.assertEqual(seen, set(Phase))

    def test_illegal_move_raises(self) -> None:
        """
        An event the table does not allow raises SessionError: a slot for a
        connection that never asked for one is a bug in the glue.
        """
        session = Session(ProtocolSettings(), AdmissionPolicy())
        with self.assertRaises(SessionError):
            session.served(0.0)
        session.connected(tls=True, behind_proxy=False, host=ALLOWED, now=0.0)
        self.assertEqual(session.phase, Phase.HANDSHAKE)
        with self.assertRaises(SessionError):
            session.served(0.0)


class SessionExampleTests(SynchronousTestCase):
    """
    A few lives told step by step, as the architecture page draws them.
    """

    def connect(self, policy: AdmissionPolicy, **settings: Any) -> Session:
        session = Session(ProtocolSettings(**settings), policy)
        actions = session.connected(tls=False, behind_proxy=False, host=ALLOWED, now=0)
        self.assertEqual(actions, [AskSlot(ALLOWED)])
        self.assertEqual(session.phase, Phase.ADMISSION)
        return session

    def test_plain_connection_opens_at_once(self) -> None:
        """
        With no admission rule, a served connection is OPEN at once and its
        first lines (STARTTLS and AUTH included) are data.
        """
        session = self.connect(AdmissionPolicy())
        self.assertEqual(session.served(0), [Serve()])
        self.assertEqual(session.phase, Phase.OPEN)
        actions = session.data(b"STARTTLS\nAUTH x\n", 0)
        self.assertEqual(
            actions, [Deliver([b"STARTTLS", b"AUTH x"], b"STARTTLS\nAUTH x\n")]
        )

    def test_starttls_upgrade(self) -> None:
        """
        On a STARTTLS port: lines before STARTTLS are delivered, then OK,
        the upgrade, and its deadline; after the handshake, lines flow.
        """
        session = self.connect(AdmissionPolicy(starttls=True), handshake_timeout=3.0)
        session.served(0)
        actions = session.data(b"a\nSTARTTLS\n", 0)
        self.assertEqual(
            actions,
            [
                Deliver([b"a"], b"a\n"),
                Send(b"OK starttls"),
                StartTLS(),
                Arm(Deadline.HANDSHAKE, 3.0),
            ],
        )
        self.assertEqual(session.phase, Phase.UPGRADING)
        self.assertEqual(
            session.handshake_done(ALLOWED, 1), [Disarm(Deadline.HANDSHAKE)]
        )
        self.assertEqual(session.phase, Phase.OPEN)

    def test_waiting_lines_are_held_then_screened(self) -> None:
        """
        Lines read while waiting for a slot are held, then screened and
        delivered once the slot comes.
        """
        session = self.connect(AdmissionPolicy(check_token=TOKEN.__eq__))
        session.queued()
        self.assertEqual(session.data(b"AUTH sesame\nhello\n", 0), [])
        self.assertEqual(session.held, 2)
        actions = session.slot_granted(1)
        self.assertEqual(
            actions, [Serve(), Authenticated(), Deliver([b"hello"], b"hello\n")]
        )
        self.assertEqual(session.phase, Phase.OPEN)

    def test_idle_deadline_sleeps_again_while_active(self) -> None:
        """
        The idle deadline costs no timer per read: a read only records the
        time, and the timer, when it fires early, asks to sleep for the rest.
        """
        session = self.connect(AdmissionPolicy(), idle_timeout=10.0)
        self.assertEqual(session.served(0), [Serve(), Arm(Deadline.IDLE, 10.0)])
        for second in range(1, 8):
            self.assertEqual(session.data(b"x\n", second)[1:], [])
        self.assertEqual(
            session.expired(Deadline.IDLE, 10, False), [Arm(Deadline.IDLE, 7.0)]
        )
        actions = session.expired(Deadline.IDLE, 17, False)
        self.assertEqual(
            actions[0], Refuse(ErrorCode.IDLE_TIMEOUT, "", "idle for 10.0s")
        )
        self.assertEqual(session.reason, CloseReason.IDLE_TIMEOUT)

    def test_paused_connection_never_idles_out(self) -> None:
        """
        A connection we paused ourselves is not timed out: its silence is ours.
        """
        session = self.connect(AdmissionPolicy(), idle_timeout=10.0)
        session.served(0)
        self.assertEqual(
            session.expired(Deadline.IDLE, 50, True), [Arm(Deadline.IDLE, 10.0)]
        )

    def test_proxy_header_deadline_none_means_no_limit(self) -> None:
        """
        A handshake timeout of None means no limit for the PROXY header too.
        """
        session = Session(ProtocolSettings(handshake_timeout=None), AdmissionPolicy())
        actions = session.connected(
            tls=False, behind_proxy=True, host="127.0.0.1", now=0
        )
        self.assertEqual(actions, [])
        self.assertEqual(session.phase, Phase.PROXY)

    def test_line_too_long_after_lines(self) -> None:
        """
        Lines before an over-long one are delivered; then one ERR and a close.
        """
        session = self.connect(AdmissionPolicy(), max_line_length=4)
        session.served(0)
        actions = session.data(b"ok\ntoolong\n", 0)
        self.assertEqual(actions[0], Deliver([b"ok"], b"ok\n"))
        self.assertEqual(actions[1].code, ErrorCode.LINE_TOO_LONG)  # type: ignore[union-attr]
        self.assertIn(Close(), actions)
        self.assertEqual(session.phase, Phase.CLOSING)
        self.assertEqual(session.data(b"more\n", 0), [])


class DocumentedTableTests(SynchronousTestCase):
    def test_architecture_page_shows_the_table(self) -> None:
        """
        docs/architecture.md's transition table is the code's, move for move.
        """
        from pathlib import Path

        page = Path(__file__).parent.parent / "docs" / "architecture.md"
        rows = set()
        for line in page.read_text().splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[0] in {phase.value for phase in Phase}:
                rows.add((Phase(cells[0]), Event(cells[1]), Phase(cells[2])))
        code = {
            (phase, event, target)
            for (phase, event), target in TRANSITIONS.items()
            if event not in (Event.CLOSE, Event.LOST)
        }
        self.assertEqual(rows, code)
