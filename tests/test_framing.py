"""The pure framer: any split of a byte stream frames to the same lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lineserver.framing import Frames, LineFramer, LineTooLong


def feed_all(
    framer: LineFramer, chunks: list[bytes]
) -> tuple[list[bytes], bytes, LineTooLong | None]:
    lines: list[bytes] = []
    raw = b""
    for chunk in chunks:
        frames = framer.feed(chunk)
        lines += frames.lines
        raw += frames.raw
        if frames.error is not None:
            return lines, raw, frames.error
    return lines, raw, None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


def reference_lines(data: bytes) -> list[bytes]:
    """
    The rule, stated plainly: split on LF, drop the unterminated tail,
    strip one CR before each LF.
    """
    parts = data.split(b"\n")[:-1]
    return [p[:-1] if p.endswith(b"\r") else p for p in parts]


# Bytes rich in the interesting ones: LF, CR, NUL, high bytes.
stream = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r", b"\r\n", b"\x00", b"\xff\xfe", b""]),
        st.binary(max_size=12),
    ),
    max_size=60,
).map(b"".join)


class FramingTests(SynchronousTestCase):
    def test_lf_and_crlf(self) -> None:
        """
        LF ends a line; a CR right before it is stripped; raw keeps both.
        """
        frames = LineFramer(100).feed(b"one\ntwo\r\nthree")
        self.assertEqual(frames.lines, [b"one", b"two"])
        self.assertEqual(frames.raw, b"one\ntwo\r\n")
        self.assertIsNone(frames.error)

    def test_lone_cr_and_binary_are_data(self) -> None:
        """
        A CR not before LF, NUL and invalid UTF-8 are kept as they are.
        """
        frames = LineFramer(100).feed(b"a\rb\n\x00\xff\xfe\n\r\r\n")
        self.assertEqual(frames.lines, [b"a\rb", b"\x00\xff\xfe", b"\r"])

    def test_empty_line(self) -> None:
        """
        An empty line is a line.
        """
        self.assertEqual(LineFramer(10).feed(b"\n\r\n").lines, [b"", b""])

    def test_exactly_the_limit(self) -> None:
        """
        A line of exactly max_line_length bytes is accepted, with LF or CRLF,
        even when its CR and LF arrive in separate reads.
        """
        framer = LineFramer(5)
        self.assertEqual(framer.feed(b"12345\n").lines, [b"12345"])
        self.assertEqual(framer.feed(b"abcde\r").lines, [])
        frames = framer.feed(b"\n")
        self.assertEqual(frames.lines, [b"abcde"])
        self.assertIsNone(frames.error)

    def test_one_over_the_limit(self) -> None:
        """
        One byte over is an error; the lines before it are still returned,
        and raw stops at the end of the last good line.
        """
        frames = LineFramer(5).feed(b"ok\n123456\nlater\n")
        self.assertEqual(frames.lines, [b"ok"])
        self.assertEqual(frames.raw, b"ok\n")
        assert frames.error is not None
        self.assertEqual((frames.error.length, frames.error.limit), (6, 5))

    def test_partial_over_limit_fails_early(self) -> None:
        """
        An unterminated line fails as soon as it is longer than the limit
        plus a possible CR, without waiting for its terminator.
        """
        framer = LineFramer(4)
        self.assertIsNone(framer.feed(b"12345").error)  # might be "1234" + CR
        self.assertIsNotNone(framer.feed(b"6").error)

    def test_trailing_partial_over_limit(self) -> None:
        """
        Complete lines of a read are returned even when the read's tail is
        already over the limit.
        """
        frames = LineFramer(3).feed(b"ab\nxxxxxxx")
        self.assertEqual(frames.lines, [b"ab"])
        self.assertIsNotNone(frames.error)

    def test_spent_after_error(self) -> None:
        """
        After an error the framer returns nothing more.
        """
        framer = LineFramer(2)
        framer.feed(b"toolong\n")
        self.assertEqual(framer.feed(b"a\n"), Frames([], b""))

    def test_pending(self) -> None:
        """
        pending counts the bytes of the unterminated tail.
        """
        framer = LineFramer(100)
        framer.feed(b"a\nbc")
        framer.feed(b"d")
        self.assertEqual((framer.pending, framer.tail), (3, b"bcd"))

    def test_bad_limit(self) -> None:
        """
        A limit below 1 is refused.
        """
        self.assertRaises(ValueError, LineFramer, 0)

    def test_long_line_in_small_reads_is_linear(self) -> None:
        """
        A 4 MiB line arriving in 1 KiB reads keeps its chunks, not a growing
        joined buffer: the tail is joined once, when the LF comes.
        """
        framer = LineFramer(4 << 20)
        chunk = b"x" * 1024
        for _ in range(4096):
            self.assertEqual(framer.feed(chunk).lines, [])
        self.assertEqual(len(framer._chunks), 4096)
        frames = framer.feed(b"\n")
        self.assertEqual([len(line) for line in frames.lines], [4 << 20])

    @settings(max_examples=300, deadline=None)
    @given(data=stream, cuts=st.lists(st.integers(min_value=0, max_value=10_000)))
    def test_any_split_same_lines(self, data: bytes, cuts: list[int]) -> None:
        """
        Property: however the stream is split into reads, the framer yields
        the reference lines, and raw is the stream up to its last LF.
        """
        lines, raw, error = feed_all(LineFramer(1 << 20), split_at(data, cuts))
        self.assertIsNone(error)
        self.assertEqual(lines, reference_lines(data))
        self.assertEqual(raw, data[: data.rfind(b"\n") + 1])

    @settings(max_examples=300, deadline=None)
    @given(
        data=stream,
        cuts=st.lists(st.integers(min_value=0, max_value=10_000)),
        limit=st.integers(min_value=1, max_value=8),
    )
    def test_limit_property(self, data: bytes, cuts: list[int], limit: int) -> None:
        """
        Property: with any limit and any split, the lines returned are the
        reference lines before the first over-long one, in order; an error
        is reported iff such a line exists (complete, or an unterminated
        tail longer than limit + 1).
        """
        lines, _, error = feed_all(LineFramer(limit), split_at(data, cuts))
        expected = reference_lines(data)
        bad = next((i for i, line in enumerate(expected) if len(line) > limit), None)
        tail = data[data.rfind(b"\n") + 1 :]
        if bad is not None:
            self.assertIsNotNone(error)
            self.assertEqual(lines, expected[:bad])
        elif len(tail) > limit + 1:
            self.assertIsNotNone(error)
            self.assertEqual(lines, expected)
        else:
            self.assertIsNone(error)
            self.assertEqual(lines, expected)


class OtherDelimiterTests(SynchronousTestCase):
    """
    A delimiter other than LF (a LineReceiver subclass's) is taken exactly.
    """

    @given(
        data=st.lists(
            st.sampled_from([b"\r\n", b"\r", b"\n", b"||", b"|", b"ab", b"\x00"]),
            max_size=40,
        ).map(b"".join),
        cuts=st.lists(st.integers(min_value=0, max_value=200)),
        delimiter=st.sampled_from([b"\r\n", b"||", b"\x00", b"|a|"]),
    )
    def test_any_split_same_lines(
        self, data: bytes, cuts: list[int], delimiter: bytes
    ) -> None:
        """
        Property: however the stream is cut into reads (a delimiter split
        between two included), the lines are C{data.split(delimiter)}
        without the tail, nothing stripped, and raw is the stream up to the
        last delimiter.
        """
        framer = LineFramer(1000, delimiter)
        lines, raw, error = feed_all(framer, split_at(data, cuts))
        self.assertIsNone(error)
        *expected, tail = data.split(delimiter)
        self.assertEqual(lines, expected)
        self.assertEqual(raw, data[: len(data) - len(tail)])
        self.assertEqual(framer.take_tail(), tail)

    def test_overlapping_delimiter(self) -> None:
        """
        The stream is split leftmost first, as bytes.split does: with
        C{||}, C{a|||} is the line C{a} and the tail C{|}, in one read or
        byte by byte.
        """
        for chunks in ([b"a|||"], [b"a", b"|", b"|", b"|"]):
            framer = LineFramer(10, b"||")
            self.assertEqual(feed_all(framer, chunks)[:2], ([b"a"], b"a||"))
            self.assertEqual(framer.take_tail(), b"|")

    def test_limit_with_delimiter(self) -> None:
        """
        A line of exactly the limit passes; a partial line fails once it
        cannot be a line of the limit plus a split delimiter.
        """
        framer = LineFramer(3, b"\r\n")
        self.assertEqual(framer.feed(b"abc\r").lines, [])
        self.assertEqual(framer.feed(b"\n").lines, [b"abc"])
        self.assertIsNotNone(LineFramer(3, b"\r\n").feed(b"abcde").error)

    def test_empty_delimiter_refused(self) -> None:
        with self.assertRaises(ValueError):
            LineFramer(3, b"")
