"""Sinks, chosen by the scheme of a URL such as C{file:lines.log}.

Built-in schemes are listed in L{_builtin_schemes}; another package adds a
scheme without touching lineserver by declaring an entry point in the
C{lineserver.sinks} group whose object is a L{SinkScheme} callable.

A scheme declares the query options it takes (C{file:x?fsync=1}) by being
a L{Scheme}, or any callable with an C{options} attribute; any other
option is then refused, so that a typo (C{?fsycn=1}) is a usage error
instead of a setting silently ignored.  A plain function declares nothing,
and its options are left to it.

Optional contracts a sink may also provide: L{IReopenable} (SIGHUP
reopens its file, for log rotation), L{IPipelinedSink} (it takes more
than one batch at a time, to group-commit them) and L{ISpooled} (it keeps
confirmed lines in a disk spool until its destination has them).

A sink whose destination is down, full or refusing fails with
L{SinkUnavailable} (or an C{OSError}): an outage, retried for as long as it
takes, never a crash that counts against the restart intensity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl

from zope.interface import Attribute, Interface

from lineserver.interfaces import ISinkFactory

ENTRY_POINT_GROUP = "lineserver.sinks"


class IReopenable(Interface):
    """
    A sink that can let go of what it writes to and take it again by name:
    a rotated log file.  The server asks on SIGHUP (C{LineServer.reload});
    a sink without it is left alone.
    """

    def reopen() -> object:
        """
        Start writing to whatever the sink's name refers to now.

        Batches are neither lost nor reordered by it: every batch written
        before goes to the old file, every batch after to the new one.

        @return: a Deferred that fires once the new file is in use (or
            fails, and the old one stays in use).
        """


class IPipelinedSink(Interface):
    """
    A sink that takes up to C{max_in_flight} batches before the first one's
    Deferred fires, keeping their order (the file sink with
    C{fsync=interval}: batches wait for one shared fsync, and with a single
    batch in flight they would wait for it one at a time).
    """

    max_in_flight = Attribute("How many batches may await their Deferred (>= 1).")


class IImmediateSink(Interface):
    """
    A sink that can often take a batch at once, its promise kept before
    the call returns (the file sink's small writes with C{fsync=never}).
    The sink service then confirms the batch without a Deferred: for a
    fleet of slow clients, where each reactor turn hands the sink a line
    or two, what that bookkeeping cost was a third of a line's cost.
    """

    def write_now(lines: list[bytes]) -> bool:  # noqa: N805 (zope declares no self)
        """
        Write C{lines} now, if that is cheap now.

        @return: True once they are written as C{write} would have
            confirmed them; False if nothing was written (C{write} will be
            called with the same lines instead).
        """


class IWantsOrigin(Interface):
    """
    A sink factory whose sinks want to know where each line came from (the
    Redis Cluster sink shards by connection; a sink may store the peer and
    the receive time): the server then hands them
    L{lineserver.handlers.OriginLine}s, still plain C{bytes} to any other
    code.  Other sinks get bare lines, at no cost.
    """


class ISpooled(Interface):
    """
    A sink that confirms lines once they are in its disk spool, before its
    destination has them.  The loss ledger counts them apart:
    received = delivered + queued + spooled + dropped.
    """

    spooled_lines = Attribute(
        "Lines confirmed by this sink (their write Deferred fired) that are"
        " in the spool and not yet confirmed by the destination behind it."
    )


class SinkUnavailable(Exception):
    """
    The sink's destination is down, full or refusing (a server that went
    away, a wrong password, a full disk): an outage, not a bug.

    The batch is kept and retried with capped backoff, and clients are
    paused (or spooled) meanwhile; the process never ends for it.  The
    message says what is wrong, for the operator's log.
    """


class SinkURLError(ValueError):
    """
    A sink URL that cannot be used; the message says why, for a user.
    """


@dataclass(frozen=True)
class SinkURL:
    """
    A parsed sink URL: C{scheme:target?key=value&...}.
    """

    scheme: str
    target: str
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> SinkURL:
        scheme, colon, rest = text.partition(":")
        if not colon or not scheme:
            raise SinkURLError(f"{text!r} is not a sink URL (want scheme:target)")
        target, _, query = rest.partition("?")
        # Blank values are kept: "?fsycn" must be refused as unknown, not
        # dropped as if it were not there.
        options = dict(parse_qsl(query, keep_blank_values=True))
        return cls(scheme.lower(), target, options)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.scheme}:{self.target}" + (f"?{query}" if query else "")


SinkScheme = Callable[[SinkURL, Any], ISinkFactory]
"""
Builds a sink factory from a parsed URL and the reactor.
"""


@dataclass(frozen=True)
class Scheme:
    """
    A L{SinkScheme} that names the query options it takes.

    @ivar build: makes the factory from the URL and the reactor.
    @ivar options: every option the URL may carry; others are refused.
    """

    build: SinkScheme
    options: frozenset[str] = frozenset()

    def __call__(self, url: SinkURL, reactor: Any) -> ISinkFactory:
        return self.build(url, reactor)


def check_options(url: SinkURL, scheme: SinkScheme) -> None:
    """
    Refuse options the scheme does not declare, naming the ones it knows.

    @raise SinkURLError: for the first unknown option.
    """
    declared: frozenset[str] | None = getattr(scheme, "options", None)
    if declared is None:
        return
    unknown = sorted(url.options.keys() - declared)
    if not unknown:
        return
    known = (
        f"known: {', '.join(sorted(declared))}"
        if declared
        else f"{url.scheme}: takes no options"
    )
    raise SinkURLError(f"{url.scheme}: unknown option {unknown[0]!r} ({known})")


def _builtin_schemes() -> dict[str, SinkScheme]:
    from lineserver.sinks.file import file_scheme
    from lineserver.sinks.null import null_scheme
    from lineserver.sinks.redis import redis_scheme
    from lineserver.sinks.relay import relay_scheme
    from lineserver.sinks.stdout import stdout_scheme

    schemes: dict[str, SinkScheme] = {
        "file": file_scheme,
        "stdout": stdout_scheme,
        "null": null_scheme,
        "tcp": relay_scheme,
        "tls": relay_scheme,
    }
    # The Redis Streams sinks (docs/redis.md).
    for name in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        schemes[name] = redis_scheme
    return schemes


def available_schemes() -> dict[str, SinkScheme]:
    """
    @return: every scheme: the built-in ones and those of installed plugins.
    """
    schemes = _builtin_schemes()
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        schemes.setdefault(entry.name, entry.load())
    return schemes


def sink_factory_from_url(text: str, reactor: Any) -> ISinkFactory:
    """
    @raise SinkURLError: for an unknown scheme or a bad target.
    """
    url = SinkURL.parse(text)
    schemes = available_schemes()
    scheme = schemes.get(url.scheme)
    if scheme is None:
        known = ", ".join(f"{name}:" for name in sorted(schemes))
        raise SinkURLError(f"unknown sink scheme {url.scheme!r} (known: {known})")
    check_options(url, scheme)
    return scheme(url, reactor)
