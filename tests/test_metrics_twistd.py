"""C{--metrics} as an operator meets it: a real twistd, scraped over HTTP.

Clients send lines over loopback sockets while a scraper reads
C{/metrics}; what the scrape says is checked against what was sent and
what the sink file holds.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.certs import make_pki
from tests.support import (
    TWISTD,
    Peer,
    ServerProcess,
    check_ledger,
    check_scraped_ledger,
    free_port,
    ledger_from_log,
    ledger_from_scrape,
    listening_addresses,
    run_threads,
    scrape_metrics,
    temp_dir,
    wait_until,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CLIENTS = 4
LINES_EACH = 500


def scrape(port: int) -> Samples:
    """
    GET /metrics over loopback, parsed as Prometheus would.

    @raise OSError: if nothing answers on C{port}.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrapes(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def listening_sockets(pid: int) -> int:
    """
    @return: how many TCP sockets process C{pid} has listening, from the
        kernel's tables (its descriptors' inodes, and the LISTEN rows).
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    found += 1
    return found


#: An application of one's own, as docs/embedding.md shows it, run by
#: C{twistd -y}: a handler that refuses (raises on) lines starting "bad".
FAILING_HANDLER_TAC = """
from twisted.application.service import Application
from twisted.internet import reactor

from lineserver import LineServer, PerLineHandler, ServerConfig, sink_factory_from_url


class RefusesBad(PerLineHandler):
    def __init__(self, connection, queue):
        self.queue = queue
        self.producer = connection.producer("sink")
        queue.register(self.producer)

    def line_received(self, line):
        if line.startswith(b"bad"):
            raise ValueError("a bad line")
        self.queue.put([line], len(line) + 1)

    def connection_lost(self):
        self.queue.unregister(self.producer)


application = Application("refuses-bad")
LineServer(
    ServerConfig(ports=["tcp:{port}:interface=127.0.0.1"], metrics="tcp:{metrics}"),
    reactor,
    handler=lambda queue: lambda conn: RefusesBad(conn, queue),
    sink=sink_factory_from_url("file:lines.log", reactor),
).setServiceParent(application)
"""


def run_tac(
    case: SynchronousTestCase, template: str
) -> tuple[subprocess.Popen[bytes], Path, int, int]:
    """
    Run the application C{template} describes (formatted with its line and
    metrics ports) under C{twistd -y}, until its metrics port answers.

    @return: the process, its log file, its line port and metrics port.
    """
    directory = temp_dir(case)
    port, metrics = free_port(), free_port()
    tac = Path(directory, "app.tac")
    tac.write_text(template.format(port=port, metrics=metrics))
    log = Path(directory, "server.log")
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", f"--logfile={log}", "-y", str(tac)],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    case.addCleanup(kill)
    wait_until(lambda: scrapes(metrics), "the metrics port", timeout=30)
    return proc, log, port, metrics


class HandlerFailureTwistdTests(SynchronousTestCase):
    def test_failed_lines_dropped_by_reason(self) -> None:
        """
        A handler that raises on some lines, in an application run by
        C{twistd -y}: each such line is dropped with reason
        C{handler-failed}, exactly as many as were refused, in a scrape
        and in the stop's ledger line; every other line is delivered.
        """
        proc, log, port, metrics = run_tac(self, FAILING_HANDLER_TAC)
        lines = [b"bad %d" % i if i % 7 == 3 else b"good %d" % i for i in range(700)]
        bad = sum(1 for line in lines if line.startswith(b"bad"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"".join(line + b"\n" for line in lines))
        good = len(lines) - bad
        wait_until(
            lambda: ledger_from_scrape(scrape_metrics(metrics)).delivered == good,
            "the good lines delivered",
        )
        check_ledger(
            self,
            ledger_from_scrape(scrape_metrics(metrics)),
            received=len(lines),
            delivered=good,
            dropped={"handler-failed": bad},
        )
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(30), -signal.SIGTERM, log.read_text()[-2000:])
        check_ledger(
            self,
            ledger_from_log(log.read_text()),
            received=len(lines),
            delivered=good,
            dropped={"handler-failed": bad},
        )
        written = Path(log.parent, "lines.log").read_bytes().splitlines()
        self.assertEqual(written, [line for line in lines if line.startswith(b"good")])


#: An application run by C{twistd -y} whose sink never confirms a write
#: (a database that hangs): a stop gives it up at the shutdown timeout.
HANGING_SINK_TAC = """
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed

from lineserver import LineServer, ServerConfig


class Hangs:
    def open(self):
        return succeed(None)

    def write(self, lines):
        return Deferred()

    def close(self):
        return succeed(None)


class HangsFactory:
    description = "hangs:"

    def __call__(self):
        return Hangs()


application = Application("hangs")
LineServer(
    ServerConfig(
        ports=["tcp:{port}:interface=127.0.0.1"],
        metrics="tcp:{metrics}",
        shutdown_timeout=1,
    ),
    reactor,
    sink=HangsFactory(),
).setServiceParent(application)
"""


class ShutdownTimeoutTwistdTests(SynchronousTestCase):
    def test_lines_given_up_are_dropped_by_number(self) -> None:
        """
        A sink that never confirms: a scrape shows every line queued; the
        stop gives the sink up at the shutdown timeout and its ledger line
        drops exactly those lines, with reason C{shutdown_timeout}.
        """
        proc, log, port, metrics = run_tac(self, HANGING_SINK_TAC)
        total = 250
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"".join(b"held %d\n" % n for n in range(total)))
        check_scraped_ledger(self, metrics, total, delivered=0, queued=total)
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(30), -signal.SIGTERM, log.read_text()[-2000:])
        self.assertIn(f"{total} line(s)", log.read_text())
        check_ledger(
            self,
            ledger_from_log(log.read_text()),
            received=total,
            delivered=0,
            dropped={"shutdown-timeout": total},
        )


class MetricsTwistdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def start(
        self, *args: str, listen: str | None = None, port: int | None = None
    ) -> tuple[ServerProcess, int]:
        """
        A twistd with C{--metrics tcp:PORT} (no interface: the default must
        be loopback), once its line port and its metrics port listen.
        """
        metrics_port = free_port()
        server = ServerProcess(
            self.dir,
            "--metrics",
            f"tcp:{metrics_port}",
            *args,
            port=port,
            listen=listen,
        )
        self.addCleanup(server.stop)
        server.wait_listening()
        wait_until(lambda: "serving metrics on" in server.log(), "the metrics port")
        return server, metrics_port

    def test_lines_received_delivered_and_ledger(self) -> None:
        """
        While clients send lines, every scrape balances the ledger
        (received = delivered + queued + dropped); once the load has
        drained, the scrape shows every line sent as received and
        delivered, nothing queued or dropped, and the sink file holds them
        all.  The metrics port, given without C{interface=}, is loopback.
        """
        server, metrics_port = self.start()
        self.assertEqual(listening_addresses(metrics_port), {"127.0.0.1"})
        sending = threading.Event()
        sending.set()
        seen: list[Samples] = []

        def client(n: int) -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                for start in range(0, LINES_EACH, 50):
                    s.sendall(
                        b"".join(
                            b"client %d line %06d\n" % (n, i)
                            for i in range(start, start + 50)
                        )
                    )

        def senders() -> None:
            try:
                run_threads([partial(client, n) for n in range(CLIENTS)])
            finally:
                sending.clear()

        def scraper() -> None:
            while sending.is_set() or len(seen) < 3:
                seen.append(scrape(metrics_port))

        run_threads([senders, scraper], timeout=60)
        for samples in seen:
            check_ledger(self, ledger_from_scrape(samples), queued=None)
        sent = CLIENTS * LINES_EACH

        def drained() -> bool:
            samples = scrape(metrics_port)
            return value(samples, "lineserver_lines_delivered_total") == sent

        wait_until(drained, f"{sent} lines delivered")
        samples = scrape(metrics_port)
        self.assertEqual(value(samples, "lineserver_lines_received_total"), sent)
        self.assertEqual(value(samples, "lineserver_lines_queued"), 0)
        self.assertEqual(value(samples, "lineserver_queued_bytes"), 0)
        self.assertEqual(
            value(samples, "lineserver_lines_dropped_total", reason="handler-failed"),
            0,
        )
        check_ledger(self, ledger_from_scrape(samples), received=sent, delivered=sent)
        self.assertEqual(value(samples, "lineserver_connections_opened_total"), CLIENTS)
        wait_until(
            lambda: value(scrape(metrics_port), "lineserver_connections_open") == 0,
            "every connection closed",
        )
        samples = scrape(metrics_port)
        self.assertEqual(value(samples, "lineserver_connections_closed_total"), CLIENTS)
        written = Path(self.dir, "lines.log").read_bytes().count(b"\n")
        self.assertEqual(written, sent)

    def test_sink_write_latency_and_restarts_by_child(self) -> None:
        """
        A real twistd exports the sink write latency as a histogram: once
        lines are delivered, every confirmed batch is counted, within the
        buckets, with a sum of seconds; and each supervised child has its
        own restart counter (at 0: nothing crashed).
        """
        server, metrics_port = self.start()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"".join(b"line %d\n" % i for i in range(200)))
        wait_until(
            lambda: (
                value(scrape(metrics_port), "lineserver_lines_delivered_total") == 200
            ),
            "200 lines delivered",
        )
        samples = scrape(metrics_port)
        name = "lineserver_sink_write_seconds"
        batches = value(samples, name + "_count")
        self.assertGreaterEqual(batches, 1)
        self.assertLessEqual(batches, 200)
        self.assertEqual(value(samples, name + "_bucket", le="+Inf"), batches)
        self.assertGreater(value(samples, name + "_sum"), 0)
        children = {
            dict(labels)["child"]: v
            for (n, labels), v in samples.items()
            if n == "lineserver_restarts_total"
        }
        self.assertEqual(children.get("sink"), 0)
        self.assertTrue(
            any(child.startswith("listener 0 tcp:") for child in children), children
        )
        self.assertEqual(sum(children.values()), 0)

    def test_refused_client_counted(self) -> None:
        """
        A client over C{--max-connections} (reject mode) reads its
        C{ERR too-many-connections}, and the scrape counts it by that
        reason, beside the one connection being served.
        """
        server, metrics_port = self.start(
            "--max-connections", "1", "--overflow", "reject"
        )
        served = Peer(server.port, send=b"first\n")
        self.addCleanup(served.close)
        wait_until(
            lambda: (
                value(scrape(metrics_port), "lineserver_lines_delivered_total") == 1
            ),
            "the first client's line delivered",
        )
        refused = Peer(server.port)
        self.addCleanup(refused.close)
        refused.wait_closed()
        self.assertEqual(refused.received, b"ERR too-many-connections\n")
        samples = scrape(metrics_port)
        self.assertEqual(
            value(
                samples,
                "lineserver_connections_refused_total",
                reason="too-many-connections",
            ),
            1,
        )
        self.assertEqual(
            value(samples, "lineserver_connections_refused_total", reason="forbidden"),
            0,
        )
        self.assertEqual(value(samples, "lineserver_connections_active"), 1)
        self.assertEqual(value(samples, "lineserver_connections_opened_total"), 2)

    def test_tls_handshakes_and_failures(self) -> None:
        """
        On an C{ssl:} port, a client that completes its handshake counts as
        a handshake, and a plaintext client as a handshake failure with
        reason C{tls-error}.
        """
        pki = make_pki(self.dir)
        port = free_port()
        key = pki.server_cert.with_suffix(".key")
        listen = (
            f"ssl:{port}:privateKey={key}:certKey={pki.server_cert}:interface=127.0.0.1"
        )
        server, metrics_port = self.start(listen=listen, port=port)
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"over tls\n")
            wait_until(
                lambda: (
                    value(scrape(metrics_port), "lineserver_lines_delivered_total") == 1
                ),
                "the TLS client's line delivered",
            )
        plain = Peer(server.port, send=b"not tls\n")
        self.addCleanup(plain.close)
        plain.wait_closed()
        failures = "lineserver_tls_handshake_failures_total"
        wait_until(
            lambda: value(scrape(metrics_port), failures, reason="tls-error") == 1,
            "the plaintext client counted",
        )
        samples = scrape(metrics_port)
        self.assertEqual(value(samples, "lineserver_tls_handshakes_total"), 1)
        self.assertEqual(value(samples, failures, reason="timeout"), 0)

    def test_busy_metrics_port_retried(self) -> None:
        """
        A metrics port held by another program is logged and retried
        while the line port serves; once it frees up, metrics are served
        there, with the lines sent meanwhile.
        """
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        metrics_port = blocker.getsockname()[1]
        server = ServerProcess(self.dir, "--metrics", f"tcp:{metrics_port}")
        self.addCleanup(server.stop)
        server.wait_listening()
        wait_until(
            lambda: f"could not serve metrics on tcp:{metrics_port}" in server.log(),
            "the metrics listen failure",
        )
        self.assertIn("Address already in use", server.log())
        client = Peer(server.port, send=b"meanwhile\n")
        self.addCleanup(client.close)
        blocker.close()
        wait_until(lambda: scrapes(metrics_port), "metrics served once the port frees")
        wait_until(
            lambda: (
                value(scrape(metrics_port), "lineserver_lines_delivered_total") == 1
            ),
            "the line sent meanwhile delivered",
        )
        self.assertIsNone(server.proc.poll(), "the server kept running")

    def test_off_by_default(self) -> None:
        """
        Without C{--metrics} the server listens on its line port alone.
        """
        server = ServerProcess(self.dir)
        self.addCleanup(server.stop)
        server.wait_listening()
        self.assertEqual(listening_sockets(server.pid), 1)
        self.assertNotIn("serving metrics", server.log())
        self.assertNotIn("lineserver.metrics", server.log())


class MetricsUsageErrorTests(SynchronousTestCase):
    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "lineserver", *args],
            cwd=temp_dir(self),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def assert_usage_error(self, args: list[str], *expected: str) -> None:
        done = self.twistd(*args)
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 1, output)
        last = [line for line in output.splitlines() if line.strip()][-1]
        for text in expected:
            self.assertIn(text, last)
        self.assertNotIn("Traceback", output)

    def test_mistakes(self) -> None:
        """
        A metrics port that is also a line port (the two would fight over
        it), C{--metrics} twice, and an endpoint that does not parse are
        usage errors naming C{--metrics}, before anything listens.
        """
        port = free_port()
        self.assert_usage_error(
            ["--port", f"tcp:{port}", "--metrics", f"tcp:{port}"],
            "--metrics:",
            f"is the port of --port 'tcp:{port}'",
        )
        self.assert_usage_error(
            [
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--metrics",
                f"tcp:{port}:interface=0.0.0.0",
            ],
            "--metrics:",
            "is the port of --port",
        )
        self.assert_usage_error(
            ["--port", "tcp:0", "--metrics", "tcp:9100", "--metrics", "tcp:9101"],
            "--metrics: given twice",
        )
        self.assert_usage_error(
            ["--port", "tcp:0", "--metrics", "tcp:nine"], "--metrics: bad endpoint"
        )
