"""Tests for L{lineserver.sinks.spooling}: the spool around a sink.

The wrapped sink is one the test answers for (each write waits for the
test to fire it); the spool's files are real, on a temporary directory,
and its blocking calls run at once instead of in a thread, so that a
L{Clock} drives every retry and timeout.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lineserver.interfaces import ISink, ISinkFactory
from lineserver.sinks import ISpooled, SinkUnavailable
from lineserver.sinks.spooling import SpoolingSink, SpoolingSinkFactory
from lineserver.spool import SegmentStore, segment_name
from lineserver.tap import Options, sink_from_options
from tests.support import temp_dir


class SinkBug(Exception):
    """
    A bug in the wrapped sink.
    """


@implementer(ISink)
class HeldSink:
    """
    A sink whose writes wait for the test.
    """

    def __init__(self, open_error: Exception | None) -> None:
        self.open_error = open_error
        self.writes: list[tuple[list[bytes], Deferred[None]]] = []
        self.closed = False

    def open(self) -> Deferred[None]:
        if self.open_error is not None:
            return fail(self.open_error)
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.writes.append((list(lines), done))
        return done

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(ISinkFactory)
class HeldSinkFactory:
    description = "held:"

    def __init__(self) -> None:
        self.sinks: list[HeldSink] = []
        self.open_error: Exception | None = None

    def __call__(self) -> HeldSink:
        sink = HeldSink(self.open_error)
        self.sinks.append(sink)
        return sink

    @property
    def last(self) -> HeldSink:
        return self.sinks[-1]

    def confirm_all(self) -> list[bytes]:
        """
        Fire every pending write of every sink, in order, until none is
        left; @return: the lines confirmed.
        """
        confirmed: list[bytes] = []
        for _ in range(1000):
            pending = [
                (lines, done)
                for sink in self.sinks
                for lines, done in sink.writes
                if not done.called
            ]
            if not pending:
                return confirmed
            lines, done = pending[0]
            confirmed.extend(lines)
            done.callback(None)
        raise AssertionError("writes never stop")


def run_now(function: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(function, *args)


class SpoolingSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = os.path.join(temp_dir(self), "spool")
        self.inner = HeldSinkFactory()

    def spooling(self, **kwargs: Any) -> SpoolingSink:
        kwargs.setdefault("backoff", lambda attempt: 1.0)
        sink = SpoolingSink(
            self.inner, self.directory, self.clock, in_thread=run_now, **kwargs
        )
        self.addCleanup(sink.close)
        return sink

    def opened(self, **kwargs: Any) -> SpoolingSink:
        sink = self.spooling(**kwargs)
        self.successResultOf(sink.open())
        return sink

    def segments(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def test_interfaces(self) -> None:
        """
        The wrapper is an ISink and an ISpooled, and its factory an
        ISinkFactory named after the wrapped sink.
        """
        sink = self.opened()
        self.assertTrue(verifyObject(ISink, sink))
        self.assertTrue(verifyObject(ISpooled, sink))
        factory = SpoolingSinkFactory(self.inner, self.directory, self.clock)
        self.assertTrue(verifyObject(ISinkFactory, factory))
        self.assertEqual(factory.description, "held:")

    def test_direct_while_the_sink_keeps_up(self) -> None:
        """
        With an empty spool and a sink that keeps up, a batch goes straight
        to the sink and is confirmed when the sink confirms it; nothing is
        spooled.
        """
        sink = self.opened()
        written = sink.write([b"a", b"b"])
        self.assertNoResult(written)
        self.assertEqual(self.inner.last.writes[0][0], [b"a", b"b"])
        self.inner.last.writes[0][1].callback(None)
        self.successResultOf(written)
        self.assertEqual(sink.spooled_lines, 0)
        self.assertEqual(self.segments(), [])

    def test_outage_spools_then_replays_in_order(self) -> None:
        """
        When the sink fails with an outage, the failed batch and every
        later one are spooled and confirmed at once (spooled_lines counts
        them); the sink is built again after the backoff, gets every
        spooled line once, in order; then the spool is empty, its files
        gone, and batches go straight to the sink again.
        """
        sink = self.opened()
        first = sink.write([b"1", b"2"])
        self.inner.last.writes[0][1].errback(ConnectionRefusedError())
        self.successResultOf(first)
        self.assertEqual(sink.spooled_lines, 2)
        self.assertTrue(self.inner.sinks[0].closed)
        for n in range(3, 6):
            self.successResultOf(sink.write([b"%d" % n]))
        self.assertEqual(sink.spooled_lines, 5)
        self.assertNotEqual(self.segments(), [])
        self.assertEqual(len(self.inner.sinks), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.inner.sinks), 2)
        # Even with the sink back, new batches queue behind the spool.
        self.successResultOf(sink.write([b"6"]))
        self.assertEqual(self.inner.confirm_all(), [b"%d" % n for n in range(1, 7)])
        self.assertEqual(sink.spooled_lines, 0)
        self.assertEqual(sink.replayed_lines, 6)
        self.assertEqual(self.segments(), [])
        direct = sink.write([b"7"])
        self.assertEqual(self.inner.last.writes[-1][0], [b"7"])
        self.assertNoResult(direct)

    def test_sink_down_at_open(self) -> None:
        """
        A wrapped sink that cannot open (an outage) does not fail the
        open: lines are spooled until it opens, retried with backoff.
        """
        self.inner.open_error = SinkUnavailable("nobody home")
        sink = self.opened()
        self.successResultOf(sink.write([b"x"]))
        self.clock.advance(1.0)
        self.assertEqual(len(self.inner.sinks), 2)
        self.inner.open_error = None
        self.clock.advance(1.0)
        self.assertEqual(self.inner.confirm_all(), [b"x"])
        self.assertEqual(sink.spooled_lines, 0)

    def test_bug_at_open_fails_the_open(self) -> None:
        """
        A wrapped sink that fails to open with a bug fails the open.
        """
        self.inner.open_error = SinkBug("typo")
        sink = self.spooling()
        self.failureResultOf(sink.open(), SinkBug)

    def test_slow_sink_spools_without_duplicates(self) -> None:
        """
        A batch the sink has not confirmed within spool_after seconds is
        spooled and confirmed from there; when the sink then confirms it,
        it is not sent again, and only later batches are replayed.
        """
        sink = self.opened(spool_after=2.0)
        slow = sink.write([b"slow"])
        self.clock.advance(1.9)
        self.assertNoResult(slow)
        self.clock.advance(0.1)
        self.successResultOf(slow)
        self.assertEqual(sink.spooled_lines, 1)
        self.successResultOf(sink.write([b"next"]))
        self.assertEqual(sink.spooled_lines, 2)
        self.assertEqual(len(self.inner.last.writes), 1)
        self.assertEqual(self.inner.confirm_all(), [b"slow", b"next"])
        self.assertEqual(sink.spooled_lines, 0)
        self.assertEqual(self.segments(), [])

    def test_slow_then_failed_batch_is_replayed(self) -> None:
        """
        A slow batch that the sink finally fails (an outage) is replayed
        from the spool, once, before the batches after it.
        """
        sink = self.opened(spool_after=1.0)
        slow = sink.write([b"slow"])
        self.clock.advance(1.0)
        self.successResultOf(slow)
        self.successResultOf(sink.write([b"after"]))
        self.inner.last.writes[0][1].errback(TimeoutError())
        self.clock.advance(1.0)
        self.assertEqual(self.inner.confirm_all(), [b"slow", b"after"])
        self.assertEqual(sink.spooled_lines, 0)

    def test_replays_what_the_spool_held_first(self) -> None:
        """
        Opened on a spool with records (left by a killed process) and a
        torn tail, the wrapper cuts the torn record (logged, counted),
        counts the rest as spooled, and replays them before any new batch.
        """
        store = SegmentStore(self.directory)
        store.open()
        for n in range(3):
            store.append([b"old %d" % n, b"more %d" % n])
        torn = store.append([b"torn"])
        store.close()
        os.truncate(
            os.path.join(self.directory, segment_name(torn.segment)), torn.end - 1
        )
        with capturedLogs() as events:
            sink = self.opened()
        text = [formatEvent(e) for e in events]
        self.assertTrue(any("torn record" in t and "dropped" in t for t in text), text)
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in events))
        self.assertEqual(sink.recovered_lines, 6)
        self.assertEqual(sink.damaged_segments, 1)
        self.assertEqual(sink.dropped_bytes, torn.size - 1)
        self.successResultOf(sink.write([b"new"]))
        # Only "new" is this process's: the six from before are not in its
        # ledger, but they are in the spool, and they go first.
        self.assertEqual(sink.spooled_lines, 1)
        self.assertEqual(sink.recovered_waiting, 6)
        self.assertEqual(sink.lines_in_spool, 7)
        self.assertEqual(
            self.inner.confirm_all(),
            [b"old 0", b"more 0", b"old 1", b"more 1", b"old 2", b"more 2", b"new"],
        )
        self.assertEqual(self.segments(), [])
        self.assertEqual((sink.spooled_lines, sink.recovered_waiting), (0, 0))

    def test_full_spool_makes_writes_wait(self) -> None:
        """
        At max_bytes, a write waits (unconfirmed) until the replay has
        freed a segment; then it is spooled and confirmed.
        """
        self.inner.open_error = ConnectionRefusedError()
        sink = self.opened(max_bytes=4096, segment_bytes=512)
        line = b"x" * 200
        confirmed = 0
        waiting = None
        for _ in range(100):
            written = sink.write([line])
            if not written.called:
                waiting = written
                break
            confirmed += 1
        self.assertIsNotNone(waiting)
        assert waiting is not None
        self.assertGreater(confirmed, 10)
        self.assertEqual(sink.spooled_lines, confirmed)
        self.clock.advance(5.0)
        self.assertNoResult(waiting)
        self.inner.open_error = None
        self.clock.advance(1.0)
        self.inner.last.writes[0][1].callback(None)
        self.successResultOf(waiting)
        self.inner.confirm_all()
        self.assertEqual(sink.spooled_lines, 0)
        self.assertEqual(self.segments(), [])

    def test_spill_at_stop_goes_past_the_cap(self) -> None:
        """
        When the process stops (spill(), run before the reactor shuts
        down), a write waiting for room is spooled past max_bytes, and so
        is every later one: what is queued is kept, not lost.
        """
        self.inner.open_error = ConnectionRefusedError()
        sink = self.opened(max_bytes=2048, segment_bytes=512)
        waiting = None
        for _ in range(100):
            written = sink.write([b"y" * 200])
            if not written.called:
                waiting = written
                break
        assert waiting is not None
        before = sink.spooled_lines
        sink.spill()
        self.successResultOf(waiting)
        self.successResultOf(sink.write([b"after"]))
        self.assertEqual(sink.spooled_lines, before + 2)
        size = sum(
            os.path.getsize(os.path.join(self.directory, name))
            for name in self.segments()
        )
        self.assertGreater(size, 2048)

    def test_bug_in_direct_write_fails_the_write(self) -> None:
        """
        A bug (not an outage) in the wrapped sink's write fails the
        wrapper's write: the sink service crashes, as without a spool.
        """
        sink = self.opened()
        written = sink.write([b"a"])
        self.inner.last.writes[0][1].errback(SinkBug("oops"))
        self.failureResultOf(written, SinkBug)
        self.assertEqual(self.segments(), [])

    def test_bug_during_replay_fails_the_next_write(self) -> None:
        """
        A bug while replaying keeps the lines spooled and fails the next
        write, so that the supervisor restarts the sink (and counts it).
        """
        sink = self.opened()
        first = sink.write([b"a"])
        self.inner.last.writes[0][1].errback(ConnectionRefusedError())
        self.successResultOf(first)
        self.clock.advance(1.0)
        self.inner.last.writes[0][1].errback(SinkBug("replay bug"))
        self.failureResultOf(sink.write([b"b"]), SinkBug)
        self.assertEqual(sink.spooled_lines, 1)
        self.flushLoggedErrors(SinkBug)

    def test_restart_in_process_keeps_its_lines_spooled(self) -> None:
        """
        A sink restarted in the same process (given the one it replaces)
        counts what that one spooled as spooled, not as recovered: those
        lines are in this process's ledger.  Only what was recovered from
        a previous process, and not replayed, stays recovered.
        """
        self.inner.open_error = ConnectionRefusedError()
        before = self.opened()
        self.successResultOf(before.write([b"from before"]))
        self.successResultOf(before.close())
        # A new process: the line is recovered; it spools two of its own.
        first = self.opened()
        self.assertEqual((first.recovered_lines, first.spooled_lines), (1, 0))
        self.successResultOf(first.write([b"mine 1", b"mine 2"]))
        self.successResultOf(first.close())
        # The supervisor restarts the sink in that process.
        again = self.opened(previous=first)
        self.assertEqual(
            (again.recovered_lines, again.recovered_waiting, again.spooled_lines),
            (1, 1, 2),
        )
        self.assertEqual(again.lines_in_spool, 3)
        self.inner.open_error = None
        self.clock.advance(1.0)
        self.assertEqual(
            self.inner.confirm_all(), [b"from before", b"mine 1", b"mine 2"]
        )
        self.assertEqual((again.recovered_waiting, again.spooled_lines), (0, 0))

    def test_close_keeps_the_spool_for_the_next_start(self) -> None:
        """
        Closing with lines spooled leaves them on disk; the next wrapper on
        the directory replays them.
        """
        self.inner.open_error = ConnectionRefusedError()
        sink = self.opened()
        self.successResultOf(sink.write([b"kept"]))
        self.successResultOf(sink.close())
        self.assertNotEqual(self.segments(), [])
        self.inner.open_error = None
        again = self.opened()
        self.assertEqual((again.spooled_lines, again.recovered_waiting), (0, 1))
        self.assertEqual(self.inner.confirm_all(), [b"kept"])
        self.assertEqual(again.lines_in_spool, 0)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--sink", "null:", *args])
        return options

    def test_spool_options(self) -> None:
        """
        --spool DIR puts the sink behind a spool in DIR (made absolute),
        capped at --spool-max (with K, M, G suffixes; 4G by default);
        without --spool the sink is used as it is.
        """
        directory = temp_dir(self)
        options = self.parse("--spool", directory, "--spool-max", "64M")
        factory = sink_from_options(options, Clock())
        self.assertIsInstance(factory, SpoolingSinkFactory)
        assert isinstance(factory, SpoolingSinkFactory)
        self.assertEqual(factory.directory, os.path.abspath(directory))
        self.assertEqual(factory.max_bytes, 64 << 20)
        self.assertEqual(factory.description, "null:")
        self.assertEqual(self.parse("--spool", directory)["spool-max"], 4 << 30)
        self.assertNotIsInstance(
            sink_from_options(self.parse(), Clock()), SpoolingSinkFactory
        )

    def test_bad_spool_options(self) -> None:
        """
        A size that is not one, or zero, is a usage error naming the
        option; so is --spool outside sink mode.
        """
        for bad in ("lots", "0", "1T"):
            error = self.assertRaises(
                usage.UsageError, self.parse, "--spool", "x", "--spool-max", bad
            )
            self.assertIn("--spool-max", str(error))
        options = Options()
        error = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--mode", "echo", "--spool", "x"]
        )
        self.assertIn("--spool", str(error))


class SpoolingPropertyTests(SynchronousTestCase):
    """
    Random interleavings of writes, the wrapped sink confirming, failing
    (an outage) or going down, and time passing.
    """

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.sampled_from(["write", "confirm", "fail", "tick", "down", "up"]),
            max_size=60,
        )
    )
    def test_every_line_once_in_order_and_exact_count(self, events: list[str]) -> None:
        """
        Whatever happens, spooled_lines is at every moment the number of
        lines the wrapper confirmed and the wrapped sink has not; and once
        the sink stays up, it has received every written line exactly
        once, in order.
        """
        clock = Clock()
        directory = os.path.join(temp_dir(self), "spool")
        inner = HeldSinkFactory()
        sink = SpoolingSink(
            inner,
            directory,
            clock,
            in_thread=run_now,
            backoff=lambda attempt: 1.0,
            max_bytes=1 << 20,
        )
        self.successResultOf(sink.open())
        written: list[bytes] = []
        confirmed: set[bytes] = set()
        delivered: list[bytes] = []
        pending: Deferred[None] | None = None

        def fire(success: bool) -> None:
            for held in inner.sinks:
                for lines, done in held.writes:
                    if not done.called:
                        if success:
                            delivered.extend(lines)
                            done.callback(None)
                        else:
                            done.errback(ConnectionRefusedError())
                        return

        def check() -> None:
            waiting = [line for line in confirmed if line not in delivered]
            self.assertEqual(sink.spooled_lines, len(waiting))

        def write() -> None:
            nonlocal pending
            if pending is not None and not pending.called:
                return
            batch = [b"line %d" % (len(written) + k) for k in range(2)]
            written.extend(batch)
            pending = sink.write(batch)
            pending.addCallback(lambda _: confirmed.update(batch))

        for event in events:
            if event == "write":
                write()
            elif event in ("confirm", "fail"):
                fire(event == "confirm")
            elif event == "tick":
                clock.advance(1.0)
            else:
                inner.open_error = ConnectionRefusedError() if event == "down" else None
            check()
        inner.open_error = None
        for _ in range(200):
            clock.advance(1.0)
            fire(True)
            check()
        self.assertEqual(delivered, written)
        self.assertEqual(confirmed, set(written))
        self.assertEqual(sink.spooled_lines, 0)
        self.successResultOf(sink.close())
        self.assertEqual(os.listdir(directory), [])
