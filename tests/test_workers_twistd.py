"""C{twistd -n lineserver --workers N}: real parent and worker processes.

Both workers serve one port; a worker killed with SIGKILL is replaced while
the other goes on serving and loses nothing; SIGTERM drains every worker;
SIGHUP reopens every worker's file; stdout lines stay whole; the metrics
are the workers' sums; a worker that cannot start ends the parent.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import test_lifecycle_twistd as lifecycle
from tests.support import (
    TWISTD,
    Peer,
    ServerProcess,
    check_ledger,
    free_port,
    ledger_from_log,
    ledger_from_scrape,
    run_threads,
    scrape_metrics,
    temp_dir,
    wait_until,
)

SIGTERM = -signal.SIGTERM
#: A file sink that cannot open (as in tests.test_lifecycle_twistd).
UNOPENABLE = "/proc/version"


def worker_pids_in(log: str) -> dict[int, list[int]]:
    """
    @return: the PIDs each worker index was started with, in order.
    """
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(r"worker (\d+) started: pid (\d+)", log):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def worker_pids(server: ServerProcess) -> dict[int, list[int]]:
    return worker_pids_in(server.log())


def file_lines(directory: str, name: str) -> list[bytes]:
    path = Path(directory, name)
    return path.read_bytes().splitlines() if path.exists() else []


def send_lines(port: int, lines: list[bytes]) -> None:
    """
    One short connection per line.
    """
    for line in lines:
        peer = Peer(port, send=line + b"\n")
        peer.close()


def start(directory: str, *args: str, workers: int = 2) -> ServerProcess:
    server = ServerProcess(directory, "--workers", str(workers), *args)
    return server.wait_listening(ports=workers, timeout=60)


class WorkersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def server(self, *args: str, workers: int = 2) -> ServerProcess:
        server = start(self.dir, *args, workers=workers)
        self.addCleanup(server.kill)
        return server

    def test_both_workers_serve_and_sigterm_drains_all(self) -> None:
        """
        Each worker writes its own file, both take connections, and after
        SIGTERM every line sent is in exactly one of the files.
        """
        server = self.server("--sink", "file:lines.log")
        sent = [b"line %d" % i for i in range(80)]
        send_lines(server.port, sent)
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.proc.wait(60), SIGTERM, server.log()[-3000:])
        first = file_lines(self.dir, "lines.log.0")
        second = file_lines(self.dir, "lines.log.1")
        self.assertTrue(first and second, (len(first), len(second)))
        self.assertEqual(sorted(first + second), sorted(sent))
        self.assertFalse(Path(self.dir, "lines.log").exists())
        log = server.log()
        for index in (0, 1):
            self.assertRegex(log, rf"worker {index} \(pid \d+\) stopped: status 0")
        self.assertIn("stopping 2 worker(s)", log)

    def test_sigint_drains_like_sigterm(self) -> None:
        server = self.server("--sink", "file:lines.log")
        peers = [Peer(server.port) for _ in range(12)]
        for n, peer in enumerate(peers):
            peer.send(b"open %d\n" % n)
        os.kill(server.pid, signal.SIGINT)
        self.assertEqual(server.proc.wait(60), -signal.SIGINT, server.log()[-3000:])
        written = file_lines(self.dir, "lines.log.0") + file_lines(
            self.dir, "lines.log.1"
        )
        self.assertEqual(sorted(written), sorted(b"open %d" % n for n in range(12)))
        for peer in peers:
            peer.wait_closed()
        self.assertEqual(len(re.findall(r"stopped: status 0", server.log())), 2)

    def test_killed_worker_is_replaced_and_the_other_loses_nothing(self) -> None:
        server = self.server("--sink", "file:lines.log")
        pids = worker_pids(server)
        peers = [Peer(server.port, send=b"peer %d first\n" % i) for i in range(24)]
        # Which worker took which connection, from the file its line is in.
        wait_until(
            lambda: (
                len(file_lines(self.dir, "lines.log.0"))
                + len(file_lines(self.dir, "lines.log.1"))
                == len(peers)
            ),
            "every first line written",
            timeout=30,
        )
        on_first = {line.split()[1] for line in file_lines(self.dir, "lines.log.0")}
        killed = [p for i, p in enumerate(peers) if b"%d" % i in on_first]
        survivors = [p for i, p in enumerate(peers) if b"%d" % i not in on_first]
        self.assertTrue(killed and survivors, (len(killed), len(survivors)))

        os.kill(pids[0][0], signal.SIGKILL)
        for peer in killed:
            # The kernel closes a dead process's sockets: a FIN, or a reset
            # if it held unread bytes.  Either way the client knows.
            peer.wait_closed(timeout=20)
            self.assertIn(peer.end, ("eof", "reset"))
        for i, peer in enumerate(peers):
            if peer in survivors:
                peer.send(b"peer %d second\n" % i)
        wait_until(
            lambda: len(worker_pids(server).get(0, [])) == 2, "a new worker 0", 30
        )
        new_pid = worker_pids(server)[0][1]
        self.assertNotEqual(new_pid, pids[0][0])
        self.assertEqual(worker_pids(server)[1], pids[1])  # the survivor stayed
        wait_until(lambda: server.log().count("listening on ") >= 3, "relisten", 30)
        before = len(file_lines(self.dir, "lines.log.0"))
        # The new worker serves: new connections reach lines.log.0 again.
        for n in range(200):
            send_lines(server.port, [b"later %d" % n])
            if len(file_lines(self.dir, "lines.log.0")) > before:
                break
        self.assertGreater(len(file_lines(self.dir, "lines.log.0")), before)
        self.assertIn("restarting child worker 0", server.log())

        for peer in survivors:
            peer.close()
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.proc.wait(60), SIGTERM, server.log()[-3000:])
        second = file_lines(self.dir, "lines.log.1")
        for i, peer in enumerate(peers):
            if peer in survivors:
                self.assertEqual(second.count(b"peer %d first" % i), 1)
                self.assertEqual(second.count(b"peer %d second" % i), 1)

    def test_sighup_reopens_every_workers_file(self) -> None:
        server = self.server("--sink", "file:lines.log")
        for index in (0, 1):
            path = Path(self.dir, f"lines.log.{index}")
            wait_until(path.exists, f"{path.name} created")
            os.rename(
                Path(self.dir, f"lines.log.{index}"),
                Path(self.dir, f"lines.log.{index}.old"),
            )
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: server.log().count("reopened (asked to)") >= 2, "reopen")
        sent = [b"after %d" % i for i in range(60)]
        send_lines(server.port, sent)
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.proc.wait(60), SIGTERM, server.log()[-3000:])
        first = file_lines(self.dir, "lines.log.0")
        second = file_lines(self.dir, "lines.log.1")
        self.assertTrue(first and second, (len(first), len(second)))
        self.assertEqual(sorted(first + second), sorted(sent))

    def test_stdout_lines_never_mix(self) -> None:
        """
        Lines far longer than a pipe's atomic write, from both workers at
        once, come out of the parent's standard output whole.
        """
        server = self.server("--sink", "stdout:")
        lines = [(b"%02d" % i) * 20_000 for i in range(16)]
        peers = [Peer(server.port) for _ in lines]
        for _ in range(3):
            for peer, line in zip(peers, lines, strict=True):
                peer.send(line[:30_000])
            for peer, line in zip(peers, lines, strict=True):
                peer.send(line[30_000:] + b"\n")
        for peer in peers:
            peer.close()
        time.sleep(1)
        os.kill(server.pid, signal.SIGTERM)
        out, _ = server.proc.communicate(timeout=60)
        self.assertEqual(server.proc.returncode, SIGTERM, server.log()[-3000:])
        got = out.splitlines()
        self.assertEqual(sorted(got), sorted(lines * 3))
        served_by = set(re.findall(r"worker (\d) \[\d+\]: closed", server.log()))
        self.assertEqual(served_by, {"0", "1"})

    def test_metrics_are_the_sums(self) -> None:
        metrics = free_port()
        server = self.server("--sink", "file:lines.log", "--metrics", f"tcp:{metrics}")
        send_lines(server.port, [b"m %d" % i for i in range(50)])

        def scrape() -> dict[str, float]:
            url = f"http://127.0.0.1:{metrics}/metrics"
            with urllib.request.urlopen(url, timeout=10) as page:
                text = page.read().decode()
            return {
                name: float(value)
                for name, value in re.findall(r"^(lineserver_\w+) (\S+)$", text, re.M)
            }

        wait_until(
            lambda: scrape().get("lineserver_lines_delivered_total") == 50,
            "50 lines delivered in the sums",
            timeout=30,
        )
        values = scrape()
        self.assertEqual(values["lineserver_lines_received_total"], 50)
        self.assertEqual(values["lineserver_connections_opened_total"], 50)
        self.assertEqual(values["lineserver_lines_queued"], 0)
        per_worker = [len(file_lines(self.dir, f"lines.log.{i}")) for i in (0, 1)]
        self.assertEqual(sum(per_worker), 50)
        self.assertTrue(all(per_worker), per_worker)

        # A worker killed: its counters stay in the sums, and the ledger
        # (received = delivered + queued + dropped) still balances.
        os.kill(worker_pids(server)[0][0], signal.SIGKILL)
        wait_until(lambda: len(worker_pids(server).get(0, [])) == 2, "restart", 30)
        send_lines(server.port, [b"n %d" % i for i in range(20)])
        wait_until(
            lambda: scrape().get("lineserver_lines_delivered_total") == 70,
            "70 lines delivered in the sums",
            timeout=30,
        )
        url = f"http://127.0.0.1:{metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            text = page.read()
        dropped = re.findall(rb'lines_dropped_total\{reason="([^"]+)"\} (\S+)', text)
        self.assertIn(b"worker-lost", dict(dropped))
        # The sums balance; what the killed worker held (if anything, at
        # its last report) is dropped as worker-lost.
        sums = check_ledger(
            self,
            ledger_from_scrape(scrape_metrics(metrics)),
            received=None,
            delivered=70,
            dropped=None,
        )
        self.assertEqual(set(sums.dropped) - {"worker-lost"}, set())
        restarts = dict(re.findall(rb'restarts_total\{child="([^"]+)"\} (\S+)', text))
        self.assertEqual(float(restarts[b"worker 0"]), 1)
        self.assertEqual(float(restarts[b"worker 1"]), 0)

    def test_per_worker_ledgers_add_up_to_the_sums(self) -> None:
        """
        Scraped while clients send to two workers, the parent's
        C{lineserver_worker_*{worker=...}} series balance each worker's
        ledger and add up to the sums, at every scrape; after the load,
        both workers took lines and delivered all of them, and the stop
        logs each worker's balanced ledger.
        """
        metrics = free_port()
        server = self.server("--sink", "file:lines.log", "--metrics", f"tcp:{metrics}")
        clients, connections, lines_each = 4, 20, 1000
        sent = clients * connections * lines_each
        done: list[int] = []

        def client(n: int) -> None:
            for c in range(connections):
                data = b"".join(b"c%d.%d %d\n" % (n, c, i) for i in range(lines_each))
                with socket.create_connection(("127.0.0.1", server.port), 10) as s:
                    s.sendall(data)
            done.append(n)

        scrapes: list[int] = []

        def scraper() -> None:
            # At least five scrapes, and on until the clients are done.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                self.assert_per_worker_ledgers(scrape_metrics(metrics))
                scrapes.append(1)
                if len(done) == clients and len(scrapes) >= 5:
                    break
                time.sleep(0.05)

        run_threads([*(lambda n=n: client(n) for n in range(clients)), scraper], 150)
        self.assertGreaterEqual(len(scrapes), 5)
        wait_until(
            lambda: ledger_from_scrape(scrape_metrics(metrics)).delivered == sent,
            f"{sent} lines delivered in the sums",
            timeout=60,
        )
        samples = scrape_metrics(metrics)
        workers = self.assert_per_worker_ledgers(samples)
        self.assertEqual(sorted(workers), ["0", "1"])
        for ledger in workers.values():
            self.assertGreater(ledger.received, 0, workers)
        check_ledger(self, ledger_from_scrape(samples), received=sent, delivered=sent)
        self.assertEqual(server.stop(), SIGTERM)
        for index in ("0", "1"):
            logged = [
                line
                for line in server.log().splitlines()
                if f"worker {index} [" in line and "ledger:" in line
            ]
            self.assertEqual(len(logged), 1, server.log()[-3000:])
            check_ledger(
                self,
                ledger_from_log(logged[0]),
                received=workers[index].received,
                delivered=workers[index].received,
            )

    def assert_per_worker_ledgers(self, samples: dict[Any, float]) -> dict[str, Any]:
        """
        Each worker's ledger in one scrape balances, and their figures add
        up to the parent's sums (no worker has exited: nothing retired).

        @return: each worker's ledger, by index.
        """
        indexes = {
            dict(labels)["worker"]
            for name, labels in samples
            if name == "lineserver_worker_lines_received_total"
        }
        workers = {i: ledger_from_scrape(samples, worker=i) for i in indexes}
        for ledger in workers.values():
            check_ledger(self, ledger, queued=None)
        sums = ledger_from_scrape(samples)
        check_ledger(self, sums, queued=None)
        for term in ("received", "delivered", "queued", "spooled", "dropped_total"):
            self.assertEqual(
                sum(getattr(w, term) for w in workers.values()),
                getattr(sums, term),
                f"{term}: {workers} against {sums}",
            )
        return workers

    def test_busy_port_is_retried_before_any_worker_starts(self) -> None:
        port = free_port()
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        self.addCleanup(holder.close)
        server = ServerProcess(self.dir, "--mode", "echo", "--workers", "2", port=port)
        self.addCleanup(server.kill)
        wait_until(lambda: "could not listen on" in server.log(), "a retry", 30)
        self.assertEqual(worker_pids(server), {})
        holder.close()
        server.wait_listening(ports=2, timeout=60)
        peer = Peer(port, send=b"at last\n")
        peer.expect(b"at last\n")
        peer.close()

    def test_workers_stop_when_the_parent_is_killed(self) -> None:
        """
        A parent gone without a stop (SIGKILL) leaves no worker behind:
        each gets SIGTERM from the kernel and stops in order.
        """
        server = self.server("--sink", "file:lines.log")
        pids = [ps[0] for ps in worker_pids(server).values()]
        send_lines(server.port, [b"before %d" % i for i in range(10)])
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(10)

        def gone(pid: int) -> bool:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                return True
            return "\nState:\tZ" in status

        wait_until(lambda: all(gone(pid) for pid in pids), "workers gone", 30)
        written = file_lines(self.dir, "lines.log.0") + file_lines(
            self.dir, "lines.log.1"
        )
        self.assertEqual(sorted(written), sorted(b"before %d" % i for i in range(10)))

    def test_auto_is_one_worker_per_core(self) -> None:
        cores = len(os.sched_getaffinity(0))
        server = self.server("--mode", "echo", workers=cores)
        self.assertEqual(sorted(worker_pids(server)), list(range(cores)))
        auto = ServerProcess(temp_dir(self), "--mode", "echo", "--workers", "auto")
        self.addCleanup(auto.kill)
        wait_until(
            lambda: auto.log().count("listening on ") >= cores, "auto workers", 60
        )
        self.assertEqual(len(worker_pids(auto)), cores)
        peer = Peer(auto.port, send=b"echo me\n")
        peer.expect(b"echo me\n")
        peer.close()

    def test_a_worker_that_cannot_start_ends_the_parent(self) -> None:
        server = ServerProcess(
            self.dir,
            "--workers",
            "2",
            "--sink",
            f"file:{UNOPENABLE}",
            "--max-restarts",
            "2",
        )
        self.addCleanup(server.kill)
        self.assertEqual(server.proc.wait(120), 70, server.log()[-3000:])
        log = server.log()
        self.assertIn("restart intensity exceeded", log)
        self.assertIn("lineserver gives up: workers crash too often", log)

    def test_bad_values_are_usage_errors(self) -> None:
        for args in (
            ["--workers", "0"],
            ["--workers", "lots"],
            ["--workers", "2", "--port", "unix:lines.sock"],
        ):
            done = subprocess.run(
                [str(TWISTD), "-n", "--pidfile=", "lineserver", *args],
                cwd=self.dir,
                capture_output=True,
                timeout=60,
            )
            self.assertEqual(done.returncode, 1, args)
            self.assertIn(b"--workers:", done.stdout + done.stderr, args)


def runs_python_as(uid: int, gid: int) -> bool:
    """
    Can this user run this interpreter and import lineserver?  (Not where
    Python lives in root's home, as pyenv puts it.)
    """

    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    try:
        done = subprocess.run(
            [sys.executable, "-c", "import lineserver.worker_main"],
            preexec_fn=drop,
            cwd="/",
            capture_output=True,
            timeout=60,
        )
    except OSError:
        return False
    return done.returncode == 0


class PrivilegedWorkersTests(lifecycle.PrivilegedPortTests):
    """
    With C{--uid}, the parent binds a port below 1024 as root and the
    workers, started after the privileges are dropped, serve it; where that
    user cannot run this Python, the parent says so and gives up.
    """

    def test_low_port_served_after_dropping_privileges(self) -> None:
        user, group, uid, gid = lifecycle.unprivileged_ids()
        port = lifecycle.free_privileged_port()
        log_path = Path(self.dir, "server.log")
        proc = subprocess.Popen(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                f"--logfile={log_path}",
                *("--uid", user, "--gid", group),
                "lineserver",
                *("--mode", "echo", "--workers", "2", "--max-restarts", "1"),
                *("--port", f"tcp:{port}:interface=127.0.0.1"),
            ],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def log() -> str:
            return log_path.read_text() if log_path.exists() else ""

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        self.addCleanup(kill)
        wait_until(lambda: f"parent bound 127.0.0.1:{port}" in log(), "bound", 30)
        # twistd drops privileges (and says so) just after the parent bound.
        wait_until(lambda: "set uid/gid" in log(), "privileges dropped", 30)
        if not runs_python_as(uid, gid):
            self.assertEqual(proc.wait(60), 70, log()[-3000:])
            self.assertIn(f"cannot start worker 0: {sys.executable}", log())
            self.assertIn("Permission denied", log())
            self.assertIn("lineserver gives up: workers crash too often", log())
            return
        wait_until(lambda: log().count("listening on ") >= 2, "2 workers", 60)
        for n in range(8):
            peer = Peer(port, send=b"served by nobody %d\n" % n)
            peer.expect(b"served by nobody %d\n" % n)
            peer.close()
        pids = [proc.pid] + [p for ps in worker_pids_in(log()).values() for p in ps]
        self.assertEqual(len(pids), 3)
        for pid in pids:
            self.assertEqual(lifecycle.ids_of(pid), ([uid] * 4, [gid] * 4))
        self.assertNotIn("could not listen", log())
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(60), SIGTERM, log()[-3000:])
        self.assertNotIn("Traceback", log())
