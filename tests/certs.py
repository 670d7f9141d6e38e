"""A throwaway PKI for TLS tests, made at run time.

Nothing secret is checked in: every test run makes a fresh CA, a server
certificate for loopback, a client certificate, and a second, unrelated CA
with its own client certificate (the one that must be refused).  EC P-256
keys keep the whole set well under a tenth of a second.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_CN = "vehicle-17"
OTHER_CLIENT_CN = "intruder-1"
ORGANIZATION = "lineserver tests"


@dataclass(frozen=True)
class TestPKI:
    """
    Paths of the PEM files of one generated PKI.

    @ivar ca_cert: the CA that signs the server and the good client.
    @ivar server_cert: for 127.0.0.1, ::1 and localhost, signed by C{ca_cert}.
    @ivar client_cert: CN=vehicle-17, signed by C{ca_cert}.
    @ivar other_ca_cert: an unrelated CA.
    @ivar other_client_cert: signed by C{other_ca_cert} only.
    @ivar client_subject: the RFC 4514 text of C{client_cert}'s subject,
        C{"CN=vehicle-17,O=lineserver tests"}.
    @ivar server_serial: the serial number of C{server_cert}.
    """

    __test__ = False  # not a pytest test class, despite its name

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path
    client_subject: str
    server_serial: int


@dataclass(frozen=True)
class Issuer:
    """
    A CA's certificate and key, to sign more certificates with.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(common_name: str, parent: Issuer | None, path_length: int) -> Issuer:
    """
    A CA valid from a day ago for ten days, self-signed or signed by
    C{parent} (then with C{parent}'s key identifier).
    """
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if parent is None else parent.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
            critical=False,
        )
    signer = key if parent is None else parent.key
    return Issuer(builder.sign(signer, hashes.SHA256()), key)


def make_ca(common_name: str, *, path_length: int = 0) -> Issuer:
    """
    @param path_length: how many levels of CAs may stand below it: 0 (a CA
        that signs leaves only), 1 for a root above an intermediate (see
        L{make_intermediate_ca}).
    @return: a self-signed CA, valid from a day ago for ten days.
    """
    return _make_ca(common_name, None, path_length)


def make_intermediate_ca(parent: Issuer, common_name: str) -> Issuer:
    """
    @param parent: a CA made with C{path_length=1}.
    @return: an intermediate CA signed by C{parent}, valid from a day ago
        for ten days, that signs leaves only.
    """
    return _make_ca(common_name, parent, 0)


def issue(
    issuer: Issuer,
    common_name: str,
    *,
    server: bool,
    key: ec.EllipticCurvePrivateKey | None = None,
    valid_days: float = 10,
    serial: int | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """
    Sign a leaf certificate.

    @param server: a server certificate (SAN 127.0.0.1, ::1, localhost;
        serverAuth) rather than a client one (clientAuth).
    @param valid_days: how long from now it stays valid; negative for a
        certificate that has already expired.
    @return: the certificate and its private key.
    """
    if key is None:
        key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=valid_days)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(min(now - datetime.timedelta(days=1), not_after))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer.key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pair(
    directory: Path,
    stem: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> tuple[Path, Path]:
    """
    Write C{stem}.pem (certificate) and C{stem}.key (key) into C{directory}.
    """
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert_pem(cert))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path


def make_pki(directory: Path | str) -> TestPKI:
    """
    Generate a complete test PKI and write its PEM files into C{directory}.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("Lineserver Test CA")
    other_ca = make_ca("Some Other CA")
    ca_cert, ca_key = write_pair(directory, "ca", ca.cert, ca.key)
    other_ca_cert, _ = write_pair(directory, "other-ca", other_ca.cert, other_ca.key)
    server = issue(ca, "localhost", server=True)
    server_cert, server_key = write_pair(directory, "server", *server)
    client = issue(ca, CLIENT_CN, server=False)
    client_cert, client_key = write_pair(directory, "client", *client)
    other_client_cert, other_client_key = write_pair(
        directory, "other-client", *issue(other_ca, OTHER_CLIENT_CN, server=False)
    )
    return TestPKI(
        directory=directory,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_cert=other_ca_cert,
        other_client_cert=other_client_cert,
        other_client_key=other_client_key,
        client_subject=client[0].subject.rfc4514_string(),
        server_serial=server[0].serial_number,
    )


def load_issuer(cert_path: Path, key_path: Path) -> Issuer:
    """
    Read back a CA written by L{make_pki}, to sign more certificates later
    (a renewed server certificate for reload tests).
    """
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issuer(cert, key)


def make_server_cert(
    pki: TestPKI,
    stem: str = "server-renewed",
    *,
    serial: int | None = None,
    valid_days: float = 10,
) -> tuple[Path, Path, int]:
    """
    Issue another server certificate from C{pki}'s CA, as a renewal would,
    for reload tests: same names, a new key, a different serial.

    @param stem: file names in C{pki.directory}: C{stem}.pem and C{stem}.key.
    @param serial: the serial number; a fresh random one by default (never
        equal to C{pki.server_serial}).
    @param valid_days: negative for one that has already expired.
    @return: the certificate path, the key path and the serial number.
    """
    ca = load_issuer(pki.ca_cert, pki.ca_key)
    if serial is None:
        serial = x509.random_serial_number()
        while serial == pki.server_serial:
            serial = x509.random_serial_number()
    cert, key = issue(
        ca, "localhost", server=True, serial=serial, valid_days=valid_days
    )
    cert_path, key_path = write_pair(pki.directory, stem, cert, key)
    return cert_path, key_path, serial
