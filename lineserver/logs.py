"""Log observers for machines, and log files that logrotate can move.

C{twistd --logger lineserver.logs.json_logger -n lineserver ...} writes
one JSON object per line (Twisted's own event serialisation, without the
RFC 7464 record separator that C{twist --log-format=json} puts before
each), to the file named by C{$LINESERVER_LOG_FILE}, or to standard
output.  Every key an event carries is a field: the connection close event
(namespace C{lineserver.connection}) has C{peer}, C{subject}, C{lines},
C{bytes}, C{duration} and C{reason}.

C{--logger} takes a callable without arguments, so the file is named by
the environment rather than by an option.  The files opened here are
remembered (weakly) so that L{reopen_logs} (SIGUSR1, or the control
socket's C{reopen log}) can reopen them after logrotate renamed them; so
is the file behind twistd's own C{--logfile}, which twistd would otherwise
rotate by renaming it itself, and could not follow a rename by logrotate.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
)
from twisted.python.logfile import BaseLogFile

from lineserver.twisted_internals import file_observer_output, global_log_observers

log = Logger(namespace="lineserver.logs")

#: The environment variable that names the log file of the factories here.
LOG_FILE_VARIABLE = "LINESERVER_LOG_FILE"

_OPEN: weakref.WeakSet[ReopenableFile] = weakref.WeakSet()


class ReopenableFile:
    """
    A text file opened for appending that can be reopened under the same
    name: after logrotate renamed it, lines go to a new file of that name.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._file: IO[str] = self._open()
        _OPEN.add(self)

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """
        Open the path again, then close the old file (a file that cannot
        be opened raises, and the old one stays in use).
        """
        fresh = self._open()
        old, self._file = self._file, fresh
        old.close()

    def close(self) -> None:
        self._file.close()
        _OPEN.discard(self)


def _output(environ: dict[str, str] | None = None) -> IO[Any]:
    """
    @return: the file named by C{$LINESERVER_LOG_FILE} (a
        L{ReopenableFile}, which has what an observer uses of a file), or
        standard output.
    """
    env = os.environ if environ is None else environ
    path = env.get(LOG_FILE_VARIABLE)
    if not path or path == "-":
        return sys.stdout
    return cast(IO[Any], ReopenableFile(path))


def json_logger() -> ILogObserver:
    """
    For C{twistd --logger}: one JSON object per line, to
    C{$LINESERVER_LOG_FILE} or standard output.
    """
    observer: ILogObserver = jsonFileLogObserver(_output(), recordSeparator="")
    return observer


def text_logger() -> ILogObserver:
    """
    For C{twistd --logger}: twistd's usual text lines, to
    C{$LINESERVER_LOG_FILE} or standard output, in a file that SIGUSR1
    reopens (for logrotate without C{copytruncate}).
    """
    observer: ILogObserver = FileLogObserver(_output(), formatEventAsClassicLogText)
    return observer


def _twistd_log_files() -> list[BaseLogFile]:
    """
    The files twistd's own C{--logfile} writes to: a L{BaseLogFile} (which
    has a public C{reopen()}) behind a C{FileLogObserver} on the global
    publisher.  Twisted offers no public way to reach them; the two
    private names this takes are in L{lineserver.twisted_internals}.
    """
    found = []
    for observer in global_log_observers():
        out = file_observer_output(observer)
        if isinstance(out, BaseLogFile):
            found.append(out)
    return found


def reopen_logs(
    extra: Callable[[], list[BaseLogFile]] = _twistd_log_files,
) -> list[str]:
    """
    Reopen every log file this process writes to by name; one that cannot
    be reopened is logged and stays in use as it was.

    @return: the paths reopened.
    """
    reopened = []
    files: list[ReopenableFile | BaseLogFile] = [*_OPEN, *extra()]
    for opened in files:
        path = str(opened.path)
        try:
            opened.reopen()
        except OSError:
            # The old file stays in use: nothing is lost, and the next
            # signal tries again.
            log.failure("could not reopen the log file {path}", path=path)
        else:
            reopened.append(path)
    return reopened
