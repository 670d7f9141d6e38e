"""Prometheus metrics: the collector over a live Stats, and /metrics over HTTP.

The exposition is checked with prometheus_client's own parser, so a name,
type or sample a scraper would reject fails here.  The server is embedded
and reached through real loopback sockets: clients send lines, an HTTP
client scrapes.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from lineserver.errors import ErrorCode
from lineserver.flow import SinkQueue
from lineserver.handlers import PerLineHandler
from lineserver.interfaces import (
    ILineHandler,
    ILineHandlerFactory,
    ISink,
    ISinkFactory,
)
from lineserver.metrics import (
    ACCEPT_ERRNOS,
    SINK_WRITE_BUCKETS,
    LatencyHistogram,
    StatsCollector,
    metrics_registry,
)
from lineserver.server import LineServer, ServerConfig
from lineserver.sink_service import SPOOL_GAUGES, SinkService, queued_lines
from lineserver.stats import Stats
from tests.support import (
    MemorySinkFactory,
    connect,
    eventually,
    free_port,
    ledger_from_scrape,
    reactor,
)

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
LOCAL = "tcp:0:interface=127.0.0.1"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, Any], Samples]:
    """
    Parse an exposition as Prometheus would (prometheus_client's parser
    raises on anything malformed).

    @return: the families by name, and every sample by name and labels.
    """
    families = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str) -> float:
    """
    @return: the sum of every sample of C{name}, whatever its labels.
    """
    return sum(v for (n, _), v in samples.items() if n == name)


def ledger(samples: Samples) -> tuple[float, float]:
    """
    @return: lines received, and lines delivered + queued + spooled +
        dropped: the promise is that the two are equal in every scrape.
    """
    received = value(samples, "lineserver_lines_received_total")
    accounted = (
        value(samples, "lineserver_lines_delivered_total")
        + value(samples, "lineserver_lines_queued")
        + value(samples, "lineserver_lines_spooled")
        + total(samples, "lineserver_lines_dropped_total")
    )
    return received, accounted


def constant(amount: int) -> Callable[[], int]:
    return lambda: amount


def exposition(stats: Stats) -> str:
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    return generate_latest(registry).decode()


#: Stats counters always incremented together with a twin that is exported
#: (lineserver/protocol.py: an ERR line and its own counter), so that the
#: value is exported once.
TWINS = {
    "errors.line-too-long": "lines.too_long",
    "errors.idle-timeout": "timeouts.idle",
    "errors.line-timeout": "timeouts.line",
    "connections.refused.forbidden": "errors.forbidden",
    "connections.refused.limit": "errors.too-many-connections",
    "connections.refused.peer": "errors.too-many-connections-from-peer",
    # Exported by child (supervisor.restarts.<child>), whose sum it is.
    "supervisor.restarts": "supervisor.restarts.<child>",
}


def documented_stats() -> dict[str, str]:
    """
    @return: every Stats name in docs/operations.md's "Counters" table, with
        its kind; C{errors.<code>} and C{accept.errors.<ERRNO>} expanded.
    """
    text = OPERATIONS.read_text()
    table = text.split("## Counters", 1)[1].split("\n## ", 1)[0]
    names: dict[str, str] = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.split("|")]
        if len(cells) < 4 or not cells[1].startswith("`"):
            continue
        kind = cells[2]
        for name in re.findall(r"`([a-z_.<>A-Z]+)`", cells[1]):
            if name == "errors.<code>":
                names.update({f"errors.{code.value}": kind for code in ErrorCode})
            elif name == "accept.errors.<ERRNO>":
                names.update({f"accept.errors.{e}": kind for e in ACCEPT_ERRNOS})
            else:
                names[name] = kind
    return names


class CollectorTests(SynchronousTestCase):
    def test_names_and_types_valid(self) -> None:
        """
        Every family parses, has help text, is a counter or a gauge with a
        C{lineserver_} name in snake case; counters' samples end in
        C{_total} and no gauge's does.
        """
        families, _ = parse(exposition(Stats()))
        self.assertGreater(len(families), 20)
        for name, family in families.items():
            self.assertRegex(name, r"^lineserver_[a-z][a-z0-9_]*[a-z]$")
            self.assertIn(family.type, ("counter", "gauge"), name)
            self.assertTrue(family.documentation, name)
            for sample in family.samples:
                if family.type == "counter":
                    self.assertEqual(sample.name, name + "_total")
                else:
                    self.assertEqual(sample.name, name)
                    self.assertFalse(sample.name.endswith("_total"), name)

    def test_every_documented_stat_is_exported(self) -> None:
        """
        Each counter and gauge that docs/operations.md lists is exported:
        given a distinct value in a Stats, that value is in the scrape.
        """
        names = documented_stats()
        self.assertIn("lines.received", names)
        self.assertIn("accept.errors.EMFILE", names)
        stats = Stats()
        expected = {}
        for index, (name, kind) in enumerate(sorted(names.items())):
            amount = 1000 + 7 * index
            expected[name] = amount
            if kind == "gauge":
                stats.add_gauge(name, constant(amount))
            else:
                stats.incr(name, amount)
        _, samples = parse(exposition(stats))
        exported = set(samples.values())
        missing = sorted(
            name
            for name, v in expected.items()
            if v not in exported and name not in TWINS
        )
        self.assertEqual(missing, [], "documented but not exported")

    def test_every_family_is_documented(self) -> None:
        """
        docs/operations.md names every exported family.
        """
        families, _ = parse(exposition(Stats()))
        text = OPERATIONS.read_text()
        undocumented = [name for name in families if f"`{name}" not in text]
        self.assertEqual(undocumented, [])

    def test_read_at_scrape_time(self) -> None:
        """
        Values are read from the live Stats at each scrape, neither cached
        nor counted a second time: labels come from the counter's name.
        """
        stats = Stats()
        queued = [3]
        stats.add_gauge("queue.lines", lambda: queued[0])
        registry = CollectorRegistry()
        registry.register(StatsCollector(stats))
        _, first = parse(generate_latest(registry).decode())
        stats.incr("lines.received", 5)
        stats.incr("errors.forbidden")
        stats.incr("accept.errors.EAGAIN", 2)
        queued[0] = 1
        _, second = parse(generate_latest(registry).decode())
        self.assertEqual(value(first, "lineserver_lines_received_total"), 0)
        self.assertEqual(value(second, "lineserver_lines_received_total"), 5)
        self.assertEqual(value(first, "lineserver_lines_queued"), 3)
        self.assertEqual(value(second, "lineserver_lines_queued"), 1)
        self.assertEqual(
            value(second, "lineserver_connections_refused_total", reason="forbidden"),
            1,
        )
        self.assertEqual(
            value(second, "lineserver_accept_errors_total", errno="EAGAIN"), 2
        )
        self.assertEqual(
            value(first, "lineserver_accept_errors_total", errno="EMFILE"),
            0,
            "the known errnos are there before they occur (rate() needs a 0)",
        )

    def test_registry_with_process_metrics(self) -> None:
        """
        The server's registry adds the standard C{process_*} metrics
        without a clash of names (registering would raise).
        """
        registry = metrics_registry(Stats())
        families, _ = parse(generate_latest(registry).decode())
        self.assertIn("lineserver_lines_received", families)
        self.assertIn("process_open_fds", families)


class SpoolFamiliesTests(SynchronousTestCase):
    def test_only_with_a_spool(self) -> None:
        """
        The spool's families are exported once the sink service has
        registered its spool gauges (with --spool), each with its value,
        and are documented; without a spool there are none.
        """
        families, _ = parse(exposition(Stats()))
        self.assertFalse([name for name in families if "spool_" in name])
        stats = Stats()
        for index, name in enumerate(sorted(SPOOL_GAUGES)):
            stats.add_gauge(name, constant(10 + index))
        families, samples = parse(exposition(stats))
        self.assertEqual(
            {n: value(samples, n) for n in samples_named(samples, "lineserver_spool_")},
            {
                "lineserver_spool_bytes": 10,
                "lineserver_spool_lines": 11,
                "lineserver_spool_recovered_lines_total": 12,
                "lineserver_spool_recovered_lines_waiting": 13,
            },
        )
        text = OPERATIONS.read_text()
        for name in families:
            self.assertIn(f"`{name}", text)


def samples_named(samples: Samples, word: str) -> list[str]:
    return sorted(name for name, labels in samples if word in name and not labels)


#: One worker's ledger figures: received = delivered + queued + spooled +
#: failed, as a worker reports them.
worker_reports = st.builds(
    lambda delivered, queued, spooled, failed, pid: {
        "lines.received": delivered + queued + spooled + failed,
        "lines.confirmed": delivered + spooled,
        "lines.delivered": delivered,
        "queue.lines": queued,
        "lines.spooled": spooled,
        "lines.failed": failed,
        "pid": pid,
    },
    *[st.integers(0, 10**9)] * 4,
    st.integers(2, 2**22),
)


class PerWorkerCollectorTests(SynchronousTestCase):
    @given(st.dictionaries(st.integers(0, 63), worker_reports, max_size=8))
    def test_each_workers_ledger(self, workers: dict[int, dict[str, int]]) -> None:
        """
        Each running worker's figures are exported as
        C{lineserver_worker_*} with its index as the C{worker} label, and
        read back (as an operator would) its ledger balances with the same
        figures; the sums' families are not touched.
        """
        registry = metrics_registry(Stats(), process=False, per_worker=lambda: workers)
        families, samples = parse(generate_latest(registry).decode())
        for name, family in families.items():
            if name.startswith("lineserver_worker_"):
                for sample in family.samples:
                    self.assertIn(sample.labels["worker"], map(str, workers))
        for index, report in workers.items():
            got = ledger_from_scrape(samples, worker=str(index))
            self.assertTrue(got.balanced, got)
            self.assertEqual(
                (got.received, got.delivered, got.queued, got.spooled),
                (
                    report["lines.received"],
                    report["lines.delivered"],
                    report["queue.lines"],
                    report["lines.spooled"],
                ),
            )
            failed = report["lines.failed"]
            self.assertEqual(
                dict(got.dropped), {"handler-failed": failed} if failed else {}
            )
        self.assertEqual(value(samples, "lineserver_lines_received_total"), 0)

    def test_no_workers_yet(self) -> None:
        """
        Before any worker has reported, the families are there, empty.
        """
        registry = metrics_registry(Stats(), process=False, per_worker=dict)
        families, samples = parse(generate_latest(registry).decode())
        self.assertIn("lineserver_worker_lines_received", families)
        self.assertFalse([key for key in samples if "worker" in key[0]])


class LatencyHistogramTests(SynchronousTestCase):
    @given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False)))
    def test_buckets_cumulative(self, observed: list[float]) -> None:
        """
        Each bucket counts the observations at or below its bound, the
        C{+Inf} bucket counts them all, and the sum is their total.
        """
        histogram = LatencyHistogram()
        for seconds in observed:
            histogram.observe(seconds, 1)
        buckets = histogram.buckets()
        self.assertEqual(buckets[-1], ("+Inf", len(observed)))
        for (bound, count), limit in zip(buckets[:-1], SINK_WRITE_BUCKETS, strict=True):
            self.assertEqual(float(bound), limit)
            self.assertEqual(count, sum(1 for s in observed if s <= limit))
        self.assertAlmostEqual(histogram.total, sum(observed), places=6)
        self.assertEqual(histogram.lines, len(observed))
        self.assertEqual(histogram.count, len(observed))

    def test_exported_as_histogram(self) -> None:
        """
        The server registry exports C{lineserver_sink_write_seconds} as a
        Prometheus histogram: cumulative C{_bucket} samples by C{le}, a
        C{_count} and a C{_sum}.
        """
        histogram = LatencyHistogram()
        histogram.observe(0.003, 10)
        histogram.observe(0.2, 5)
        registry = metrics_registry(Stats(), process=False, sink_writes=histogram)
        families, samples = parse(generate_latest(registry).decode())
        self.assertEqual(families["lineserver_sink_write_seconds"].type, "histogram")
        name = "lineserver_sink_write_seconds"
        self.assertEqual(value(samples, name + "_bucket", le="0.0025"), 0)
        self.assertEqual(value(samples, name + "_bucket", le="0.005"), 1)
        self.assertEqual(value(samples, name + "_bucket", le="0.25"), 2)
        self.assertEqual(value(samples, name + "_bucket", le="+Inf"), 2)
        self.assertEqual(value(samples, name + "_count"), 2)
        self.assertAlmostEqual(value(samples, name + "_sum"), 0.203)

    def test_sink_service_reports_each_confirmed_batch(self) -> None:
        """
        The SinkService calls its C{on_written} hook once per confirmed
        batch, with the time from hand-over to confirmation and the lines;
        a batch still in flight is not reported.
        """
        now = [100.0]
        seen: list[tuple[float, int]] = []
        factory = HeldSinkFactory()
        queue = SinkQueue(1 << 20, 1 << 10)
        service = SinkService(
            factory,
            queue,
            on_written=lambda seconds, lines: seen.append((seconds, lines)),
            timer=lambda: now[0],
        )
        service.startService()
        queue.put([b"a", b"b"], 4)
        self.assertEqual(len(factory.sink.writes), 1)
        now[0] += 0.25
        self.assertEqual(seen, [])
        factory.sink.writes[0][1].callback(None)
        self.assertEqual(seen, [(0.25, 2)])


class QueueLineCountTests(SynchronousTestCase):
    def test_lines_counted_until_confirmed(self) -> None:
        """
        Lines stay counted while waiting and while in flight, come back
        with a failed batch, and leave when the sink confirms the batch's
        last byte (bytes are confirmed as a whole or in parts).
        """
        queue = SinkQueue(1000, 10)
        queue.put([b"a", b"b"], 4)
        queue.put([b"c"], 2)
        self.assertEqual(queue.buffered_lines, 3)
        lines, cost = queue.take(1000)
        self.assertEqual((len(lines), cost), (3, 6))
        self.assertEqual(queue.buffered_lines, 3, "in flight still counts")
        queue.give_back(lines, cost)
        self.assertEqual(queue.buffered_lines, 3)
        self.assertEqual(queued_lines(queue), 3)
        self.assertEqual(queue.buffered_lines, 3, "counting them changes nothing")
        self.assertEqual(queue.take(1000), (lines, cost))
        queue.confirm(4)
        self.assertEqual(queue.buffered_lines, 3, "part of a batch confirmed")
        queue.confirm(2)
        self.assertEqual(queue.buffered_lines, 0)
        queue.put([b"d"], 2)
        queue.put([b"e", b"f"], 3)
        queue.take(1)
        queue.take(1)
        queue.confirm(2)
        self.assertEqual(queue.buffered_lines, 2, "the oldest batch in flight")
        queue.confirm(3)
        self.assertEqual(queue.buffered_lines, 0)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["put", "take", "give_back", "confirm", "count"]),
                st.integers(1, 5),
            ),
            max_size=60,
        )
    )
    def test_line_count_property(self, ops: list[tuple[str, int]]) -> None:
        """
        Property: whatever the order of puts, takes, give-backs (of the
        batch just taken), confirmations (of the oldest batch in flight,
        whole or in two parts) and counts, C{buffered_lines} is the lines
        put minus the lines of every batch whose bytes were all confirmed.
        """
        queue = SinkQueue(10_000, 10)
        put_lines = confirmed_lines = 0
        in_flight: list[tuple[int, int]] = []
        for op, n in ops:
            if op == "put":
                queue.put([b"x"] * n, 2 * n)
                put_lines += n
            elif op == "take":
                lines, cost = queue.take(3 * n)
                if lines:
                    in_flight.append((len(lines), cost))
            elif op == "give_back" and in_flight:
                count, cost = in_flight.pop()
                queue.give_back([b"x"] * count, cost)
            elif op == "confirm" and in_flight:
                count, cost = in_flight.pop(0)
                part = cost // 2 if n % 2 else 0
                if part:
                    queue.confirm(part)
                queue.confirm(cost - part)
                confirmed_lines += count
            elif op == "count":
                queued_lines(queue)
            self.assertEqual(queue.buffered_lines, put_lines - confirmed_lines)


# -- an embedded server, through real sockets ---------------------------------


@implementer(ISink)
class HeldSink:
    """
    A sink whose writes end when the test says so.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[list[bytes], Deferred[None]]] = []

    def open(self) -> Deferred[None]:
        return succeed(None)

    def write(self, lines: list[bytes]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.writes.append((lines, done))
        return done

    def close(self) -> Deferred[None]:
        for _, done in self.writes:
            if not done.called:
                done.callback(None)
        return succeed(None)


@implementer(ISinkFactory)
class HeldSinkFactory:
    description = "held:"

    def __init__(self) -> None:
        self.sink = HeldSink()

    def __call__(self) -> HeldSink:
        return self.sink


class FailsOnBad(PerLineHandler):
    """
    Queues each line, and fails on the line C{bad}.
    """

    def __init__(self, queue: SinkQueue) -> None:
        self.queue = queue

    def line_received(self, line: bytes) -> None:
        if line == b"bad":
            raise ValueError("bad line")
        self.queue.put([line], len(line) + 1)


def fails_on_bad(queue: SinkQueue) -> ILineHandlerFactory:
    @implementer(ILineHandlerFactory)
    class Factory:
        def __call__(self, connection: Any) -> ILineHandler:
            handler: ILineHandler = FailsOnBad(queue)  # type: ignore[assignment]
            return handler

    return Factory()


class _Body(Protocol):
    """
    Collects a response body (C{readBody} warns about our transports).
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: Any) -> Deferred[bytes]:
    body = _Body()
    response.deliverBody(body)
    return body.done


class ScrapeTests(TestCase):
    def start(
        self, handler: Any = "sink", sink: Any = None, **config: Any
    ) -> Deferred[LineServer]:
        """
        A server with metrics on a free loopback port, once both listen.
        """
        config.setdefault("ports", [LOCAL])
        config.setdefault("metrics", LOCAL)
        server = LineServer(ServerConfig(**config), reactor, handler=handler, sink=sink)
        server.startService()
        self.addCleanup(server.stopService)
        metrics = server.metrics
        assert metrics is not None
        waiting: Deferred[Any] = server.when_listening()
        waiting.addCallback(lambda _: metrics.when_listening())
        return waiting.addCallback(lambda _: server)

    def metrics_port(self, server: LineServer) -> int:
        metrics = server.metrics
        assert metrics is not None and metrics.port is not None
        return int(metrics.port.getHost().port)  # type: ignore[attr-defined]

    @inlineCallbacks
    def get(
        self,
        port: int,
        path: bytes = b"/metrics",
        method: bytes = b"GET",
        accept: str | None = None,
    ) -> Generator[Any, Any, tuple[int, Mapping[bytes, list[bytes]], str]]:
        headers = Headers({b"accept": [accept.encode()]} if accept else {})
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield Agent(reactor, pool=pool).request(
            method, b"http://127.0.0.1:%d%s" % (port, path), headers
        )
        body = yield read_body(response)
        return (
            response.code,
            dict(response.headers.getAllRawHeaders()),
            body.decode(),
        )

    @inlineCallbacks
    def scrape(self, server: LineServer) -> Generator[Any, Any, Samples]:
        code, headers, body = yield self.get(self.metrics_port(server))
        self.assertEqual(code, 200, body)
        self.assertTrue(headers[b"Content-Type"][0].startswith(b"text/plain"))
        _, samples = parse(body)
        return samples

    @inlineCallbacks
    def test_ledger_with_a_batch_in_flight(self) -> Generator[Any, Any, None]:
        """
        Lines sent over a socket show as received at once, as queued while
        the sink's write is in flight, and as delivered once it ends; in
        every scrape received = delivered + queued + dropped.
        """
        factory = HeldSinkFactory()
        server = yield self.start(sink=factory)
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"one\ntwo\nthree\n")
        yield eventually(lambda: bool(factory.sink.writes), "a write in flight")
        during = yield self.scrape(server)
        self.assertEqual(value(during, "lineserver_lines_received_total"), 3)
        self.assertEqual(value(during, "lineserver_lines_queued"), 3)
        self.assertEqual(value(during, "lineserver_queued_bytes"), 14)
        self.assertEqual(value(during, "lineserver_lines_delivered_total"), 0)
        self.assertEqual(value(during, "lineserver_connections_active"), 1)
        self.assertEqual(value(during, "lineserver_connections_open"), 1)
        received, accounted = ledger(during)
        self.assertEqual(received, accounted)
        factory.sink.writes[0][1].callback(None)
        client.transport.loseConnection()
        yield client.gone
        after = yield self.scrape(server)
        self.assertEqual(value(after, "lineserver_lines_delivered_total"), 3)
        self.assertEqual(value(after, "lineserver_lines_queued"), 0)
        self.assertEqual(value(after, "lineserver_queued_bytes"), 0)
        self.assertEqual(value(after, "lineserver_connections_opened_total"), 1)
        self.assertEqual(value(after, "lineserver_connections_closed_total"), 1)
        self.assertEqual(value(after, "lineserver_connections_open"), 0)
        received, accounted = ledger(after)
        self.assertEqual((received, accounted), (3, 3))

    @inlineCallbacks
    def test_failed_handler_lines_dropped(self) -> Generator[Any, Any, None]:
        """
        A line whose handler raises is counted as dropped (reason
        C{handler-failed}), and the ledger still balances.
        """
        sink = MemorySinkFactory()
        server = yield self.start(handler=fails_on_bad, sink=sink)
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"good\nbad\nfine\n")
        yield eventually(lambda: len(sink.store) == 2, "the good lines written")
        samples = yield self.scrape(server)
        self.assertEqual(
            value(samples, "lineserver_lines_dropped_total", reason="handler-failed"),
            1,
        )
        self.assertEqual(value(samples, "lineserver_handler_failures_total"), 1)
        self.assertEqual(ledger(samples), (3, 3))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        client.transport.loseConnection()
        yield client.gone

    @inlineCallbacks
    def test_rejected_lines_outside_the_ledger(self) -> Generator[Any, Any, None]:
        """
        A line over the limit and an unterminated last line were never
        accepted: counted as rejected, and not part of received.
        """
        sink = MemorySinkFactory()
        server = yield self.start(sink=sink)
        port = server.port_numbers()[0]
        long_client = yield connect(port)
        long_client.transport.write(b"ok\n" + b"x" * 70_000 + b"\n")
        yield long_client.gone
        partial = yield connect(port)
        partial.transport.write(b"first\nno end")
        yield eventually(lambda: len(sink.store) == 2, "the complete lines written")
        partial.transport.loseConnection()
        yield partial.gone
        yield eventually(lambda: not len(server.registry), "both connections gone")
        samples = yield self.scrape(server)
        rejected = "lineserver_lines_rejected_total"
        self.assertEqual(value(samples, rejected, reason="line-too-long"), 1)
        self.assertEqual(value(samples, rejected, reason="unterminated"), 1)
        self.assertEqual(ledger(samples), (2, 2))

    @inlineCallbacks
    def test_accept_errors_by_errno(self) -> Generator[Any, Any, None]:
        """
        accept() failures injected through the listener's guard (the fire
        drill docs/operations.md describes) show by errno.
        """
        server = yield self.start(handler="echo")
        port = server.port_numbers()[0]
        guard = server.listeners[0].guard
        assert guard is not None
        guard.inject(errno.EMFILE, 2)
        client = yield connect(port)
        client.transport.write(b"hi\n")
        yield client.wait_for(3)
        samples = yield self.scrape(server)
        self.assertEqual(
            value(samples, "lineserver_accept_errors_total", errno="EMFILE"), 2
        )
        client.transport.loseConnection()
        yield client.gone

    @inlineCallbacks
    def test_only_metrics_path_and_get(self) -> Generator[Any, Any, None]:
        """
        Only C{/metrics} is served (404 elsewhere), to GET (405 for POST);
        a scraper asking for OpenMetrics gets it.
        """
        server = yield self.start(handler="echo")
        port = self.metrics_port(server)
        code, _, _ = yield self.get(port, b"/")
        self.assertEqual(code, 404)
        code, _, _ = yield self.get(port, b"/metrics", method=b"POST")
        self.assertEqual(code, 405)
        code, headers, body = yield self.get(
            port, accept="application/openmetrics-text; version=1.0.0"
        )
        self.assertEqual(code, 200)
        self.assertTrue(
            headers[b"Content-Type"][0].startswith(b"application/openmetrics-text")
        )
        self.assertTrue(body.endswith("# EOF\n"))
        self.assertIn("lineserver_lines_received_total 0", body)

    @inlineCallbacks
    def test_busy_port_retried(self) -> Generator[Any, Any, None]:
        """
        A metrics port that is taken is logged and retried with backoff,
        while the line port serves; metrics are served once it frees up.
        """
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        messages: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "lineserver.metrics":
                messages.append(event["log_format"].format(**event))

        globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[arg-type]
        server = LineServer(
            ServerConfig(ports=[LOCAL], metrics=f"tcp:{port}"),
            reactor,
            handler="echo",
        )
        server.startService()
        self.addCleanup(server.stopService)
        yield server.when_listening()
        yield eventually(
            lambda: any(m.startswith("could not serve metrics") for m in messages),
            "the listen failure log",
        )
        self.assertIn("Address already in use", messages[0])
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"up\n")
        yield client.wait_for(3)
        blocker.close()
        metrics = server.metrics
        assert metrics is not None
        listening = metrics.when_listening()
        listening.addTimeout(5, reactor)
        yield listening
        samples = yield self.scrape(server)
        self.assertEqual(value(samples, "lineserver_lines_received_total"), 1)
        self.assertEqual(total(samples, "lineserver_restarts_total"), 0)
        client.transport.loseConnection()
        yield client.gone

    @inlineCallbacks
    def test_lost_port_restarted(self) -> Generator[Any, Any, None]:
        """
        A metrics port that stops listening under the service (closed by
        the embedding application) is a crash: the supervisor builds a
        fresh metrics service on the same endpoint, and counts a restart.
        """
        port = free_port()
        server = yield self.start(handler="echo", metrics=f"tcp:{port}")
        first = server.metrics
        assert first is not None and first.port is not None
        yield first.port.stopListening()
        yield eventually(
            lambda: (
                server.metrics not in (None, first) and server.metrics.port is not None
            ),  # type: ignore[union-attr]
            "a fresh metrics service listening",
        )
        samples = yield self.scrape(server)
        self.assertEqual(self.metrics_port(server), port)
        self.assertEqual(total(samples, "lineserver_restarts_total"), 1)
        self.assertEqual(
            value(samples, "lineserver_restarts_total", child=first.name), 1
        )
        self.assertEqual(
            value(
                samples,
                "lineserver_restarts_total",
                child=str(server.listeners[0].name),
            ),
            0,
            "every child has its series, at 0 until it restarts",
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_scraped_while_stopping(self) -> Generator[Any, Any, None]:
        """
        The metrics port is stopped last: while the stop waits for the sink
        to flush, a scrape still answers and shows the lines still queued;
        once stopped, nothing listens there.
        """
        factory = HeldSinkFactory()
        server = yield self.start(sink=factory)
        port = self.metrics_port(server)
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"a\nb\n")
        yield eventually(lambda: bool(factory.sink.writes), "a write in flight")
        client.transport.loseConnection()
        yield client.gone
        stopping = server.stopService()
        yield eventually(
            lambda: not server.listeners or server.listeners[0].port is None,
            "the line port closed",
        )
        samples = yield self.scrape(server)
        self.assertNoResult(stopping)
        self.assertEqual(value(samples, "lineserver_lines_queued"), 2)
        self.assertEqual(ledger(samples), (2, 2))
        factory.sink.writes[0][1].callback(None)
        yield stopping
        self.assertIsNone(server.metrics and server.metrics.port)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    @inlineCallbacks
    def test_served_again_after_restart(self) -> Generator[Any, Any, None]:
        """
        A server stopped and started again serves metrics again on the
        same endpoint, with the counters carried over.
        """
        port = free_port()
        server = yield self.start(handler="echo", metrics=f"tcp:{port}")
        client = yield connect(server.port_numbers()[0])
        client.transport.write(b"x\n")
        yield client.wait_for(2)
        client.transport.loseConnection()
        yield client.gone
        yield server.stopService()
        server.startService()
        metrics = server.metrics
        assert metrics is not None
        yield metrics.when_listening()
        samples = yield self.scrape(server)
        self.assertEqual(self.metrics_port(server), port)
        self.assertEqual(value(samples, "lineserver_lines_received_total"), 1)
