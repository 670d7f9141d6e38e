"""Listening endpoint descriptions: lineserver's defaults on top of Twisted's.

Twisted's C{tcp:4040} listens on every IPv4 interface and with a backlog of
50.  A line server for untrusted networks should be reachable from outside
only when someone wrote that down, and a burst of reconnecting clients
should not be refused by a short kernel queue, so a C{--port} without them
gets C{interface=127.0.0.1} (C{::1} for C{tcp6:}) and the C{--backlog}.
"""

from __future__ import annotations

from lineserver.twisted_internals import parse_endpoint_description

#: Where each kind of stream endpoint takes its listening address, by
#: position, when it is not given as C{interface=}.
_INTERFACE_POSITION = {"tcp": 2, "tcp6": 2, "ssl": 4}
_LOOPBACK = {"tcp": "127.0.0.1", "tcp6": "\\:\\:1", "ssl": "127.0.0.1"}
_WITH_BACKLOG = {"tcp", "tcp6", "ssl", "unix"}
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
    C{haproxy:}), and C{backlog} for stream endpoints.  What the
    description says is never changed; other kinds pass through.
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
    backlog_position = 1 if kind in ("tcp", "tcp6") else 5 if kind == "ssl" else None
    has_backlog = "backlog" in named or (
        backlog_position is not None and len(positional) > backlog_position
    )
    if kind in _WITH_BACKLOG and not has_backlog:
        result += f":backlog={backlog}"
    return result


def listens_everywhere(host: str) -> bool:
    """
    Is C{host} (a listening port's address) every interface of the machine?
    """
    return host in EVERY_INTERFACE
