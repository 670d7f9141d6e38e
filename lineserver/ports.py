"""Listening endpoint descriptions: lineserver's defaults on top of Twisted's.

Twisted's C{tcp:4040} listens on every IPv4 interface and with a backlog of
50.  A line server for untrusted networks should be reachable from outside
only when someone wrote that down, and a burst of reconnecting clients
should not be refused by a short kernel queue, so a C{--port} without them
gets C{interface=127.0.0.1} (C{::1} for C{tcp6:}) and the C{--backlog}.

A unix socket is guarded by its file's mode alone (C{--allow} judges IP
addresses), and Twisted's default, 0666, lets every local user connect:
a C{unix:} port without C{mode=} gets L{UNIX_MODE}, owner and group only.
"""

from __future__ import annotations

from lineserver.twisted_internals import parse_endpoint_description

#: Where each kind of stream endpoint takes its listening address, by
#: position, when it is not given as C{interface=}.
_INTERFACE_POSITION = {"tcp": 2, "tcp6": 2, "ssl": 4}
_LOOPBACK = {"tcp": "127.0.0.1", "tcp6": "\\:\\:1", "ssl": "127.0.0.1"}
_WITH_BACKLOG = {"tcp", "tcp6", "ssl", "unix"}
#: Where each kind takes its backlog, by position, when not as C{backlog=}.
_BACKLOG_POSITION = {"tcp": 1, "tcp6": 1, "ssl": 5, "unix": 2}
#: Where a unix: port takes its mode, by position (C{unix:PATH:MODE}).
_UNIX_MODE_POSITION = 1
#: The file mode of a unix socket whose description does not set one
#: (octal, as Twisted's C{mode=} takes it): owner and group may connect.
UNIX_MODE = "660"
#: Kinds whose first positional argument is a TCP port number.
_WITH_PORT_NUMBER = {"tcp", "tcp6", "ssl"}
#: Addresses that mean "every interface".
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})


def _kind_and_args(description: str) -> tuple[str, list[str], dict[str, str]]:
    rest = description
    if rest.lower().startswith("haproxy:"):
        rest = rest[len("haproxy:") :]
    args, kwargs = parse_endpoint_description(rest)
    kind = str(args[0]).lower() if args else ""
    return kind, [str(a) for a in args[1:]], {k: str(v) for k, v in kwargs.items()}


def with_defaults(description: str, backlog: int) -> str:
    """
    Add lineserver's defaults to a C{--port} description that lacks them:
    a loopback C{interface} for C{tcp:}, C{tcp6:} and C{ssl:} (also under
    C{haproxy:}), C{mode=660} for C{unix:}, and C{backlog} for stream
    endpoints.  What the description says is never changed; other kinds
    pass through.
    """
    try:
        kind, positional, named = _kind_and_args(description)
    except (ValueError, IndexError):
        return description  # the endpoint parser will say what is wrong
    result = description
    position = _INTERFACE_POSITION.get(kind)
    if (
        position is not None
        and "interface" not in named
        and len(positional) <= position
    ):
        result += f":interface={_LOOPBACK[kind]}"
    if (
        kind == "unix"
        and "mode" not in named
        and len(positional) <= _UNIX_MODE_POSITION
    ):
        result += f":mode={UNIX_MODE}"
    backlog_position = _BACKLOG_POSITION.get(kind)
    has_backlog = "backlog" in named or (
        backlog_position is not None and len(positional) > backlog_position
    )
    if kind in _WITH_BACKLOG and not has_backlog:
        result += f":backlog={backlog}"
    return result


def port_number(description: str) -> int | None:
    """
    @return: the TCP port number a C{tcp:}, C{tcp6:} or C{ssl:} description
        (also under C{haproxy:}) listens on; None for other kinds, or when
        there is no number to read (Twisted's parser says what is wrong).
    """
    try:
        kind, positional, named = _kind_and_args(description)
    except (ValueError, IndexError):
        return None
    if kind not in _WITH_PORT_NUMBER:
        return None
    text = named.get("port", positional[0] if positional else None)
    if text is None or not text.strip().lstrip("+-").isdigit():
        return None
    return int(text)


def listens_everywhere(host: str) -> bool:
    """
    Is C{host} (a listening port's address) every interface of the machine?
    """
    return host in EVERY_INTERFACE
