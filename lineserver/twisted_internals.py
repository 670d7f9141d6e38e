"""Every private Twisted name lineserver relies on, and nothing else.

Twisted's compatibility policy covers its public API only: a private name
may change in any release without a deprecation.  Each one we use is here,
with the reason we need it, so an upgrade has one file to review, and
C{tests/test_twisted_internals.py} checks each against the installed
Twisted with a message saying what changed.  The rest of lineserver imports
these names from here, never from Twisted's private modules.

The supported Twisted range is declared in C{pyproject.toml}; CI runs the
suite on its oldest and newest ends (C{make test}).
"""

from __future__ import annotations

from typing import Any, ClassVar

# Twisted parses endpoint descriptions (C{tcp:4040:interface=\:\:1}, with
# its own quoting) only inside serverFromString; no public function returns
# the parts.  We need them to add our defaults (interface, backlog, mode) to
# a --port without changing what it says, and to take an ssl: description
# apart so that it listens with our reloadable TLS context.
from twisted.internet import tcp
from twisted.internet.endpoints import _parse
from twisted.logger import FileLogObserver, globalLogPublisher

# The PROXY protocol wrapper and its factory live in a private module; the
# public twisted.protocols.haproxy exports only proxyEndpoint(), which
# cannot take another factory.  We subclass the wrapper to learn when the
# header has arrived (see lineserver.proxy), and recognise it among a
# connection's transports (lineserver.transports.behind_proxy).
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)

# Twisted's TLS layer (TLSMemoryBIOProtocol) hands its protocol each TLS
# record as it is decrypted, in _flushReceiveBIO, which has no public hook.
# lineserver.tls.CoalescingTLSProtocol overrides that method to hand the
# protocol one dataReceived per socket read (a 64 KiB read was four passes
# through the per-read path), and _write and _flushSendBIO to encrypt a
# write in one SSL_write and send its records in one transport write,
# keeping their error handling, for which it calls and reads the private
# members below.  The overrides mirror Twisted's own methods: review them
# whenever Twisted changes those methods.

#: The private methods of TLSMemoryBIOProtocol that
#: CoalescingTLSProtocol overrides (the first three) or calls.
TLS_RECEIVE_METHODS: tuple[str, ...] = (
    "_flushReceiveBIO",
    "_flushSendBIO",
    "_write",
    "_bufferedWrite",
    "_shutdownTLS",
    "_tlsShutdownFinished",
)
#: BufferingTLSTransport's write aggregator, flushed by the override once
#: per read (its public flush(), on a private attribute).
TLS_AGGREGATOR_ATTRIBUTE = "_aggregator"
#: Its private flags (class-level booleans) that the override reads.
TLS_RECEIVE_FLAGS: tuple[str, ...] = ("_aborted", "_lostTLSConnection")
#: The OpenSSL connection, set on each connection when it is made.
TLS_CONNECTION_ATTRIBUTE = "_tlsConnection"

__all__ = [
    "TLS_AGGREGATOR_ATTRIBUTE",
    "TLS_CONNECTION_ATTRIBUTE",
    "TLS_RECEIVE_FLAGS",
    "TLS_RECEIVE_METHODS",
    "HAProxyProtocolWrapper",
    "HAProxyWrappingFactory",
    "LeanServer",
    "file_observer_output",
    "global_log_observers",
    "listening_socket",
    "parse_endpoint_description",
    "proxy_header_received",
    "replace_listening_socket",
    "use_lean_transport",
]


# tcp.Server formats two strings for every accepted connection, its log
# prefix and its repr (~150 bytes together, a tenth of an idle
# connection's memory), which most connections never show.  LeanServer
# makes them when asked; a listening tcp.Port builds its connections'
# transports from its class attribute "transport", which lineserver's
# ports set to LeanServer (use_lean_transport).  Twisted's Server.__init__
# assigns both strings, so they are properties whose setters keep nothing;
# the getters call the private _getLogPrefix and read the port's private
# _realPortNumber, as Twisted's __init__ does.


class LeanServer(tcp.Server):
    """
    Twisted's TCP server transport, its log prefix and repr formatted when
    used rather than kept per connection.

    The log prefix is asked for at every read (Twisted runs each event in
    a log context named by it), so its first part, the protocol's
    C{logPrefix()}, is taken once per kind of protocol (its class and the
    classes it wraps: TLS, PROXY): on lineserver's ports it is the
    protocol's class name, with " (TLS)" under TLS, the same for every
    connection of a kind.
    """

    _prefixes: ClassVar[dict[tuple[type, ...], str]] = {}

    @property  # type: ignore[override]
    def logstr(self) -> str:
        protocol = self.protocol
        kind = _protocol_kind(protocol)
        prefix = self._prefixes.get(kind)
        if prefix is None:
            prefix = self._prefixes[kind] = self._getLogPrefix(protocol)
        return f"{prefix},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        """
        Twisted's C{__init__} sets it; it is made on use instead.
        """

    @property
    def repstr(self) -> str:
        port = self.server._realPortNumber if self.server is not None else "?"
        return f"<{self.protocol.__class__.__name__} #{self.sessionno} on {port}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        """
        Likewise.
        """


def _protocol_kind(protocol: object) -> tuple[type, ...]:
    """
    A protocol's class, and the classes of the protocols it wraps.
    """
    kind = [type(protocol)]
    wrapped = getattr(protocol, "wrappedProtocol", None)
    while wrapped is not None and len(kind) < 4:
        kind.append(type(wrapped))
        wrapped = getattr(wrapped, "wrappedProtocol", None)
    return tuple(kind)


def use_lean_transport(port: object) -> bool:
    """
    Have a listening TCP port build L{LeanServer} transports.

    @return: False for any other port (unix sockets, a port whose
        transport class someone else chose), left as it is.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = LeanServer
        return True
    return False


def parse_endpoint_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description as Twisted's parser does, unquoting
    C{\\:}: C{"tcp:80:interface=\\:\\:1"} gives C{(["tcp", "80"],
    {"interface": "::1"})}.
    """
    args, kwargs = _parse(description)
    return [str(arg) for arg in args], {str(k): str(v) for k, v in kwargs.items()}


def proxy_header_received(wrapper: HAProxyProtocolWrapper) -> bool:
    """
    Has this PROXY protocol wrapper parsed its connection's header?

    The wrapper keeps the parsed header in C{_proxyInfo} (None until then)
    and says nothing when it arrives; a client behind HAProxy may stay
    quiet for minutes after connecting, and we judge its address as soon as
    the header is in, not at its first line.
    """
    info: object = wrapper._proxyInfo
    return info is not None


def listening_socket(port: Any) -> Any | None:
    """
    The socket a listening C{tcp.Port} or C{unix.Port} accepts on, or None
    (not listening, or not a socket port).
    """
    return getattr(port, "socket", None)


def replace_listening_socket(port: Any, stand_in: Any) -> None:
    """
    Make a listening port accept through C{stand_in}.

    C{tcp.Port.doRead} calls C{self.socket.accept()} and has no hook for
    its errors: on ENFILE, ENOBUFS or ENOMEM it logs and returns with the
    socket still readable, and the reactor calls it again at once (100%
    CPU).  Putting our L{lineserver.accept_guard.GuardedSocket} in the
    C{socket} attribute is the one place to turn those errors into a
    backoff.  The port keeps its descriptor: C{fileno} was bound to the
    real socket when it started listening.
    """
    port.socket = stand_in


def global_log_observers() -> list[Any]:
    """
    The observers on Twisted's global log publisher.

    C{LogPublisher} keeps them in C{_observers} and has no public way to
    list them.  We need them to find the file behind twistd's own
    C{--logfile} (see L{file_observer_output}), which twistd opens and
    keeps to itself; that file is what SIGUSR1 must reopen after logrotate
    renamed it.  Empty if the attribute is gone (the test says so by name).
    """
    return list(getattr(globalLogPublisher, "_observers", []))


def file_observer_output(observer: Any) -> Any | None:
    """
    The file a C{twisted.logger.FileLogObserver} writes to (its
    C{_outFile}), or None for any other observer.

    twistd's C{--logfile} is a C{FileLogObserver} over a
    C{twisted.python.logfile.LogFile}, whose public C{reopen()} is what we
    call; the observer has no public way to name its file.
    """
    if not isinstance(observer, FileLogObserver):
        return None
    return getattr(observer, "_outFile", None)
