"""The twistd plugin's options and service maker: C{twistd -n lineserver}.

Options are only parsed and checked here (no side effects in
C{postOptions}); C{makeService} builds the service tree from them.
"""

from __future__ import annotations

import atexit
import os
import platform
import re
import socket
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any, NoReturn, cast

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from typing_extensions import override

from lineserver.connections import OVERFLOW_CHOICES
from lineserver.control.service import ControlService, control_defaults
from lineserver.control.target import ServerControl
from lineserver.fdlimits import DEFAULT_RESERVE
from lineserver.interfaces import ISinkFactory
from lineserver.logs import reopen_logs
from lineserver.ports import EVERY_INTERFACE, port_number, with_defaults
from lineserver.protocol import ProtocolSettings
from lineserver.security import Security, SecurityConfig, SecurityConfigError
from lineserver.server import DEFAULT_PORT, HANDLERS, LineServer, ServerConfig
from lineserver.signals import HangupReload, LogReopen
from lineserver.sinks import SinkURLError, sink_factory_from_url
from lineserver.sinks.spooling import SpoolingSinkFactory
from lineserver.stats import Stats
from lineserver.supervisor import ChildSpec
from lineserver.systemd_sockets import missing_socket
from lineserver.tls import (
    ReloadableServerTLS,
    TLSConfigError,
    is_ssl_description,
    split_ssl_description,
)
from lineserver.twisted_internals import parse_endpoint_description
from lineserver.workers import WORKER_SOCKETS, parse_workers

log = Logger(namespace="lineserver.tap")

#: Exit status when the supervisor gives up (sysexits' EX_SOFTWARE).
EXIT_ESCALATED = 70
#: Exit status when the server cannot start: its sink did not open
#: (sysexits' EX_UNAVAILABLE).
EXIT_CANNOT_START = 69

#: Where lines go when --sink is not given.
DEFAULT_SINK = "file:lines.log"
#: Seconds of silence before TCP keepalive probes a peer, unless told.
DEFAULT_TCP_KEEPALIVE = "300"

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """
    C{65536}, C{64K}, C{4M}, C{1GiB}: bytes, with binary multiples.

    @raise ValueError: for anything else.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"expected a size in bytes like 65536, 64K or 4M, got {text!r}"
        )
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def default_port(environ: dict[str, str] | None = None) -> str:
    """
    The default endpoint; a C{PORT} environment variable sets its port.
    """
    env = os.environ if environ is None else environ
    port = env.get("PORT")
    if port is None:
        return DEFAULT_PORT
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise usage.UsageError(
            f"PORT environment variable: not a port number: {port!r}"
        )
    return f"tcp:{port}:interface=127.0.0.1"


def check_endpoint(description: str, option: str = "--port") -> None:
    """
    Parse an endpoint description now, so a typo is a usage error and not a
    listener retrying forever.

    Twisted's parsers only check the description and keep the reactor for
    C{listen()}, which is never called here: so no reactor is given (nor
    imported, nor faked), and nothing listens.

    @raise usage.UsageError: naming C{option} and the reason.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(cast(Any, None), description)
    except Exception as error:
        problem = missing_socket(description)
        if problem is not None:
            raise usage.UsageError(f"{option} {description}: {problem}") from None
        raise usage.UsageError(
            f"{option}: bad endpoint {description!r}: {error}"
        ) from None
    port = port_number(description)
    if port is not None and not 0 <= port <= 65535:
        raise usage.UsageError(f"{option}: port out of range in {description!r}")


def _tcp_address(description: str, backlog: int) -> tuple[int, str | None] | None:
    """
    @return: the TCP port number and interface a description listens on,
        once lineserver's defaults are added (the interface None if given
        by position); None if it is not a TCP port or listens on port 0.
    """
    full = with_defaults(description, backlog)
    number = port_number(full)
    if not number:
        return None
    try:
        _, named = parse_endpoint_description(full)
    except (ValueError, IndexError):
        return None
    return number, named.get("interface")


def check_metrics_port(metrics: str, ports: list[str], backlog: int) -> None:
    """
    The metrics endpoint must not be one of the line ports: the two would
    fight over it, and one would retry for ever.

    @raise usage.UsageError: naming --metrics and the --port it repeats.
    """
    mine = _tcp_address(metrics, backlog)
    if mine is None:
        return
    for description in ports:
        other = _tcp_address(description, backlog)
        if other is None or other[0] != mine[0]:
            continue
        interfaces = {mine[1], other[1]}
        if len(interfaces) == 1 or interfaces & EVERY_INTERFACE:
            raise usage.UsageError(
                f"--metrics: {metrics!r} is the port of --port {description!r}; "
                "serve metrics on a port of their own"
            )


def check_tls_port(description: str, client_ca: str | None) -> None:
    """
    Read an C{ssl:} port's certificate, key and chain now, and check the
    TCP port under it, so that a bad one is a usage error naming it.

    @raise SecurityConfigError: naming the port and what is wrong with it.
    """
    try:
        spec = split_ssl_description(description)
        ReloadableServerTLS(
            spec.cert_path, spec.key_path, client_ca, chain_path=spec.chain_path
        )
    except (TLSConfigError, ValueError) as error:
        raise SecurityConfigError(f"--port {description}: {error}") from error
    check_endpoint(spec.plain)


def version_text() -> str:
    """
    @return: C{lineserver X (Twisted Y, Python Z)}, for --version and bug
        reports.
    """
    from twisted import __version__ as twisted_version

    try:
        ours = metadata.version("lineserver")
    except metadata.PackageNotFoundError:  # run from a checkout, not installed
        ours = "(not installed)"
    return (
        f"lineserver {ours} (Twisted {twisted_version}, "
        f"Python {platform.python_version()})"
    )


def _flowed(method: Callable[..., None]) -> Callable[..., None]:
    """
    Let C{--help} wrap an C{opt_} docstring as one paragraph (it would keep
    each line's indentation inside the text).
    """
    method.__doc__ = " ".join((method.__doc__ or "").split())
    return method


class Options(usage.Options):
    """
    Command line of C{twistd lineserver}; every option shows its default.
    """

    synopsis = "[options]"
    longdesc = (
        "A supervised, flow-controlled line server. Each newline-terminated "
        "line is echoed back (--mode echo) or handed unchanged to a sink "
        "(--mode sink). Sizes take K, M, G suffixes; times are seconds."
    )

    optParameters: list[list[Any]] = [
        ["mode", "m", "sink", "What to do with lines: echo or sink."],
        [
            "max-line-length",
            None,
            "65536",
            "Longest line in bytes, terminator not counted.",
        ],
        [
            "max-connections",
            None,
            None,
            "Most connections at once (default: no limit).",
        ],
        [
            "max-connections-per-peer",
            None,
            None,
            "Most connections from one address (default: no limit).",
        ],
        [
            "overflow",
            None,
            "wait",
            "At --max-connections: wait (stop accepting) or reject (ERR and close).",
        ],
        [
            "backlog",
            None,
            "1024",
            "Listen backlog for endpoints that do not set backlog=.",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close a connection silent this long (default: never).",
        ],
        [
            "line-timeout",
            None,
            None,
            "Close a connection whose line stays incomplete this long "
            "(default: never).",
        ],
        [
            "shutdown-timeout",
            None,
            "10",
            "Seconds a clean stop may take to drain and flush.",
        ],
        ["high-watermark", None, "4M", "Queued bytes at which connections are paused."],
        [
            "low-watermark",
            None,
            "1M",
            "Queued bytes below which paused connections resume.",
        ],
        [
            "max-restarts",
            None,
            "5",
            "Restarts of a part within --restart-period before giving up.",
        ],
        ["restart-period", None, "10", "Window in seconds for --max-restarts."],
        [
            "tcp-keepalive",
            None,
            DEFAULT_TCP_KEEPALIVE,
            "Seconds of silence after which TCP keepalive probes a client; "
            "one that does not answer is dropped (0: off).",
        ],
        [
            "fd-reserve",
            None,
            str(DEFAULT_RESERVE),
            "Descriptors kept free below RLIMIT_NOFILE: accepting pauses there "
            "(0: no watermark, only the accept guard).",
        ],
        [
            "tls-handshake-timeout",
            None,
            "10",
            "Seconds a TLS handshake may take before the connection is aborted.",
        ],
        [
            "tls-client-ca",
            None,
            None,
            "Require client certificates from these CAs (PEM), on ssl: ports "
            "and after STARTTLS.",
        ],
        ["tls-cert", None, None, "Certificate (and chain) PEM for --starttls."],
        [
            "tls-key",
            None,
            None,
            "Private key PEM for --starttls (default: in --tls-cert).",
        ],
        [
            "workers",
            None,
            "1",
            "Worker processes serving the ports: a number, or auto (one per "
            "core); 1 is a single process. See docs/workers.md.",
        ],
        [
            "worker-sockets",
            None,
            "reuseport",
            "With --workers: reuseport (one SO_REUSEPORT socket per worker, "
            "even spread) or shared (one socket all workers accept from).",
        ],
        [
            "auth-tokens",
            None,
            None,
            "File of tokens; a client's first line must be AUTH <token>. "
            "Re-read on SIGHUP.",
        ],
        [
            "spool",
            None,
            None,
            "Directory of the disk spool: lines the sink cannot take now "
            "(down or slow) are fsynced there and replayed in order "
            "(default: no spool; clients are paused).",
        ],
        [
            "spool-max",
            None,
            "4G",
            "Most bytes of --spool files; at it, clients are paused.",
        ],
        [
            "ack-interval",
            None,
            "2",
            "With --ack: seconds after which a connection whose lines wait is "
            "sent its latest ACK again.",
        ],
    ]

    optFlags: list[list[Any]] = [
        ["starttls", None, "Offer STARTTLS on plain ports (needs --tls-cert)."],
        ["require-tls", None, "Refuse every line sent before TLS is on."],
        [
            "ack",
            None,
            "Send each connection ACK <n> once its first n lines are durable "
            "by the sink's promise (sink mode; see docs/protocol.md).",
        ],
        [
            "quiet-connections",
            None,
            "Do not log a line per closed connection (refusals are still logged).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []
        self["allow"] = None
        self["sink"] = DEFAULT_SINK
        self._sink_given = False
        self["metrics"] = None
        self["control"] = None
        self.arguments: list[str] = []

    def opt_version(self) -> NoReturn:
        """
        Print lineserver's version (with Twisted's and Python's) and exit.
        """
        print(version_text())
        sys.exit(0)

    @_flowed
    def opt_sink(self, url: str) -> None:
        """
        Where lines go in sink mode: file:PATH (with
        ?fsync=never|batch|interval, see docs/delivery.md), stdout:, null:,
        tcp:HOST:PORT or tls:HOST:PORT:... (another line server, see
        docs/relay.md), redis://HOST:PORT/DB?stream=KEY, rediss://...,
        redis+cluster://HOST:PORT,.../?stream=KEY&shards=N (docs/redis.md).
        Once at most, and only with --mode sink. [default: file:lines.log]
        """
        if self._sink_given:
            raise usage.UsageError(
                f"--sink: given twice ({self['sink']!r} and {url!r}); "
                "lines go to one sink"
            )
        self._sink_given = True
        self["sink"] = url

    opt_s = opt_sink

    @_flowed
    def opt_port(self, description: str) -> None:
        """
        Listen on this endpoint, e.g. tcp:4040, tcp6:4040,
        ssl:4443:privateKey=KEY.pem:certKey=CERT.pem, haproxy:tcp:4040,
        unix:/run/lines.sock; repeatable. Without interface= a tcp/ssl port
        binds loopback only; write interface=0.0.0.0 (or \\:\\:) to bind
        every interface. [default: tcp:4040:interface=127.0.0.1, or $PORT's
        port]
        """
        self["ports"].append(description)

    opt_p = opt_port

    @_flowed
    def opt_metrics(self, description: str) -> None:
        """
        Serve Prometheus metrics at /metrics on this endpoint, e.g.
        tcp:9100; once at most. Without interface= a tcp/ssl port binds
        loopback only, as --port does. [default: off]
        """
        if self["metrics"] is not None:
            raise usage.UsageError(
                f"--metrics: given twice ({self['metrics']!r} and "
                f"{description!r}); metrics are served on one endpoint"
            )
        self["metrics"] = description

    @_flowed
    def opt_control(self, description: str) -> None:
        """
        Take operator commands on this endpoint, e.g.
        unix:/run/lineserver.sock (mode=600 unless given; only the file mode
        protects it); once at most. See lineserver-ctl. [default: off]
        """
        if self["control"] is not None:
            raise usage.UsageError(
                f"--control: given twice ({self['control']!r} and "
                f"{description!r}); there is one control socket"
            )
        self["control"] = description

    @_flowed
    def opt_allow(self, network: str) -> None:
        """
        Admit only clients from this network (CIDR or address, IPv4 or
        IPv6); repeatable. Others get ERR forbidden. [default: everyone]
        """
        self["allow"] = [*(self["allow"] or []), network]

    @override
    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept for --workers: each worker is given the same command line.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    @override
    def postOptions(self) -> None:
        self["ports"] = list(self["ports"]) or [default_port()]
        try:
            self["workers"] = parse_workers(str(self["workers"]), self["ports"])
        except ValueError as error:
            raise usage.UsageError(f"--workers: {error}") from None
        if self["worker-sockets"] not in WORKER_SOCKETS:
            raise usage.UsageError(
                "--worker-sockets: expected reuseport or shared, got "
                f"{self['worker-sockets']!r}"
            )
        for description in self["ports"]:
            if not is_ssl_description(description):
                check_endpoint(description)
        if self["mode"] not in HANDLERS:
            modes = ", ".join(sorted(HANDLERS))
            raise usage.UsageError(
                f"--mode: expected one of {modes}, got {self['mode']!r}"
            )
        if self["mode"] != "sink" and self._sink_given:
            raise usage.UsageError(
                f"--sink: only used in --mode sink; --mode {self['mode']} "
                "would ignore it"
            )
        if self["overflow"] not in OVERFLOW_CHOICES:
            raise usage.UsageError(
                f"--overflow: expected wait or reject, got {self['overflow']!r}"
            )
        self["max-line-length"] = _convert(
            "max-line-length", self, parse_size, minimum=1
        )
        self["high-watermark"] = _convert("high-watermark", self, parse_size, minimum=1)
        self["low-watermark"] = _convert("low-watermark", self, parse_size, minimum=0)
        if self["low-watermark"] >= self["high-watermark"]:
            raise usage.UsageError(
                "--low-watermark: must be below --high-watermark "
                f"({self['low-watermark']} >= {self['high-watermark']})"
            )
        for name in ("max-connections", "max-connections-per-peer"):
            self[name] = _convert(name, self, _whole, minimum=1)
        self["backlog"] = _convert("backlog", self, _whole, minimum=1)
        if self["metrics"] is not None:
            check_endpoint(self["metrics"], "--metrics")
            check_metrics_port(self["metrics"], self["ports"], self["backlog"])
        if self["control"] is not None:
            check_endpoint(self["control"], "--control")
        self["max-restarts"] = _convert("max-restarts", self, _whole, minimum=0)
        self["fd-reserve"] = _convert("fd-reserve", self, _whole, minimum=0)
        self["tls-handshake-timeout"] = _convert(
            "tls-handshake-timeout", self, _seconds, minimum=0.001
        )
        self._check_security()
        for name in (
            "idle-timeout",
            "line-timeout",
            "shutdown-timeout",
            "restart-period",
            "tcp-keepalive",
        ):
            self[name] = _convert(name, self, _seconds, minimum=0)
        if self["mode"] == "sink":
            self._check_sink()
        self["spool-max"] = _convert("spool-max", self, parse_size, minimum=1)
        if self["spool"] is not None and self["mode"] != "sink":
            raise usage.UsageError("--spool: only used in --mode sink")
        if self["control"] is not None and self["workers"] > 1:
            # One socket for N processes needs a parent that fans commands
            # out to its workers; until then, refused rather than ignored.
            raise usage.UsageError(
                "--control: not available with --workers above 1 yet"
            )
        if self["ack"] and self["mode"] != "sink":
            raise usage.UsageError(
                f"--ack: only with --mode sink; --mode {self['mode']} has no "
                "sink to acknowledge lines for"
            )
        self["ack-interval"] = _convert("ack-interval", self, _seconds, minimum=0.001)

    def _check_security(self) -> None:
        """
        Read every TLS, CA and token file now, so that a bad one is a usage
        error naming it, not a server that starts and refuses everyone.
        """
        config = security_from_options(self)
        try:
            config.check(self["ports"])
            Security(config)
            for description in self["ports"]:
                if is_ssl_description(description):
                    check_tls_port(description, config.tls_client_ca)
        except SecurityConfigError as error:
            raise usage.UsageError(str(error)) from None

    def _check_sink(self) -> None:
        try:
            sink_factory_from_url(self["sink"], reactor=None)
        except SinkURLError as error:
            raise usage.UsageError(f"--sink: {error}") from None
        to_stdout = self["sink"].lower().startswith("stdout:")
        if to_stdout and _daemonizes(self.parent):
            raise usage.UsageError(
                "--sink stdout: twistd without -n (--nodaemon) runs in the "
                "background with standard output on /dev/null, and every line "
                "would be lost; add -n, or choose a file: sink"
            )
        if to_stdout and _logs_to_stdout(self.parent):
            raise usage.UsageError(
                "--sink stdout: lines would mix with the log on standard output; "
                "send the log elsewhere with twistd --logfile=FILE (or --syslog), "
                "or twist --log-file=FILE"
            )


def _daemonizes(parent: Any) -> bool:
    """
    Will twistd go to the background (no C{-n}), with standard output on
    /dev/null?  C{twist} never does.
    """
    if parent is None:
        return False
    options = getattr(parent, "opts", parent)
    return "nodaemon" in options and not options.get("nodaemon")


def _logs_to_stdout(parent: Any) -> bool:
    """
    Would the log go to standard output under this twistd or twist command?
    """
    if parent is None:
        return False
    options = getattr(parent, "opts", parent)
    if "logFile" in options:  # twist
        target = options.get("logFile")
        return (
            target is None
            or target is sys.stdout
            or (getattr(target, "name", None) == "<stdout>")
        )
    if "logfile" in options:  # twistd
        if options.get("syslog"):
            return False
        logfile = options.get("logfile")
        return logfile in (None, "-") if options.get("nodaemon") else logfile == "-"
    return False


def _whole(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number of seconds, got {text!r}")
    return value


def _convert(
    name: str, options: Options, convert: Callable[[str], Any], minimum: float
) -> Any:
    raw = options[name]
    if raw is None:
        return None
    try:
        value = convert(str(raw))
    except ValueError as error:
        raise usage.UsageError(f"--{name}: {error}") from None
    if value < minimum:
        raise usage.UsageError(f"--{name}: must be at least {minimum}, got {raw!r}")
    return value


def security_from_options(options: Options) -> SecurityConfig:
    return SecurityConfig(
        allow=options["allow"],
        auth_tokens=options["auth-tokens"],
        tls_cert=options["tls-cert"],
        tls_key=options["tls-key"],
        tls_client_ca=options["tls-client-ca"],
        starttls=bool(options["starttls"]),
        require_tls=bool(options["require-tls"]),
    )


def config_from_options(options: Options) -> ServerConfig:
    settings = ProtocolSettings(
        max_line_length=options["max-line-length"],
        idle_timeout=options["idle-timeout"] or None,
        line_timeout=options["line-timeout"] or None,
        handshake_timeout=options["tls-handshake-timeout"],
        tcp_keepalive=options["tcp-keepalive"] or None,
        log_connections=not options["quiet-connections"],
    )
    return ServerConfig(
        ports=list(options["ports"]),
        backlog=options["backlog"],
        settings=settings,
        max_connections=options["max-connections"],
        max_connections_per_peer=options["max-connections-per-peer"],
        overflow=options["overflow"],
        shutdown_timeout=options["shutdown-timeout"],
        high_watermark=options["high-watermark"],
        low_watermark=options["low-watermark"],
        max_restarts=options["max-restarts"],
        restart_period=options["restart-period"],
        security=security_from_options(options),
        fd_reserve=options["fd-reserve"],
        metrics=options["metrics"],
        ack=bool(options["ack"]),
        ack_interval=options["ack-interval"],
    )


def exit_after_stop(
    reactor: Any,
    status: int = EXIT_ESCALATED,
    why: str = "restart intensity exceeded",
) -> Callable[[Failure], None]:
    """
    @return: an escalation handler that stops the reactor and makes the
        process exit with C{status} once twistd has cleaned up.
    """

    def escalate(reason: Failure) -> None:
        log.critical(
            "lineserver gives up: {why} ({reason}); exiting with status {status}",
            why=why,
            reason=reason.getErrorMessage(),
            status=status,
        )
        atexit.register(_hard_exit, status)
        if reactor.running:
            reactor.stop()

    return escalate


def _hard_exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def sink_from_options(options: Options, reactor: Any) -> ISinkFactory:
    """
    The sink of C{--sink}, behind the disk spool if C{--spool} names one.
    """
    sink = sink_factory_from_url(options["sink"], reactor)
    if options["spool"] is None:
        return sink
    return SpoolingSinkFactory(
        sink, options["spool"], reactor, max_bytes=options["spool-max"]
    )


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    if options["workers"] > 1:
        from lineserver.workers import worker_parent

        return worker_parent(options, reactor)
    server = make_server(options, reactor)
    server.add_child(ChildSpec("sighup", lambda: HangupReload(reactor, server.reload)))
    server.add_child(ChildSpec("sigusr1", lambda: LogReopen(reactor, reopen_logs)))
    if options["control"] is not None:
        control = control_defaults(options["control"])
        target = ServerControl(
            server,
            reactor,
            mode=options["mode"],
            reopen=reopen_logs,
            version=version_text(),
        )
        server.add_child(
            ChildSpec(
                f"control {control}",
                lambda: ControlService(control, target, reactor),
            )
        )
    return server


def make_server(
    options: Options,
    reactor: Any,
    inherited: dict[tuple[int, str], socket.socket] | None = None,
    stats: Stats | None = None,
) -> LineServer:
    """
    The server C{options} describe (a worker's adopts C{inherited} ports).
    """
    server = LineServer(
        config_from_options(options),
        reactor,
        handler=options["mode"],
        sink=sink_from_options(options, reactor) if options["mode"] == "sink" else None,
        on_escalate=exit_after_stop(reactor),
        on_start_failed=exit_after_stop(
            reactor, EXIT_CANNOT_START, "the server could not start"
        ),
        inherited=inherited,
        stats=stats,
    )
    return server
