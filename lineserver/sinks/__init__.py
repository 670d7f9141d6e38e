"""Sinks, chosen by the scheme of a URL such as C{file:lines.log}.

Built-in schemes are listed in L{BUILTIN_SCHEMES}; another package adds a
scheme without touching lineserver by declaring an entry point in the
C{lineserver.sinks} group whose object is a L{SinkScheme} callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl

from lineserver.interfaces import ISinkFactory

ENTRY_POINT_GROUP = "lineserver.sinks"


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
        return cls(scheme.lower(), target, dict(parse_qsl(query)))

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.scheme}:{self.target}" + (f"?{query}" if query else "")


SinkScheme = Callable[[SinkURL, Any], ISinkFactory]
"""
Builds a sink factory from a parsed URL and the reactor.
"""


def _builtin_schemes() -> dict[str, SinkScheme]:
    from lineserver.sinks.file import file_scheme
    from lineserver.sinks.null import null_scheme
    from lineserver.sinks.stdout import stdout_scheme

    return {"file": file_scheme, "stdout": stdout_scheme, "null": null_scheme}


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
    return scheme(url, reactor)
