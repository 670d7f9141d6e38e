"""A TLS port hands its protocol whole reads, not one TLS record at a time,
and encrypts a protocol's write in one go, whatever its size.

A record carries at most 16 KiB; Twisted's TLS layer delivered each on its
own, so a protocol behind C{tls_server_endpoint} saw four calls where a
plain port gives one.  Through real loopback sockets: a client sends
256 KiB at once, and the protocol must get some call larger than one
record, with every byte echoed back in order.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from typing_extensions import override

from tests.test_tls import Echo, EchoFactory, TLSTestCase
from tests.tls_clients import client_context

#: The most plaintext one TLS record carries.
RECORD = 2**14

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB


class SizedEcho(Echo):
    @override
    def dataReceived(self, data: bytes) -> None:
        self.factory.sizes.append(len(data))  # type: ignore[attr-defined]
        super().dataReceived(data)


class SizedEchoFactory(EchoFactory):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    @override
    def buildProtocol(self, addr: Any) -> SizedEcho:  # type: ignore[override]
        protocol = SizedEcho()
        protocol.factory = self
        return protocol


class Blurt(Echo):
    """
    Answers a client's first bytes with one large write, then closes.
    """

    @override
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(BLURT)
        self.transport.loseConnection()


class BlurtFactory(EchoFactory):
    @override
    def buildProtocol(self, addr: Any) -> Blurt:  # type: ignore[override]
        protocol = Blurt()
        protocol.factory = self
        return protocol


#: Many records and more than one read of the send BIO; not a multiple of
#: a record.
BLURT = bytes(range(251)) * (4 * 2**20 // 251 + 1)


def read_blurt(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"go\n")
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ssl.SSLEOFError:
                break
            if not chunk:
                break
            received += chunk
        return bytes(received)


def send_and_read(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(PAYLOAD)
        received = bytearray()
        while len(received) < len(PAYLOAD):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)


class CoalescingTests(TLSTestCase):
    @inlineCallbacks
    def test_reads_not_records(self) -> Any:
        factory = SizedEchoFactory()
        port, _ = yield self.listen_tls(self.server(), factory)
        echoed = yield deferToThread(send_and_read, port, client_context(self.pki))
        self.assertEqual(echoed, PAYLOAD)
        self.assertEqual(sum(factory.sizes), len(PAYLOAD))
        self.assertGreater(max(factory.sizes), RECORD)
        self.assertLess(len(factory.sizes), len(PAYLOAD) // RECORD)

    @inlineCallbacks
    def test_one_large_write(self) -> Any:
        """
        A 4 MiB write (hundreds of records, several reads of the send BIO)
        reaches the client whole and in order, then the close.
        """
        port, _ = yield self.listen_tls(self.server(), BlurtFactory())
        received = yield deferToThread(read_blurt, port, client_context(self.pki))
        self.assertEqual(len(received), len(BLURT))
        self.assertEqual(received, BLURT)
