"""The file sink's two write paths keep one order.

With C{fsync=never} a small batch is written on the reactor thread and a
large one (over C{INLINE_MAX}) on the writer thread; batches handed over
without waiting, alternating small and large, must still land in the file
in the order given, each Deferred firing in that order and only once its
bytes are in the file.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from lineserver.sinks.file import INLINE_MAX, FileSink
from tests.support import reactor, temp_dir


class InlineOrderTests(TestCase):
    @inlineCallbacks
    def test_small_and_large_batches_keep_order(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        path = os.path.join(temp_dir(self), "lines.log")
        sink = FileSink(path, reactor)
        yield sink.open()
        batches = []
        for i in range(40):
            size = INLINE_MAX + 1000 if i % 5 == 4 else 20
            batches.append([b"%03d " % i + b"x" * size, b"%03d end" % i])
        expected = [b"".join(line + b"\n" for line in batch) for batch in batches]
        fired: list[tuple[int, int]] = []

        def done(_: object, i: int) -> None:
            fired.append((i, os.path.getsize(path)))

        writes = []
        for i, batch in enumerate(batches):
            d = sink.write(batch)
            d.addCallback(done, i)
            writes.append(d)
        yield gatherResults(writes)
        yield sink.close()
        self.assertEqual(Path(path).read_bytes(), b"".join(expected))
        self.assertEqual([i for i, _ in fired], list(range(len(batches))))
        for i, size in fired:
            self.assertGreaterEqual(size, sum(len(e) for e in expected[: i + 1]))

    @inlineCallbacks
    def test_small_batch_confirmed_at_once(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """
        A small batch with nothing before it is in the file, and confirmed,
        when C{write} returns: no reactor turn between a fleet's line and
        its confirmation.  One that follows a batch still being written
        waits for it.
        """
        path = os.path.join(temp_dir(self), "lines.log")
        sink = FileSink(path, reactor)
        yield sink.open()
        first = sink.write([b"a", b"b"])
        self.assertEqual(Path(path).read_bytes(), b"a\nb\n")
        self.assertIsNone(self.successResultOf(first))
        large = sink.write([b"x" * (INLINE_MAX + 1)])
        after = sink.write([b"c"])
        self.assertNoResult(after)
        yield gatherResults([large, after])
        yield sink.close()
        self.assertEqual(
            Path(path).read_bytes(), b"a\nb\n" + b"x" * (INLINE_MAX + 1) + b"\nc\n"
        )

    @inlineCallbacks
    def test_write_now(self) -> Generator[Deferred[Any], Any, None]:
        """
        C{write_now} (the sink service's way without a Deferred) writes a
        small batch with nothing before it and says so; with a batch still
        being written, or one too large for the reactor thread, it writes
        nothing and says so.
        """
        path = os.path.join(temp_dir(self), "lines.log")
        sink = FileSink(path, reactor)
        yield sink.open()
        self.assertTrue(sink.write_now([b"a"]))
        self.assertEqual(Path(path).read_bytes(), b"a\n")
        self.assertFalse(sink.write_now([b"x" * (INLINE_MAX + 1)]))
        large = sink.write([b"y" * (INLINE_MAX + 1)])
        self.assertFalse(sink.write_now([b"b"]))
        yield large
        self.assertTrue(sink.write_now([b"c"]))
        yield sink.close()
        self.assertEqual(
            Path(path).read_bytes(), b"a\n" + b"y" * (INLINE_MAX + 1) + b"\nc\n"
        )
