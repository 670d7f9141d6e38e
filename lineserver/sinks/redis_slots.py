"""Redis Cluster's key slots and redirections: pure code.

A key belongs to slot CRC16(key) mod 16384, hashing only the part between
the first C{{...}} braces when there is one (a hash tag); C{CLUSTER SLOTS}
says which node serves each slot, and C{-MOVED}/C{-ASK} errors say a slot
is (for good, or for one command) somewhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from lineserver.sinks.redis_resp import Reply

SLOTS = 16384


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _table()


def crc16(data: bytes) -> int:
    """
    @return: CRC16-CCITT (XMODEM), the checksum Redis Cluster uses.
    """
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """
    @return: the slot of C{key}, honouring a non-empty hash tag.
    """
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


@dataclass(frozen=True)
class Redirect:
    """
    A C{-MOVED slot host:port} or C{-ASK slot host:port} error.
    """

    ask: bool
    slot: int
    node: tuple[str, int]


def parse_redirect(message: str, default_host: str) -> Redirect | None:
    """
    @param default_host: the host of the node that replied, for a
        redirection with an empty endpoint (C{-MOVED 3999 :6381}: Redis
        sends that when the target's endpoint is unknown, and it means
        "the host you asked").
    @return: the redirection an error message carries, or None.
    """
    parts = message.split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, colon, port = parts[2].rpartition(":")
    if not colon or not port.isdigit() or not parts[1].isdigit():
        return None
    slot = int(parts[1])
    if slot >= SLOTS:
        return None
    return Redirect(parts[0] == "ASK", slot, (host or default_host, int(port)))


def parse_slots(reply: Reply, default_host: str) -> dict[int, tuple[str, int]]:
    """
    @param reply: the reply to C{CLUSTER SLOTS}.
    @param default_host: the host asked, for a node that reports an
        empty address (a node that does not know its own IP).
    @return: the master of each slot range's first slot, as a map from
        range start to (end, node) flattened into slot -> node for the
        slots we need; here simply every slot -> node.
    """
    slots: dict[int, tuple[str, int]] = {}
    if not isinstance(reply, list):
        return slots
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3:
            continue
        start, end, master = entry[0], entry[1], entry[2]
        if not (
            isinstance(start, int) and isinstance(end, int) and isinstance(master, list)
        ):
            continue
        host_reply, port_reply = master[0], master[1]
        host = host_reply.decode() if isinstance(host_reply, bytes) else ""
        if not isinstance(port_reply, int):
            continue
        node = (host or default_host, port_reply)
        for slot in range(start, end + 1):
            slots[slot] = node
    return slots
