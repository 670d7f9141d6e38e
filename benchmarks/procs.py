"""The processes of a benchmark, shared by both harnesses.

C{benchmarks.run} (lines per second) and C{benchmarks.longlines} (long
lines) start the servers under test as real processes, run each
measurement in a fresh client process (L{benchmarks.loadgen},
L{benchmarks.longlines}) that prints one JSON object, read the servers' CPU
time and peak memory from C{/proc}, alternate the servers round by round,
and stop them with SIGTERM, all through the pieces here, so their figures
are measured the same way.  The TLS scenarios' servers listen on C{ssl:}
ports with a certificate made at the start of the run (L{make_tls_files}).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MIB = 1 << 20

#: The two kinds of server, and the two columns of every table.
BASELINE = "baseline"
LINESERVER = "lineserver"

#: The third column of the TLS scenarios: lineserver again, on a plain TCP
#: port, measured in the same rounds as the two TLS servers (the TLS cost).
PLAIN = "lineserver-plain"


@dataclass
class ServerReport:
    """
    What one server process cost over a whole phase (one mode).
    """

    server: str
    mode: str
    command: list[str]
    peak_rss_kib: int
    cpu_seconds: float
    log: str
    tls: bool = False


@dataclass
class Harness:
    """
    What every phase of a run shares.

    @ivar servers: the columns to measure, L{BASELINE} and/or L{LINESERVER}.
    @ivar candidate: the kind of server in the L{LINESERVER} column
        (L{BASELINE} for an A/A check of the harness).
    @ivar timeout: seconds one measurement may take.
    @ivar logs: the directory for the servers' logs.
    @ivar server_cpus: the CPUs the servers run on (None: any).
    @ivar client_cpus: the CPUs the client processes run on (None: any).
    @ivar baseline: the kind of server in the L{BASELINE} column:
        L{BASELINE}, or C{checkout:DIR} for lineserver from another
        checkout (a before/after comparison in one run, L{checkout_kind}).
    """

    servers: list[str]
    candidate: str
    rounds: int
    timeout: float
    logs: Path
    server_cpus: set[int] | None = None
    client_cpus: set[int] | None = None
    baseline: str = "baseline"


def checkout_kind(directory: Path) -> str:
    """
    @return: the server kind that runs lineserver from the checkout at
        C{directory} (its C{lineserver} package and C{twisted/plugins}),
        with this checkout's interpreter and Twisted.
    """
    return f"checkout:{directory.resolve()}"


@dataclass(frozen=True)
class TLSFiles:
    """
    The PEM files of the TLS scenarios, made at the start of a run.

    @ivar ca: the CA that signed C{cert}; the clients trust it alone.
    @ivar cert: the servers' certificate (127.0.0.1, ::1, localhost).
    @ivar key: its private key.
    """

    ca: Path
    cert: Path
    key: Path

    def endpoint(self, port: int) -> str:
        """
        @return: the C{ssl:} endpoint description both servers listen on.
        """
        # Imported here: the client processes import this module too.
        from twisted.internet.endpoints import quoteStringArgument

        key = quoteStringArgument(str(self.key))
        cert = quoteStringArgument(str(self.cert))
        return f"ssl:{port}:privateKey={key}:certKey={cert}:interface={HOST}"


def make_tls_files(directory: Path) -> TLSFiles:
    """
    Generate a throwaway CA and server certificate into C{directory} (the
    test suite's generator: EC P-256, valid for ten days).
    """
    from tests.certs import make_pki

    pki = make_pki(directory)
    return TLSFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key)


@dataclass(frozen=True)
class Column:
    """
    One server of a phase: its column, what runs in it, and how it listens.

    @ivar label: L{BASELINE}, L{LINESERVER} or L{PLAIN}.
    @ivar kind: the server that runs, L{BASELINE} or L{LINESERVER}.
    @ivar tls: its certificate and key on an C{ssl:} port; None for C{tcp:}.
    """

    label: str
    kind: str
    tls: TLSFiles | None = None


def columns(harness: Harness, tls: TLSFiles | None = None) -> list[Column]:
    """
    The servers of a phase: one per column of C{harness}, over TLS if
    C{tls} is given, and then also lineserver on a plain port (L{PLAIN}).
    """
    chosen = [
        Column(
            label, harness.candidate if label == LINESERVER else harness.baseline, tls
        )
        for label in harness.servers
    ]
    if tls is not None and LINESERVER in harness.servers:
        chosen.append(Column(PLAIN, harness.candidate))
    return chosen


def free_port() -> int:
    """
    A port that was free a moment ago (bind port 0, read it, release it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def proc_cpu_seconds(pid: int) -> float:
    """
    @return: user plus system CPU seconds of process C{pid}, all threads.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), counted after the command's ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """
    @return: CPU time the hypervisor gave to others, all CPUs, since boot;
        its growth during a round says the round was measured on a busy host.
    """
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    steal = int(fields[8]) if len(fields) > 8 else 0
    return steal / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    """
    @return: a size in KiB from C{/proc/PID/status} (C{VmRSS}, C{VmHWM}),
        or 0 if it is not there.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def proc_peak_rss_kib(pid: int) -> int:
    """
    @return: the process's peak resident set size (VmHWM) in KiB.
    """
    return proc_status_kib(pid, "VmHWM")


@dataclass(eq=False)
class ServerProcess:
    """
    A server under test, run as its own process with its log in a file.

    @ivar server: its column, L{BASELINE}, L{LINESERVER} or L{PLAIN}.
    @ivar cpus: the CPUs it runs on (None: any).
    @ivar tls: it listens on an C{ssl:} port.
    @ivar start_rss_kib: its resident memory once it accepted a connection.
    @ivar nofile: raise its C{RLIMIT_NOFILE} to this many descriptors
        (None: inherit the limit).
    """

    server: str
    mode: str
    port: int
    command: list[str]
    log_path: Path
    cpus: set[int] | None = None
    tls: bool = False
    nofile: int | None = None
    start_rss_kib: int = field(default=0, init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _process: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout: float = 30.0) -> None:
        """
        Start the process and wait until its port accepts a connection.
        """
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            self.command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=pinning(self.cpus, self.nofile),
        )
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                socket.create_connection((HOST, self.port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.server} did not accept on port {self.port} within "
                        f"{timeout:.0f} s; see {self.log_path}"
                    ) from None
                time.sleep(0.05)
        self.start_rss_kib = proc_status_kib(self.pid, "VmRSS")

    def check_alive(self) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            raise BenchError(
                f"{self.server} ({self.mode}) exited with status {code}; "
                f"see {self.log_path}"
            )

    def stop(self) -> ServerReport | None:
        """
        Read the peak RSS and CPU time, then stop with SIGTERM (SIGKILL if
        it does not exit in time).

        @return: the report, or None if the process was already gone.
        """
        if self._process is None:
            return None
        report = None
        if self._process.poll() is None:
            report = ServerReport(
                server=self.server,
                mode=self.mode,
                command=self.command,
                peak_rss_kib=proc_peak_rss_kib(self.pid),
                cpu_seconds=proc_cpu_seconds(self.pid),
                log=str(self.log_path),
                tls=self.tls,
            )
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
        self._process = None
        return report


class BenchError(Exception):
    """
    A server or the load generator failed; the run cannot go on.
    """


def pinning(
    cpus: set[int] | None, nofile: int | None = None
) -> Callable[[], None] | None:
    """
    @return: a C{preexec_fn} that keeps a child (and the threads it will
        start) on C{cpus}, or None to let the kernel place it; and raises
        its C{RLIMIT_NOFILE} towards C{nofile} (L{raise_nofile}).
    """
    if cpus is None and nofile is None:
        return None

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if nofile is not None:
            raise_nofile(nofile)

    return pin


def raise_nofile(wanted: int) -> int:
    """
    Raise this process's soft C{RLIMIT_NOFILE} towards C{wanted}: up to
    the hard limit, and the hard limit too where allowed (root).

    @return: the soft limit now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def twistd_path() -> str:
    """
    The twistd beside this interpreter (the project's virtualenv), else on
    C{PATH}.
    """
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found is None:
        raise BenchError("twistd not found beside the interpreter or on PATH")
    return found


def server_command(
    kind: str,
    mode: str,
    port: int,
    sink: Path | None = None,
    max_line: int | None = None,
    tls: TLSFiles | None = None,
    options_for_lineserver: Sequence[str] = (),
) -> list[str]:
    """
    The command line of a server of C{kind} (L{BASELINE} or L{LINESERVER}).

    @param mode: C{sink} or C{echo}.
    @param sink: the sink file, in sink mode.
    @param max_line: the line limit in bytes, if not the server's default.
    @param tls: listen on an C{ssl:} port with these files, not C{tcp:}.
    @param options_for_lineserver: more options, given to lineserver only
        (C{--ack}, guards).
    """
    endpoint = f"tcp:{port}:interface={HOST}" if tls is None else tls.endpoint(port)
    options = ["--port", endpoint, "--mode", mode]
    if sink is not None:
        options += ["--sink", f"file:{sink}"]
    if kind == BASELINE:
        if max_line is not None:
            options += ["--max-line-length", str(max_line)]
        return [sys.executable, "-m", "benchmarks.baseline_server", *options]
    if max_line is not None:
        size = f"{max_line // MIB}M" if max_line % MIB == 0 else str(max_line)
        options += ["--max-line-length", size]
    command = [
        twistd_path(),
        "-n",
        "--pidfile=",
        "lineserver",
        *options,
        *options_for_lineserver,
    ]
    if kind.startswith("checkout:"):
        # Its lineserver and plugin come first on the path.
        command = ["env", f"PYTHONPATH={kind.removeprefix('checkout:')}", *command]
    return command


@contextmanager
def running_servers(
    harness: Harness,
    mode: str,
    name: str,
    stopped: Callable[[ServerProcess, ServerReport], None],
    sinks: Mapping[str, Path] | None = None,
    max_line: int | None = None,
    servers: Sequence[Column] | None = None,
    options_for_lineserver: Sequence[str] = (),
) -> Iterator[list[ServerProcess]]:
    """
    Start one server per column of C{harness} on a free port, each ready
    to accept, and stop them all on the way out.

    @param name: what the log files are named for (the mode or scenario).
    @param stopped: called with each server and its report as it stops.
    @param sinks: each column's sink file, in sink mode.
    @param max_line: see L{server_command}.
    @param servers: the servers to start, if not L{columns}C{(harness)}.
    @param options_for_lineserver: see L{server_command}.
    """
    with ExitStack() as stack:
        running: list[ServerProcess] = []
        for column in columns(harness) if servers is None else servers:
            label = column.label
            port = free_port()
            sink = None if sinks is None else sinks[label]
            server = ServerProcess(
                label,
                mode,
                port,
                server_command(
                    column.kind,
                    mode,
                    port,
                    sink,
                    max_line,
                    column.tls,
                    options_for_lineserver,
                ),
                harness.logs / f"{label}-{name}.log",
                harness.server_cpus,
                column.tls is not None,
            )

            def stop(server: ServerProcess = server) -> None:
                report = server.stop()
                if report is not None:
                    stopped(server, report)

            stack.callback(stop)
            server.start()
            running.append(server)
        yield running


def alternating(servers: list[T], rounds: int) -> Iterator[tuple[int, list[T]]]:
    """
    @return: each round's number, from 1, with the servers in the order
        they run in it: as started in odd rounds, reversed in even ones, so
        that neither always goes first.
    """
    for round_number in range(1, rounds + 1):
        yield round_number, servers if round_number % 2 else servers[::-1]


class Round(Protocol):
    """
    One round of one scenario against one server, as both harnesses record
    it.
    """

    scenario: str
    server: str
    round: int

    def figures(self) -> str:
        """
        @return: the round's figures for its progress line.
        """


def progress(harness: Harness, measured: Round) -> None:
    """
    Print one round's progress line.
    """
    print(
        f"  round {measured.round}/{harness.rounds} {measured.scenario:11} "
        f"{measured.server:16} {measured.figures()}",
        flush=True,
    )


def run_client(
    harness: Harness,
    server: ServerProcess,
    scenario: str,
    module: str,
    options: Sequence[str],
) -> tuple[dict[str, Any], float]:
    """
    One measurement: the client C{python -m module} in a fresh process
    against C{server}, with C{options} and the harness's timeout.

    @return: the JSON object the client printed (see L{client_main}), and
        the server's CPU seconds over the measurement.
    @raise BenchError: if the client or the server failed.
    """
    command = [
        sys.executable,
        "-m",
        module,
        "--host",
        HOST,
        "--port",
        str(server.port),
        *options,
        "--timeout",
        str(harness.timeout),
    ]
    cpu_before = proc_cpu_seconds(server.pid)
    try:
        result = _run_json(command, harness.timeout + 30, harness.client_cpus)
    except BenchError as e:
        server.check_alive()
        raise BenchError(
            f"{scenario} against {server.server}: {e}; see {server.log_path}"
        ) from None
    cpu = proc_cpu_seconds(server.pid) - cpu_before
    server.check_alive()
    return result, cpu


def _run_json(
    command: list[str], timeout: float, cpus: set[int] | None
) -> dict[str, Any]:
    try:
        done = subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            timeout=timeout,
            preexec_fn=pinning(cpus),
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"client did not finish: {' '.join(command)}") from None
    if done.returncode != 0:
        raise BenchError(done.stderr.decode(errors="replace").strip())
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def client_parser(
    prog: str, description: str, timeout: float
) -> argparse.ArgumentParser:
    """
    The command line of a client process, with the options L{run_client}
    gives every client: C{--host}, C{--port} and C{--timeout} (seconds).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=timeout)
    return parser


def client_main(
    name: str, measure: Callable[[], DataclassInstance], error: type[Exception]
) -> int:
    """
    The client side of L{run_client}: run C{measure} and print its result
    as one JSON object, or C{error} or an C{OSError} on stderr.

    @return: the exit status, 0 or 1.
    """
    try:
        result = measure()
    except (error, OSError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0
