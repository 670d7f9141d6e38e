"""Who may send lines: the pure rules for the first lines of a connection.

A connection is *open* once every requirement is met (TLS when required,
a valid C{AUTH <token>} when tokens are configured), its first line was
delivered, and, where C{STARTTLS} is offered, TLS is on.  Until then
each line goes through L{Admission.on_line}, which says what to do with
it; once open, lines go straight to the handler and this costs nothing
more.

Rules, in order:
  1. C{STARTTLS} asks for an upgrade.  It is refused where TLS is not
     offered or already on, and it must be the last thing the client sent:
     bytes after it in the same read are refused, since they were sent in
     plaintext before the client could have seen our answer (the STARTTLS
     command-injection bug of old mail servers).
  2. Before the upgrade, with TLS required, any other line is refused.
  3. With tokens configured, the first line must be C{AUTH <token>}; the
     line is consumed, never delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from lineserver.errors import ErrorCode

STARTTLS = b"STARTTLS"
AUTH_PREFIX = b"AUTH "


class Verdict(Enum):
    DELIVER = "deliver"
    CONSUMED = "consumed"
    START_TLS = "start-tls"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    code: ErrorCode | None = None
    detail: str = ""


DELIVER = Decision(Verdict.DELIVER)
CONSUMED = Decision(Verdict.CONSUMED)
START_TLS = Decision(Verdict.START_TLS)


@dataclass(frozen=True)
class AdmissionPolicy:
    """
    Who may connect, and what each connection must do before its lines
    count.  Built once (by L{lineserver.security.Security}) and handed to
    the protocol factory; what it refers to (tokens, contexts) reloads in
    place.

    @ivar starttls: C{STARTTLS} is offered on this plain port.
    @ivar require_tls: no line is accepted before TLS is on.
    @ivar check_token: checks an C{AUTH} token; None if no auth is required.
    @ivar allow: admits a client by its IP address (C{--allow}); None
        admits every address.
    @ivar starttls_context: the TLS context C{STARTTLS} upgrades with.
    """

    starttls: bool = False
    require_tls: bool = False
    check_token: Callable[[bytes], bool] | None = None
    allow: Callable[[str], bool] | None = None
    starttls_context: object | None = None


def parse_auth_line(line: bytes) -> bytes | None:
    """
    @return: the token of an C{AUTH <token>} line, else None.
    """
    if line.startswith(AUTH_PREFIX):
        token = line[len(AUTH_PREFIX) :].strip()
        return token or None
    return None


class Admission:
    """
    The admission state of one connection.
    """

    __slots__ = ("authenticated", "delivering", "policy", "tls")

    def __init__(self, policy: AdmissionPolicy, tls: bool = False) -> None:
        self.policy = policy
        self.tls = tls
        self.authenticated = policy.check_token is None
        self.delivering = False

    @property
    def open(self) -> bool:
        """
        Do lines now go straight to the handler?  Only once one was
        delivered, and, where C{STARTTLS} is offered, once TLS is on.

        Until a line is delivered, C{STARTTLS} is a command even where no
        rule applies (a client asking for TLS where there is none gets
        C{ERR tls-unavailable}, not its handshake in the sink); on a port
        that offers it, it stays one until TLS is on.
        """
        return self.delivering and (self.tls or not self.policy.starttls)

    def tls_started(self) -> None:
        self.tls = True

    def on_line(self, line: bytes, last: bool) -> Decision:
        """
        @param last: nothing else (no line, no partial line) followed this
            line in what the client has sent so far.
        """
        policy = self.policy
        if line == STARTTLS:
            if self.tls or not policy.starttls:
                return Decision(Verdict.REFUSE, ErrorCode.TLS_UNAVAILABLE)
            if not last:
                return Decision(
                    Verdict.REFUSE, ErrorCode.PROTOCOL, "data after STARTTLS"
                )
            return START_TLS
        if policy.require_tls and not self.tls:
            return Decision(Verdict.REFUSE, ErrorCode.TLS_REQUIRED)
        if not self.authenticated:
            token = parse_auth_line(line)
            assert policy.check_token is not None
            if token is None or not policy.check_token(token):
                return Decision(Verdict.REFUSE, ErrorCode.UNAUTHORIZED)
            self.authenticated = True
            return CONSUMED
        self.delivering = True
        return DELIVER
