"""TLS contexts: loading, validation, reload, client subjects, TLS ports.

Every TLS connection, at accept or after C{STARTTLS}, gets its OpenSSL
connection from one L{ReloadableServerTLS}.  That object is both the
modern L{IOpenSSLServerConnectionCreator} (what C{TLSMemoryBIOFactory} and
C{wrapServerTLS} prefer) and the old L{IOpenSSLContextFactory}, so it can
be handed to C{transport.startTLS(...)} as well: C{startTLS} builds a
C{TLSMemoryBIOFactory} around whatever it is given, and on a server
transport that factory calls C{serverConnectionForTLS}.

Reload swaps the whole C{CertificateOptions} (and so its C{SSL.Context}):
connections built afterwards use the new one, connections already built
keep theirs.  A new certificate is validated completely before the swap,
so a bad file on disk never replaces a good certificate in memory.

How the handshake is known to be done (Twisted 26.10): C{TLSMemoryBIOProtocol}
calls C{handshakeCompleted()} on the protocol it wraps when that protocol
provides L{twisted.internet.interfaces.IHandshakeListener}.  That holds for
a listener wrapped in TLS (C{wrapServerTLS}, C{TLSMemoryBIOFactory}) and for
C{transport.startTLS}, whose TLS layer wraps C{transport.protocol}.  A
failed handshake never calls it: the connection is lost with an
C{OpenSSL.SSL.Error}.  Nothing calls it when the peer just stays silent,
which is why L{lineserver.protocol.LineProtocol} keeps its own handshake
deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    ISSLTransport,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
)
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from lineserver.proxy import is_proxy_description, proxy_endpoint
from lineserver.twisted_internals import parse_endpoint_description

StrPath = str | os.PathLike[str]

#: The oldest protocol version we speak.  Twisted 26.10's own default is
#: already TLS 1.2; saying it here keeps it true if that default moves.
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2


class TLSConfigError(Exception):
    """
    A certificate, key or CA file cannot be used.  The message names the
    file and the reason, ready for the log or the command line.
    """


# -- loading and validating --------------------------------------------------


def _read(path: StrPath, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} {os.fspath(path)}: {e.strerror}") from e


def load_certificates(
    path: StrPath, what: str = "certificate file"
) -> list[x509.Certificate]:
    """
    Read every PEM certificate of a file, in order (a leaf, then its chain;
    or a bundle of CAs).  Other PEM blocks (a private key) are ignored.

    @raise TLSConfigError: unreadable, or no certificate in it.
    """
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(
            f"{what} {os.fspath(path)}: no PEM certificate in it ({e})"
        ) from e
    return certificates


def load_private_key(path: StrPath) -> PrivateKeyTypes:
    """
    Read an unencrypted PEM private key (a file holding a certificate as
    well is fine, as Twisted's C{ssl:} endpoint allows).

    @raise TLSConfigError: unreadable, encrypted, or no key in it.
    """
    data = _read(path, "key file")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise TLSConfigError(
            f"key file {os.fspath(path)}: the key is encrypted; "
            "lineserver needs an unencrypted key"
        ) from e
    except (ValueError, crypto.Error) as e:
        raise TLSConfigError(
            f"key file {os.fspath(path)}: no usable PEM private key in it ({e})"
        ) from e


def _public_der(key: Any) -> bytes:
    result: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return result


def _describe(certificate: x509.Certificate) -> str:
    return (
        f"{certificate.subject.rfc4514_string() or '(empty subject)'} "
        f"serial {certificate.serial_number:x}"
    )


@dataclass(frozen=True)
class ServerCredentials:
    """
    A validated server certificate, its key and (for mutual TLS) the CAs
    that client certificates must chain to.

    @ivar certificate: the leaf certificate served.
    @ivar chain: intermediate certificates sent after it.
    @ivar client_cas: trusted client CAs; empty when clients need no certificate.
    """

    certificate: x509.Certificate
    key: PrivateKeyTypes
    chain: tuple[x509.Certificate, ...] = ()
    client_cas: tuple[x509.Certificate, ...] = field(default=())


def load_credentials(
    cert_path: StrPath,
    key_path: StrPath,
    client_ca_path: StrPath | None = None,
    *,
    chain_path: StrPath | None = None,
    now: datetime.datetime | None = None,
) -> ServerCredentials:
    """
    Load and check everything a server context needs.

    @param cert_path: PEM: the server certificate first, optionally followed
        by its intermediates.
    @param chain_path: more intermediates (Twisted's C{extraCertChain}).
    @param now: the time to judge expiry by (tests); the current time if None.
    @raise TLSConfigError: a file is missing or unreadable, holds no PEM of
        the right kind, the key does not belong to the certificate, or the
        certificate has expired.
    """
    certificates = load_certificates(cert_path)
    key = load_private_key(key_path)
    certificate = certificates[0]
    if _public_der(certificate.public_key()) != _public_der(key.public_key()):
        raise TLSConfigError(
            f"key file {os.fspath(key_path)}: this key does not match the "
            f"certificate in {os.fspath(cert_path)} ({_describe(certificate)})"
        )
    now = now or datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        raise TLSConfigError(
            f"certificate file {os.fspath(cert_path)}: the certificate "
            f"({_describe(certificate)}) expired on "
            f"{certificate.not_valid_after_utc.isoformat()}"
        )
    chain = tuple(certificates[1:])
    if chain_path is not None:
        chain += tuple(load_certificates(chain_path, "chain file"))
    client_cas: tuple[x509.Certificate, ...] = ()
    if client_ca_path is not None:
        client_cas = tuple(load_certificates(client_ca_path, "client CA file"))
    return ServerCredentials(certificate, key, chain, client_cas)


def server_options(credentials: ServerCredentials) -> CertificateOptions:
    """
    Build the Twisted options for C{credentials}: TLS 1.2 at least; with
    client CAs, a client certificate chaining to one of them (and to those
    only, not the system's store) is required.

    The OpenSSL context is built here, so that OpenSSL's own checks run now.

    @raise TLSConfigError: OpenSSL refuses the key or a certificate.
    """
    # pyOpenSSL 26 takes (and prefers: the old types are deprecated there)
    # cryptography objects for the key and certificates; only the CA store
    # still wants its own X509 type.
    mutual = bool(credentials.client_cas)
    options = CertificateOptions(
        privateKey=credentials.key,  # type: ignore[arg-type]
        certificate=credentials.certificate,  # type: ignore[arg-type]
        extraCertChain=list(credentials.chain),  # type: ignore[arg-type]
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        verify=mutual,
        requireCertificate=mutual,
        caCerts=(
            [crypto.X509.from_cryptography(c) for c in credentials.client_cas]
            if mutual
            else None
        ),
    )
    try:
        options.getContext()
    except (SSL.Error, TypeError, ValueError) as e:
        raise TLSConfigError(f"OpenSSL refused the certificate or key: {e}") from e
    return options


def load_server_options(
    cert_path: StrPath,
    key_path: StrPath,
    client_ca_path: StrPath | None = None,
    *,
    chain_path: StrPath | None = None,
) -> CertificateOptions:
    """
    L{load_credentials} then L{server_options}.

    @raise TLSConfigError: see L{load_credentials} and L{server_options}.
    """
    credentials = load_credentials(
        cert_path, key_path, client_ca_path, chain_path=chain_path
    )
    return server_options(credentials)


# -- the context every TLS connection comes from -----------------------------


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ReloadableServerTLS:
    """
    The server side of TLS, from files that can be loaded again.

    Give it to L{tls_server_endpoint} (TLS at accept) or to
    C{transport.startTLS} (C{STARTTLS}); call L{reload} on SIGHUP.

    @ivar cert_path: the certificate (and chain) PEM file.
    @ivar key_path: the private key PEM file.
    @ivar client_ca_path: CAs for client certificates; None for no mutual TLS.
    @ivar chain_path: extra intermediates, or None.
    @ivar credentials: what is in use for new connections now.
    """

    def __init__(
        self,
        cert_path: StrPath,
        key_path: StrPath,
        client_ca_path: StrPath | None = None,
        *,
        chain_path: StrPath | None = None,
    ) -> None:
        """
        @raise TLSConfigError: the files cannot be used (nothing to fall back on).
        """
        self.cert_path = cert_path
        self.key_path = key_path
        self.client_ca_path = client_ca_path
        self.chain_path = chain_path
        self.credentials, self._options = self._load()
        report_session_tickets(self._options.getContext())

    def _load(self) -> tuple[ServerCredentials, CertificateOptions]:
        credentials = load_credentials(
            self.cert_path,
            self.key_path,
            self.client_ca_path,
            chain_path=self.chain_path,
        )
        return credentials, server_options(credentials)

    @property
    def mutual(self) -> bool:
        """
        Are client certificates required?
        """
        return bool(self.credentials.client_cas)

    @property
    def certificate(self) -> x509.Certificate:
        """
        The certificate new connections are served.
        """
        return self.credentials.certificate

    def describe(self) -> str:
        """
        @return: a line for the log: subject, serial and expiry in use.
        """
        certificate = self.certificate
        return (
            f"{_describe(certificate)}, valid until "
            f"{certificate.not_valid_after_utc.isoformat()}"
        )

    def reload(self) -> None:
        """
        Load the files again and use them for new connections; connections
        already made keep the context they were made with.

        @raise TLSConfigError: the new files are unusable; the old
            certificate stays in use.
        """
        self.credentials, self._options = self._load()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N803
        """
        L{IOpenSSLServerConnectionCreator}: a connection from the current
        context.
        """
        connection: SSL.Connection = self._options.serverConnectionForTLS(tlsProtocol)
        return connection

    def getContext(self) -> SSL.Context:
        """
        L{IOpenSSLContextFactory}, for code that wants a bare context.
        """
        context: SSL.Context = self._options.getContext()
        return context


# -- TLS 1.3 session tickets ---------------------------------------------------

_tickets_log = Logger(namespace="lineserver.tls")
_tickets_reported = False


def _move(source: SSL.Connection, target: SSL.Connection) -> int:
    moved = 0
    while True:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return moved
        target.bio_write(data)
        moved += len(data)


def session_ticket_bytes(context: SSL.Context) -> int | None:
    """
    How many bytes a server with C{context} sends once a TLS 1.3 client has
    finished its handshake: its session tickets, which a client that
    sends and closes without reading leaves unread (docs/sending.md).

    OpenSSL's C{SSL_CTX_set_num_tickets} is out of reach from pyOpenSSL,
    and there is no getter either, so this asks by doing a handshake in
    memory with a throwaway client.

    @return: the bytes (0 once C{NumTickets = 0} is configured through
        C{OPENSSL_CONF}), or None if the handshake cannot be done without
        a client certificate (mutual TLS).
    """
    server = SSL.Connection(context, None)
    server.set_accept_state()
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_min_proto_version(SSL.TLS1_3_VERSION)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    client_done = False
    after = 0
    try:
        for _ in range(8):
            try:
                client.do_handshake()
                client_done = True
            except SSL.WantReadError:
                pass
            _move(client, server)
            with contextlib.suppress(SSL.WantReadError):
                server.do_handshake()
            moved = _move(server, client)
            if client_done:
                after += moved
    except SSL.Error:
        return None
    return after if client_done else None


def report_session_tickets(context: SSL.Context) -> None:
    """
    Log once per process whether this server sends TLS 1.3 session
    tickets, and what that costs clients that close without reading.
    """
    global _tickets_reported
    if _tickets_reported:
        return
    count = session_ticket_bytes(context)
    if count is None:
        return
    _tickets_reported = True
    if count:
        _tickets_log.warn(
            "TLS 1.3: this server sends session tickets ({count} bytes) after "
            "each handshake; a client that sends and then closes without "
            "reading them loses lines (set NumTickets = 0 through OPENSSL_CONF: "
            "docs/sending.md)",
            count=count,
        )
    else:
        _tickets_log.info("TLS 1.3: no session tickets are sent")


# -- who is on the other end --------------------------------------------------


def tls_at_accept(transport: object) -> bool:
    """
    Is this a connection of a TLS port (a handshake to wait for)?

    A listener wrapped in TLS (L{tls_server_endpoint}) hands its protocols a
    C{TLSMemoryBIOProtocol} as transport, which in Twisted 26.10 does not
    declare L{ISSLTransport} itself; Twisted's own C{ssl:} ports give a
    transport that does.
    """
    return isinstance(transport, TLSMemoryBIOProtocol) or ISSLTransport.providedBy(
        transport
    )


def peer_certificate(transport: object) -> x509.Certificate | None:
    """
    @return: the client certificate OpenSSL verified for this transport, or
        None: not TLS (yet), no certificate, or not verified.

    Duck-typed on C{getPeerCertificate}/C{getHandle} rather than on
    C{ISSLTransport}: in Twisted 26.10 C{TLSMemoryBIOProtocol} does not
    declare that interface itself (it copies whatever its own transport
    provides), while C{startTLS} adds the methods to the TCP transport.
    """
    get_peer = getattr(transport, "getPeerCertificate", None)
    get_handle = getattr(transport, "getHandle", None)
    if get_peer is None or get_handle is None:
        return None
    try:
        peer: Any = get_peer()
        if peer is None:
            return None
        handle = get_handle()
    except (SSL.Error, AttributeError):
        # No TLS connection (any more) behind the transport.
        return None
    verified = getattr(handle, "get_verified_chain", None)
    if verified is None or not verified():
        # A certificate the server did not verify (no client CA configured)
        # is only the peer's claim.
        return None
    if isinstance(peer, x509.Certificate):
        return peer
    certificate: x509.Certificate = peer.to_cryptography()  # pyOpenSSL X509
    return certificate


def peer_subject(transport: object) -> str | None:
    """
    @return: the verified client certificate's subject in RFC 4514 text,
        most specific first (C{"CN=vehicle-17,O=lineserver tests"}), with
        special characters escaped; None when there is no such certificate.
    """
    certificate = peer_certificate(transport)
    if certificate is None:
        return None
    return certificate.subject.rfc4514_string()


def tls_failure_text(reason: Failure) -> str | None:
    """
    Why OpenSSL ended a connection, for the log line of a refused client:
    C{"unsupported protocol"} (TLS 1.1), C{"peer did not return a
    certificate"}, C{"certificate verify failed"} (another CA), ...

    @param reason: the C{connectionLost} reason of a TLS connection.
    @return: OpenSSL's reasons joined with C{"; "}, or None if the
        connection did not end on a TLS error.
    """
    error = reason.value
    if not isinstance(error, SSL.Error):
        return None
    details = error.args[0] if error.args else None
    texts: list[str] = []
    if isinstance(details, list):
        for item in details:
            if isinstance(item, tuple) and len(item) == 3 and item[2]:
                texts.append(str(item[2]))
    return "; ".join(texts) or str(error) or type(error).__name__


# -- fewer Python calls per TLS record ------------------------------------------

#: Bytes asked of OpenSSL per C{recv} (it returns one record, at most 16 KiB).
RECEIVE_SIZE = 2**15
#: Bytes asked of the send BIO at a time: an echo's 64 KiB and its record
#: overhead in one read, under malloc's mmap threshold (128 KiB).
SEND_READ_SIZE = 2**17 - 2**12


class CoalescingTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS layer, handing the protocol one C{dataReceived} per read.

    C{TLSMemoryBIOProtocol} hands the protocol each record as it is
    decrypted (at most 16 KiB), so a 64 KiB socket read became four passes
    through lineserver's whole per-read path; here the plaintext of every
    record a read completed goes to the protocol in one C{dataReceived},
    as over plain TCP.  And a write is encrypted in one C{SSL_write} and
    its records handed to the socket in one transport write, not 16 KiB at
    a time (L{_write}).  The bytes and their order are unchanged.

    Overrides C{_flushReceiveBIO}, a private method of Twisted 26.10's
    C{TLSMemoryBIOProtocol}, keeping its error handling; it and the other
    private members used here are listed in
    L{lineserver.twisted_internals} (C{TLS_RECEIVE_METHODS},
    C{TLS_RECEIVE_FLAGS}, C{TLS_CONNECTION_ATTRIBUTE}) and checked by
    C{tests/test_twisted_internals.py}.
    """

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            ProtocolWrapper.dataReceived(self, data)

    @override
    def _flushReceiveBIO(self) -> None:
        chunks: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                chunks.append(self._tlsConnection.recv(RECEIVE_SIZE))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._deliver(chunks)
                chunks = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(Failure())
        self._deliver(chunks)
        # The protocol's replies to this read go out now, as one TLS
        # write, rather than at the aggregator's flush in the next reactor
        # iteration (with a reply trailing behind its request there, Nagle
        # and a delayed ACK held small echoes back).
        self._aggregator.flush()
        self._flushSendBIO()

    @override
    def _write(self, data: bytes) -> None:
        """
        Encrypt a write in one C{SSL_write} and hand its records to the
        socket in one transport write.

        Twisted's own C{_write} cuts a write into 16 KiB slices (a copy
        each), and after each one's C{SSL_write} reads the send BIO until
        it is empty (one C{WantReadError} raised per slice) and writes that
        record to the transport: for an echo's 64 KiB that is four of each.
        OpenSSL cuts a large write into records itself.  Same error
        handling as Twisted's.
        """
        if self._lostTLSConnection:
            return
        sent = 0
        size = len(data)
        while sent < size:
            try:
                sent += self._tlsConnection.send(
                    data if sent == 0 else memoryview(data)[sent:]
                )
            except SSL.WantReadError:
                self._bufferedWrite(data[sent:])
                break
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                break
        self._flushSendBIO()

    @override
    def _flushSendBIO(self) -> None:
        """
        Everything in the send BIO, in one transport write.
        """
        chunks: list[bytes] = []
        connection = self._tlsConnection
        while True:
            try:
                chunks.append(connection.bio_read(SEND_READ_SIZE))
            except SSL.WantReadError:
                break
        if chunks and self.transport is not None:
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))


class _CoalescingTLSFactory(TLSMemoryBIOFactory):
    protocol = CoalescingTLSProtocol


@implementer(IStreamServerEndpoint)
class _CoalescingTLSEndpoint:
    """
    C{wrapServerTLS}, with L{CoalescingTLSProtocol} for each connection.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        creator: IOpenSSLServerConnectionCreator,
        clock: IReactorTime,
    ) -> None:
        self._endpoint = endpoint
        self._creator = creator
        self._clock = clock

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        wrapped = _CoalescingTLSFactory(
            self._creator, False, factory, clock=self._clock
        )
        listening: Deferred[IListeningPort] = self._endpoint.listen(wrapped)
        return listening


# -- listening with our context -----------------------------------------------


def tls_server_endpoint(
    reactor: IReactorTime,
    endpoint: str | IStreamServerEndpoint,
    tls: ReloadableServerTLS,
) -> IStreamServerEndpoint:
    """
    Listen on a plain stream endpoint with TLS from C{tls} on top, so that
    its TLS 1.2 minimum, client certificate rule and reloads apply.

    The handshake runs on each connection (in C{TLSMemoryBIOProtocol}), never
    in the accept path.  With C{haproxy:tcp:...} the PROXY header is read
    first, then TLS starts, as HAProxy in TCP mode sends them.

    @param reactor: the reactor to parse C{endpoint} with, and the clock
        for the TLS layer's write buffering.
    @param endpoint: an endpoint description without TLS (C{tcp:4443:...},
        C{tcp6:...}, C{unix:...}, C{haproxy:tcp:...}) or an endpoint.
    @raise ValueError: the description already asks for TLS.
    """
    if isinstance(endpoint, str):
        scheme = endpoint.split(":", 2)
        layers = scheme[:2] if scheme[0] == "haproxy" else scheme[:1]
        if any(layer in ("ssl", "tls") for layer in layers):
            raise ValueError(
                f"{endpoint!r} already has TLS; give the plain endpoint under it "
                "(see split_ssl_description)"
            )
        plain: IStreamServerEndpoint = (
            proxy_endpoint(reactor, endpoint)
            if is_proxy_description(endpoint)
            else serverFromString(reactor, endpoint)
        )
    else:
        plain = endpoint
    return _CoalescingTLSEndpoint(plain, tls, reactor)


@dataclass(frozen=True)
class SSLPortSpec:
    """
    An C{ssl:} port description taken apart.

    @ivar plain: the same port without TLS (C{tcp:...}, or
        C{haproxy:tcp:...}), for L{tls_server_endpoint}.
    @ivar cert_path: C{certKey} (which defaults to C{privateKey}).
    @ivar key_path: C{privateKey}.
    @ivar chain_path: C{extraCertChain}, or None.
    """

    plain: str
    cert_path: str
    key_path: str
    chain_path: str | None = None


#: C{ssl:} parameters that go to TCP unchanged.
_TCP_PARAMETERS = ("interface", "backlog")


def is_ssl_description(description: str) -> bool:
    """
    Does this C{--port} ask for TLS at accept (C{ssl:} or C{haproxy:ssl:})?
    """
    kind = description.lower()
    if kind.startswith("haproxy:"):
        kind = kind[len("haproxy:") :]
    return kind.startswith("ssl:")


def split_ssl_description(description: str) -> SSLPortSpec:
    """
    Take apart Twisted's C{ssl:PORT:privateKey=KEY:certKey=CERT} syntax (with
    an optional C{haproxy:} prefix) so that the port listens with our own
    reloadable context instead of the one Twisted's parser would build.

    Twisted's defaults are kept: C{privateKey} defaults to C{server.pem},
    C{certKey} to C{privateKey}, C{interface} to every IPv4 address.

    @raise ValueError: not an C{ssl:} description, or it sets C{sslmethod}
        or C{dhParameters} (the protocol floor and the key exchange are
        ours), or an unknown parameter.
    """
    prefix = ""
    rest = description
    if rest.startswith("haproxy:"):
        prefix, rest = "haproxy:", rest[len("haproxy:") :]
    if not rest.startswith("ssl:"):
        raise ValueError(f"not an ssl: endpoint description: {description!r}")
    args, kwargs = parse_endpoint_description(rest)
    positional = list(args[1:])
    names = ["port", "privateKey", "certKey", "sslmethod", "interface", "backlog"]
    for name, value in zip(names, positional, strict=False):
        if name in kwargs:
            raise ValueError(f"{description!r}: {name} given twice")
        kwargs[name] = value
    if len(positional) > len(names):
        raise ValueError(f"{description!r}: too many positional arguments")
    refused = {"sslmethod", "dhParameters"} & kwargs.keys()
    if refused:
        raise ValueError(
            f"{description!r}: {', '.join(sorted(refused))} is not supported; "
            "lineserver always uses TLS 1.2 or later with ECDHE key exchange"
        )
    known = {"port", "privateKey", "certKey", "extraCertChain", *_TCP_PARAMETERS}
    unknown = kwargs.keys() - known
    if unknown:
        raise ValueError(
            f"{description!r}: unknown parameter(s) {', '.join(sorted(unknown))}"
        )
    if "port" not in kwargs:
        raise ValueError(f"{description!r}: no port")
    key_path = kwargs.get("privateKey", "server.pem")
    cert_path = kwargs.get("certKey", key_path)
    plain = f"{prefix}tcp:{quoteStringArgument(kwargs['port'])}"
    for name in _TCP_PARAMETERS:
        if name in kwargs:
            plain += f":{name}={quoteStringArgument(kwargs[name])}"
    return SSLPortSpec(plain, cert_path, key_path, kwargs.get("extraCertChain"))


def ssl_server_endpoint(
    reactor: IReactorTime,
    description: str,
    client_ca_path: StrPath | None = None,
) -> tuple[IStreamServerEndpoint, ReloadableServerTLS]:
    """
    An C{ssl:} (or C{haproxy:ssl:}) port, listening with our reloadable
    context.

    @return: the endpoint, and the context to L{ReloadableServerTLS.reload}.
    @raise ValueError: see L{split_ssl_description}.
    @raise TLSConfigError: the files named cannot be used.
    """
    spec = split_ssl_description(description)
    tls = ReloadableServerTLS(
        spec.cert_path, spec.key_path, client_ca_path, chain_path=spec.chain_path
    )
    return tls_server_endpoint(reactor, spec.plain, tls), tls
