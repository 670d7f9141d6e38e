"""Which Redis client for the sink: pipelined XADD through each, measured.

On loopback against one redis-server started here, the same lines
(C{--lines} of 100 bytes, batches of C{--batch}, up to four batches in
flight where the client allows) through:

  - C{lineserver}: our RESP protocol, as the sink sends (MULTI/XADD/EXEC);
  - C{txredisapi}: Twisted-native, C{pipeline()} of XADD (if installed);
  - C{redis-py}: C{pipeline(transaction=True)} of XADD, blocking, in
    this thread (if installed; with hiredis when that is installed too).

    python -m benchmarks.redis_clients [--lines 200000] [--batch 1000]

txredisapi and redis-py are not dependencies of lineserver: install them
in the virtualenv to compare (C{pip install txredisapi redis hiredis}).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, task

from lineserver.sinks.redis_resp import ReplyParser, encode_command

LINE = b"x" * 99


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def xlen(port: int, key: str) -> int:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(encode_command(["XLEN", key]))
        parser = ReplyParser()
        while not (replies := parser.feed(sock.recv(4096))):
            pass
        return int(replies[0])  # type: ignore[arg-type]


def batches(lines: int, batch: int) -> list[list[bytes]]:
    return [[LINE] * min(batch, lines - n) for n in range(0, lines, batch)]


def ours(reactor: Any, port: int, work: list[list[bytes]]) -> Generator[Any, Any, None]:
    from lineserver.sinks.redis import RedisStreamSink
    from lineserver.sinks.redis_config import RedisConfig

    sink = RedisStreamSink(
        RedisConfig(nodes=(("127.0.0.1", port),), stream="ours"), reactor
    )
    yield sink.open()
    pending: list[defer.Deferred[None]] = []
    for lines in work:
        pending.append(sink.write(lines))
        if len(pending) >= 4:
            yield pending.pop(0)
    yield defer.gatherResults(pending)
    yield sink.close()


def txredis(
    reactor: Any, port: int, work: list[list[bytes]]
) -> Generator[Any, Any, None]:
    import txredisapi  # type: ignore[import-not-found]

    connection = yield txredisapi.Connection("127.0.0.1", port, reconnect=False)
    for lines in work:
        pipe = yield connection.pipeline()
        for line in lines:
            pipe.execute_command("XADD", "txredisapi", "*", "line", line)
        yield pipe.execute_pipeline()
    yield connection.disconnect()


def redis_py(port: int, work: list[list[bytes]]) -> None:
    import redis  # type: ignore[import-not-found]

    client = redis.Redis(port=port)
    for lines in work:
        pipe = client.pipeline(transaction=True)
        for line in lines:
            pipe.xadd("redis-py", {"line": line})
        pipe.execute()
    client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args(argv)
    server = shutil.which("redis-server")
    if server is None:
        print("needs redis-server (make system-tools)")
        return 1
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                directory,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    xlen(port, "none")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            work = batches(args.lines, args.batch)
            results: dict[str, float | str] = {}

            def twisted_run(body: Any) -> Callable[[], None]:
                def run() -> None:
                    task.react(
                        lambda reactor: defer.inlineCallbacks(body)(reactor, port, work)
                    )

                return run

            candidates: list[tuple[str, str, Callable[[], None]]] = [
                ("lineserver RESP (MULTI/XADD/EXEC)", "ours", twisted_run(ours)),
            ]
            try:
                import txredisapi  # type: ignore[import-not-found]  # noqa: F401

                candidates.append(
                    ("txredisapi pipeline", "txredisapi", twisted_run(txredis))
                )
            except ImportError:
                results["txredisapi pipeline"] = "not installed"
            try:
                import redis  # type: ignore[import-not-found]  # noqa: F401

                candidates.append(
                    ("redis-py pipeline", "redis-py", lambda: redis_py(port, work))
                )
            except ImportError:
                results["redis-py pipeline"] = "not installed"
            for name, key, run in candidates:
                pid = os.fork()
                if pid == 0:  # each client in a fresh process (task.react exits)
                    try:
                        run()
                    finally:
                        os._exit(0)
                started = time.perf_counter()
                os.waitpid(pid, 0)
                elapsed = time.perf_counter() - started
                count = xlen(port, key)
                results[name] = (
                    f"{count / elapsed:,.0f}"
                    if count == args.lines
                    else f"wrote {count} of {args.lines}"
                )
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
    print(f"{args.lines} lines of 100 bytes, batches of {args.batch}, lines/s:")
    for name, figure in results.items():
        print(f"  {name:<36} {figure:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
