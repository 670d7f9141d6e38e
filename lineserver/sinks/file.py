"""The file sink: appends each line, LF-terminated, to a file.

Disk writes block, and a slow disk must not stall the reactor, so writes
run on one private thread.  One batch is in flight at a time (the sink
queue's rule), so lines keep their order without any lock.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import Scheme, SinkURL, SinkURLError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@implementer(ISink)
class FileSink:
    """
    Appends lines to C{path}; C{fsync} makes each batch durable before its
    Deferred fires (slower; off by default: a clean close always flushes).
    """

    def __init__(self, path: str, reactor: Any, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"sink {path}")
        self._file: IO[bytes] | None = None

    def _in_thread(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def open(self) -> Deferred[None]:
        self._pool.start()
        return self._in_thread(self._open)

    def _open(self) -> None:
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed in close())

    def write(self, lines: list[bytes]) -> Deferred[None]:
        return self._in_thread(self._write, lines)

    def _write(self, lines: list[bytes]) -> None:
        assert self._file is not None
        if not lines:
            return
        self._file.write(b"\n".join(lines))
        self._file.write(b"\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> Deferred[None]:
        closed = self._in_thread(self._close)
        closed.addBoth(self._stop_pool)
        return closed

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _stop_pool(self, result: object) -> object:
        self._pool.stop()
        return result


@implementer(ISinkFactory)
class FileSinkFactory:
    def __init__(self, path: str, reactor: Any, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync
        self.description = f"file:{path}"
        self._reactor = reactor

    def __call__(self) -> FileSink:
        return FileSink(self.path, self._reactor, self.fsync)


def _file_factory(url: SinkURL, reactor: Any) -> ISinkFactory:
    """
    C{file:PATH} or C{file:PATH?fsync=1}.

    The path is checked, never opened, here: this runs while the command
    line is parsed, which must not create files.  A path that exists and
    is not a regular file's, or a missing directory, would fail the
    sink's first open; saying so now names the option at fault.
    """
    if not url.target:
        raise SinkURLError("file: needs a path, as in file:lines.log")
    fsync_text = url.options.get("fsync", "0").lower()
    if fsync_text not in _TRUE | _FALSE:
        raise SinkURLError(f"file: fsync must be 0 or 1, not {fsync_text!r}")
    if os.path.isdir(url.target):
        raise SinkURLError(
            f"file: {url.target!r} is a directory; name a file in it, "
            f"as in file:{os.path.join(url.target, 'lines.log')}"
        )
    directory = os.path.dirname(os.path.abspath(url.target))
    if not os.path.isdir(directory):
        raise SinkURLError(f"file: directory {directory!r} does not exist")
    return FileSinkFactory(url.target, reactor, fsync_text in _TRUE)


#: C{file:PATH}, with the one option C{fsync}.
file_scheme = Scheme(_file_factory, frozenset({"fsync"}))
