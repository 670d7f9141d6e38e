"""The documented embedding example runs as written."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

import lineserver

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
EXAMPLE = EXAMPLES / "uppercase_app.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect_when_ready(port: int, timeout: float = 15.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ExampleTests(TestCase):
    def test_uppercase_app(self) -> None:
        """
        docs/examples/uppercase_app.py, run as the docs say, upper-cases the
        lines it receives, prints them, and stops cleanly on SIGTERM with
        every line written.
        """
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), f"tcp:{port}:interface=127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: None if proc.poll() is not None else proc.kill())
        client = connect_when_ready(port)
        client.sendall(b"hello\r\nvehicle 17\n")
        client.close()
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        self.assertEqual(out, b"HELLO\nVEHICLE 17\n", err.decode())
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), err.decode())

    def test_ack_spool_app(self) -> None:
        """
        docs/examples/ack_spool_app.py, run as the docs say, acknowledges
        the lines it received (C{ACK 3}) before the connection closes, has
        them in its file once stopped by SIGTERM, and leaves its spool
        directory empty.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / "ack_spool_app.py"),
                f"tcp:{port}:interface=127.0.0.1",
                "spool",
                "lines.log",
            ],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: None if proc.poll() is not None else proc.kill())
        client = connect_when_ready(port)
        client.settimeout(15)
        client.sendall(b"a\nb\r\nc\n")
        client.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := client.recv(4096):
            replies += chunk
        client.close()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        self.assertEqual(replies.splitlines()[-1], b"ACK 3", err.decode())
        self.assertEqual((directory / "lines.log").read_bytes(), b"a\nb\nc\n")
        self.assertEqual(list((directory / "spool").iterdir()), [])
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), err.decode())

    def test_names_the_docs_import_are_public(self) -> None:
        """
        Every name a page of docs/ or an example imports with
        C{from lineserver import ...} is in the public API
        (C{lineserver.__all__}), and importable.
        """
        docs = EXAMPLES.parent
        sources = [*docs.glob("*.md"), *EXAMPLES.glob("*.py")]
        imports = re.compile(
            r"^ *from lineserver import (?:\(([^)]*)\)|(.+))$", re.MULTILINE
        )
        named: set[str] = set()
        for source in sources:
            for group in imports.findall(source.read_text()):
                names = "".join(group).replace("\n", " ").split(",")
                named.update(name.strip() for name in names if name.strip())
        self.assertIn("SpoolingSinkFactory", named)
        self.assertEqual(sorted(named - set(lineserver.__all__)), [])
        for name in named:
            self.assertTrue(hasattr(lineserver, name), name)
