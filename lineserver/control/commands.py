"""Control commands: a command line to a L{Command}, or a L{CommandError}.

Pure: no reactor, no socket.  L{COMMANDS} is the one list of what the
control socket takes (its words, arguments and help line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The longest command line taken; a longer one closes the connection.
MAX_COMMAND_LENGTH = 4096
#: The prefix that asks for a JSON answer: C{json show info}.
JSON_PREFIX = "json"


class CommandError(Exception):
    """
    A command line that is not a command, or a bad argument: an error
    answer, never a crash.
    """


@dataclass(frozen=True)
class Command:
    """
    One parsed command.

    @ivar name: the command's words, like C{"show connections"}.
    @ivar args: its arguments, converted.
    @ivar json: answer in JSON.
    """

    name: str
    args: tuple[Any, ...] = ()
    json: bool = False


def _count(word: str) -> int:
    if not word.isdigit() or int(word) < 1:
        raise CommandError(f"expected a whole number of at least 1, got {word!r}")
    return int(word)


def _limit(word: str) -> int | None:
    if word.lower() == "none":
        return None
    return _count(word)


def _connection_id(word: str) -> int:
    text = word[1:] if word.startswith("#") else word
    if not text.isdigit():
        raise CommandError(f"expected a connection id like 12 or #12, got {word!r}")
    return int(text)


def _seconds(word: str) -> float:
    try:
        value = float(word)
    except ValueError:
        raise CommandError(f"expected seconds, got {word!r}") from None
    if not 0 <= value < float("inf"):
        raise CommandError(f"expected seconds of at least 0, got {word!r}")
    return value


@dataclass(frozen=True)
class Spec:
    """
    A command's words, its arguments' converters, and its help line.

    @ivar optional: how many of the last converters may be left out.
    """

    name: str
    usage: str
    help: str
    converters: tuple[Callable[[str], Any], ...] = ()
    optional: int = 0


COMMANDS: tuple[Spec, ...] = (
    Spec("help", "help", "list the commands"),
    Spec("show info", "show info", "process, version, phase, listeners, limits"),
    Spec("show stats", "show stats", "every counter and gauge, by name"),
    Spec(
        "show connections",
        "show connections",
        "one line per connection: id, peer, subject, age, lines, bytes, paused",
    ),
    Spec(
        "disable listener",
        "disable listener",
        "stop accepting on every port (kept open: new clients wait in the backlog)",
    ),
    Spec("enable listener", "enable listener", "accept again"),
    Spec(
        "set max-connections",
        "set max-connections N|none",
        "change the connection limit (none: no limit)",
        (_limit,),
    ),
    Spec(
        "kill connection",
        "kill connection ID",
        "close connection ID (after what it already sent is delivered)",
        (_connection_id,),
    ),
    Spec(
        "reload",
        "reload",
        "what SIGHUP does: certificates, keys, CAs, tokens, reopen the sink",
    ),
    Spec("reopen log", "reopen log", "what SIGUSR1 does: reopen the log file(s)"),
    Spec(
        "drain",
        "drain [SECONDS]",
        "stop accepting, wait up to SECONDS for clients to leave, then stop "
        "in order (drain, flush, close) and exit with status 0",
        (_seconds,),
        optional=1,
    ),
)
_BY_NAME = {spec.name: spec for spec in COMMANDS}


def parse(line: str) -> Command:
    """
    @param line: one command line, like C{set max-connections 100} or
        C{json show info}.
    @raise CommandError: for anything that is not a command with good
        arguments.
    """
    words = line.split()
    as_json = bool(words) and words[0].lower() == JSON_PREFIX
    if as_json:
        words = words[1:]
    if not words:
        raise CommandError("empty command; try help")
    lowered = [word.lower() for word in words]
    for size in (2, 1):
        spec = _BY_NAME.get(" ".join(lowered[:size]))
        if spec is not None:
            break
    else:
        raise CommandError(f"unknown command {' '.join(words)!r}; try help")
    given = words[len(spec.name.split()) :]
    least = len(spec.converters) - spec.optional
    if not least <= len(given) <= len(spec.converters):
        raise CommandError(f"usage: {spec.usage}")
    args = tuple(
        convert(word) for convert, word in zip(spec.converters, given, strict=False)
    )
    return Command(spec.name, args, as_json)
