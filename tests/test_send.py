"""C{lineserver-send}: the console script, against real servers.

The ACK paths run against L{tests.ack_peer.AckPeer}, a real loopback
server speaking the server side of C{--ack} (the script runs as a real
process, or in-process through L{lineserver.send.run}); the paths without
ACKs run against a real C{twistd -n lineserver} with a file sink.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lineserver.send import Options, endpoint_for, run, split_host_port
from tests.ack_peer import AckPeer, first_arrivals, peer_cleanup
from tests.certs import make_pki
from tests.support import (
    ServerProcess,
    eventually,
    free_port,
    later,
    reactor,
    temp_dir,
    wait_until,
)

#: The console script installed beside this Python.
SEND = Path(sys.executable).with_name("lineserver-send")


def lines_file(
    directory: str, count: int, name: str = "in.txt"
) -> tuple[Path, list[bytes]]:
    lines = [b"line %07d %s" % (i, b"x" * (i % 50)) for i in range(count)]
    path = Path(directory, name)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path, lines


def send_process(
    *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(SEND), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


class OptionsTests(SynchronousTestCase):
    def test_host_port(self) -> None:
        self.assertEqual(split_host_port("example.org:4040"), ("example.org", 4040))
        self.assertEqual(split_host_port("[::1]:4040"), ("::1", 4040))
        for bad in ("4040", "host:", "host:x"):
            with self.subTest(bad=bad):
                self.assertRaises(usage.UsageError, split_host_port, bad)

    def test_usage_errors(self) -> None:
        for argv in (
            [],
            ["--window", "0", "h:1"],
            ["--tls", "--starttls", "h:1"],
            ["--key", "k.pem", "h:1"],
            ["--auth-token-file", "/nonexistent/token", "h:1"],
        ):
            with self.subTest(argv=argv):
                self.assertRaises(usage.UsageError, Options().parseOptions, argv)

    def test_endpoint_usage_errors(self) -> None:
        """
        An C{ssl:} endpoint (which would not check the server) and TLS
        flags with an endpoint string (which says its own TLS) are refused.
        """
        for argv, why in (
            (["ssl:h:1"], "do not check the server's certificate"),
            (["--tls", "tcp:h:1"], "--tls/--starttls go with HOST:PORT"),
        ):
            with self.subTest(argv=argv):
                options = Options()
                options.parseOptions(argv)
                error = self.assertRaises(
                    usage.UsageError, endpoint_for, reactor, options
                )
                self.assertIn(why, str(error))

    def test_usage_exit_status(self) -> None:
        """
        A usage error exits 2 with the synopsis, before any connection.
        """
        result = send_process("--window", "0", "127.0.0.1:1")
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"--window must be at least 1", result.stderr)
        self.assertIn(b"lineserver-send [options]", result.stderr)


class AckTests(TestCase):
    """
    C{--ack} against a real loopback server that acknowledges, stalls,
    drops and restarts.
    """

    timeout = 120

    def setUp(self) -> None:
        self.dir = temp_dir(self)

    async def peer(self) -> AckPeer:
        peer = AckPeer()
        await peer.start()
        self.addCleanup(peer_cleanup, peer)
        return peer

    async def send(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        status = await run(reactor, list(argv), err)
        return status, err.getvalue()

    async def test_all_acknowledged(self) -> None:
        peer = await self.peer()
        path, lines = lines_file(self.dir, 20_000)
        status, err = await self.send("--ack", f"127.0.0.1:{peer.port}", str(path))
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(peer.acknowledged, lines)
        self.assertEqual(peer.received, lines)  # nothing resent without a fault

    async def test_drop_mid_stream(self) -> None:
        """
        The connection drops with lines read but not acknowledged: the
        sender reconnects, resends them, and exits 0 once all are
        acknowledged; the server acknowledged each line once, in order.
        """
        peer = await self.peer()
        path, lines = lines_file(self.dir, 30_000)
        peer.drop_after = 12_345
        status, err = await self.send("--ack", f"127.0.0.1:{peer.port}", str(path))
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(peer.dropped, 1)
        # Every line acknowledged, in order; a line twice only where the
        # drop threw its ACK away before the sender could read it.
        self.assertEqual(first_arrivals(peer.acknowledged), lines)
        self.assertGreater(len(peer.received), len(lines))

    async def test_window_bounds_what_is_read(self) -> None:
        """
        While the server acknowledges nothing, no more than C{--window}
        lines are sent; once it acknowledges, the rest follow.
        """
        peer = await self.peer()
        peer.stalled = True
        path, lines = lines_file(self.dir, 5000)
        sending = Deferred.fromCoroutine(
            self.send("--ack", "--window", "100", f"127.0.0.1:{peer.port}", str(path))
        )
        await eventually(lambda: len(peer.received) == 100, "the first window")
        await later(0.5)
        self.assertEqual(len(peer.received), 100)
        self.assertNoResult(sending)
        peer.resume()
        status, err = await sending
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(peer.acknowledged, lines)

    async def test_permanent_error(self) -> None:
        peer = await self.peer()
        peer.refuse = b"ERR unauthorized"
        path, _ = lines_file(self.dir, 10)
        status, err = await self.send("--ack", f"127.0.0.1:{peer.port}", str(path))
        self.assertEqual(status, 1)
        self.assertIn("the server refused: ERR unauthorized", err)
        self.assertEqual(peer.received, [])

    async def test_give_up_without_progress(self) -> None:
        peer = await self.peer()
        peer.stalled = True
        path, _ = lines_file(self.dir, 10)
        started = time.monotonic()
        status, err = await self.send(
            "--ack", "--give-up", "1", f"127.0.0.1:{peer.port}", str(path)
        )
        self.assertEqual(status, 1)
        self.assertIn(
            "no progress for 1 seconds; giving up with 0 of 10 lines acknowledged", err
        )
        self.assertLess(time.monotonic() - started, 30)

    async def test_auth_token(self) -> None:
        peer = await self.peer()
        peer.auth_token = b"sesame"
        token = Path(self.dir, "token")
        token.write_text("sesame\n")
        path, lines = lines_file(self.dir, 100)
        status, err = await self.send(
            "--ack",
            "--auth-token-file",
            str(token),
            f"127.0.0.1:{peer.port}",
            str(path),
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(peer.acknowledged, lines)

    async def test_script_survives_server_restart(self) -> None:
        """
        The console script, from standard input, while the server goes
        away for a second and comes back on the same port: it reconnects,
        resends what was not acknowledged, and exits 0.
        """
        peer = await self.peer()
        peer.stalled = True
        _, lines = lines_file(self.dir, 50_000)
        data = b"".join(line + b"\n" for line in lines)
        running = deferToThread(
            send_process,
            "--ack",
            "--window",
            "20000",
            f"127.0.0.1:{peer.port}",
            "-",
            stdin=data,
        )
        await eventually(
            lambda: len(peer.received) >= 1000, "lines before the restart", 30
        )
        await peer.stop()
        await later(1.0)
        peer.stalled = False
        await peer.start()
        result: Any = await running
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(peer.acknowledged, lines)
        self.assertGreater(len(peer.received), len(lines))


class TwistdTests(SynchronousTestCase):
    """
    Without C{--ack}, against a real C{twistd -n lineserver}.
    """

    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def server(
        self, *args: str, listen: str | None = None, port: int | None = None
    ) -> tuple[ServerProcess, Path]:
        cwd = Path(self.dir, f"server{len(os.listdir(self.dir))}")
        cwd.mkdir()
        out = cwd / "out.log"
        server = ServerProcess(
            str(cwd), "--sink", f"file:{out}", *args, listen=listen, port=port
        )
        self.addCleanup(server.kill)
        server.wait_listening()
        return server, out

    def wait_lines(self, out: Path, count: int) -> list[bytes]:
        wait_until(
            lambda: out.exists() and out.read_bytes().count(b"\n") >= count,
            f"{count} lines in the sink",
            timeout=60,
        )
        return out.read_bytes().splitlines()

    def test_file(self) -> None:
        server, out = self.server()
        path, lines = lines_file(self.dir, 200_000)
        result = send_process(f"127.0.0.1:{server.port}", str(path))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, b"")
        self.assertEqual(self.wait_lines(out, len(lines)), lines)

    def test_stdin_and_endpoint_string(self) -> None:
        server, out = self.server()
        _, lines = lines_file(self.dir, 1000)
        data = b"".join(line + b"\n" for line in lines) + b"no newline at the end"
        result = send_process(f"tcp:host=127.0.0.1:port={server.port}", "-", stdin=data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            self.wait_lines(out, len(lines) + 1), [*lines, b"no newline at the end"]
        )

    def test_refused_token(self) -> None:
        """
        A real server with C{--auth-tokens} refuses a wrong token: exit 1,
        the server's error named, nothing delivered.
        """
        tokens = Path(self.dir, "tokens")
        tokens.write_text("sesame\n")
        wrong = Path(self.dir, "wrong")
        wrong.write_text("open-up\n")
        server, out = self.server("--auth-tokens", str(tokens))
        path, _ = lines_file(self.dir, 10)
        result = send_process(
            "--auth-token-file", str(wrong), f"127.0.0.1:{server.port}", str(path)
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"the server refused: ERR unauthorized", result.stderr)
        self.assertFalse(out.exists() and out.read_bytes())

    def test_token_and_starttls(self) -> None:
        """
        C{--starttls} with a token against a server with C{--starttls
        --require-tls --auth-tokens}: every line arrives.
        """
        pki = make_pki(Path(self.dir, "pki"))
        tokens = Path(self.dir, "tokens")
        tokens.write_text("sesame\n")
        server, out = self.server(
            "--starttls",
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--require-tls",
            "--auth-tokens",
            str(tokens),
        )
        path, lines = lines_file(self.dir, 5000)
        result = send_process(
            "--starttls",
            "--ca",
            str(pki.ca_cert),
            "--server-name",
            "localhost",
            "--auth-token-file",
            str(tokens),
            f"127.0.0.1:{server.port}",
            str(path),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.wait_lines(out, len(lines)), lines)

    def test_tls_with_client_certificate(self) -> None:
        """
        C{--tls} to an C{ssl:} port that requires a client certificate.
        """
        pki = make_pki(Path(self.dir, "pki"))
        port = free_port()
        listen = (
            f"ssl:{port}:privateKey={pki.server_key}:certKey={pki.server_cert}"
            ":interface=127.0.0.1"
        )
        _, out = self.server(
            "--tls-client-ca", str(pki.ca_cert), listen=listen, port=port
        )
        path, lines = lines_file(self.dir, 50_000)
        result = send_process(
            "--tls",
            "--ca",
            str(pki.ca_cert),
            "--server-name",
            "localhost",
            "--cert",
            str(pki.client_cert),
            "--key",
            str(pki.client_key),
            f"127.0.0.1:{port}",
            str(path),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.wait_lines(out, len(lines)), lines)

    def test_server_killed_mid_stream(self) -> None:
        """
        Without C{--ack}, the server killed while lines are still coming:
        exit 1, saying that which lines arrived is unknown.
        """
        server, out = self.server()
        sender = subprocess.Popen(
            [str(SEND), f"127.0.0.1:{server.port}", "-"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(sender.kill)
        assert sender.stdin is not None
        sender.stdin.write(b"before\n" * 100)
        sender.stdin.flush()
        self.wait_lines(out, 100)
        server.kill()
        try:
            sender.stdin.write(b"after\n" * 100)
            sender.stdin.close()
        except BrokenPipeError:
            pass  # it may have noticed the loss and exited already
        assert sender.stderr is not None
        err = sender.stderr.read()
        self.assertEqual(sender.wait(60), 1, err)
        self.assertIn(b"the connection was lost; without --ack it is unknown", err)

    def test_server_gone(self) -> None:
        """
        Without C{--ack}, nothing listening: exit 1 after C{--give-up}.
        """
        path, _ = lines_file(self.dir, 10)
        result = send_process("--give-up", "1", f"127.0.0.1:{free_port()}", str(path))
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"no progress for 1 seconds", result.stderr)
        self.assertIn(
            b"(last connection attempt: Connection was refused", result.stderr
        )
