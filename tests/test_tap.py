"""Tests for L{lineserver.tap}: the command line of C{twistd lineserver}.

Options are checked in process; what a user sees (exit status, the last
line of output, standard output as a sink) through a real twistd.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import platform
import re
import select
import signal
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python import usage

# twistd's options for this platform: public, but chosen at import time,
# which hides the name from mypy.
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SynchronousTestCase

from lineserver.tap import (
    Options,
    config_from_options,
    default_port,
    parse_size,
    version_text,
)
from tests.support import TWISTD, ServerProcess, free_port, temp_dir


def without_port_variable(case: SynchronousTestCase) -> None:
    """
    Take C{PORT} out of the environment for this test, so defaults are the
    embedded ones wherever the suite runs.
    """
    saved = os.environ.pop("PORT", None)
    if saved is not None:
        case.addCleanup(os.environ.__setitem__, "PORT", saved)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        without_port_variable(self)

    def test_defaults(self) -> None:
        """
        With no arguments: sink mode into file:lines.log on
        127.0.0.1:4040, and every documented default, converted.
        """
        options = parse()
        self.assertEqual(options["ports"], ["tcp:4040:interface=127.0.0.1"])
        self.assertEqual(options["mode"], "sink")
        self.assertEqual(options["sink"], "file:lines.log")
        self.assertEqual(options["max-line-length"], 65536)
        self.assertIsNone(options["max-connections"])
        self.assertIsNone(options["max-connections-per-peer"])
        self.assertEqual(options["overflow"], "wait")
        self.assertEqual(options["backlog"], 1024)
        self.assertIsNone(options["idle-timeout"])
        self.assertIsNone(options["line-timeout"])
        self.assertEqual(options["shutdown-timeout"], 10.0)
        self.assertEqual(options["high-watermark"], 4 << 20)
        self.assertEqual(options["low-watermark"], 1 << 20)
        self.assertEqual(options["max-restarts"], 5)
        self.assertEqual(options["restart-period"], 10.0)
        self.assertEqual(options["tcp-keepalive"], 300.0)

    def test_repeatable_port(self) -> None:
        """
        C{--port} (and C{-p}) may be given several times; each is kept, in
        order, and the default is not added.
        """
        options = parse("--port", "tcp:1:interface=127.0.0.1", "-p", "unix:/tmp/x")
        self.assertEqual(options["ports"], ["tcp:1:interface=127.0.0.1", "unix:/tmp/x"])

    def test_size_suffixes(self) -> None:
        """
        Sizes take K and M suffixes (binary multiples).
        """
        options = parse(
            "--max-line-length",
            "64K",
            "--high-watermark",
            "2M",
            "--low-watermark",
            "512k",
        )
        self.assertEqual(options["max-line-length"], 65536)
        self.assertEqual(options["high-watermark"], 2 << 20)
        self.assertEqual(options["low-watermark"], 512 << 10)

    def test_values_converted(self) -> None:
        """
        Numbers and seconds arrive as numbers.
        """
        options = parse(
            "--mode",
            "echo",
            "--max-connections",
            "7",
            "--idle-timeout",
            "2.5",
            "--overflow",
            "reject",
            "--backlog",
            "10",
        )
        self.assertEqual(options["mode"], "echo")
        self.assertEqual(options["max-connections"], 7)
        self.assertEqual(options["idle-timeout"], 2.5)
        self.assertEqual(options["overflow"], "reject")
        self.assertEqual(options["backlog"], 10)

    def test_bad_values_name_the_option(self) -> None:
        """
        Every bad value raises UsageError whose message starts with the
        option's name.
        """
        cases = [
            (["--mode", "bogus"], "--mode"),
            (["--max-line-length", "abc"], "--max-line-length"),
            (["--max-line-length", "0"], "--max-line-length"),
            (["--high-watermark", "1M", "--low-watermark", "1M"], "--low-watermark"),
            (["--high-watermark", "1M", "--low-watermark", "2M"], "--low-watermark"),
            (["--idle-timeout", "nan"], "--idle-timeout"),
            (["--idle-timeout", "inf"], "--idle-timeout"),
            (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
            (["--sink", "ftp:x"], "--sink"),
            (["--overflow", "x"], "--overflow"),
            (["--backlog", "-1"], "--backlog"),
            (["--max-connections", "0"], "--max-connections"),
            (["--max-connections-per-peer", "x"], "--max-connections-per-peer"),
            (["--max-restarts", "1.5"], "--max-restarts"),
            (["--tcp-keepalive", "-1"], "--tcp-keepalive"),
            (["--tcp-keepalive", "soon"], "--tcp-keepalive"),
            (["--port", "tcp:70000"], "--port"),
            (["--port", "bogus:1"], "--port"),
        ]
        for args, name in cases:
            with self.assertRaises(usage.UsageError, msg=repr(args)) as caught:
                parse(*args)
            self.assertTrue(
                str(caught.exception).startswith(name + ":"),
                f"{args}: {caught.exception}",
            )

    def test_tcp_keepalive(self) -> None:
        """
        C{--tcp-keepalive} reaches the protocol settings in seconds; 0
        turns keepalive off (None there).
        """
        cases = [(None, 300.0), ("45", 45.0), ("0.5", 0.5), ("0", None)]
        for value, expected in cases:
            args = [] if value is None else ["--tcp-keepalive", value]
            protocol_settings = config_from_options(parse(*args)).settings
            self.assertEqual(protocol_settings.tcp_keepalive, expected, value)

    def test_unusable_tls_port(self) -> None:
        """
        An C{ssl:} port whose key file is missing is refused at once,
        naming the port and the file; nothing listens to find out.
        """
        with self.assertRaises(usage.UsageError) as caught:
            parse("--port", "ssl:0:privateKey=/nonexistent/key.pem")
        message = str(caught.exception)
        self.assertTrue(message.startswith("--port ssl:0:"), message)
        self.assertIn("/nonexistent/key.pem", message)


class SinkOptionTests(SynchronousTestCase):
    """
    C{--sink}: given at most once, only in sink mode, with known options
    and a usable path; refusing it leaves no trace on disk.
    """

    def setUp(self) -> None:
        without_port_variable(self)
        self.dir = temp_dir(self)

    def refused(self, *args: str) -> str:
        """
        @return: the usage error's message, after checking it names --sink
            and that parsing created nothing.
        """
        with self.assertRaises(usage.UsageError) as caught:
            parse(*args)
        message = str(caught.exception)
        self.assertTrue(message.startswith("--sink:"), message)
        self.assertEqual(os.listdir(self.dir), [])
        return message

    def test_default_and_explicit(self) -> None:
        """
        Without C{--sink} lines go to file:lines.log, in sink mode only;
        echo mode does not mind the default.  C{-s} is C{--sink}.
        """
        self.assertEqual(parse()["sink"], "file:lines.log")
        self.assertEqual(parse("--mode", "echo")["mode"], "echo")
        path = os.path.join(self.dir, "out.log")
        self.assertEqual(parse("-s", f"file:{path}")["sink"], f"file:{path}")
        self.assertEqual(os.listdir(self.dir), [])

    def test_given_twice(self) -> None:
        """
        A second C{--sink} (or C{-s}) is refused, naming both, instead of
        the last one silently winning.
        """
        message = self.refused("--sink", "null:", "-s", "stdout:")
        self.assertIn("given twice", message)
        self.assertIn("'null:'", message)
        self.assertIn("'stdout:'", message)
        self.refused("--sink", "null:", "--sink", "null:")

    def test_in_echo_mode(self) -> None:
        """
        C{--sink} with C{--mode echo} is refused, whichever comes first.
        """
        for args in (
            ("--mode", "echo", "--sink", "null:"),
            ("--sink", "null:", "-m", "echo"),
        ):
            self.assertIn("--mode echo", self.refused(*args))

    def test_unknown_option(self) -> None:
        """
        A misspelt URL option is refused, naming it and the known ones; a
        scheme without options says so.
        """
        path = os.path.join(self.dir, "x.log")
        message = self.refused("--sink", f"file:{path}?fsycn=1")
        self.assertIn("'fsycn'", message)
        self.assertIn("known: fsync", message)
        message = self.refused("--sink", "null:?fsync=1")
        self.assertIn("'fsync'", message)
        self.assertIn("takes no options", message)

    def test_directory(self) -> None:
        """
        A path that is a directory is refused, suggesting a file in it.
        """
        sub = os.path.join(self.dir, "logs")
        os.mkdir(sub)
        with self.assertRaises(usage.UsageError) as caught:
            parse("--sink", f"file:{sub}")
        self.assertIn("is a directory", str(caught.exception))
        self.assertEqual(os.listdir(self.dir), ["logs"])
        self.assertEqual(os.listdir(sub), [])

    def test_missing_directory(self) -> None:
        """
        A file in a directory that does not exist is refused, naming the
        directory, and the directory is not made.
        """
        missing = os.path.join(self.dir, "nope")
        message = self.refused("--sink", f"file:{missing}/lines.log")
        self.assertIn(repr(missing), message)


def twistd_options(*args: str) -> ServerOptions:
    """
    Parse a whole twistd command line, as twistd itself does before it
    starts (or goes to the background).
    """
    config = ServerOptions()
    config.parseOptions(list(args))
    return config


class ParentOptionsTests(SynchronousTestCase):
    """
    What twistd's own options allow C{--sink stdout:} to do.
    """

    def setUp(self) -> None:
        without_port_variable(self)

    def test_daemon_mode(self) -> None:
        """
        Without C{-n} twistd puts standard output on /dev/null: a stdout
        sink would lose every line, so it is refused, even with a log file.
        """
        with self.assertRaises(usage.UsageError) as caught:
            twistd_options("--logfile=x.log", "lineserver", "--sink", "stdout:")
        self.assertIn("without -n", str(caught.exception))

    def test_foreground_with_log_file(self) -> None:
        """
        In the foreground with the log in a file, a stdout sink is fine.
        """
        config = twistd_options(
            "-n", "--logfile=x.log", "lineserver", "--sink", "stdout:"
        )
        self.assertEqual(config.subOptions["sink"], "stdout:")

    def test_daemon_mode_other_sinks(self) -> None:
        """
        Other sinks run in the background as well.
        """
        config = twistd_options("--logfile=x.log", "lineserver", "--sink", "null:")
        self.assertEqual(config.subOptions["sink"], "null:")


class VersionTests(SynchronousTestCase):
    def test_text(self) -> None:
        """
        The version line names lineserver's installed version, then
        Twisted's and Python's.
        """
        expected = (
            f"lineserver {metadata.version('lineserver')} "
            f"(Twisted {metadata.version('twisted')}, "
            f"Python {platform.python_version()})"
        )
        self.assertEqual(version_text(), expected)


class DefaultPortTests(SynchronousTestCase):
    def test_embedded(self) -> None:
        """
        Without PORT, the default is 127.0.0.1:4040.
        """
        self.assertEqual(default_port({}), "tcp:4040:interface=127.0.0.1")

    def test_port_variable(self) -> None:
        """
        PORT sets the port of the default, still on loopback only.
        """
        self.assertEqual(default_port({"PORT": "5000"}), "tcp:5000:interface=127.0.0.1")

    def test_bad_port_variable(self) -> None:
        """
        A PORT that is not a port number is a usage error naming PORT.
        """
        for bad in ["http", "-1", "65536", "", "50 00"]:
            with self.assertRaises(usage.UsageError) as caught:
                default_port({"PORT": bad})
            self.assertIn("PORT", str(caught.exception))


UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ParseSizeTests(SynchronousTestCase):
    @given(
        number=st.integers(min_value=0, max_value=10**9),
        unit=st.sampled_from(["", "b", "k", "kb", "kib", "m", "mb", "mib", "g", "gib"]),
        upper=st.booleans(),
        space=st.sampled_from(["", " "]),
    )
    @settings(max_examples=200, deadline=None)
    def test_property(self, number: int, unit: str, upper: bool, space: str) -> None:
        """
        Any whole number with any unit spelling parses to number x unit.
        """
        text = f"{space}{number}{space}{unit.upper() if upper else unit}{space}"
        self.assertEqual(parse_size(text), number * UNITS[unit[:1]])

    @given(st.text(alphabet="0123456789kKmMgGiIbBtT.-+ e", max_size=8))
    @settings(max_examples=200, deadline=None)
    def test_only_sizes(self, text: str) -> None:
        """
        Text either parses to a whole number of bytes or raises ValueError
        naming the text; nothing else escapes.
        """
        try:
            value = parse_size(text)
        except ValueError as error:
            self.assertIn(repr(text), str(error))
        else:
            self.assertIsInstance(value, int)
            self.assertGreaterEqual(value, 0)

    def test_refused(self) -> None:
        """
        Negative, fractional, unit-only and unknown-unit sizes are refused.
        """
        for bad in ["-1", "1.5K", "K", "", "1T", "1KK", "0x10"]:
            with self.assertRaises(ValueError):
                parse_size(bad)


CONFIGURATION = Path(__file__).parent.parent / "docs" / "configuration.md"


def cells_of(row: str) -> list[str]:
    """
    The cells of a Markdown table row (C{\\|} is a pipe inside a cell).
    """
    return re.split(r"(?<!\\)\|", row)


class DocumentationTests(SynchronousTestCase):
    def table_row(self, option: str) -> str:
        """
        @return: the default column of C{--option}'s row in
            docs/configuration.md's tables.
        """
        for line in CONFIGURATION.read_text().splitlines():
            cells = cells_of(line)
            if len(cells) > 3 and (
                f"`--{option} " in cells[1] or f"`--{option}`" in cells[1]
            ):
                return cells[2]
        self.fail(f"--{option} has no row in docs/configuration.md")

    def test_every_option_with_its_default(self) -> None:
        """
        Every option of C{twistd lineserver} has a row in
        docs/configuration.md, and a default that C{--help} shows is the
        one the row's default column gives.
        """
        for name, _short, default, _doc in Options.optParameters:
            documented = self.table_row(name)
            if default is not None:
                self.assertIn(f"`{default}`", documented, name)
        for name, *_ in Options.optFlags:
            self.assertIn("off", self.table_row(name), name)
        methods = [n[4:] for n in dir(Options) if n.startswith("opt_") and len(n) > 5]
        for method in methods:
            name = method.replace("_", "-")
            if name in ("help", "version"):
                self.assertIn(f"--{name}", CONFIGURATION.read_text())
            else:
                self.table_row(name)
        self.assertIn("`file:lines.log`", self.table_row("sink"))


def run_twistd(cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


class CommandLineTests(SynchronousTestCase):
    """
    What a user sees from a real twistd.
    """

    def setUp(self) -> None:
        self.dir = temp_dir(self)

    def test_bad_option_exits_1(self) -> None:
        """
        A bad option or value exits with status 1; the last line of output
        names the option; no traceback.
        """
        cases = [
            (["--mode", "bogus"], "--mode"),
            (["--max-line-length", "0"], "--max-line-length"),
            (["--sink", "ftp:x"], "--sink"),
            (["--bogus"], "--bogus"),
        ]
        for args, name in cases:
            done = run_twistd(self.dir, "lineserver", *args)
            output = done.stdout + done.stderr
            self.assertEqual(done.returncode, 1, f"{args}: {output}")
            last = [line for line in output.splitlines() if line.strip()][-1]
            self.assertIn(name, last)
            self.assertNotIn("Traceback", output)
            self.assertFalse(os.path.exists(os.path.join(self.dir, "lines.log")))

    def test_stdout_sink_needs_logfile(self) -> None:
        """
        C{--sink stdout:} with the log on standard output is refused with a
        message saying to send the log elsewhere.
        """
        done = run_twistd(self.dir, "lineserver", "--sink", "stdout:")
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 1, output)
        last = [line for line in output.splitlines() if line.strip()][-1]
        self.assertIn("--sink stdout: lines would mix with the log", last)
        self.assertIn("--logfile=FILE", last)
        self.assertNotIn("Traceback", output)

    def test_stdout_sink(self) -> None:
        """
        With the log in a file, C{--sink stdout:} writes each received line,
        byte for byte and LF-terminated, to standard output while it runs;
        lines sent just before SIGTERM still come out; nothing else does.
        """
        server = ServerProcess(self.dir, "--sink", "stdout:", port=free_port())
        self.addCleanup(server.kill)
        server.ready()
        assert server.proc.stdout is not None
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"first line\r\nsecond \xff\x00\n")
            # Seeing them on stdout also proves the reactor runs, so twistd
            # has its signal handlers (see the note in tests/test_twistd.py).
            wanted = b"first line\nsecond \xff\x00\n"
            early = read_exactly(server.proc.stdout.fileno(), len(wanted), 10)
            self.assertEqual(early, wanted)
            sock.sendall(b"\nthird\n")
        # SIGTERM at once: lines the server's kernel already holds are
        # drained before the sink closes.
        os.kill(server.pid, signal.SIGTERM)
        out, err = server.proc.communicate(timeout=20)
        self.assertEqual(server.proc.returncode, -signal.SIGTERM, server.log())
        self.assertEqual(out, b"\nthird\n")
        self.assertNotIn(b"Traceback", err)
        self.assertIn("sink stdout: open", server.log())


def read_exactly(fd: int, size: int, timeout: float) -> bytes:
    """
    Read C{size} bytes from a pipe, failing after C{timeout} seconds.
    """
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(0.0, left))
        if not readable:
            raise AssertionError(f"only {data!r} after {timeout}s")
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise AssertionError(f"end of file after {data!r}")
        data += chunk
    return data


class AckOptionTests(SynchronousTestCase):
    """
    C{--ack} and C{--ack-interval}.
    """

    def test_defaults(self) -> None:
        config = config_from_options(parse())
        self.assertEqual((config.ack, config.ack_interval), (False, 2.0))

    def test_given(self) -> None:
        config = config_from_options(parse("--ack", "--ack-interval", "0.5"))
        self.assertEqual((config.ack, config.ack_interval), (True, 0.5))

    def test_refused_with_echo(self) -> None:
        """
        Echo mode has no sink to acknowledge lines for: a usage error.
        """
        with self.assertRaises(usage.UsageError) as caught:
            parse("--ack", "--mode", "echo")
        self.assertIn("--ack: only with --mode sink", str(caught.exception))

    def test_bad_interval(self) -> None:
        for bad in ("0", "-1", "soon", "nan"):
            with self.assertRaises(usage.UsageError, msg=bad) as caught:
                parse("--ack", "--ack-interval", bad)
            self.assertTrue(str(caught.exception).startswith("--ack-interval: "))
