"""The control socket's pure parts: parsing, answers, dispatch, and the
registry hooks its commands use.

The real thing (a twistd, its unix socket, C{lineserver-ctl}) is in
tests/test_control_twistd.py.
"""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Generator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lineserver.connections import LIMIT_REASON, ConnectionRegistry
from lineserver.control.answers import Answer, ConnectionInfo, ServerInfo
from lineserver.control.commands import COMMANDS, Command, CommandError, parse
from lineserver.control.dispatch import IControlTarget, dispatch
from lineserver.control.protocol import ControlFactory
from lineserver.control.service import control_defaults
from lineserver.control.target import ServerControl
from lineserver.ctl import is_error
from lineserver.flow import PauseGate
from lineserver.handlers import EchoHandlerFactory
from lineserver.logs import ReopenableFile, reopen_logs
from lineserver.protocol import LineFactory, LineProtocol
from lineserver.server import LineServer, ServerConfig
from lineserver.stats import Stats
from tests.support import reactor, temp_dir


class ParseTests(SynchronousTestCase):
    def test_every_command(self) -> None:
        """
        Each command parses to its name, with converted arguments; words
        are case-insensitive and extra spaces do not matter.
        """
        self.assertEqual(parse("help"), Command("help"))
        self.assertEqual(parse("  SHOW   Info "), Command("show info"))
        self.assertEqual(parse("show stats"), Command("show stats"))
        self.assertEqual(parse("show connections"), Command("show connections"))
        self.assertEqual(parse("disable listener"), Command("disable listener"))
        self.assertEqual(parse("enable listener"), Command("enable listener"))
        self.assertEqual(
            parse("set max-connections 10"), Command("set max-connections", (10,))
        )
        self.assertEqual(
            parse("set max-connections none"), Command("set max-connections", (None,))
        )
        self.assertEqual(
            parse("kill connection #12"), Command("kill connection", (12,))
        )
        self.assertEqual(parse("kill connection 7"), Command("kill connection", (7,)))
        self.assertEqual(parse("reload"), Command("reload"))
        self.assertEqual(parse("reopen log"), Command("reopen log"))
        self.assertEqual(parse("drain"), Command("drain"))
        self.assertEqual(parse("drain 2.5"), Command("drain", (2.5,)))

    def test_json_prefix(self) -> None:
        """
        A leading C{json} asks for a JSON answer to the command after it.
        """
        self.assertEqual(parse("json show info"), Command("show info", json=True))
        self.assertEqual(
            parse("JSON kill connection 3"),
            Command("kill connection", (3,), json=True),
        )

    def test_errors(self) -> None:
        """
        Unknown commands, missing, extra or bad arguments, and an empty
        line are each a L{CommandError} that says what is wrong.
        """
        cases = {
            "": "empty",
            "json": "empty",
            "show": "unknown command",
            "show everything": "unknown command",
            "shutdown": "unknown command",
            "set max-connections": "usage: set max-connections N|none",
            "set max-connections 0": "at least 1",
            "set max-connections -3": "at least 1",
            "set max-connections ten": "whole number",
            "set max-connections 1 2": "usage",
            "kill connection": "usage: kill connection ID",
            "kill connection abc": "connection id",
            "help me": "usage: help",
            "drain soon": "seconds",
            "drain -1": "at least 0",
            "drain nan": "at least 0",
            "drain 1 2": "usage",
        }
        for line, why in cases.items():
            with self.subTest(line=line):
                error = self.assertRaises(CommandError, parse, line)
                self.assertIn(why, str(error))

    @given(st.text(max_size=60))
    def test_any_text_is_a_command_or_an_error(self, line: str) -> None:
        """
        Whatever the line, parsing gives a known command or a
        L{CommandError}, never another exception.
        """
        names = {spec.name for spec in COMMANDS}
        try:
            command = parse(line)
        except CommandError:
            return
        self.assertIn(command.name, names)


class AnswerTests(SynchronousTestCase):
    @given(st.lists(st.text(max_size=30), max_size=8))
    def test_text_answer_ends_at_its_one_empty_line(self, lines: list[str]) -> None:
        """
        A text answer is never empty and has no empty line but the one
        that ends it, whatever its lines hold (line breaks included).
        """
        wire = Answer(lines).render(as_json=False).decode()
        self.assertTrue(wire.endswith("\n\n"))
        self.assertNotIn("\n\n", wire[:-1])
        self.assertFalse(wire.startswith("\n"))

    @given(st.text(max_size=40))
    def test_error_answer(self, why: str) -> None:
        """
        An error is one line starting with C{ERR}, in text; C{"ok": false}
        with the reason, in JSON; C{lineserver-ctl} sees both as errors.
        """
        answer = Answer.failed(why)
        text = answer.render(as_json=False).decode()
        lines = text[:-2].split("\n")
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("ERR "))
        self.assertTrue(is_error(lines, as_json=False))
        wire = answer.render(as_json=True).decode()
        self.assertTrue(wire.endswith("\n\n"))
        self.assertEqual(json.loads(wire), {"ok": False, "error": why})
        self.assertTrue(is_error([wire.strip()], as_json=True))

    def test_json_answer(self) -> None:
        """
        A JSON answer is one line holding C{ok} and the result.
        """
        wire = Answer(["a 1"], {"a": 1}).render(as_json=True)
        self.assertEqual(wire.count(b"\n"), 2)
        self.assertEqual(json.loads(wire), {"ok": True, "result": {"a": 1}})
        self.assertFalse(is_error([wire.decode().strip()], as_json=True))


@implementer(IControlTarget)
class RecordingTarget:
    """
    A target that records what it was asked (for the dispatch table: the
    real target is exercised through twistd in test_control_twistd).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.reload_ok = True
        self.conns = [ConnectionInfo(3, "127.0.0.1:5000", None, 1.25, 2, 10, ("sink",))]

    def info(self) -> ServerInfo:
        return ServerInfo(42, "v", 1.0, "running", "echo", True, None, 1)

    def stats(self) -> dict[str, int]:
        return {"lines.received": 5, "a.b": 1}

    def connections(self) -> list[ConnectionInfo]:
        return self.conns

    def enable_listeners(self, enabled: bool) -> None:
        self.calls.append(("enable", enabled))

    def set_max_connections(self, limit: int | None) -> None:
        self.calls.append(("limit", limit))

    def kill_connection(self, number: int) -> bool:
        self.calls.append(("kill", number))
        return number == 3

    def reload(self) -> bool:
        return self.reload_ok

    def reopen_logs(self) -> list[str]:
        raise OSError(13, "Permission denied")

    def drain(self, grace: float) -> Deferred[str]:
        return succeed("drained")


class DispatchTests(SynchronousTestCase):
    def answer(self, line: str, target: RecordingTarget) -> Answer:
        result = dispatch(parse(line), target)
        assert isinstance(result, Answer)
        return result

    def test_target_verified(self) -> None:
        verifyObject(IControlTarget, RecordingTarget())

    def test_commands_reach_the_target(self) -> None:
        """
        Each command calls the target once, with its argument, and says
        what it did.
        """
        target = RecordingTarget()
        self.assertEqual(
            self.answer("disable listener", target).lines, ["listeners disabled"]
        )
        self.assertEqual(
            self.answer("enable listener", target).lines, ["listeners enabled"]
        )
        self.assertEqual(
            self.answer("set max-connections none", target).lines,
            ["max-connections none"],
        )
        self.assertEqual(self.answer("kill connection 3", target).lines, ["closing #3"])
        self.assertEqual(
            self.answer("kill connection 4", target).error, "no connection #4"
        )
        self.assertEqual(
            target.calls,
            [
                ("enable", False),
                ("enable", True),
                ("limit", None),
                ("kill", 3),
                ("kill", 4),
            ],
        )

    def test_show(self) -> None:
        """
        C{show stats} is sorted by name; C{show connections} gives every
        field of each connection, in text and in JSON.
        """
        target = RecordingTarget()
        stats = self.answer("show stats", target)
        self.assertEqual(stats.lines, ["a.b 1", "lines.received 5"])
        conns = self.answer("show connections", target)
        self.assertEqual(
            conns.lines,
            ["#3 peer=127.0.0.1:5000 subject=- age=1.2s lines=2 bytes=10 paused=sink"],
        )
        self.assertEqual(
            conns.result,
            [
                {
                    "id": 3,
                    "peer": "127.0.0.1:5000",
                    "subject": None,
                    "age": 1.25,
                    "lines": 2,
                    "bytes": 10,
                    "paused": ["sink"],
                }
            ],
        )
        target.conns = []
        self.assertEqual(
            self.answer("show connections", target).lines, ["no connections"]
        )
        info = self.answer("show info", target)
        self.assertIn("pid: 42", info.lines)
        self.assertEqual(info.result["pid"], 42)

    def test_failures_are_answers(self) -> None:
        """
        A reload that leaves a file unloaded, and a target that raises, are
        error answers (the raise is logged), never a crash.
        """
        target = RecordingTarget()
        target.reload_ok = False
        self.assertIn("did not load", self.answer("reload", target).error or "")
        answer = self.answer("reopen log", target)
        self.assertIn("Permission denied", answer.error or "")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_help_lists_every_command(self) -> None:
        answer = self.answer("help", RecordingTarget())
        text = "\n".join(answer.lines)
        for spec in COMMANDS:
            self.assertIn(spec.usage, text)


class ProtocolTests(SynchronousTestCase):
    def connect(self) -> tuple[StringTransport, object]:
        factory = ControlFactory(RecordingTarget(), lambda: None)
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        return transport, proto

    def test_answers_in_order(self) -> None:
        """
        Several commands in one read are answered in order, each answer
        ended by an empty line; a bad one does not end the connection.
        """
        transport, proto = self.connect()
        proto.dataReceived(b"enable listener\r\nbogus\njson kill connection 3\n")  # type: ignore[attr-defined]
        answers = transport.value().decode().split("\n\n")
        self.assertEqual(answers[0], "listeners enabled")
        self.assertTrue(answers[1].startswith("ERR unknown command 'bogus'"))
        self.assertEqual(json.loads(answers[2]), {"ok": True, "result": {"closing": 3}})
        self.assertEqual(answers[3], "")
        self.assertFalse(transport.disconnecting)

    def test_json_error(self) -> None:
        """
        A bad command with the C{json} prefix (in any case) gets its error
        in JSON.
        """
        transport, proto = self.connect()
        proto.dataReceived(b"JSON bogus\n")  # type: ignore[attr-defined]
        answer = json.loads(transport.value())
        self.assertFalse(answer["ok"])
        self.assertIn("unknown command", answer["error"])

    def test_drain_answers_twice(self) -> None:
        """
        C{drain} answers at once (draining), then with the target's
        summary; commands after it are not taken.
        """
        transport, proto = self.connect()
        proto.dataReceived(b"drain 0\nshow stats\n")  # type: ignore[attr-defined]
        answers = transport.value().decode().split("\n\n")
        self.assertEqual(
            answers[:2], ["draining: 1 connection(s), grace 0s", "drained"]
        )
        self.assertEqual(answers[2], "")

    def test_overlong_and_undecodable(self) -> None:
        """
        A line that is not UTF-8 is an error answer; an over-long line is
        one too, and closes the connection.
        """
        transport, proto = self.connect()
        proto.dataReceived(b"show \xff\n")  # type: ignore[attr-defined]
        self.assertEqual(transport.value(), b"ERR commands are UTF-8 text\n\n")
        transport.clear()
        proto.dataReceived(b"x" * 5000)  # type: ignore[attr-defined]
        self.assertTrue(transport.value().startswith(b"ERR command longer than"))
        self.assertTrue(transport.disconnecting)


class DefaultsTests(SynchronousTestCase):
    def test_unix_mode_and_tcp_loopback(self) -> None:
        """
        A unix control socket is owner-only unless told; a TCP one binds
        loopback unless told.
        """
        self.assertIn(":mode=600", control_defaults("unix:/run/l.sock"))
        self.assertIn(":mode=660", control_defaults("unix:/run/l.sock:mode=660"))
        self.assertNotIn("mode=600", control_defaults("unix:/run/l.sock:mode=660"))
        self.assertIn("interface=127.0.0.1", control_defaults("tcp:9999"))


class Listener:
    def __init__(self) -> None:
        self.reading = True
        self.gate = PauseGate(self.stop, self.start)

    def stop(self) -> None:
        self.reading = False

    def start(self) -> None:
        self.reading = True


class RegistryHookTests(SynchronousTestCase):
    """
    The registry hooks behind C{disable listener} and C{set
    max-connections}.
    """

    def make(self, limit: int | None) -> ConnectionRegistry[LineProtocol]:
        self.registry: ConnectionRegistry[LineProtocol] = ConnectionRegistry(
            limit, stats=Stats()
        )
        self.factory = LineFactory(EchoHandlerFactory(), self.registry, Clock())
        self.listener = Listener()
        self.registry.add_listener_gate(self.listener.gate)
        return self.registry

    def open(self) -> tuple[LineProtocol, StringTransport]:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def test_held_listeners(self) -> None:
        """
        Holding the listeners stops them, also a listener that comes later
        (a restarted port); a connection that closes does not release
        them; releasing does, unless the registry is full.
        """
        registry = self.make(1)
        registry.hold_listeners(True)
        self.assertFalse(self.listener.reading)
        later = Listener()
        registry.add_listener_gate(later.gate)
        self.assertFalse(later.reading)
        proto, _ = self.open()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.listener.reading)
        self.open()
        registry.hold_listeners(False)
        self.assertFalse(self.listener.reading, "full: still held")
        self.assertEqual(self.listener.gate.reasons, {LIMIT_REASON})
        registry.set_max_connections(None)
        self.assertTrue(self.listener.reading)
        self.assertTrue(later.reading)

    def test_raised_limit_serves_waiters(self) -> None:
        """
        Raising the limit hands back the waiting connections it lets in,
        first come first served; lowering it stops accepting.
        """
        registry = self.make(1)
        self.open()
        second, _ = self.open()
        third, _ = self.open()
        self.assertEqual(list(registry.waiting), [second, third])
        self.assertEqual(registry.set_max_connections(2), [second])
        self.assertEqual(list(registry.waiting), [third])
        self.assertFalse(self.listener.reading)
        self.assertEqual(registry.set_max_connections(5), [third])
        self.assertTrue(self.listener.reading)
        registry.set_max_connections(3)
        self.assertFalse(self.listener.reading)
        self.assertIs(registry.find(second.number), second)
        self.assertIsNone(registry.find(99))


class ServerControlTests(TestCase):
    """
    L{ServerControl} over a real L{LineServer} on a loopback port.
    """

    @inlineCallbacks
    def test_drain_once(self) -> Generator[Any, Any, None]:
        """
        Two operators' C{drain}s stop the server once and exit once; both
        get the summary.
        """
        server = LineServer(
            ServerConfig(ports=["tcp:0:interface=127.0.0.1"]), reactor, handler="echo"
        )
        server.startService()
        self.addCleanup(server.stopService)
        yield server.when_listening()
        exits: list[None] = []
        control = ServerControl(server, reactor, exit=lambda: exits.append(None))
        verifyObject(IControlTarget, control)
        first = control.drain(0)
        second = control.drain(0)
        summaries = yield gatherResults([first, second])
        self.assertEqual(
            summaries, ["drained: 0 line(s) delivered; exiting with status 0"] * 2
        )
        self.assertFalse(server.running)
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(exits, [None])
        self.assertFalse(server.listeners_enabled)


class ReopenFailureTests(SynchronousTestCase):
    def test_unreopenable_file_logged_and_kept(self) -> None:
        """
        A log file whose directory went away cannot be reopened: that is
        logged, the others are reopened, and the old file stays in use.
        """
        good_dir = temp_dir(self)
        gone_dir = temp_dir(self)
        good = ReopenableFile(os.path.join(good_dir, "good.log"))
        self.addCleanup(good.close)
        gone = ReopenableFile(os.path.join(gone_dir, "gone.log"))
        self.addCleanup(gone.close)
        shutil.rmtree(gone_dir)
        reopened = reopen_logs(extra=list)
        self.assertIn(good.path, reopened)
        self.assertNotIn(gone.path, reopened)
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)
        gone.write("still written\n")
        gone.flush()
