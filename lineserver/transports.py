"""Placeholder: replaced by the full module from the cli branch at merge."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper


def transport_chain(transport: Any) -> Iterator[Any]:
    for _ in range(6):
        if transport is None:
            return
        yield transport
        transport = getattr(transport, "transport", None)


def behind_proxy(transport: Any) -> bool:
    chain = transport_chain(transport)
    return any(isinstance(t, HAProxyProtocolWrapper) for t in chain)


def enable_keepalive(transport: Any, idle: float) -> bool:
    for t in transport_chain(transport):
        skt = getattr(t, "socket", None)
        ip = (socket.AF_INET, socket.AF_INET6)
        if isinstance(skt, socket.socket) and skt.family in ip:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
            return True
    return False
