"""Who may connect: address allow lists and shared-secret tokens.

Pure rules, no sockets: the listener asks L{AllowList.allows} about a
peer's address before reading a byte, and the admission step asks
L{TokenSet.check} about the token of a C{AUTH <token>} line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _as_ipv4(address: IPAddress) -> IPAddress:
    """
    An IPv4-mapped IPv6 address (C{::ffff:10.0.0.1}, what a dual-stack
    socket reports for an IPv4 peer) is that IPv4 address.
    """
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


def parse_network(text: str) -> IPNetwork:
    """
    Parse one C{--allow} value: a CIDR (C{10.0.0.0/8}, C{2001:db8::/32}) or
    a single address (C{192.0.2.7}, C{::1}).

    An IPv4-mapped IPv6 network (C{::ffff:10.0.0.0/104}) is taken as the
    IPv4 network it maps.

    @raise ValueError: naming the value; a network with host bits set
        (C{10.1.2.3/8}) is refused rather than guessed at, since it is
        usually a typo for a different prefix length.
    """
    value = text.strip()
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(
                f"--allow {text!r}: not an IP address or CIDR network"
            ) from e
        raise ValueError(
            f"--allow {text!r}: host bits are set; did you mean {loose}?"
        ) from e
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_address(host: str) -> IPAddress | None:
    """
    @return: the address of C{host} (IPv4-mapped IPv6 turned into IPv4, a
        zone such as C{%eth0} dropped), or None if it is not an IP address.
    """
    text = host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _as_ipv4(address)


class AllowList:
    """
    The set of networks whose clients may connect (C{--allow}, repeatable).

    Build one only when C{--allow} was given: the empty list allows nothing
    (no address is in no network), it does not mean "no restriction".
    Anything that is not an IP address (a UNIX socket path, a name) is not
    allowed either.

    @ivar networks: the networks, merged where they overlap.
    """

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        """
        @raise ValueError: for a value that is not a network, naming it.
        """
        parsed = [parse_network(cidr) for cidr in cidrs]
        self._v4 = tuple(
            ipaddress.collapse_addresses(
                n for n in parsed if isinstance(n, ipaddress.IPv4Network)
            )
        )
        self._v6 = tuple(
            ipaddress.collapse_addresses(
                n for n in parsed if isinstance(n, ipaddress.IPv6Network)
            )
        )
        self.networks: tuple[IPNetwork, ...] = self._v4 + self._v6

    def allows_address(self, address: IPAddress) -> bool:
        address = _as_ipv4(address)
        if isinstance(address, ipaddress.IPv4Address):
            return any(address in network for network in self._v4)
        return any(address in network for network in self._v6)

    def allows(self, host: str) -> bool:
        """
        @param host: a peer's address as text, as in C{IAddress.host}.
        """
        address = parse_address(host)
        return address is not None and self.allows_address(address)

    def allows_peer(self, peer: object) -> bool:
        """
        @param peer: an C{IAddress} (C{transport.getPeer()}); only IPv4 and
            IPv6 addresses can be allowed.
        """
        host = getattr(peer, "host", None)
        return isinstance(host, str) and self.allows(host)

    def __repr__(self) -> str:
        return f"AllowList({[str(n) for n in self.networks]!r})"


class TokenFileError(ValueError):
    """
    The C{--auth-tokens} file cannot be used; the message names it.
    """


def parse_tokens(data: bytes, source: str = "tokens") -> frozenset[bytes]:
    """
    One token per line; blank lines and lines starting with C{#} (after
    leading blanks) are ignored, as are blanks around a token.  A C{#} later
    in a line is part of the token.

    @raise TokenFileError: if a token contains blanks or there is none.
    """
    tokens = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line.split()) != 1:
            raise TokenFileError(
                f"{source}, line {number}: a token cannot contain blanks"
            )
        tokens.add(line)
    if not tokens:
        raise TokenFileError(
            f"{source}: no tokens in it; every client would be refused"
        )
    return frozenset(tokens)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenSet:
    """
    The shared secrets a client may present with C{AUTH <token>}.

    L{check} compares in constant time: the candidate's SHA-256 against
    every known token's, all of them, with C{hmac.compare_digest}.
    Comparing digests rather than the tokens hides their lengths too.
    """

    __slots__ = ("_digests", "path")

    def __init__(self, tokens: Iterable[bytes], path: Path | None = None) -> None:
        self.path = path
        self._digests = tuple(_digest(token) for token in tokens)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenSet:
        """
        @raise TokenFileError: if the file cannot be read or has no token.
        """
        path = Path(path)
        return cls(cls._read(path), path)

    @staticmethod
    def _read(path: Path) -> frozenset[bytes]:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenFileError(
                f"auth tokens {path}: cannot read: {e.strerror or e}"
            ) from e
        return parse_tokens(data, f"auth tokens {path}")

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, token: bytes) -> bool:
        """
        Is C{token} one of ours?  Takes the same time whichever token
        matches, or none.
        """
        candidate = _digest(token)
        found = False
        for known in self._digests:
            # No short-circuit: every comparison runs.
            found = hmac.compare_digest(candidate, known) | found
        return found

    def reload(self) -> int:
        """
        Read the file again and use its tokens from now on.

        @return: how many tokens are now in use.
        @raise TokenFileError: if the file cannot be used; the old tokens
            stay in use then.
        """
        if self.path is None:
            raise TokenFileError("these tokens were not read from a file")
        tokens = self._read(self.path)
        self._digests = tuple(_digest(token) for token in tokens)
        return len(self._digests)
