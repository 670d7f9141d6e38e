"""Tests for L{lineserver.spool}: the record format and the segment files."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lineserver.spool import (
    HEADER,
    MAGIC,
    SegmentStore,
    SpoolLocked,
    decode,
    encode,
    segment_name,
)
from tests.support import temp_dir

#: Lines as framing hands them over: any bytes but LF.
lines_strategy = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=6
)
batches = st.lists(lines_strategy, min_size=1, max_size=8)


def segment(batches: list[list[bytes]]) -> tuple[bytes, list[int]]:
    """
    @return: a segment's bytes (without the magic) and each record's end.
    """
    data = b""
    ends = []
    for batch in batches:
        data += encode(batch)
        ends.append(len(data))
    return data, ends


class FormatTests(SynchronousTestCase):
    @given(batches)
    def test_round_trip(self, written: list[list[bytes]]) -> None:
        """
        Every record decodes to its batch, in order, with nothing left.
        """
        data, _ = segment(written)
        decoded = decode(data)
        self.assertIsNone(decoded.damage)
        self.assertEqual([lines for _, _, lines in decoded.records], written)
        self.assertEqual(decoded.end, len(data))

    @settings(max_examples=60)
    @given(batches)
    def test_every_truncation_keeps_exactly_the_whole_records(
        self, written: list[list[bytes]]
    ) -> None:
        """
        Cut anywhere, a segment yields exactly the records that lie wholly
        before the cut; a cut inside a record is reported as damage, and
        the good end is that of the last whole record.
        """
        data, ends = segment(written)
        for cut in range(len(data) + 1):
            decoded = decode(data[:cut])
            whole = [end for end in ends if end <= cut]
            self.assertEqual(
                [lines for _, _, lines in decoded.records], written[: len(whole)]
            )
            self.assertEqual(decoded.end, whole[-1] if whole else 0)
            self.assertEqual(decoded.damage is None, cut in (0, *ends))

    @settings(max_examples=40)
    @given(batches, st.data())
    def test_a_changed_byte_is_detected(
        self, written: list[list[bytes]], data_strategy: st.DataObject
    ) -> None:
        """
        Changing any one byte of any record stops decoding at that record:
        the records before it come out intact, none after it, and damage
        is reported.
        """
        data, ends = segment(written)
        position = data_strategy.draw(st.integers(0, len(data) - 1))
        flip = data_strategy.draw(st.integers(1, 255))
        damaged = bytearray(data)
        damaged[position] ^= flip
        decoded = decode(bytes(damaged))
        index = next(i for i, end in enumerate(ends) if position < end)
        self.assertIsNotNone(decoded.damage)
        self.assertEqual([lines for _, _, lines in decoded.records], written[:index])

    def test_empty_batch_and_empty_line_differ(self) -> None:
        """
        A record of one empty line is not a record of no lines.
        """
        data = encode([b""]) + encode([])
        self.assertEqual([r[2] for r in decode(data).records], [[b""], []])

    def test_header_layout(self) -> None:
        """
        A record is a 12-byte header (length, lines, CRC-32) and the lines
        joined by LF.
        """
        record = encode([b"ab", b"c"])
        self.assertEqual(HEADER.unpack_from(record)[:2], (4, 2))
        self.assertEqual(record[HEADER.size :], b"ab\nc")


class SegmentStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(temp_dir(self), "spool")

    def store(self, segment_bytes: int = 1 << 20) -> SegmentStore:
        store = SegmentStore(self.directory, segment_bytes)
        self.addCleanup(store.close)
        return store

    def test_append_read_delete(self) -> None:
        """
        Appended records read back in order; deleting every segment leaves
        the directory empty.
        """
        store = self.store(segment_bytes=64)
        self.assertEqual(store.open().records, [])
        records = [store.append([b"line %d" % i] * 3) for i in range(10)]
        self.assertGreater(len({r.segment for r in records}), 1)
        expected = [b"line %d" % i for i in range(4) for _ in range(3)]
        self.assertEqual(store.read(records[:4]), expected)
        for number in sorted({r.segment for r in records}):
            end = max(r.end for r in records if r.segment == number)
            store.delete(number, end)
        self.assertEqual(os.listdir(self.directory), [])
        self.assertEqual(store.disk_bytes, 0)

    def test_delete_skips_a_segment_that_grew(self) -> None:
        """
        A segment is not deleted if records were added after the end its
        caller knows of.
        """
        store = self.store()
        store.open()
        first = store.append([b"a"])
        store.append([b"b"])
        store.delete(first.segment, first.end)
        self.assertEqual(os.listdir(self.directory), [segment_name(first.segment)])

    def test_recover_cuts_a_torn_tail(self) -> None:
        """
        After a crash mid-record, reopening keeps the whole records, cuts
        the torn one off the file, and says so.
        """
        store = self.store()
        store.open()
        good = [store.append([b"kept %d" % i]) for i in range(3)]
        torn = store.append([b"torn"])
        store.close()
        path = os.path.join(self.directory, segment_name(torn.segment))
        os.truncate(path, torn.end - 2)
        again = self.store()
        recovered = again.open()
        self.assertEqual(recovered.records, good)
        self.assertEqual(recovered.dropped_bytes, torn.size - 2)
        self.assertEqual(len(recovered.damaged), 1)
        self.assertIn("torn", recovered.damaged[0])
        self.assertEqual(os.path.getsize(path), good[-1].end)
        self.assertEqual(
            again.read(recovered.records), [b"kept 0", b"kept 1", b"kept 2"]
        )
        # New records follow in a new segment, after the old ones.
        later = again.append([b"new"])
        self.assertGreater(later.segment, torn.segment)

    def test_empty_and_header_only_segments_are_removed(self) -> None:
        """
        A segment with nothing whole in it (torn at creation) is deleted.
        """
        os.makedirs(self.directory)
        for number, content in ((1, MAGIC[:3]), (2, MAGIC)):
            with open(os.path.join(self.directory, segment_name(number)), "wb") as f:
                f.write(content)
        recovered = self.store().open()
        self.assertEqual(recovered.records, [])
        self.assertEqual(os.listdir(self.directory), [])

    def test_a_foreign_file_is_left_alone(self) -> None:
        """
        A .seg file that is not a spool segment is neither read nor deleted.
        """
        os.makedirs(self.directory)
        path = os.path.join(self.directory, segment_name(1))
        with open(path, "wb") as f:
            f.write(b"something else entirely")
        recovered = self.store().open()
        self.assertEqual(recovered.records, [])
        self.assertTrue(os.path.exists(path))
        self.assertIn("not a spool segment", recovered.damaged[0])

    def test_one_user_at_a_time(self) -> None:
        """
        A second store on the same directory is refused while one holds it.
        """
        self.store().open()
        error = self.assertRaises(SpoolLocked, self.store().open)
        self.assertIn("in use", str(error))
