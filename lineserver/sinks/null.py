"""The null sink: takes every line and keeps none (for tests and benches)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import IImmediateSink, Scheme, SinkURL


@implementer(ISink, IImmediateSink)
class NullSink:
    """
    Counts what it is given, so tests can see that lines arrived.
    """

    def __init__(self) -> None:
        self.lines = 0
        self.batches = 0

    def open(self) -> Deferred[None]:
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        self.write_now(lines)
        return succeed(None)

    def write_now(self, lines: list[bytes]) -> bool:
        self.lines += len(lines)
        self.batches += 1
        return True

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(ISinkFactory)
class NullSinkFactory:
    description = "null:"

    def __call__(self) -> NullSink:
        return NullSink()


def _null_factory(url: SinkURL, reactor: Any) -> ISinkFactory:
    return NullSinkFactory()


#: C{null:}, which takes no options.
null_scheme = Scheme(_null_factory)
