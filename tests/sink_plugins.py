"""Sink plugins for tests of a real twistd, installed the way a user would.

L{install} writes a C{.dist-info} directory declaring these schemes in the
C{lineserver.sinks} entry point group; a server started with that
directory on its C{PYTHONPATH} finds them as it finds any plugin.

  - C{buggy:} opens, then raises a genuine bug (not an outage) on every
    write: the supervisor must restart it and, repeated, escalate.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import Scheme, SinkURL

ENTRY_POINTS = """\
[lineserver.sinks]
buggy = tests.sink_plugins:buggy_scheme
"""


class SinkBug(Exception):
    """
    What a bug in a sink raises: neither SinkUnavailable nor OSError.
    """


@implementer(ISink)
class BuggySink:
    def open(self) -> Deferred[None]:
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        raise SinkBug(f"a bug in the sink, writing {len(lines)} line(s)")

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(ISinkFactory)
class BuggySinkFactory:
    description = "buggy:"

    def __call__(self) -> BuggySink:
        return BuggySink()


def _buggy(url: SinkURL, reactor: Any) -> ISinkFactory:
    return BuggySinkFactory()


buggy_scheme = Scheme(_buggy)


def install(directory: str) -> dict[str, str]:
    """
    Declare the schemes above in C{directory}.

    @return: the environment that makes a server find them.
    """
    info = os.path.join(directory, "lineserver_test_sinks-1.0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as metadata:
        metadata.write("Metadata-Version: 2.1\nName: lineserver-test-sinks\n")
        metadata.write("Version: 1.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as entry_points:
        entry_points.write(ENTRY_POINTS)
    return {"PYTHONPATH": directory}
