"""What a control command answers, and how it looks on the wire.

Pure.  Every answer ends with an empty line.  A text answer's other lines
are never empty; an error answer is one line, C{ERR <why>}.  A JSON answer
is one line, C{{"ok": true, "result": ...}} or C{{"ok": false, "error":
"..."}}.  The C{*Info} records are what a target reports, rendered here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lineserver.control.commands import COMMANDS, JSON_PREFIX


@dataclass(frozen=True)
class Answer:
    """
    What a command answers: C{lines} in text, C{result} in JSON.

    @ivar error: why the command failed, or None.
    """

    lines: Sequence[str] = ()
    result: Any = None
    error: str | None = None

    @classmethod
    def failed(cls, why: str) -> Answer:
        return cls(error=why)

    def render(self, as_json: bool) -> bytes:
        """
        @return: the answer on the wire, its closing empty line included.
        """
        if as_json:
            body = (
                {"ok": False, "error": self.error}
                if self.error is not None
                else {"ok": True, "result": self.result}
            )
            text = json.dumps(body, sort_keys=True, default=str)
            return text.encode() + b"\n\n"
        if self.error is not None:
            lines = [f"ERR {_one_line(self.error)}"]
        else:
            lines = [_one_line(line) for line in self.lines] or ["OK"]
        return "".join(f"{line}\n" for line in lines).encode() + b"\n"


def _one_line(text: str) -> str:
    """
    A line of an answer: no line breaks, never empty (an empty line ends
    the answer).
    """
    flat = " ".join(text.splitlines()).strip()
    return flat or "-"


@dataclass(frozen=True)
class ConnectionInfo:
    """
    What C{show connections} says of one connection.
    """

    id: int
    peer: str
    subject: str | None
    age: float
    lines: int
    bytes: int
    paused: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListenerInfo:
    """
    What C{show info} says of one line port.
    """

    name: str
    address: str | None
    accepting: bool


@dataclass(frozen=True)
class ServerInfo:
    """
    What C{show info} says of the server.
    """

    pid: int
    version: str
    uptime: float
    phase: str
    mode: str
    listeners_enabled: bool
    max_connections: int | None
    connections: int
    listeners: tuple[ListenerInfo, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


def help_answer() -> Answer:
    width = max(len(spec.usage) for spec in COMMANDS)
    return Answer(
        [f"{spec.usage.ljust(width)}  {spec.help}" for spec in COMMANDS]
        + [f"{JSON_PREFIX} COMMAND".ljust(width) + "  the answer in JSON"],
        {spec.usage: spec.help for spec in COMMANDS},
    )


def info_answer(info: ServerInfo) -> Answer:
    lines = [
        f"pid: {info.pid}",
        f"version: {info.version}",
        f"uptime: {info.uptime:.1f}s",
        f"phase: {info.phase}",
        f"mode: {info.mode}",
        f"listeners: {'enabled' if info.listeners_enabled else 'disabled'}",
        f"max-connections: {limit_text(info.max_connections)}",
        f"connections: {info.connections}",
    ]
    for listener in info.listeners:
        state = "accepting" if listener.accepting else "not accepting"
        lines.append(
            f"listener: {listener.name} on {listener.address or '-'} ({state})"
        )
    lines += [f"{key}: {value}" for key, value in sorted(info.extra.items())]
    result = {
        "pid": info.pid,
        "version": info.version,
        "uptime": round(info.uptime, 3),
        "phase": info.phase,
        "mode": info.mode,
        "listeners_enabled": info.listeners_enabled,
        "max_connections": info.max_connections,
        "connections": info.connections,
        "listeners": [
            {"name": lis.name, "address": lis.address, "accepting": lis.accepting}
            for lis in info.listeners
        ],
        **info.extra,
    }
    return Answer(lines, result)


def limit_text(limit: int | None) -> str:
    return "none" if limit is None else str(limit)


def connections_answer(conns: list[ConnectionInfo]) -> Answer:
    lines = [
        f"#{c.id} peer={c.peer} subject={c.subject or '-'} age={c.age:.1f}s "
        f"lines={c.lines} bytes={c.bytes} paused={','.join(c.paused) or '-'}"
        for c in conns
    ] or ["no connections"]
    result = [
        {
            "id": c.id,
            "peer": c.peer,
            "subject": c.subject,
            "age": round(c.age, 3),
            "lines": c.lines,
            "bytes": c.bytes,
            "paused": list(c.paused),
        }
        for c in conns
    ]
    return Answer(lines, result)
