"""Tests for L{lineserver.sinks} and L{lineserver.sink_service}.

The file sink runs on a real reactor (it writes from a thread), the stdout
sink on a real pipe (its backpressure is the pipe filling up); SinkService
is driven deterministically by a sink double whose Deferreds the test fires.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import select
import shutil
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer, provider
from zope.interface.verify import verifyObject

from lineserver.flow import SinkQueue
from lineserver.interfaces import ISink, ISinkFactory, ISupervisor
from lineserver.sink_service import SinkService
from lineserver.sinks import (
    IPipelinedSink,
    IReopenable,
    Scheme,
    SinkURL,
    SinkURLError,
    available_schemes,
    check_options,
    sink_factory_from_url,
)
from lineserver.sinks.file import FileSink, FileSinkFactory, Fsync
from lineserver.sinks.null import NullSink, NullSinkFactory
from lineserver.sinks.stdout import StdoutSink, StdoutSinkFactory
from lineserver.stats import Stats
from tests.support import eventually, later, reactor, temp_dir
from tests.test_file_sink_ops import fill, small_filesystem


def capture_log(case: SynchronousTestCase) -> list[str]:
    """
    @return: a list that gets the text of every log event from now on,
        until the test ends.
    """
    messages: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return messages


ODD_LINES = [b"plain", b"nul\x00inside", b"\xff\xfe invalid utf-8 \xc3", b"", b"end"]


class FileSinkTests(TestCase):
    """
    FileSink through the real reactor and its private writer thread.
    """

    def path(self) -> str:
        return os.path.join(temp_dir(self), "lines.log")

    @inlineCallbacks
    def test_bytes_exact_lf_terminated(self) -> Generator[Deferred[Any], Any, None]:
        """
        Each line is written exactly as given (NUL, invalid UTF-8, an empty
        line) followed by one LF, in order across batches.
        """
        path = self.path()
        sink = FileSink(path, reactor)
        yield sink.open()
        yield sink.write(ODD_LINES[:2])
        yield sink.write(ODD_LINES[2:])
        yield sink.close()
        self.assertEqual(
            Path(path).read_bytes(), b"".join(line + b"\n" for line in ODD_LINES)
        )

    @inlineCallbacks
    def test_written_before_close(self) -> Generator[Deferred[Any], Any, None]:
        """
        When a write's Deferred fires, its lines are already in the file
        (flushed), not only after close.
        """
        path = self.path()
        sink = FileSink(path, reactor)
        yield sink.open()
        try:
            yield sink.write([b"one", b"two"])
            self.assertEqual(Path(path).read_bytes(), b"one\ntwo\n")
        finally:
            yield sink.close()

    @inlineCallbacks
    def test_appends(self) -> Generator[Deferred[Any], Any, None]:
        """
        An existing file is appended to, never truncated.
        """
        path = self.path()
        Path(path).write_bytes(b"old 1\nold 2\n")
        sink = FileSink(path, reactor)
        yield sink.open()
        yield sink.write([b"new"])
        yield sink.close()
        self.assertEqual(Path(path).read_bytes(), b"old 1\nold 2\nnew\n")

    def count_fsyncs(self) -> list[int]:
        """
        @return: a list that gets the descriptor of every fsync from now on
            (the calls still happen).
        """
        synced: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        self.patch(os, "fsync", counting_fsync)
        return synced

    @inlineCallbacks
    def test_fsync_each_batch(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{fsync=batch}, and the old C{fsync=1}, make a sink that fsyncs every
        batch before its Deferred fires; C{fsync=never}, the old C{fsync=0}
        and no option fsync only on close.
        """
        synced = self.count_fsyncs()
        path = self.path()
        for option in ("fsync=batch", "fsync=1", "fsync=true"):
            factory = sink_factory_from_url(f"file:{path}?{option}", reactor)
            assert isinstance(factory, FileSinkFactory)
            self.assertIs(factory.fsync, Fsync.BATCH, option)
            sink = factory()
            yield sink.open()
            del synced[:]
            yield sink.write([b"a"])
            yield sink.write([b"b"])
            self.assertEqual(len(synced), 2, option)
            yield sink.close()
            self.assertEqual(len(synced), 3, option)

        for url in (f"file:{path}", f"file:{path}?fsync=never", f"file:{path}?fsync=0"):
            plain = sink_factory_from_url(url, reactor)()
            assert isinstance(plain, FileSink)
            self.assertIs(plain.fsync, Fsync.NEVER, url)
            yield plain.open()
            del synced[:]
            yield plain.write([b"c"])
            self.assertEqual(synced, [], url)
            yield plain.close()
            self.assertEqual(len(synced), 1, url)
        self.assertEqual(Path(path).read_bytes(), b"a\nb\n" * 3 + b"c\n" * 3)

    @inlineCallbacks
    def test_fsync_interval_group_commit(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{fsync=interval}: a batch is in the file at once, but its Deferred
        fires only after the fsync that covers it; the first fsync comes at
        once, the next not before C{fsync_interval} seconds, and covers
        every batch written meanwhile with one call.
        """
        synced = self.count_fsyncs()
        clock = Clock()
        path = self.path()
        sink = FileSink(path, reactor, Fsync.INTERVAL, fsync_interval=2.0, clock=clock)
        self.assertEqual(sink.max_in_flight, 64)
        yield sink.open()
        first = sink.write([b"a"])
        yield eventually(lambda: Path(path).read_bytes() == b"a\n", "a written")
        yield eventually(lambda: clock.getDelayedCalls() != [], "a sync planned")
        self.assertNoResult(first)
        clock.advance(0)
        yield eventually(lambda: first.called, "a synced")
        self.assertEqual(len(synced), 1)

        second, third = sink.write([b"b"]), sink.write([b"c", b"d"])
        yield eventually(lambda: Path(path).read_bytes() == b"a\nb\nc\nd\n", "b-d")
        clock.advance(1.9)
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.assertEqual(len(synced), 1)
        clock.advance(0.1)
        yield eventually(lambda: second.called and third.called, "b-d synced")
        self.assertEqual(len(synced), 2)

        # close fsyncs what waits for the next interval, and fires it.
        fourth = sink.write([b"e"])
        yield eventually(lambda: clock.getDelayedCalls() != [], "e's sync planned")
        self.assertEqual(Path(path).read_bytes(), b"a\nb\nc\nd\ne\n")
        self.assertNoResult(fourth)
        yield sink.close()
        self.assertIsNone(self.successResultOf(fourth))
        self.assertEqual(len(synced), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_truncated_just_before_write(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        logrotate's copytruncate can empty the file just before the sink's
        write, which then lands at the start of the emptied file: the sink
        sees where it landed, takes it back, writes again what the copy
        missed (here nothing), then the write; every line once, in order,
        and the next write does not take the first for lost bytes.
        """
        path = self.path()
        sink = FileSink(path, reactor)
        yield sink.open()
        yield sink.write([b"a1", b"a2"])
        shutil.copyfile(path, path + ".1")
        real_write = os.write
        rotated: list[int] = []

        def rotate_then_write(fd: int, data: Any) -> int:
            # logrotate acts right before the sink's next write.
            if not rotated and Path(path).stat().st_size:
                os.truncate(path, 0)
                rotated.append(fd)
            return real_write(fd, data)

        self.patch(os, "write", rotate_then_write)
        yield sink.write([b"b1", b"b2"])
        self.patch(os, "write", real_write)
        yield sink.write([b"c1"])
        yield sink.close()
        self.assertEqual(len(rotated), 1)
        self.assertEqual(Path(path + ".1").read_bytes(), b"a1\na2\n")
        self.assertEqual(Path(path).read_bytes(), b"b1\nb2\nc1\n")

    @inlineCallbacks
    def test_reopen(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{reopen} (what SIGHUP asks) puts every batch written before it in
        the old file and every batch after it in a new file at the path.
        """
        path = self.path()
        sink = FileSink(path, reactor)
        verifyObject(IReopenable, sink)
        yield sink.open()
        yield sink.write([b"one"])
        os.rename(path, path + ".1")
        yield sink.write([b"two"])
        yield sink.reopen()
        yield sink.write([b"three"])
        yield sink.close()
        self.assertEqual(Path(path + ".1").read_bytes(), b"one\ntwo\n")
        self.assertEqual(Path(path).read_bytes(), b"three\n")

    @inlineCallbacks
    def test_follows_a_moved_file(self) -> Generator[Deferred[Any], Any, None]:
        """
        Without a SIGHUP, a file moved away is noticed by the writer itself
        (at most a second later): the lines go on in a new file at the
        path, each line in exactly one of the two files.
        """
        path = self.path()
        sink = FileSink(path, reactor)
        yield sink.open()
        yield sink.write([b"0"])
        os.rename(path, path + ".1")
        written = 1
        deadline = reactor.seconds() + 10
        while not os.path.exists(path):
            self.assertLess(reactor.seconds(), deadline, "never reopened")
            yield sink.write([b"%d" % written])
            written += 1
            yield later(0.05)
        yield sink.write([b"%d" % written])
        yield sink.close()
        old = Path(path + ".1").read_bytes().splitlines()
        new = Path(path).read_bytes().splitlines()
        self.assertEqual(old + new, [b"%d" % n for n in range(written + 1)])
        self.assertGreaterEqual(len(new), 1)

    @inlineCallbacks
    def test_truncated_under_the_sink(self) -> Generator[Deferred[Any], Any, None]:
        """
        After the file is truncated under the sink (logrotate's
        C{copytruncate}), the next line goes at the start of the emptied
        file, not past a hole of zeros, and the sink says so once.
        """
        messages = capture_log(self)
        path = self.path()
        sink = FileSink(path, reactor)
        yield sink.open()
        yield sink.write([b"before"])
        os.truncate(path, 0)
        yield sink.write([b"after"])
        yield sink.write([b"more"])
        yield sink.close()
        self.assertEqual(Path(path).read_bytes(), b"after\nmore\n")
        shrank = [m for m in messages if "shrank" in m]
        self.assertEqual(len(shrank), 1, messages)
        self.assertIn("from 7 to 0 bytes", shrank[0])
        self.assertIn("may be lost", shrank[0])

    @inlineCallbacks
    def test_full_disk_held_and_retried(self) -> Generator[Deferred[Any], Any, None]:
        """
        On a real full filesystem, a batch that does not fit is cut back
        (nothing torn stays in the file) and kept, with the batches after
        it; it is retried after 0.1 s, doubling to 5 s; one log line says
        so, and the next only after 5 s; once space is freed, the next
        retry writes everything, once, and says so.
        """
        messages = capture_log(self)
        small = small_filesystem(self)
        filler = fill(small, leave=8192)
        clock = Clock()
        path = os.path.join(small, "lines.log")
        sink = FileSink(path, reactor, clock=clock)
        yield sink.open()
        try:
            lines = [b"%05d " % n + b"x" * 94 for n in range(200)]  # 20 kB
            first, second = sink.write(lines[:100]), sink.write(lines[100:])
            delays: list[float] = []
            while True:
                yield eventually(lambda: bool(clock.getDelayedCalls()), "a retry")
                self.assertEqual(os.path.getsize(path), 0)
                self.assertNoResult(first)
                self.assertNoResult(second)
                complaints = [m for m in messages if "cannot write" in m]
                self.assertEqual(len(complaints), 1 if clock.seconds() < 5 else 2)
                if clock.seconds() >= 6:
                    break
                delays.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
                clock.advance(delays[-1])
            self.assertIn(
                "cannot write: No space left on device (ENOSPC); 200 line(s) wait",
                complaints[0],
            )
            for attempt, delay in enumerate(delays):
                expected = min(0.1 * 2**attempt, 5.0)
                self.assertTrue(expected <= delay <= expected + 0.1, delays)

            os.remove(filler)
            clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
            yield eventually(lambda: first.called and second.called, "written")
            self.assertEqual(
                Path(path).read_bytes(), b"".join(line + b"\n" for line in lines)
            )
            recovered = [m for m in messages if "writing again" in m]
            self.assertEqual(len(recovered), 1, messages)
            self.assertIn("of ENOSPC", recovered[0])
        finally:
            yield sink.close()

    @inlineCallbacks
    def test_copytruncate_window(self) -> Generator[Deferred[Any], Any, None]:
        """
        What C{copytruncate} cuts off after its copy is written again: the
        copy's torn last line is finished in the copy, the whole lines
        after it go to the start of the emptied file, before the next
        batch; each line ends up in exactly one file, whole.
        """
        messages = capture_log(self)
        path = self.path()
        sink = FileSink(path, reactor)
        yield sink.open()
        yield sink.write([b"one", b"two"])
        yield sink.write([b"three", b"four"])
        # logrotate read the file while "three" was half written, then
        # truncated it after "four" was written.
        Path(path + ".1").write_bytes(Path(path).read_bytes()[:10])
        Path(path + ".2").write_bytes(b"an older copy, not ours\n")
        os.truncate(path, 0)
        yield sink.write([b"five"])
        yield sink.close()
        self.assertEqual(Path(path + ".1").read_bytes(), b"one\ntwo\nthree\n")
        self.assertEqual(Path(path).read_bytes(), b"four\nfive\n")
        again = [m for m in messages if "written again" in m]
        self.assertEqual(len(again), 1, messages)
        self.assertIn(f"9 byte(s) written after its copy {path}.1", again[0])
        self.assertIn("(4 to end the copy's last line)", again[0])

    @inlineCallbacks
    def test_open_fails_for_unwritable_path(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        A path that cannot be opened makes C{open}'s Deferred fail (so the
        supervisor can retry) rather than raising in the reactor.
        """
        sink = FileSink(temp_dir(self), reactor)  # a directory: not openable
        try:
            with self.assertRaises(IsADirectoryError):
                yield sink.open()
        finally:
            yield sink.close()


class SinkURLTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        C{scheme:target?k=v} parses into a lower-case scheme, the target and
        the options; a URL without query has no options.
        """
        url = SinkURL.parse("FILE:logs/a.log?fsync=1&mode=x")
        self.assertEqual(url.scheme, "file")
        self.assertEqual(url.target, "logs/a.log")
        self.assertEqual(url.options, {"fsync": "1", "mode": "x"})
        self.assertEqual(SinkURL.parse("null:"), SinkURL("null", "", {}))

    def test_str_round_trip(self) -> None:
        """
        C{str} gives back a URL that parses to the same value.
        """
        for text in ["file:a.log", "file:a.log?fsync=1", "stdout:", "x:y?a=1&b=2"]:
            url = SinkURL.parse(text)
            self.assertEqual(str(url), text)
            self.assertEqual(SinkURL.parse(str(url)), url)

    def test_not_a_url(self) -> None:
        """
        Text without a scheme is refused with a message saying what is wanted.
        """
        for text in ["lines.log", ":x", ""]:
            with self.assertRaises(SinkURLError) as caught:
                SinkURL.parse(text)
            self.assertIn("scheme:target", str(caught.exception))


class SinkFactoryFromURLTests(SynchronousTestCase):
    def test_file(self) -> None:
        """
        C{file:PATH} gives a FileSinkFactory for that path, whose sinks
        write there.
        """
        path = os.path.join(temp_dir(self), "x.log")
        factory = sink_factory_from_url(f"file:{path}", reactor)
        assert isinstance(factory, FileSinkFactory)
        self.assertEqual(factory.path, path)
        self.assertEqual(factory.description, f"file:{path}")
        self.assertIs(factory.fsync, Fsync.NEVER)
        self.assertEqual(factory.fsync_interval, 1.0)
        sink = factory()
        self.assertIsInstance(sink, FileSink)
        self.assertEqual(sink.path, path)

    def test_null_and_stdout(self) -> None:
        """
        C{null:} and C{stdout:} give their factories, and each call makes a
        fresh sink.
        """
        null = sink_factory_from_url("null:", reactor)
        self.assertIsInstance(null, NullSinkFactory)
        self.assertIsInstance(null(), NullSink)
        self.assertIsNot(null(), null())
        stdout = sink_factory_from_url("stdout:", reactor)
        self.assertIsInstance(stdout, StdoutSinkFactory)
        self.assertIsInstance(stdout(), StdoutSink)
        self.assertEqual(stdout.description, "stdout:")

    def test_unknown_scheme(self) -> None:
        """
        An unknown scheme is refused with a message naming it and the known
        schemes.
        """
        with self.assertRaises(SinkURLError) as caught:
            sink_factory_from_url("ftp://example/x", reactor)
        message = str(caught.exception)
        self.assertIn("unknown sink scheme 'ftp'", message)
        for known in ("file:", "null:", "stdout:"):
            self.assertIn(known, message)

    def test_fsync_values(self) -> None:
        """
        C{fsync} takes never, batch or interval (any case), and the old
        boolean words; C{fsync_interval} takes seconds, with interval.
        """
        cases = {
            "fsync=never": (Fsync.NEVER, 1.0),
            "fsync=BATCH": (Fsync.BATCH, 1.0),
            "fsync=interval": (Fsync.INTERVAL, 1.0),
            "fsync=interval&fsync_interval=0.25": (Fsync.INTERVAL, 0.25),
            "fsync=interval&fsync_interval=30": (Fsync.INTERVAL, 30.0),
            "fsync=0": (Fsync.NEVER, 1.0),
            "fsync=off": (Fsync.NEVER, 1.0),
            "fsync=1": (Fsync.BATCH, 1.0),
            "fsync=yes": (Fsync.BATCH, 1.0),
        }
        for query, (fsync, interval) in cases.items():
            factory = sink_factory_from_url(f"file:x.log?{query}", reactor)
            assert isinstance(factory, FileSinkFactory)
            self.assertEqual((factory.fsync, factory.fsync_interval), (fsync, interval))
            sink = factory()
            self.assertEqual((sink.fsync, sink.fsync_interval), (fsync, interval))

    def test_bad_fsync(self) -> None:
        """
        An unknown C{fsync} value, or an C{fsync_interval} that is not a
        positive number of seconds or comes without C{fsync=interval}, is
        refused, naming the option and the value.
        """
        cases = {
            "fsync=sometimes": (
                "file: fsync must be never, batch or interval (or the old 0 or 1), "
                "not 'sometimes'"
            ),
            "fsync=": "fsync must be never, batch or interval",
            "fsync=interval&fsync_interval=0": (
                "file: fsync_interval must be a number of seconds above 0, not '0'"
            ),
            "fsync=interval&fsync_interval=-1": "fsync_interval must be",
            "fsync=interval&fsync_interval=soon": "not 'soon'",
            "fsync=interval&fsync_interval=inf": "not 'inf'",
            "fsync=interval&fsync_interval=nan": "not 'nan'",
            "fsync_interval=2": (
                "file: fsync_interval is only used with fsync=interval (fsync is never)"
            ),
            "fsync=batch&fsync_interval=2": "(fsync is batch)",
        }
        for query, expected in cases.items():
            with self.assertRaises(SinkURLError, msg=query) as caught:
                sink_factory_from_url(f"file:x.log?{query}", reactor)
            self.assertIn(expected, str(caught.exception), query)

    def test_missing_directory(self) -> None:
        """
        A file in a directory that does not exist is refused at once, naming
        the directory, instead of failing later at open.
        """
        missing = os.path.join(temp_dir(self), "missing")
        with self.assertRaises(SinkURLError) as caught:
            sink_factory_from_url(f"file:{missing}/lines.log", reactor)
        self.assertIn("does not exist", str(caught.exception))
        self.assertIn(missing, str(caught.exception))

    def test_file_needs_path(self) -> None:
        """
        C{file:} alone is refused with an example of what is wanted.
        """
        with self.assertRaises(SinkURLError) as caught:
            sink_factory_from_url("file:", reactor)
        self.assertIn("needs a path", str(caught.exception))

    def test_directory(self) -> None:
        """
        A path that is a directory is refused at once (it could never be
        opened for appending), suggesting a file in it.
        """
        directory = temp_dir(self)
        with self.assertRaises(SinkURLError) as caught:
            sink_factory_from_url(f"file:{directory}", reactor)
        message = str(caught.exception)
        self.assertIn("is a directory", message)
        self.assertIn(os.path.join(directory, "lines.log"), message)

    def test_checking_creates_nothing(self) -> None:
        """
        Making the factory (which runs while options are parsed) neither
        creates the file nor opens it; the sink's open does.
        """
        directory = temp_dir(self)
        path = os.path.join(directory, "lines.log")
        factory = sink_factory_from_url(f"file:{path}?fsync=1", reactor)
        self.assertEqual(os.listdir(directory), [])
        sink = factory()
        assert isinstance(sink, FileSink)
        self.assertIs(sink.fsync, Fsync.BATCH)
        self.assertEqual(os.listdir(directory), [])

    def test_unknown_options(self) -> None:
        """
        Each built-in scheme refuses an option it does not declare, naming
        it and the ones it knows.
        """
        cases = [
            (
                "file:x.log?fsycn=1",
                "file: unknown option 'fsycn' (known: fsync, fsync_interval)",
            ),
            (
                "file:x.log?fsync=1&mode=600",
                "file: unknown option 'mode' (known: fsync, fsync_interval)",
            ),
            ("null:?fsync=1", "null: unknown option 'fsync' (null: takes no options)"),
            ("stdout:?x=", "stdout: unknown option 'x' (stdout: takes no options)"),
            ("stdout:?x", "stdout: unknown option 'x' (stdout: takes no options)"),
        ]
        for url, expected in cases:
            with self.assertRaises(SinkURLError, msg=url) as caught:
                sink_factory_from_url(url, reactor)
            self.assertEqual(str(caught.exception), expected)


class SchemeOptionsTests(SynchronousTestCase):
    """
    How a scheme (built in, or from another package's entry point) declares
    its options.
    """

    def test_declared(self) -> None:
        """
        A L{Scheme} takes its declared options and refuses any other.
        """
        scheme = Scheme(lambda url, reactor: NullSinkFactory(), frozenset({"a", "b"}))
        check_options(SinkURL.parse("x:?a=1&b=2"), scheme)
        with self.assertRaises(SinkURLError) as caught:
            check_options(SinkURL.parse("x:?a=1&c=3"), scheme)
        self.assertEqual(str(caught.exception), "x: unknown option 'c' (known: a, b)")
        self.assertIsInstance(scheme(SinkURL.parse("x:?a=1"), reactor), NullSinkFactory)

    def test_undeclared(self) -> None:
        """
        A plain function declares nothing: its options are its own to check.
        """

        def plugin(url: SinkURL, reactor: Any) -> ISinkFactory:
            return NullSinkFactory()

        check_options(SinkURL.parse("kafka:topic?acks=all&linger=5"), plugin)

    def test_builtin_declarations(self) -> None:
        """
        The built-in schemes declare what their code reads.
        """
        schemes = available_schemes()
        self.assertEqual(
            getattr(schemes["file"], "options", None), {"fsync", "fsync_interval"}
        )
        self.assertEqual(getattr(schemes["null"], "options", None), frozenset())
        self.assertEqual(getattr(schemes["stdout"], "options", None), frozenset())


class InterfaceTests(SynchronousTestCase):
    def test_sinks_provide_isink(self) -> None:
        """
        Every built-in sink provides L{ISink}.
        """
        verifyObject(ISink, FileSink("x.log", reactor))
        verifyObject(IReopenable, FileSink("x.log", reactor))
        verifyObject(IPipelinedSink, FileSink("x.log", reactor))
        verifyObject(ISink, NullSink())
        verifyObject(ISink, StdoutSink(reactor, fd=1))

    def test_factories_provide_isinkfactory(self) -> None:
        """
        Every built-in sink factory provides L{ISinkFactory}.
        """
        verifyObject(ISinkFactory, FileSinkFactory("x.log", reactor))
        verifyObject(ISinkFactory, NullSinkFactory())
        verifyObject(ISinkFactory, StdoutSinkFactory(reactor))


class NullSinkTests(SynchronousTestCase):
    def test_counts(self) -> None:
        """
        The null sink takes every batch at once and counts lines and batches.
        """
        sink = NullSink()
        self.successResultOf(sink.open())
        self.successResultOf(sink.write([b"a", b"b"]))
        self.successResultOf(sink.write([b"c"]))
        self.successResultOf(sink.close())
        self.assertEqual((sink.lines, sink.batches), (3, 2))


def pipe_full(fd: int) -> bool:
    """
    @return: whether a write to C{fd} would block right now.
    """
    _, writable, _ = select.select([], [fd], [], 0)
    return not writable


class StdoutSinkTests(TestCase):
    """
    StdoutSink on the write end of a real pipe, read (or not) by the test.
    """

    def make_pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        os.set_blocking(r, False)
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        return r, w

    def poll(self, check: Callable[[], bool], timeout: float = 10.0) -> Deferred[None]:
        """
        @return: a Deferred that fires once C{check()} is true, checked
            every 10 ms of reactor time, failing after C{timeout} seconds.
        """
        done: Deferred[None] = Deferred()
        deadline = reactor.seconds() + timeout

        def step() -> None:
            if check():
                done.callback(None)
            elif reactor.seconds() > deadline:
                done.errback(AssertionError(f"{check} still false after {timeout}s"))
            else:
                reactor.callLater(0.01, step)

        step()
        return done

    @inlineCallbacks
    def test_writes_lines(self) -> Generator[Deferred[Any], Any, None]:
        """
        Lines reach the descriptor byte for byte, LF-terminated, and close
        fires once they are all out.
        """
        r, w = self.make_pipe()
        sink = StdoutSink(reactor, fd=w)
        yield sink.open()
        yield sink.write(ODD_LINES)
        yield sink.close()
        self.assertEqual(os.read(r, 65536), b"".join(x + b"\n" for x in ODD_LINES))

    @inlineCallbacks
    def test_backpressure(self) -> Generator[Deferred[Any], Any, None]:
        """
        With nobody reading, write() Deferreds stop firing once the pipe and
        the descriptor's buffer are full; reading the pipe makes the pending
        one fire, and everything written arrives in order.
        """
        r, w = self.make_pipe()
        sink = StdoutSink(reactor, fd=w)
        yield sink.open()
        line = b"x" * 1023
        pending: Deferred[None] | None = None
        sent = 0
        for number in range(1000):  # 1 MiB: far beyond pipe + buffer
            written = sink.write([b"%05d" % number + line])
            sent += 1
            if not written.called:
                pending = written
                break
        self.assertIsNotNone(pending)
        assert pending is not None
        self.assertLess(sent, 1000)
        # Let the reactor push what it can into the pipe until it is full.
        yield self.poll(lambda: pipe_full(w))
        self.assertNoResult(pending)

        received = bytearray()

        def drain() -> bool:
            try:
                while chunk := os.read(r, 65536):
                    received.extend(chunk)
            except BlockingIOError:
                pass
            return pending.called

        yield self.poll(drain)
        self.assertIsNone(self.successResultOf(pending))
        closed = sink.close()
        yield self.poll(lambda: drain() and closed.called)
        drain()
        expected = b"".join(b"%05d" % n + line + b"\n" for n in range(sent))
        self.assertEqual(len(received), len(expected))
        self.assertEqual(bytes(received), expected)


class SinkError(Exception):
    """
    What the sink double fails with.
    """


@implementer(ISink)
class ControlledSink:
    """
    A sink whose open, write and close return Deferreds the test fires.
    """

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.opened: Deferred[None] = Deferred()
        self.writes: list[tuple[list[bytes], Deferred[None]]] = []
        self.closed: Deferred[None] = Deferred()

    def open(self) -> Deferred[None]:
        self.events.append("open")
        return self.opened

    def write(self, lines: list[bytes]) -> Deferred[None]:
        self.events.append("write " + b",".join(lines).decode())
        done: Deferred[None] = Deferred()
        self.writes.append((list(lines), done))
        return done

    def close(self) -> Deferred[None]:
        self.events.append("close")
        return self.closed


@implementer(IPipelinedSink, IReopenable)
class PipelinedSink(ControlledSink):
    """
    A sink double that takes three batches at a time and can reopen.
    """

    max_in_flight = 3

    def __init__(self, events: list[str]) -> None:
        super().__init__(events)
        self.reopened: list[Deferred[None]] = []

    def reopen(self) -> Deferred[None]:
        self.events.append("reopen")
        done: Deferred[None] = Deferred()
        self.reopened.append(done)
        return done


@implementer(ISinkFactory)
class ControlledSinkFactory:
    description = "controlled:"

    def __init__(self, kind: type[ControlledSink] = ControlledSink) -> None:
        self.events: list[str] = []
        self.sinks: list[ControlledSink] = []
        self.kind = kind

    def __call__(self) -> ControlledSink:
        sink = self.kind(self.events)
        self.sinks.append(sink)
        return sink


@implementer(ISupervisor)
class FakeSupervisor(MultiService):
    """
    A parent that records what its children report.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[tuple[object, Failure]] = []

    def child_failed(self, child: object, reason: object) -> None:
        assert isinstance(reason, Failure)
        self.failures.append((child, reason))


class SinkServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.queue = SinkQueue(high_watermark=1000, low_watermark=100)
        self.factory = ControlledSinkFactory()
        self.stats = Stats()
        self.parent = FakeSupervisor()

    def service(self, max_batch_bytes: int = 1 << 20) -> SinkService:
        service = SinkService(self.factory, self.queue, self.stats, max_batch_bytes)
        service.setServiceParent(self.parent)
        service.startService()
        return service

    def sink(self) -> ControlledSink:
        return self.factory.sinks[-1]

    def test_verify(self) -> None:
        """
        The sink double keeps the contract it stands in for.
        """
        verifyObject(ISinkFactory, self.factory)
        verifyObject(ISink, ControlledSink([]))
        verifyObject(ISupervisor, self.parent)

    def test_one_batch_in_flight(self) -> None:
        """
        Nothing is written before the sink is open; then one batch at a
        time: what is queued while a write is in flight waits, and goes
        out merged once that write fires.
        """
        self.service()
        self.queue.put([b"a"], 1)
        self.assertEqual(self.factory.events, ["open"])
        self.sink().opened.callback(None)
        self.assertEqual(self.factory.events, ["open", "write a"])
        self.queue.put([b"b"], 1)
        self.queue.put([b"c"], 1)
        self.assertEqual(len(self.sink().writes), 1)
        self.sink().writes[0][1].callback(None)
        self.assertEqual(self.factory.events, ["open", "write a", "write b,c"])
        self.assertEqual(self.queue.buffered, 2)
        self.sink().writes[1][1].callback(None)
        self.assertEqual(self.queue.buffered, 0)
        self.assertEqual(self.stats.get("lines.delivered"), 3)
        self.queue.put([b"d"], 1)
        self.assertEqual(self.factory.events[-1], "write d")

    def test_pipelined_window(self) -> None:
        """
        A sink that provides L{IPipelinedSink} gets up to C{max_in_flight}
        batches before the first one's Deferred fires; each confirmed batch
        frees its bytes and makes room for the next.
        """
        self.factory.kind = PipelinedSink
        self.service()
        self.sink().opened.callback(None)
        for line in (b"a", b"b", b"c", b"d"):
            self.queue.put([line], 1)
        self.assertEqual(self.factory.events, ["open", "write a", "write b", "write c"])
        self.sink().writes[1][1].callback(None)
        self.assertEqual(self.factory.events[-1], "write d")
        self.assertEqual(self.queue.buffered, 3)
        for _, done in self.sink().writes:
            if not done.called:
                done.callback(None)
        self.assertEqual(self.queue.buffered, 0)
        self.assertEqual(self.stats.get("lines.delivered"), 4)

    def test_pipelined_failure_gives_back_in_order(self) -> None:
        """
        When one of several batches in flight fails, it and the batches
        sent after it go back to the queue in their order (what succeeds
        of them afterwards no longer counts); one sent before it still
        counts when it succeeds, and one that fails goes back in front.
        The next sink gets them first, merged, in order.
        """
        self.factory.kind = PipelinedSink
        service = self.service()
        self.sink().opened.callback(None)
        for line in (b"a", b"b", b"c", b"d"):
            self.queue.put([line], 1)  # d waits: three in flight at most
        first = self.sink()
        first.writes[2][1].errback(SinkError("disk gone"))
        self.assertEqual(len(self.parent.failures), 1)
        self.assertEqual(service.unwritten(), (4, 4))
        first.writes[0][1].callback(None)
        first.writes[1][1].errback(SinkError("disk gone"))
        self.assertEqual(len(self.parent.failures), 1)
        self.assertEqual(self.queue.buffered, 3)
        self.assertEqual(service.unwritten(), (3, 3))
        self.assertEqual(self.stats.get("lines.delivered"), 1)

        self.service()
        self.sink().opened.callback(None)
        self.assertEqual(self.factory.events[-1], "write b,c,d")
        self.assertEqual(len(self.flushLoggedErrors(SinkError)), 1)

    def test_reopen(self) -> None:
        """
        C{reopen} asks an open sink that provides L{IReopenable}; a sink
        not yet open, or one without it, is left alone; a failure to
        reopen is logged, and the Deferred still fires.
        """
        self.factory.kind = PipelinedSink
        service = self.service()
        self.assertIsNone(self.successResultOf(service.reopen()))
        self.assertNotIn("reopen", self.factory.events)
        self.sink().opened.callback(None)
        reopened = service.reopen()
        self.assertEqual(self.factory.events[-1], "reopen")
        self.assertNoResult(reopened)
        sink = self.sink()
        assert isinstance(sink, PipelinedSink)
        sink.reopened[0].callback(None)
        self.assertIsNone(self.successResultOf(reopened))
        failing = service.reopen()
        sink.reopened[1].errback(SinkError("no such directory"))
        self.assertIsNone(self.successResultOf(failing))
        self.assertEqual(len(self.flushLoggedErrors(SinkError)), 1)

        plain = SinkService(ControlledSinkFactory(), SinkQueue(10, 1))
        plain.startService()
        plain.sink_factory.sinks[-1].opened.callback(None)  # type: ignore[attr-defined]
        self.assertIsNone(self.successResultOf(plain.reopen()))

    def test_batches_merged_up_to_max(self) -> None:
        """
        Queued batches are merged into one write until about
        C{max_batch_bytes}; the rest goes in the next write, in order.
        """
        self.service(max_batch_bytes=10)
        for name in (b"a", b"b", b"c", b"d"):
            self.queue.put([name], 6)
        self.sink().opened.callback(None)
        self.assertEqual([lines for lines, _ in self.sink().writes], [[b"a", b"b"]])
        self.sink().writes[0][1].callback(None)
        self.assertEqual(
            [lines for lines, _ in self.sink().writes], [[b"a", b"b"], [b"c", b"d"]]
        )

    def test_failed_write_gives_batch_back(self) -> None:
        """
        A failed write puts its batch back at the front of the queue (still
        counted), reports the failure to the ISupervisor parent, counts it,
        and writes nothing more.
        """
        service = self.service()
        self.queue.put([b"a", b"b"], 2)
        self.sink().opened.callback(None)
        self.queue.put([b"c"], 1)
        self.sink().writes[0][1].errback(SinkError("disk full"))
        self.assertEqual(len(self.flushLoggedErrors(SinkError)), 1)
        self.assertEqual(len(self.parent.failures), 1)
        child, reason = self.parent.failures[0]
        self.assertIs(child, service)
        self.assertIsInstance(reason.value, SinkError)
        self.assertEqual(self.stats.get("sink.failures"), 1)
        self.assertEqual(len(self.sink().writes), 1)
        self.assertEqual(self.queue.buffered, 3)
        self.assertEqual(self.queue.take(100), ([b"a", b"b", b"c"], 3))
        self.assertEqual(self.stats.get("lines.delivered"), 0)

    def test_next_incarnation_writes_given_back_batch(self) -> None:
        """
        A fresh SinkService around the same queue (what the supervisor does
        after a crash) writes the failed batch first.
        """
        first = self.service()
        self.queue.put([b"a"], 1)
        self.sink().opened.callback(None)
        self.queue.put([b"b"], 1)
        self.sink().writes[0][1].errback(SinkError("gone"))
        self.flushLoggedErrors(SinkError)
        first.disownServiceParent()
        self.service()
        self.sink().opened.callback(None)
        self.assertEqual([lines for lines, _ in self.sink().writes], [[b"a", b"b"]])

    def test_stop_flushes_before_close(self) -> None:
        """
        stopService writes out everything queued, and only then closes the
        sink; its Deferred fires when the close does.
        """
        service = self.service()
        self.queue.put([b"a"], 1)
        self.sink().opened.callback(None)
        self.queue.put([b"b"], 1)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.sink().writes[0][1].callback(None)
        self.assertEqual(self.factory.events, ["open", "write a", "write b"])
        self.assertNoResult(stopped)
        self.sink().writes[1][1].callback(None)
        self.assertEqual(self.factory.events[-1], "close")
        self.assertNoResult(stopped)
        self.sink().closed.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.queue.buffered, 0)
        self.assertIsNone(service.sink)

    def test_open_failure_reported(self) -> None:
        """
        A sink that fails to open is reported to the parent and counted; the
        queue keeps its lines and C{flushed} does not wait for them.
        """
        service = self.service()
        self.queue.put([b"a"], 1)
        self.sink().opened.errback(SinkError("no such device"))
        self.assertEqual(len(self.flushLoggedErrors(SinkError)), 1)
        self.assertEqual(len(self.parent.failures), 1)
        self.assertIs(self.parent.failures[0][0], service)
        self.assertEqual(self.stats.get("sink.failures"), 1)
        self.assertEqual(self.sink().writes, [])
        self.assertEqual(len(self.queue), 1)
        self.successResultOf(service.flushed())
