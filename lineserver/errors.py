"""The error lines the server sends, in one place.

Every error a client can receive is one line, C{ERR <code> [detail]},
sent just before the server closes the connection.  Codes are stable
lower-case words; the detail is free text for humans.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """
    The codes of C{ERR} lines; C{docs/protocol.md} lists what each means.
    """

    LINE_TOO_LONG = "line-too-long"
    IDLE_TIMEOUT = "idle-timeout"
    LINE_TIMEOUT = "line-timeout"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    TOO_MANY_CONNECTIONS_FROM_PEER = "too-many-connections-from-peer"
    SHUTTING_DOWN = "shutting-down"
    FORBIDDEN = "forbidden"
    UNAUTHORIZED = "unauthorized"
    TLS_REQUIRED = "tls-required"
    TLS_UNAVAILABLE = "tls-unavailable"
    PROTOCOL = "protocol-error"


def error_line(code: ErrorCode | str, detail: str = "") -> bytes:
    """
    @return: the line (without terminator) for C{code} and C{detail}; the
        detail is reduced to printable ASCII on one line.
    """
    text = code.value if isinstance(code, ErrorCode) else code
    if detail:
        clean = "".join(c if " " <= c <= "~" else "?" for c in detail)
        text = f"{text} {clean}"
    return b"ERR " + text.encode("ascii")
