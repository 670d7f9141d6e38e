"""What lies under a connection's transport, and the socket at the bottom.

A protocol's transport may be TCP itself, or a layer over it: TLS
(C{TLSMemoryBIOProtocol}), the PROXY protocol wrapper, or both (TLS over
PROXY over TCP).  Whatever needs the socket (keepalive, how much input
the kernel still holds) or a layer (is this connection behind HAProxy?)
walks the same chain, with L{transport_chain}.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
from collections.abc import Iterator

from lineserver.twisted_internals import HAProxyProtocolWrapper, listening_socket

#: More layers than any stack we build (TLS over PROXY over TCP is three);
#: the walk stops there even if some object points back at itself.
MAX_LAYERS = 8

#: Unanswered keepalive probes after which the kernel drops the peer.
KEEPALIVE_PROBES = 3
#: The longest gap between two probes, in seconds.
KEEPALIVE_MAX_INTERVAL = 30
#: Linux refuses a larger TCP_KEEPIDLE or TCP_KEEPINTVL.
_KERNEL_MAX_SECONDS = 32767


def transport_chain(transport: object) -> Iterator[object]:
    """
    Yield C{transport}, then the transport under it, and so on down to the
    one that owns the socket (which has no C{transport} of its own).
    """
    seen: set[int] = set()
    layer: object = transport
    while layer is not None and id(layer) not in seen and len(seen) < MAX_LAYERS:
        seen.add(id(layer))
        yield layer
        layer = getattr(layer, "transport", None)


def socket_of(transport: object) -> socket.socket | None:
    """
    @return: the socket under C{transport} (through TLS and PROXY layers),
        or None if there is none (a test transport, a pipe).
    """
    for layer in transport_chain(transport):
        get_handle = getattr(layer, "getHandle", None)
        if get_handle is None:
            continue
        try:
            handle = get_handle()
        except AttributeError:  # a closed tcp.Connection has let go of it
            return None
        # A TLS layer's handle is its OpenSSL connection: go on down.
        if isinstance(handle, socket.socket):
            return handle
    return None


def enable_keepalive(transport: object, idle: float) -> bool:
    """
    Turn on TCP keepalive so that a peer gone without a word (power cut,
    cable pulled, NAT state lost) is dropped after C{idle} seconds of
    silence and L{KEEPALIVE_PROBES} unanswered probes, freeing its slot.

    Probes are C{min(idle, 30)} seconds apart; times are whole seconds
    (the kernel's unit), at least 1.  A connection accepted on a port
    given the same options by L{keepalive_on_listener} has them already
    (Linux copies them at accept), so nothing is set again.

    @return: False if there is no TCP socket under C{transport} (a unix
        socket, a test transport); True once the options are set.
    @raise ValueError: C{idle} is not positive.
    """
    seconds = _keepalive_seconds(idle)
    for layer in transport_chain(transport):
        if getattr(getattr(layer, "server", None), _INHERITED, None) == seconds:
            return True
    sock = socket_of(transport)
    if sock is None:
        return False
    return _set_keepalive(sock, seconds)


def keepalive_on_listener(port: object, idle: float) -> bool:
    """
    Give a listening TCP port's socket the keepalive options of
    L{enable_keepalive}, where the connections it accepts inherit them
    (Linux), and mark the port so that they are not set again for each
    connection: four system calls fewer per accept.

    @return: whether the port's connections inherit them.
    """
    sock = listening_socket(port)
    if not sys.platform.startswith("linux") or not isinstance(sock, socket.socket):
        return False
    seconds = _keepalive_seconds(idle)
    if not _set_keepalive(sock, seconds):
        return False
    try:
        setattr(port, _INHERITED, seconds)
    except AttributeError:  # a port that takes no attributes
        return False
    return True


#: The attribute of a listening port whose accepted sockets inherit the
#: keepalive options (L{keepalive_on_listener}): their idle seconds.
_INHERITED = "lineserver_keepalive_seconds"


def _keepalive_seconds(idle: float) -> int:
    if not idle > 0:
        raise ValueError(f"keepalive idle time must be positive, got {idle!r}")
    return min(max(1, round(idle)), _KERNEL_MAX_SECONDS)


def _set_keepalive(sock: socket.socket, seconds: int) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    interval = min(seconds, KEEPALIVE_MAX_INTERVAL)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # TCP_KEEPIDLE is Linux's (and BSD's) name; macOS calls it TCP_KEEPALIVE.
    idle_option = getattr(socket, "TCP_KEEPIDLE", None) or getattr(
        socket, "TCP_KEEPALIVE", None
    )
    if idle_option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, idle_option, seconds)
    if hasattr(socket, "TCP_KEEPINTVL"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    if hasattr(socket, "TCP_KEEPCNT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    return True


def pending_input(transport: object) -> int:
    """
    @return: bytes the kernel holds for this connection that we have not
        read yet (FIONREAD); 0 if it cannot tell (no socket under it, or
        the socket is closed).
    """
    sock = socket_of(transport)
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    except (OSError, ValueError):
        return 0
    count: int = struct.unpack("i", buf)[0]
    return count


def behind_proxy(transport: object) -> bool:
    """
    Is there a PROXY protocol wrapper (a C{haproxy:} port) in the chain
    under a protocol, directly or under a TLS layer?
    """
    layers = transport_chain(transport)
    return any(isinstance(layer, HAProxyProtocolWrapper) for layer in layers)
