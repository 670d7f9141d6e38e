"""The pure parts of C{--workers}: option values, per-worker sink paths,
whole-line relaying, and the stats sums with their ledger.

The processes themselves are tested in L{tests.test_workers_twistd}.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from lineserver.tap import Options
from lineserver.workers import (
    LOST_WITH_WORKER,
    GaugeNamingStats,
    SummedStats,
    WholeLines,
    WorkerStats,
    cpu_count,
    parse_workers,
    worker_sink_url,
)

TCP = ["tcp:4040:interface=127.0.0.1"]


class ParseWorkersTests(SynchronousTestCase):
    def test_numbers(self) -> None:
        self.assertEqual(parse_workers("1", TCP), 1)
        self.assertEqual(parse_workers(" 3 ", TCP), 3)

    def test_auto_is_one_per_usable_core(self) -> None:
        self.assertEqual(parse_workers("auto", TCP), len(os.sched_getaffinity(0)))
        self.assertEqual(parse_workers("AUTO", TCP), cpu_count())

    def test_bad_values(self) -> None:
        for text in ("0", "-1", "two", "", "1.5", "auto2"):
            with self.assertRaises(ValueError, msg=text) as raised:
                parse_workers(text, TCP)
            self.assertIn("from 1, or auto", str(raised.exception))

    def test_unix_ports_only_with_one_worker(self) -> None:
        unix = ["unix:/tmp/lines.sock"]
        self.assertEqual(parse_workers("1", unix), 1)
        with self.assertRaises(ValueError) as raised:
            parse_workers("2", [*TCP, *unix])
        self.assertIn("unix:/tmp/lines.sock", str(raised.exception))

    def test_tls_and_proxy_ports_are_tcp(self) -> None:
        ports = ["ssl:4443:privateKey=k.pem:certKey=c.pem", "haproxy:tcp:4041"]
        self.assertEqual(parse_workers("2", ports), 2)

    def test_options_usage_errors(self) -> None:
        for args in (
            ["--workers", "0"],
            ["--workers", "many"],
            ["--workers", "2", "--port", "unix:/tmp/x.sock"],
            ["--workers", "2", "--worker-sockets", "fork"],
        ):
            with self.assertRaises(usage.UsageError, msg=str(args)):
                Options().parseOptions(["--mode", "echo", *args])

    def test_options_default_is_one_process(self) -> None:
        options = Options()
        options.parseOptions(["--mode", "echo"])
        self.assertEqual(options["workers"], 1)
        self.assertEqual(options.arguments, ["--mode", "echo"])


class WorkerSinkURLTests(SynchronousTestCase):
    def test_file_sink_one_file_per_worker(self) -> None:
        self.assertEqual(worker_sink_url("file:lines.log", 0), "file:lines.log.0")
        self.assertEqual(
            worker_sink_url("file:/var/log/l.log?fsync=batch", 3),
            "file:/var/log/l.log.3?fsync=batch",
        )

    def test_other_sinks_shared(self) -> None:
        for url in ("stdout:", "null:"):
            self.assertEqual(worker_sink_url(url, 2), url)


class WholeLinesTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))),
        st.lists(st.integers(min_value=0, max_value=50)),
    )
    def test_any_chunking_gives_the_same_lines(
        self, lines: list[bytes], cuts: list[int]
    ) -> None:
        stream = b"".join(line + b"\n" for line in lines)
        splitter = WholeLines()
        got: list[bytes] = []
        position = 0
        for cut in cuts:
            got += splitter.feed(stream[position : position + cut])
            position += cut
        got += splitter.feed(stream[position:])
        self.assertEqual(got, lines)
        self.assertEqual(splitter.rest, b"")

    def test_unterminated_rest_waits(self) -> None:
        splitter = WholeLines()
        self.assertEqual(splitter.feed(b"a\nb"), [b"a"])
        self.assertEqual(splitter.rest, b"b")
        self.assertEqual(splitter.feed(b"c\n"), [b"bc"])


def _report(stats: GaugeNamingStats) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(stats.report())
    return decoded


class WorkerStatsTests(SynchronousTestCase):
    def _worker(self, received: int, delivered: int, queued: int) -> GaugeNamingStats:
        stats = GaugeNamingStats()
        stats.incr("lines.received", received)
        stats.incr("lines.delivered", delivered)
        stats.add_gauge("queue.lines", lambda: queued)
        return stats

    def test_report_separates_gauges(self) -> None:
        report = _report(self._worker(5, 3, 2))
        self.assertEqual(report["pid"], os.getpid())
        self.assertEqual(
            report["counters"], {"lines.received": 5, "lines.delivered": 3}
        )
        self.assertEqual(report["gauges"], {"queue.lines": 2})

    def test_sums_and_per_worker(self) -> None:
        workers = WorkerStats()
        workers.update(0, _report(self._worker(5, 3, 2)))
        workers.update(1, _report(self._worker(7, 7, 0)))
        totals = workers.totals()
        self.assertEqual(totals["lines.received"], 12)
        self.assertEqual(totals["lines.delivered"], 10)
        self.assertEqual(totals["queue.lines"], 2)
        self.assertEqual(sorted(workers.per_worker()), [0, 1])
        self.assertEqual(workers.per_worker()[1]["lines.received"], 7)

    def test_exited_worker_keeps_counters_not_gauges(self) -> None:
        workers = WorkerStats()
        workers.update(0, _report(self._worker(5, 5, 0)))
        workers.retire(0)
        workers.update(0, _report(self._worker(1, 0, 1)))
        totals = workers.totals()
        self.assertEqual(totals["lines.received"], 6)
        self.assertEqual(totals["queue.lines"], 1)
        self.assertEqual(totals.get(LOST_WITH_WORKER, 0), 0)

    def test_lines_held_by_an_exited_worker_count_as_lost(self) -> None:
        workers = WorkerStats()
        workers.update(1, _report(self._worker(9, 5, 4)))
        workers.retire(1)
        self.assertEqual(workers.totals()[LOST_WITH_WORKER], 4)
        self.assertEqual(workers.totals().get("queue.lines", 0), 0)
        self.assertEqual(workers.per_worker(), {})

    @given(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.integers(0, 100),
                st.integers(0, 100),
                st.booleans(),
            ),
            max_size=30,
        )
    )
    def test_ledger_holds_for_the_sums(
        self, events: list[tuple[int, int, int, bool]]
    ) -> None:
        """
        Whatever workers report, and whenever they exit, received = delivered + queued
        + lost holds for the sums, when it held for each report.
        """
        workers = WorkerStats()
        for index, delivered, queued, exits in events:
            report = _report(self._worker(delivered + queued, delivered, queued))
            workers.update(index, report)
            if exits:
                workers.retire(index)
        totals = workers.totals()
        self.assertEqual(
            totals.get("lines.received", 0),
            totals.get("lines.delivered", 0)
            + totals.get("queue.lines", 0)
            + totals.get(LOST_WITH_WORKER, 0),
        )

    def test_summed_stats_add_the_parents_own(self) -> None:
        workers = WorkerStats()
        workers.update(0, _report(self._worker(2, 2, 0)))
        summed = SummedStats(workers)
        summed.add_gauge("workers.running", lambda: 1)
        self.assertEqual(summed.get("lines.received"), 2)
        self.assertEqual(summed.snapshot()["workers.running"], 1)
        self.assertEqual(summed.get("nothing.here"), 0)
