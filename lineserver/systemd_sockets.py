"""Why a C{systemd:} endpoint found no socket, in words an operator can act on.

Twisted's C{systemd:} parser looks the socket up in the descriptors systemd
passed (C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}); with none passed
it fails with a bare C{IndexError} or C{KeyError} ("list index out of
range").  L{missing_socket} reads the same environment, through Twisted's
public L{ListenFDs}, and says what is wrong.  Pure: the environment and
the pid are parameters.

Twisted deletes C{LISTEN_PID} and C{LISTEN_FDS} from C{os.environ} as soon
as it imports its C{systemd:} parser (so that nothing adopts the same
descriptors twice), before any of our code runs; L{initial_environment}
reads the environment the process started with instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.python.systemd import ListenFDs

from lineserver.proxy import is_proxy_description
from lineserver.twisted_internals import parse_endpoint_description

#: How to get sockets passed, for the end of every message.
_HOW = (
    "run it from a systemd socket unit (twistd itself in ExecStart=, or "
    "exec'd by a wrapper), or under systemd-socket-activate"
)


def _asked(description: str) -> tuple[str, str] | None:
    """
    @return: C{("index", "0")} or C{("name", "lines")} for a C{systemd:}
        description (also under C{haproxy:}), None for any other.
    """
    if is_proxy_description(description):
        description = description.split(":", 1)[1]
    if not description.lower().startswith("systemd:"):
        return None
    try:
        _, named = parse_endpoint_description(description)
    except Exception:
        return None
    for key in ("index", "name"):
        if key in named:
            return key, named[key]
    return None


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def initial_environment() -> Mapping[str, str]:
    """
    @return: the environment this process started with (Linux's
        C{/proc/self/environ}), or C{os.environ} where that cannot be read.
    """
    try:
        with open("/proc/self/environ", "rb") as environ:
            raw = environ.read()
    except OSError:
        return os.environ
    found = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep:
            found[os.fsdecode(name)] = os.fsdecode(value)
    return found


def missing_socket(
    description: str,
    environ: Mapping[str, str] | None = None,
    pid: int | None = None,
) -> str | None:
    """
    @param environ: the process environment (L{initial_environment} if
        None).
    @param pid: this process's pid (C{os.getpid()} if None).
    @return: why the C{systemd:} socket C{description} asks for was not
        passed to this process, or None if it was (or if C{description}
        is not a C{systemd:} one).
    """
    asked = _asked(description)
    if asked is None:
        return None
    env = initial_environment() if environ is None else environ
    own_pid = os.getpid() if pid is None else pid
    if "LISTEN_FDS" not in env or "LISTEN_PID" not in env:
        return (
            "no socket passed by systemd: LISTEN_FDS and LISTEN_PID are not "
            f"set; {_HOW}"
        )
    if env["LISTEN_PID"] != str(own_pid):
        return (
            f"no socket passed by systemd to this process: LISTEN_PID is "
            f"{env['LISTEN_PID']}, this process is {own_pid} (a wrapper that "
            f"did not exec twistd?); {_HOW}"
        )
    # ListenFDs reads the pid from the real process; the check above
    # already compared it, so hand it a matching one.
    fds = ListenFDs.fromEnvironment({**env, "LISTEN_PID": str(os.getpid())})
    passed = fds.inheritedDescriptors()
    if not passed:
        return (
            f"no socket passed by systemd: LISTEN_FDS={env['LISTEN_FDS']!r} with "
            f"LISTEN_FDNAMES={env.get('LISTEN_FDNAMES')!r} (Twisted needs both, "
            f"naming as many sockets); {_HOW}"
        )
    key, value = asked
    if key == "index":
        try:
            index = int(value)
        except ValueError:
            return None
        if 0 <= index < len(passed):
            return None
        return (
            f"systemd passed {len(passed)} socket(s) (index 0 to "
            f"{len(passed) - 1}); index={value} asks for the "
            f"{_ordinal(index + 1)}"
        )
    names = fds.inheritedNamedDescriptors()
    if value in names:
        return None
    return (
        f"systemd passed no socket named {value!r} (FileDescriptorName=); "
        f"it passed {', '.join(repr(n) for n in names)}"
    )
