"""Descriptor watermarks: where to stop accepting, and the gate they hold."""

from __future__ import annotations

import errno
import resource
import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from lineserver.fdlimits import (
    WATERMARK_REASON,
    FdWatermark,
    current_soft_limit,
    fd_watermarks,
    open_fd_count,
)
from lineserver.stats import Stats
from tests.support import RecordingGate


class FakeCount:
    """
    A descriptor count that the test sets, and that counts its readings;
    with C{error} set, counting raises it (as listing /proc/self/fd does
    when no descriptor is left).
    """

    def __init__(self, value: int) -> None:
        self.value = value
        self.readings = 0
        self.error: OSError | None = None

    def __call__(self) -> int:
        self.readings += 1
        if self.error is not None:
            raise self.error
        return self.value


class WatermarksTests(SynchronousTestCase):
    @given(
        soft=st.integers(min_value=1, max_value=10**7),
        reserve=st.integers(min_value=0, max_value=10**4),
    )
    def test_ordered(self, soft: int, reserve: int) -> None:
        """
        For any limit of at least 1: 0 <= low < high <= limit.
        """
        high, low = fd_watermarks(soft, reserve)
        self.assertTrue(0 <= low < high <= soft, (soft, reserve, high, low))

    @given(
        soft=st.integers(min_value=1, max_value=10**7),
        reserve=st.integers(min_value=0, max_value=10**4),
    )
    def test_reserve_kept(self, soft: int, reserve: int) -> None:
        """
        When the limit is at least twice the reserve (and the reserve
        leaves at least one descriptor), the high mark is exactly the limit
        minus the reserve; the reserve never takes more than half.
        """
        high, _low = fd_watermarks(soft, reserve)
        if soft >= 2 * reserve and soft - reserve >= 1:
            self.assertEqual(high, soft - reserve)
        else:
            self.assertGreaterEqual(high, soft // 2)

    @given(
        soft=st.integers(min_value=16, max_value=10**7),
        wobble=st.lists(st.integers(min_value=0, max_value=7), max_size=20),
    )
    def test_hysteresis(self, soft: int, wobble: list[int]) -> None:
        """
        For any limit, the watermark does not flap: once accepting paused
        at the high mark, a count that wobbles anywhere within 7
        descriptors below it keeps accepting paused; freeing a tenth of
        the descriptors (at least 8) resumes it; reaching the high mark
        again pauses it again.  The gate moves once per crossing.
        """
        high, low = fd_watermarks(soft)
        count = FakeCount(high)
        gate = RecordingGate()
        mark = FdWatermark(gate.gate, high, low, count=count)
        self.assertTrue(mark.check(force=True))
        for below in wobble:
            count.value = high - below
            self.assertTrue(mark.check(force=True), f"resumed at {count.value}")
        count.value = high - max(8, high // 10)
        self.assertFalse(mark.check(force=True), f"still paused at {count.value}")
        count.value = high
        self.assertTrue(mark.check(force=True))
        self.assertEqual(gate.calls, ["pause", "resume", "pause"])

    def test_examples(self) -> None:
        """
        Typical limits: 1024 and 65536 keep 64 free; tiny limits keep half,
        and a limit of 1 still gives marks (1, 0).
        """
        self.assertEqual(fd_watermarks(1024), (960, 912))
        self.assertEqual(fd_watermarks(65536), (65472, 62199))
        self.assertEqual(fd_watermarks(64), (32, 24))
        self.assertEqual(fd_watermarks(10), (5, 0))
        self.assertEqual(fd_watermarks(1), (1, 0))
        self.assertEqual(fd_watermarks(100, reserve=0), (100, 92))

    def test_invalid(self) -> None:
        """
        A limit under 1 or a negative reserve is an error.
        """
        self.assertRaises(ValueError, fd_watermarks, 0)
        self.assertRaises(ValueError, fd_watermarks, 100, -1)


class ProcessTests(SynchronousTestCase):
    def test_soft_limit(self) -> None:
        """
        The soft limit is the process's RLIMIT_NOFILE (None if infinite).
        """
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        expected = None if soft == resource.RLIM_INFINITY else soft
        self.assertEqual(current_soft_limit(), expected)

    def test_open_fd_count(self) -> None:
        """
        Opening three sockets raises the count by three, closing them
        lowers it back.
        """
        before = open_fd_count()
        socks = [socket.socket() for _ in range(3)]
        try:
            self.assertEqual(open_fd_count(), before + 3)
        finally:
            for sock in socks:
                sock.close()
        self.assertEqual(open_fd_count(), before)


class FdWatermarkTests(SynchronousTestCase):
    def make(
        self, value: int, clock: Clock | None = None
    ) -> tuple[FdWatermark, FakeCount, RecordingGate, Stats]:
        count = FakeCount(value)
        gate = RecordingGate()
        stats = Stats()
        mark = FdWatermark(gate.gate, 100, 90, count=count, clock=clock, stats=stats)
        return mark, count, gate, stats

    def test_pause_and_resume(self) -> None:
        """
        At the high mark the gate's fd-watermark reason is held; it stays
        held until the count is at most the low mark, then is released.
        """
        mark, count, gate, stats = self.make(99)
        self.assertFalse(mark.check(force=True))
        count.value = 100
        with capturedLogs() as events:
            self.assertTrue(mark.check(force=True))
        self.assertEqual(gate.gate.reasons, {WATERMARK_REASON})
        self.assertEqual(stats.get("accept.fd_watermark.pauses"), 1)
        self.assertIn("at the watermark 100", formatEvent(events[0]))
        count.value = 91
        self.assertTrue(mark.check(force=True))
        count.value = 90
        self.assertFalse(mark.check(force=True))
        self.assertEqual(gate.calls, ["pause", "resume"])

    def test_counts_only_when_needed(self) -> None:
        """
        Each call moves the count by at most one, so far below the high
        mark (or far above the low one, when paused) calls do not count.
        """
        mark, count, gate, _stats = self.make(50)
        mark.check()
        self.assertEqual(count.readings, 1)
        for _ in range(49):
            self.assertFalse(mark.check())
        self.assertEqual(count.readings, 1)
        count.value = 100
        self.assertTrue(mark.check())
        self.assertEqual(count.readings, 2)
        for _ in range(9):
            self.assertTrue(mark.check())
        self.assertEqual(count.readings, 2)
        count.value = 90
        self.assertFalse(mark.check())
        self.assertEqual(count.readings, 3)
        self.assertEqual(gate.calls, ["pause", "resume"])

    def test_poll(self) -> None:
        """
        With a clock, the count is taken every poll interval, so
        descriptors freed elsewhere resume accepting without a check call.
        """
        clock = Clock()
        mark, count, gate, _stats = self.make(120, clock)
        mark.start()
        self.assertEqual(gate.gate.reasons, {WATERMARK_REASON})
        count.value = 10
        clock.advance(0.99)
        self.assertTrue(gate.gate.paused)
        clock.advance(0.01)
        self.assertFalse(gate.gate.paused)
        mark.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_poll_stretched_far_from_the_mark(self) -> None:
        """
        Far below the high mark the poll is stretched in proportion to the
        room left (up to ten intervals); within a tenth of the mark, or
        paused, it is every interval again.
        """
        clock = Clock()
        mark, count, gate, _stats = self.make(10, clock)
        mark.start()
        self.assertEqual(mark.next_poll(), 9.0)
        self.assertEqual(count.readings, 1)
        count.value = 95
        clock.advance(8.99)
        self.assertEqual(count.readings, 1)
        clock.advance(0.01)
        self.assertEqual(count.readings, 2)
        self.assertEqual(mark.next_poll(), 1.0)
        count.value = 120
        clock.advance(1.0)
        self.assertEqual(count.readings, 3)
        self.assertTrue(gate.gate.paused)
        self.assertEqual(mark.next_poll(), 1.0)
        count.value = 0
        clock.advance(1.0)
        self.assertFalse(gate.gate.paused)
        self.assertEqual(mark.next_poll(), 10.0)
        mark.stop()

    def test_no_descriptor_left_to_count_with(self) -> None:
        """
        When counting itself fails with EMFILE, the process is at its
        limit: accepting pauses, and resumes once counting works and shows
        room again.
        """
        mark, count, gate, _stats = self.make(50)
        count.error = OSError(errno.EMFILE, "Too many open files")
        self.assertTrue(mark.check(force=True))
        self.assertEqual(gate.gate.reasons, {WATERMARK_REASON})
        count.error = None
        self.assertFalse(mark.check(force=True))
        self.assertEqual(gate.calls, ["pause", "resume"])

    def test_poll_survives_a_failed_count(self) -> None:
        """
        A count that raises does not end the polling.
        """
        clock = Clock()
        mark, count, gate, _stats = self.make(120, clock)
        mark.start()
        count.error = OSError(errno.EIO, "I/O error")
        self.assertRaises(OSError, clock.advance, 1.0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        count.error = None
        count.value = 10
        clock.advance(1.0)
        self.assertFalse(gate.gate.paused)
        mark.stop()

    def test_stop_releases(self) -> None:
        """
        Stopping releases the gate's reason even at the high mark.
        """
        mark, _count, gate, _stats = self.make(200, Clock())
        mark.start()
        mark.stop()
        self.assertFalse(gate.gate.paused)
        self.assertFalse(mark.paused)

    def test_invalid(self) -> None:
        """
        The low mark must be under the high one.
        """
        gate = RecordingGate().gate
        self.assertRaises(ValueError, FdWatermark, gate, 10, 10)
        self.assertRaises(ValueError, FdWatermark, gate, 10, -1)

    def test_from_limit(self) -> None:
        """
        From the process's limit, the marks are fd_watermarks of it.
        """
        limit = current_soft_limit()
        mark = FdWatermark.from_limit(RecordingGate().gate)
        if limit is None:
            self.assertIsNone(mark)
        else:
            assert mark is not None
            self.assertEqual((mark.high, mark.low), fd_watermarks(limit))
