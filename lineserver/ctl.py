"""C{lineserver-ctl}: send one command to a server's control socket.

    lineserver-ctl --socket /run/lineserver.sock show connections
    lineserver-ctl --socket /run/lineserver.sock --json show stats
    lineserver-ctl --socket /run/lineserver.sock drain 30

Prints the answer and exits 0, or 1 on an error answer (C{ERR ...}, or
C{"ok": false}), or 2 if the socket cannot be reached or the answer is cut
short.  C{drain} waits for the second answer (drained) and for the socket
to close, which happens when the server process has ended.

A plain blocking client (no reactor): it runs once and exits, and the wire
format (lineserver.control) is one line out, lines back to an empty one.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence

from lineserver.control.commands import JSON_PREFIX

EXIT_OK = 0
EXIT_ERROR_ANSWER = 1
EXIT_UNREACHABLE = 2


class Cut(Exception):
    """
    The connection ended before an answer did.
    """


class _Reader:
    """
    Answers from a control connection, one at a time.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def answer(self) -> list[str]:
        """
        @return: the next answer's lines, without the empty line that ends it.
        @raise Cut: if the connection ends first.
        """
        while b"\n\n" not in self.buffer and not self.buffer.startswith(b"\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Cut(self.buffer.decode(errors="replace"))
            self.buffer += chunk
        if self.buffer.startswith(b"\n"):
            self.buffer = self.buffer[1:]
            return []
        text, self.buffer = self.buffer.split(b"\n\n", 1)
        return text.decode(errors="replace").split("\n")

    def until_closed(self) -> bytes:
        """
        @return: whatever came until the server closed the connection.
        """
        rest = self.buffer
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return rest
            rest += chunk


def is_error(lines: list[str], as_json: bool) -> bool:
    if as_json:
        try:
            return not json.loads("\n".join(lines)).get("ok", False)
        except (ValueError, AttributeError):
            return True
    return bool(lines) and lines[0].startswith("ERR ")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lineserver-ctl",
        description="Send one command to a lineserver control socket "
        "(twistd lineserver --control unix:PATH) and print the answer.",
        epilog="Commands: help, show info, show stats, show connections, "
        "disable listener, enable listener, set max-connections N|none, "
        "kill connection ID, reload, reopen log, drain [SECONDS].",
    )
    p.add_argument("--socket", required=True, help="the control socket's path")
    p.add_argument("--json", action="store_true", help="answer in JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for an answer (drain waits without limit) [default: 10]",
    )
    p.add_argument("command", nargs="+", help="the command and its arguments")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    words = list(args.command)
    line = " ".join(([JSON_PREFIX] if args.json else []) + words)
    draining = words[0].lower() == "drain"
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(args.timeout)
        sock.connect(args.socket)
    except OSError as error:
        print(f"lineserver-ctl: cannot reach {args.socket}: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    with sock:
        reader = _Reader(sock)
        try:
            sock.sendall(line.encode() + b"\n")
            lines = reader.answer()
            _print(lines)
            if is_error(lines, args.json):
                return EXIT_ERROR_ANSWER
            if not draining:
                return EXIT_OK
            sock.settimeout(None)
            lines = reader.answer()
            _print(lines)
            if is_error(lines, args.json):
                return EXIT_ERROR_ANSWER
            reader.until_closed()
        except Cut as cut:
            partial = str(cut).strip()
            if partial:
                print(partial)
            print("lineserver-ctl: the connection ended mid-answer", file=sys.stderr)
            return EXIT_UNREACHABLE
        except OSError as error:
            print(f"lineserver-ctl: {args.socket}: {error}", file=sys.stderr)
            return EXIT_UNREACHABLE
    return EXIT_OK


def _print(lines: list[str]) -> None:
    for text in lines:
        print(text)
    sys.stdout.flush()


def run() -> None:
    """
    The console script's entry point.
    """
    sys.exit(main())


if __name__ == "__main__":
    run()
