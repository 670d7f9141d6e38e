"""Prometheus metrics: the server's L{Stats}, read at scrape time, over HTTP.

Nothing here counts anything.  L{StatsCollector} is a C{prometheus_client}
custom collector that reads the live L{Stats} when Prometheus scrapes, so
a value can never be counted twice or drift from what the server and its
log say.  L{MetricsService} serves it as C{/metrics} on any server
endpoint, retrying a port it cannot listen on, like our line listeners.

The scrape is rendered in the reactor thread, between two events:
C{prometheus_client.twisted.MetricsResource} would render it in a worker
thread, reading counters and gauges (sets of connections) while the
reactor changes them, and a line could be counted as received but not yet
as queued.  Read in the reactor, one scrape is one consistent moment:
lines received = delivered + queued + spooled + dropped holds in every
scrape.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
)
from twisted.logger import Logger
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from typing_extensions import override

from lineserver.errors import ErrorCode
from lineserver.listener import DEFAULT_LISTEN_RETRY, SupervisedPort
from lineserver.stats import Stats

log = Logger(namespace="lineserver.metrics")

PREFIX = "lineserver_"
PATH = b"metrics"

#: ERR codes that end a connection being served (counted as lines
#: rejected or timeouts); every other code refuses a client.
_CLOSING_CODES = frozenset(
    {ErrorCode.LINE_TOO_LONG, ErrorCode.IDLE_TIMEOUT, ErrorCode.LINE_TIMEOUT}
)
REFUSAL_CODES: tuple[str, ...] = tuple(
    code.value for code in ErrorCode if code not in _CLOSING_CODES
)
#: The Stats name of a child's restarts is this and the child's name.
RESTARTS_PREFIX = "supervisor.restarts."
#: Upper bounds, in seconds, of the sink write latency histogram's buckets.
SINK_WRITE_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: The accept() errors the accept guard counts; shown at 0 until they occur.
ACCEPT_ERRNOS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")


@dataclass(frozen=True)
class Family:
    """
    One exported metric family and the L{Stats} names it is read from.

    @ivar name: without the C{lineserver_} prefix, and for a counter
        without C{_total} (prometheus_client adds it to the sample).
    @ivar sources: the Stats name of each sample, by label value; the
        empty label value for a family without a label.
    @ivar prefix: a Stats name prefix whose every name is a sample too,
        labelled with the rest of the name (C{accept.errors.EMFILE}).
    """

    name: str
    kind: Literal["counter", "gauge"]
    doc: str
    sources: Mapping[str, str]
    label: str | None = None
    prefix: str | None = None
    #: Exported only when one of its sources is there (spool figures,
    #: with C{--spool} only).
    optional: bool = False


def _one(name: str, kind: Literal["counter", "gauge"], source: str, doc: str) -> Family:
    return Family(name, kind, doc, {"": source})


#: Every metric, from the Stats names documented in docs/operations.md.
FAMILIES: tuple[Family, ...] = (
    _one(
        "lines_received",
        "counter",
        "lines.received",
        "Complete lines accepted from clients and handed to the handler.",
    ),
    _one(
        "lines_delivered",
        "counter",
        "lines.delivered",
        "Lines the sink confirmed written, less those still in its spool.",
    ),
    _one(
        "lines_confirmed",
        "counter",
        "lines.confirmed",
        "Lines the sink confirmed (written, or in its spool).",
    ),
    _one(
        "lines_spooled",
        "gauge",
        "lines.spooled",
        "Lines the sink confirmed into its disk spool, not yet at its destination.",
    ),
    _one(
        "lines_queued",
        "gauge",
        "queue.lines",
        "Lines accepted and not yet confirmed by the sink (in flight included).",
    ),
    Family(
        "lines_dropped",
        "counter",
        "Lines accepted and then lost, by reason: received = delivered + "
        "queued + spooled + dropped.",
        {
            "handler-failed": "lines.failed",
            "shutdown-timeout": "lines.dropped.shutdown_timeout",
            "sink-failed": "lines.dropped.sink_failed",
            "worker-lost": "lines.worker_lost",
        },
        label="reason",
    ),
    Family(
        "spool_recovered_lines",
        "counter",
        "Lines found in the disk spool at start, left by a previous process "
        "(outside this process's ledger: it never received them).",
        {"": "spool.recovered_lines"},
        optional=True,
    ),
    Family(
        "spool_recovered_lines_waiting",
        "gauge",
        "Lines found in the spool at start that the sink does not have yet "
        "(replayed before anything new).",
        {"": "spool.recovered_waiting"},
        optional=True,
    ),
    Family(
        "spool_lines",
        "gauge",
        "Lines in the disk spool for the sink: lines_spooled plus "
        "spool_recovered_lines_waiting.",
        {"": "spool.lines"},
        optional=True,
    ),
    Family(
        "spool_bytes",
        "gauge",
        "Bytes of the disk spool's segment files (what --spool-max caps).",
        {"": "spool.bytes"},
        optional=True,
    ),
    Family(
        "lines_rejected",
        "counter",
        "Lines never accepted, by reason: over --max-line-length, or an "
        "unterminated last line.",
        {"line-too-long": "lines.too_long", "unterminated": "lines.partial_discarded"},
        label="reason",
    ),
    _one(
        "queued_bytes",
        "gauge",
        "queue.bytes",
        "Bytes accepted for the sink and not yet confirmed.",
    ),
    _one(
        "queue_pauses",
        "counter",
        "queue.pauses",
        "Times the sink queue reached --high-watermark and paused its clients.",
    ),
    _one(
        "connections_opened",
        "counter",
        "connections.opened",
        "Connections past the address check, handed to the connection registry.",
    ),
    _one(
        "connections_closed",
        "counter",
        "connections.closed",
        "Connections the registry held that have ended.",
    ),
    _one(
        "connections_open",
        "gauge",
        "connections.open",
        "Connections the registry holds: served, waiting, or being closed.",
    ),
    _one(
        "connections_active",
        "gauge",
        "connections.active",
        "Connections being served (what --max-connections limits).",
    ),
    _one(
        "connections_waiting",
        "gauge",
        "connections.waiting",
        "Connections accepted past --max-connections, waiting for a slot.",
    ),
    _one(
        "connections_paused",
        "gauge",
        "connections.paused",
        "Connections not being read, for any reason (sink full, client "
        "not reading, waiting, closing).",
    ),
    Family(
        "connections_refused",
        "counter",
        "Connections refused with an ERR line before being served, by ERR code.",
        {code: f"errors.{code}" for code in REFUSAL_CODES},
        label="reason",
    ),
    _one(
        "connections_aborted",
        "counter",
        "connections.aborted",
        "Connections aborted because they did not take their last bytes.",
    ),
    Family(
        "timeouts",
        "counter",
        "Connections closed by a deadline, by kind.",
        {
            "idle": "timeouts.idle",
            "line": "timeouts.line",
            "handshake": "timeouts.handshake",
            "proxy": "timeouts.proxy",
        },
        label="kind",
    ),
    Family(
        "accept_errors",
        "counter",
        "accept() failures for want of a resource, by errno; each pauses "
        "accepting for a backoff.",
        {errno: f"accept.errors.{errno}" for errno in ACCEPT_ERRNOS},
        label="errno",
        prefix="accept.errors.",
    ),
    _one(
        "accept_fd_watermark_pauses",
        "counter",
        "accept.fd_watermark.pauses",
        "Times accepting paused at the descriptor watermark (--fd-reserve).",
    ),
    _one(
        "tls_handshakes",
        "counter",
        "tls.handshakes",
        "TLS handshakes completed (ssl: ports and STARTTLS).",
    ),
    Family(
        "tls_handshake_failures",
        "counter",
        "Connections that ended before their TLS handshake did, by reason.",
        {
            "tls-error": "tls.refused",
            "abandoned": "tls.abandoned",
            "timeout": "timeouts.handshake",
        },
        label="reason",
    ),
    _one(
        "tls_starttls",
        "counter",
        "tls.starttls",
        "STARTTLS upgrades begun.",
    ),
    _one(
        "auth_accepted",
        "counter",
        "auth.accepted",
        'AUTH lines accepted (refusals: connections_refused{reason="unauthorized"}).',
    ),
    _one(
        "handler_failures",
        "counter",
        "handler.failures",
        "Handler exceptions; each recreated the connection's handler.",
    ),
    _one(
        "sink.failures",
        "counter",
        "sink.failures",
        "Sink open or write failures; each restarted the sink.",
    ),
    _one(
        "listen_failures",
        "counter",
        "listen.failures",
        "Failed attempts to listen on a --port (retried with backoff).",
    ),
    Family(
        "restarts",
        "counter",
        "Supervised children (sink, listeners, metrics and control ports) "
        "restarted after a failure, by child.",
        {},
        label="child",
        prefix=RESTARTS_PREFIX,
    ),
)


class StatsCollector:
    """
    A C{prometheus_client} collector over a live L{Stats}.

    Every value is read from C{stats} when the registry collects, so the
    metrics are the server's own counters, never a second count of them.
    """

    def __init__(self, stats: Stats, families: Iterable[Family] = FAMILIES) -> None:
        self.stats = stats
        self.families = tuple(families)

    def describe(self) -> list[Metric]:
        """
        The families, for the registry's check that no two collectors
        export the same name.
        """
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        values = self.stats.snapshot()
        for family in self.families:
            if _exported(family, values):
                yield _family(family, {"": values})


def _exported(family: Family, values: Mapping[str, int]) -> bool:
    return not family.optional or any(s in values for s in family.sources.values())


def _family(
    family: Family,
    values: Mapping[str, Mapping[str, int]],
    name_prefix: str = PREFIX,
    outer: str | None = None,
) -> Metric:
    """
    @param values: the Stats values of each source, by the value of the
        C{outer} label (C{""} and no C{outer} for one process).
    """
    name = name_prefix + family.name
    labels = [label for label in (outer, family.label) if label is not None]
    metric: CounterMetricFamily | GaugeMetricFamily
    if family.kind == "counter":
        metric = CounterMetricFamily(name, family.doc, labels=labels or None)
    else:
        metric = GaugeMetricFamily(name, family.doc, labels=labels or None)
    for key, these in values.items():
        samples = {
            label: these.get(source, 0) for label, source in family.sources.items()
        }
        if family.prefix is not None:
            for source, value in these.items():
                if source.startswith(family.prefix):
                    samples[source[len(family.prefix) :]] = value
        head = [key] if outer is not None else []
        for label, value in sorted(samples.items()):
            metric.add_metric(head + ([label] if family.label else []), value)
    return metric


#: The families exported once per worker by a C{--workers} parent: the
#: ledger and the spool, so that each worker's ledger can be checked.
WORKER_FAMILIES: tuple[Family, ...] = tuple(
    family
    for family in FAMILIES
    if family.name.startswith(("lines_", "spool_"))
    and family.name not in ("lines_rejected",)
)
#: The name prefix of the per-worker families.
WORKER_PREFIX = PREFIX + "worker_"


class PerWorkerCollector:
    """
    The ledger of each running worker, as C{lineserver_worker_*} families
    with a C{worker} label (its index), beside the parent's sums.

    Separate names, not the sums' names with a label: a sum over the
    label of one family must mean something, and the sums (which keep
    the counters of workers that exited) would count every live worker
    twice if they shared a name with its series.
    """

    def __init__(
        self,
        per_worker: Callable[[], Mapping[int, Mapping[str, int]]],
        families: Iterable[Family] = WORKER_FAMILIES,
    ) -> None:
        """
        @param per_worker: each running worker's last reported Stats, by
            index (L{lineserver.workers.WorkerStats.per_worker}).
        """
        self.per_worker = per_worker
        self.families = tuple(families)

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        workers = {str(k): v for k, v in sorted(self.per_worker().items())}
        for family in self.families:
            present = {k: v for k, v in workers.items() if _exported(family, v)}
            if present or not family.optional:
                yield _family(family, present, WORKER_PREFIX, outer="worker")


class LatencyHistogram:
    """
    Seconds observed, in cumulative buckets: the sink write latency, from
    a batch's hand-over to the sink to its confirmation.

    Pure bookkeeping, fed by L{lineserver.sink_service.SinkService}'s
    C{on_written} hook and read at scrape time by L{HistogramCollector}.

    @ivar counts: observations per bucket (not cumulative); the last one
        is above every bound (C{+Inf}).
    """

    def __init__(self, bounds: Iterable[float] = SINK_WRITE_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.lines = 0

    def observe(self, seconds: float, lines: int = 0) -> None:
        """
        One confirmed batch of C{lines} lines that took C{seconds}.
        """
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.lines += lines

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """
        @return: (upper bound, cumulative count) pairs, C{+Inf} last, as
            Prometheus wants them.
        """
        cumulative = 0
        pairs = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return pairs


class HistogramCollector:
    """
    Exports a L{LatencyHistogram} as one Prometheus histogram family.
    """

    def __init__(self, name: str, doc: str, histogram: LatencyHistogram) -> None:
        self.name = PREFIX + name
        self.doc = doc
        self.histogram = histogram

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], self.histogram.buckets(), self.histogram.total)
        yield family


def metrics_registry(
    stats: Stats,
    process: bool = True,
    sink_writes: LatencyHistogram | None = None,
    per_worker: Callable[[], Mapping[int, Mapping[str, int]]] | None = None,
) -> CollectorRegistry:
    """
    @return: a registry of this server's own (never the process-global
        C{REGISTRY}: two servers in one process would clash there), with
        the L{StatsCollector}, the sink write latency histogram if
        C{sink_writes} and, if C{process}, the standard C{process_*}
        metrics (open and maximum descriptors, memory, CPU) that tell how
        close the server is to its limits; with C{per_worker} (a
        C{--workers} parent), each worker's ledger too
        (L{PerWorkerCollector}).
    """
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    if per_worker is not None:
        registry.register(PerWorkerCollector(per_worker))
    if sink_writes is not None:
        registry.register(
            HistogramCollector(
                "sink_write_seconds",
                "Seconds from a batch's hand-over to the sink to its "
                "confirmation, per batch.",
                sink_writes,
            )
        )
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """
    C{/metrics}: the registry in the text format the scraper asks for
    (Prometheus text, or OpenMetrics by its C{Accept} header), rendered in
    the reactor thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    @override
    def render(self, request: Request) -> bytes:
        """
        GET and HEAD only; anything else is answered here, since Twisted's
        own page for it is deprecated.
        """
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"405 method not allowed: use GET\n"
        rendered: bytes = super().render(request)
        return rendered

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encode, content_type = choose_encoder(
            accept.decode("latin-1") if accept is not None else ""
        )
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encode(self.registry)


def metrics_site(registry: CollectorRegistry, stopped: Callable[[], None]) -> Site:
    """
    @return: a site with C{/metrics} alone (anything else is a 404).
    """
    root = _Root()
    root.putChild(PATH, MetricsPage(registry))
    return _MetricsSite(root, stopped)


class _Root(Resource):
    """
    C{/metrics} and nothing else: a 404 page for any other path.
    """

    @override
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _MetricsSite(Site):
    """
    No access log (a scrape every few seconds would drown the server's own
    lines), and tell the service when the port stops.
    """

    noisy = False

    def __init__(self, root: Resource, stopped: Callable[[], None]) -> None:
        super().__init__(root)
        self._stopped = stopped

    @override
    def log(self, request: http.Request) -> None:
        """
        Scrapes are not logged.
        """

    @override
    def doStop(self) -> None:
        super().doStop()
        self._stopped()


class MetricsService(SupervisedPort):
    """
    Serves C{/metrics} on one endpoint description, supervised like a line
    listener (L{SupervisedPort}): bound before twistd drops privileges,
    listening once the reactor runs, a busy port retried with backoff while
    the line ports go on serving, a lost port reported to the supervisor.
    """

    verb = "serve metrics on"
    noun = "metrics port"

    def __init__(
        self,
        description: str,
        registry: CollectorRegistry,
        reactor: Any,
        retry: Callable[[int], float] = DEFAULT_LISTEN_RETRY,
    ) -> None:
        super().__init__(description, reactor, retry)
        self.registry = registry

    @override
    def _factory(self, stopped: Callable[[], None]) -> IProtocolFactory:
        return metrics_site(self.registry, stopped)

    @override
    def _logger(self) -> Logger:
        return log

    @override
    def _listened_on(self, port: IListeningPort) -> None:
        address = port.getHost()
        host = getattr(address, "host", None)
        where = (
            f"http://{_url_host(host)}:{address.port}/metrics"  # type: ignore[attr-defined]
            if host is not None
            else str(address)
        )
        log.info(
            "serving metrics on {endpoint} ({where})",
            endpoint=self.description,
            where=where,
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
