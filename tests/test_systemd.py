"""Socket activation, for real: the units in contrib/systemd/, their
command line run under C{systemd-socket-activate}, and the C{systemd:}
endpoint through lineserver's listener.

C{systemd-socket-activate} (from the distribution's systemd package) does
what systemd does for C{lineserver.socket}: it binds and listens on the
socket, and runs the service with the socket as descriptor 3 and
C{LISTEN_FDS}, C{LISTEN_PID} and C{LISTEN_FDNAMES} set.  It then becomes
the service (it execs it), so it cannot hold the socket across a restart
as systemd's PID 1 does.  For the restart test a small shell plays that
part of PID 1: it is what C{systemd-socket-activate} runs, it keeps
descriptor 3 open, and it starts the unit's command twice, each time with
C{LISTEN_PID} set to the new process (as systemd sets it).  Between the
two runs no lineserver process exists at all, and the test proves that
clients connecting then are not refused: they wait in the kernel's queue
and the second run serves them.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import configparser
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.listener import InheritedEndpoint
from lineserver.systemd_sockets import missing_socket
from tests.support import (
    TWISTD,
    Peer,
    _lower_nofile,
    connect,
    free_port,
    proxy_v1,
    reactor,
    read_to_eof,
    temp_dir,
    wait_until,
)

UNITS = Path(__file__).parent.parent / "contrib" / "systemd"
SERVICE = UNITS / "lineserver.service"
SOCKET = UNITS / "lineserver.socket"
#: Where the unit expects the checkout's twistd; the tests run this one.
INSTALLED_TWISTD = "/opt/lineserver/.venv/bin/twistd"

#: Plays PID 1 across a restart: run the command, wait for the go file,
#: run it again; each run gets LISTEN_PID = its own pid (the inner shell
#: execs the command, so the pid is the command's) and writes its pid to
#: run-N.pid.  The wait is bounded (60 s) in case the test dies.
RESTARTER = r"""
go=$1; shift
run() {
    n=$1; shift
    sh -c 'echo $$ > "run-$0.pid"; export LISTEN_PID=$$; exec "$@"' "$n" "$@"
}
run 1 "$@"
i=0
while [ ! -e "$go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
run 2 "$@"
"""


def activate() -> str:
    """
    @return: the path of systemd-socket-activate (make test installs it).
    """
    found = shutil.which("systemd-socket-activate")
    if found is None:
        raise AssertionError(
            "systemd-socket-activate is missing: make system-tools installs it "
            "(apt-get install systemd)"
        )
    return found


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(path)
    return parser


def service_command() -> list[str]:
    """
    The unit's C{ExecStart}, with this checkout's twistd.
    """
    words = shlex.split(unit(SERVICE)["Service"]["ExecStart"])
    if words[0] != INSTALLED_TWISTD:
        raise AssertionError(f"ExecStart runs {words[0]}, not {INSTALLED_TWISTD}")
    return [str(TWISTD), *words[1:]]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


class Activated:
    """
    The service's command under C{systemd-socket-activate}, on a free
    loopback port, in a fresh working directory (the unit's
    C{WorkingDirectory}); its log (stdout, the journal under systemd) goes
    to C{service.log} there.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        *extra: str,
        restart: bool = False,
        replace: bool = False,
        nofile: int | None = None,
    ) -> None:
        """
        @param nofile: a soft C{RLIMIT_NOFILE} for the service.
        @param extra: more options for the command.
        @param replace: C{extra} is C{--port DESCRIPTION}, to take the place
            of the unit's own C{--port}.
        """
        self.dir = Path(temp_dir(case))
        self.port = free_port()
        self.go = self.dir / "go"
        self.log_path = self.dir / "service.log"
        self.activate_log = self.dir / "activate.log"
        name = unit(SOCKET)["Socket"]["FileDescriptorName"]
        command = [
            activate(),
            f"--fdname={name}",
            "--listen",
            f"127.0.0.1:{self.port}",
        ]
        if restart:
            command += ["sh", "-c", RESTARTER, "restarter", str(self.go)]
        service = service_command()
        if replace:
            at = service.index("--port")
            service[at : at + 2] = extra[:2]
            extra = extra[2:]
        command += [*service, *extra]
        with open(self.log_path, "wb") as out, open(self.activate_log, "wb") as err:
            self.proc = subprocess.Popen(
                command,
                cwd=self.dir,
                stdout=out,
                stderr=err,
                preexec_fn=None if nofile is None else partial(_lower_nofile, nofile),
            )
        case.addCleanup(self.kill)
        wait_until(
            lambda: "Listening on" in self.activate_log.read_text(),
            "systemd-socket-activate to listen",
            timeout=15,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[bytes]:
        path = self.dir / "lines.log"
        return path.read_bytes().splitlines() if path.exists() else []

    def run_pid(self, run: int) -> int:
        path = self.dir / f"run-{run}.pid"
        wait_until(path.exists, f"run {run} to start", timeout=15)
        wait_until(lambda: path.read_text().strip() != "", f"run {run}'s pid")
        return int(path.read_text())

    def wait_listening(self, runs: int) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited with {self.proc.returncode}:\n{self.log()[-3000:]}\n"
                    f"{self.activate_log.read_text()[-2000:]}"
                )
            return self.log().count("listening on systemd:") >= runs

        wait_until(listening, f"run {runs} to listen", timeout=30)

    def wait_lines(self, expected: list[bytes]) -> None:
        wait_until(
            lambda: sorted(self.lines()) == sorted(expected),
            f"{len(expected)} lines in the sink (have {len(self.lines())})",
            timeout=30,
        )

    def stop(self, pid: int | None = None) -> None:
        os.kill(pid or self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        for run in (1, 2):
            path = self.dir / f"run-{run}.pid"
            if path.exists() and path.read_text().strip():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(path.read_text()), signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent has not reaped it yet).
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def send_and_close(port: int, line: bytes) -> None:
    """
    Connect (a refused connection raises), send one line, close.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(line + b"\n")


class SocketActivationTests(SynchronousTestCase):
    def test_served_on_the_inherited_socket(self) -> None:
        """
        The unit's command line, run as systemd runs it on the socket
        unit's descriptor, serves the connection that caused the start
        (made before any lineserver process existed), and says where it
        listens.
        """
        service = Activated(self)
        send_and_close(service.port, b"first")
        service.wait_listening(1)
        service.wait_lines([b"first"])
        self.assertIn(
            f"listening on systemd:domain=INET:name=lines "
            f"(IPv4Address(type='TCP', host='127.0.0.1', port={service.port}))",
            service.log(),
        )
        service.stop()
        self.assertEqual(service.proc.wait(30), -signal.SIGTERM, service.log())
        self.assertIn("stopped: 1 line(s) delivered", service.log())

    def test_restart_refuses_no_connection(self) -> None:
        """
        Clients that connect while lineserver stops, and while no
        lineserver runs at all, are not refused: they wait in the kernel's
        queue on the socket systemd holds, and the next run serves every
        line they sent.
        """
        service = Activated(self, restart=True)
        send_and_close(service.port, b"run-1")
        service.wait_listening(1)
        service.wait_lines([b"run-1"])
        first = service.run_pid(1)
        service.stop(first)
        sent = [b"run-1"]
        for index in range(5):  # during the ordered stop
            line = f"stopping-{index}".encode()
            send_and_close(service.port, line)
            sent.append(line)
        wait_until(lambda: not alive(first), "run 1 to exit", timeout=30)
        self.assertFalse((service.dir / "run-2.pid").exists())
        for index in range(20):  # no lineserver process exists now
            line = f"between-{index}".encode()
            send_and_close(service.port, line)
            sent.append(line)
        self.assertFalse((service.dir / "run-2.pid").exists())
        service.go.touch()
        second = service.run_pid(2)
        service.wait_listening(2)
        service.wait_lines(sent)
        service.stop(second)
        self.assertEqual(service.proc.wait(30), 128 + signal.SIGTERM, service.log())
        self.assertEqual(service.log().count("stopped: "), 2, service.log())

    def test_connection_limit_holds_clients_in_the_queue(self) -> None:
        """
        The listener's gate works on the inherited socket: at
        C{--max-connections} the next client waits unserved, and is served
        once a slot frees.
        """
        service = Activated(self, "--max-connections", "1")
        first = Peer(service.port, send=b"one\n")
        self.addCleanup(first.close)
        service.wait_lines([b"one"])
        second = Peer(service.port, send=b"two\n")
        self.addCleanup(second.close)
        self.assertEqual(second.silent_for(1.0), b"")
        self.assertEqual(service.lines(), [b"one"])
        first.close()
        service.wait_lines([b"one", b"two"])
        service.stop()
        self.assertEqual(service.proc.wait(30), -signal.SIGTERM, service.log())

    def held_then_served(self, service: Activated, paused: str) -> None:
        """
        80 clients connect and send a line each; the server, short of
        descriptors, stops accepting (it logs C{paused}); the clients it
        did not take wait in the socket's queue and are served once 40
        clients leave.
        """
        clients = []
        sent = []
        for index in range(80):
            line = f"client-{index}".encode()
            clients.append(Peer(service.port, send=line + b"\n"))
            self.addCleanup(clients[-1].close)
            sent.append(line)
        wait_until(lambda: paused in service.log(), repr(paused), timeout=30)
        self.assertLess(len(service.lines()), len(sent))
        for client in clients[:40]:
            client.close()
        service.wait_lines(sent)
        service.stop()
        self.assertEqual(service.proc.wait(30), -signal.SIGTERM, service.log())

    def test_descriptor_watermark_holds_clients_in_the_queue(self) -> None:
        """
        The descriptor watermark works on the inherited socket: with a
        soft limit of 96 descriptors and C{--fd-reserve 32}, the server
        stops accepting at 64 open, and accepts again once clients leave.
        """
        service = Activated(self, "--fd-reserve", "32", nofile=96)
        self.held_then_served(service, "at the watermark 64: pausing accept")
        self.assertIn("accepting again", service.log())

    def test_accept_guard_holds_clients_in_the_queue(self) -> None:
        """
        The accept guard works on the inherited socket: with no watermark
        (C{--fd-reserve 0}), accept() failing with EMFILE pauses accepting
        with a backoff instead of spinning, and the waiting clients are
        served once descriptors free up.
        """
        service = Activated(self, "--fd-reserve", "0", nofile=64)
        self.held_then_served(service, "accept failed with EMFILE")

    def test_proxy_protocol_on_the_inherited_socket(self) -> None:
        """
        C{haproxy:systemd:...}: the PROXY header is read on the inherited
        socket, and the line after it is delivered.
        """
        service = Activated(
            self, "--port", "haproxy:systemd:domain=INET:name=lines", replace=True
        )
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as c:
            c.sendall(proxy_v1("192.0.2.7", 4711, service.port) + b"proxied\n")
        service.wait_lines([b"proxied"])
        # The close's log line names the peer the header gave; the line may
        # be in the file before the server has seen the close.
        wait_until(lambda: "192.0.2.7" in service.log(), "the close logged")
        service.stop()
        self.assertEqual(service.proc.wait(30), -signal.SIGTERM, service.log())


class UnitFileTests(SynchronousTestCase):
    def test_units_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing to say about the units
        (with ExecStart pointing at this checkout's twistd, which must
        exist for it).
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise AssertionError("systemd-analyze is missing (apt-get install systemd)")
        directory = Path(temp_dir(self))
        for path in (SERVICE, SOCKET):
            text = path.read_text().replace(INSTALLED_TWISTD, str(TWISTD))
            (directory / path.name).write_text(text)
        result = subprocess.run(
            [
                analyze,
                "verify",
                str(directory / SOCKET.name),
                str(directory / SERVICE.name),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.gettempdir(),
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_stop_timeout_outlasts_the_shutdown_timeout(self) -> None:
        """
        systemd's SIGKILL comes well after lineserver's own deadline for
        an ordered stop, so a slow drain is never cut short by systemd.
        """
        service = unit(SERVICE)["Service"]
        shutdown = float(option(service_command(), "--shutdown-timeout"))
        self.assertGreaterEqual(float(service["TimeoutStopSec"]), shutdown + 5)
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual(service["KillSignal"], "SIGTERM")


class InheritedEndpointTests(TestCase):
    """
    An inherited listening socket can be listened on again after a stop,
    which Twisted's own adopted endpoint cannot (it closes the descriptor).
    """

    def setUp(self) -> None:
        self.inherited = socket.socket()
        self.addCleanup(self.inherited.close)
        self.inherited.bind(("127.0.0.1", 0))
        self.inherited.listen(16)
        self.port_number = self.inherited.getsockname()[1]

    @inlineCallbacks
    def served_once(
        self, endpoint: InheritedEndpoint
    ) -> Generator[Deferred[Any], Any, None]:
        factory = Factory.forProtocol(Protocol)
        port: IListeningPort = yield endpoint.listen(factory)
        client = yield connect(self.port_number)
        self.assertIsNotNone(client.transport)
        client.transport.loseConnection()
        yield maybeDeferred(port.stopListening)

    @inlineCallbacks
    def test_listens_twice(self) -> Generator[Deferred[Any], Any, None]:
        """
        Listen, stop, listen again on the same inherited socket: both
        serve, and the inherited descriptor stays open throughout.
        """
        endpoint = InheritedEndpoint(reactor, self.inherited.fileno(), socket.AF_INET)
        yield self.served_once(endpoint)
        yield self.served_once(endpoint)
        self.assertEqual(self.inherited.getsockname()[1], self.port_number)
        # While nobody listens through Twisted, a client still connects.
        socket.create_connection(("127.0.0.1", self.port_number), timeout=5).close()


#: Runs as the service under systemd-socket-activate: serves /metrics on
#: the inherited socket (C{--metrics systemd:...}'s service), scrapes it,
#: stops the service, starts it again and scrapes again; one line per run.
RELISTEN_METRICS = r"""
import sys
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, task
from twisted.web.client import Agent, readBody
from lineserver.metrics import MetricsService

@defer.inlineCallbacks
def main(reactor):
    url = f"http://127.0.0.1:{sys.argv[1]}/metrics".encode()
    registry = CollectorRegistry()
    Counter("probe", "Proves the page is ours.", registry=registry).inc()
    service = MetricsService("systemd:domain=INET:index=0", registry, reactor)
    service.privilegedStartService()
    for run in (1, 2):
        service.startService()
        yield service.when_listening()
        response = yield Agent(reactor).request(b"GET", url)
        body = yield readBody(response)
        print(f"run {run}: {response.code} {b'probe_total 1.0' in body}", flush=True)
        yield service.stopService()

task.react(main)
"""


class InheritedMetricsTests(SynchronousTestCase):
    def test_metrics_listen_again_after_a_stop(self) -> None:
        """
        The metrics service on an inherited socket (C{--metrics
        systemd:domain=INET:index=0}) serves, stops, and serves again on
        the same socket: it is built as line ports are, through
        L{lineserver.listener.server_endpoint}.  (Built with Twisted's
        C{serverFromString}, as it was, this test times out: Twisted's
        endpoint closes the inherited descriptor once it adopted it.)
        """
        work = Path(temp_dir(self))
        port = free_port()
        out, err = work / "out.log", work / "err.log"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [
                    activate(),
                    # Twisted takes inherited sockets only when named.
                    "--fdname=metrics",
                    "--listen",
                    f"127.0.0.1:{port}",
                    sys.executable,
                    "-c",
                    RELISTEN_METRICS,
                    str(port),
                ],
                cwd=work,
                stdout=stdout,
                stderr=stderr,
            )

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

        self.addCleanup(stop)
        wait_until(
            lambda: "Listening on" in err.read_text(),
            "systemd-socket-activate to listen",
            timeout=15,
        )
        # The first client starts the service, and is served by it.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = read_to_eof(client, timeout=30)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:200])
        self.assertIn(b"probe_total 1.0", answer)
        wait_until(
            lambda: proc.poll() is not None,
            f"two runs (so far: {out.read_text()!r}, {err.read_text()[-2000:]!r})",
            timeout=60,
        )
        self.assertEqual(proc.returncode, 0, err.read_text()[-3000:])
        self.assertEqual(
            out.read_text().splitlines(), ["run 1: 200 True", "run 2: 200 True"]
        )


class MissingSocketTests(SynchronousTestCase):
    """
    A C{systemd:} port with no such socket passed is a usage error that
    says why, as a user running twistd meets it.
    """

    def usage_error(self, done: subprocess.CompletedProcess[str]) -> str:
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("out of range", output)
        return [line for line in output.splitlines() if line.strip()][-1]

    def test_twistd_without_systemd(self) -> None:
        """
        C{twistd -n lineserver --port systemd:domain=INET:index=0} run from
        a shell: no socket was passed, and the message says so.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        done = subprocess.run(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                "lineserver",
                "--port",
                "systemd:domain=INET:index=0",
            ],
            cwd=temp_dir(self),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        last = self.usage_error(done)
        self.assertIn("--port systemd:domain=INET:index=0", last)
        self.assertIn(
            "no socket passed by systemd: LISTEN_FDS and LISTEN_PID are not set",
            last,
        )

    def test_index_beyond_the_sockets_passed(self) -> None:
        """
        Under C{systemd-socket-activate} with one socket, C{index=1} is a
        usage error saying one socket was passed; the process exits 1.
        """
        service = Activated(self, "--port", "systemd:domain=INET:index=1", replace=True)
        # systemd-socket-activate starts the service on the first client.
        with contextlib.suppress(OSError):
            send_and_close(service.port, b"wake")
        wait_until(lambda: service.proc.poll() is not None, "the exit", timeout=30)
        # The service's output last: the activator's own lines come first.
        done = subprocess.CompletedProcess(
            [], service.proc.returncode, service.activate_log.read_text(), service.log()
        )
        last = self.usage_error(done)
        self.assertIn(
            "systemd passed 1 socket(s) (index 0 to 0); index=1 asks for the 2nd",
            last,
        )

    def test_messages(self) -> None:
        """
        Each way of passing no such socket has its own message; a socket
        that was passed, or a description that is not C{systemd:}, none.
        """
        pid = 4242
        passed = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        cases: list[tuple[str, dict[str, str], str | None]] = [
            ("tcp:4040", {}, None),
            (
                "systemd:domain=INET:index=0",
                {},
                "LISTEN_FDS and LISTEN_PID are not set",
            ),
            (
                "haproxy:systemd:domain=INET:name=a",
                {},
                "LISTEN_FDS and LISTEN_PID are not set",
            ),
            (
                "systemd:domain=INET:index=0",
                {**passed, "LISTEN_PID": "1"},
                "LISTEN_PID is 1, this process is 4242",
            ),
            (
                "systemd:domain=INET:index=0",
                {"LISTEN_PID": "4242", "LISTEN_FDS": "2"},
                "LISTEN_FDNAMES=None",
            ),
            ("systemd:domain=INET:index=1", passed, None),
            (
                "systemd:domain=INET:index=2",
                passed,
                "systemd passed 2 socket(s) (index 0 to 1); index=2 asks for the 3rd",
            ),
            ("systemd:domain=INET:name=b", passed, None),
            (
                "systemd:domain=INET:name=c",
                passed,
                "systemd passed no socket named 'c' (FileDescriptorName=); "
                "it passed 'a', 'b'",
            ),
        ]
        for description, environ, expected in cases:
            found = missing_socket(description, environ, pid)
            if expected is None:
                self.assertIsNone(found, description)
            else:
                self.assertIsNotNone(found, description)
                self.assertIn(expected, str(found), (description, environ))
