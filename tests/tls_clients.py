"""TLS test clients shared by the TLS and security tests.

Python's own blocking C{ssl} module, so that the client's TLS stack is not
the server's, with a timeout on every socket operation; and a fresh
L{tests.certs} PKI per test.  A plain module, not a test module: importing
from here brings no TestCase into the importer's namespace.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from tests.certs import TestPKI, make_pki

#: Every blocking socket operation of a test client gives up after this.
SOCKET_TIMEOUT = 5.0


def new_pki(case: SynchronousTestCase) -> TestPKI:
    """
    A fresh PKI in a temporary directory removed after the test (not
    C{mktemp}: under pytest that writes into the working directory).
    """
    directory = Path(tempfile.mkdtemp(prefix="lineserver-tls-"))
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return make_pki(directory)


def client_context(
    pki: TestPKI,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    tls11_only: bool = False,
    max_tls12: bool = False,
) -> ssl.SSLContext:
    """
    A client trusting C{pki}'s CA, with a client certificate if given.

    @param tls11_only: offer TLS 1.1 and nothing else.
    @param max_tls12: offer TLS 1.2 at most.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca_cert))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    if tls11_only:
        # Lower the client's own floor so that it really offers TLS 1.1:
        # at the default security level OpenSSL 3 would not even try.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    elif max_tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def client_hello(context: ssl.SSLContext) -> bytes:
    """
    @return: the ClientHello C{context} would send, without a socket.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@dataclass
class ClientResult:
    """
    What a L{run_client} client saw.

    @ivar version: the TLS version negotiated, if the handshake got through
        on the client's side (with TLS 1.3 a refused client certificate is
        only reported after that).
    @ivar echoed: what came back for the payload.
    @ivar server_serial: the serial of the certificate the server showed.
    @ivar error: why it failed, if it did.
    """

    version: str | None = None
    echoed: bytes = b""
    server_serial: int | None = None
    error: str | None = None


def run_client(
    port: int,
    context: ssl.SSLContext,
    payload: bytes = b"hello\n",
    between: Callable[[], None] | None = None,
) -> ClientResult:
    """
    Connect to 127.0.0.1:C{port}, handshake, send C{payload}, read as many
    bytes back (blocking, bounded): for an echoing server.

    @param between: called after the handshake, before sending (to hold a
        connection open across a reload).
    """
    result = ClientResult()
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            result.version = conn.version()
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            result.server_serial = x509.load_der_x509_certificate(der).serial_number
            if between is not None:
                between()
            conn.sendall(payload)
            while len(result.echoed) < len(payload):
                data = conn.recv(4096)
                if not data:
                    result.error = "closed by the server"
                    break
                result.echoed += data
    except (OSError, ssl.SSLError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        raw.close()
    return result
