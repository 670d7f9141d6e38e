"""Allow lists and auth tokens: the pure rules of who may connect."""

from __future__ import annotations

import hmac
import ipaddress
import shutil
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from lineserver.access import (
    AllowList,
    TokenFileError,
    TokenSet,
    parse_network,
    parse_tokens,
)
from lineserver.admission import parse_auth_line


class AllowListTests(SynchronousTestCase):
    def test_ipv4_cidr_and_single_address(self) -> None:
        """
        An IPv4 network admits its addresses only; a bare address is a /32.
        """
        allow = AllowList(["10.0.0.0/8", "192.0.2.7"])
        self.assertTrue(allow.allows("10.0.0.1"))
        self.assertTrue(allow.allows("10.255.255.255"))
        self.assertTrue(allow.allows("192.0.2.7"))
        self.assertFalse(allow.allows("11.0.0.1"))
        self.assertFalse(allow.allows("192.0.2.8"))

    def test_ipv6(self) -> None:
        """
        IPv6 networks and single IPv6 addresses work the same way.
        """
        allow = AllowList(["2001:db8::/32", "::1"])
        self.assertTrue(allow.allows("2001:db8:1::5"))
        self.assertTrue(allow.allows("::1"))
        self.assertFalse(allow.allows("2001:db9::1"))
        self.assertFalse(allow.allows("::2"))

    def test_families_do_not_mix(self) -> None:
        """
        An IPv4 rule does not admit an IPv6 address, nor the reverse.
        """
        self.assertFalse(AllowList(["0.0.0.0/0"]).allows("::1"))
        self.assertFalse(AllowList(["::/0"]).allows("127.0.0.1"))

    def test_ipv4_mapped_ipv6_peer_matches_ipv4_rule(self) -> None:
        """
        A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; IPv4 rules
        apply to them.
        """
        allow = AllowList(["10.0.0.0/8"])
        self.assertTrue(allow.allows("::ffff:10.0.0.1"))
        self.assertFalse(allow.allows("::ffff:11.0.0.1"))

    def test_ipv4_mapped_rule_matches_ipv4_peer(self) -> None:
        """
        A rule written as an IPv4-mapped IPv6 network is the IPv4 network.
        """
        allow = AllowList(["::ffff:10.0.0.0/104"])
        self.assertEqual([str(n) for n in allow.networks], ["10.0.0.0/8"])
        self.assertTrue(allow.allows("10.1.2.3"))
        self.assertTrue(allow.allows("::ffff:10.1.2.3"))
        self.assertFalse(allow.allows("11.1.2.3"))

    def test_zone_is_ignored(self) -> None:
        """
        A link-local peer's zone (%eth0) does not stop it from matching.
        """
        self.assertTrue(AllowList(["fe80::/10"]).allows("fe80::1%eth0"))

    def test_empty_allows_nothing(self) -> None:
        """
        AllowList([]) admits no one: it is built only when --allow is given.
        """
        allow = AllowList([])
        for host in ("127.0.0.1", "::1", "10.0.0.1"):
            self.assertFalse(allow.allows(host))

    def test_not_an_address(self) -> None:
        """
        Names and other non-IP hosts are not allowed.
        """
        allow = AllowList(["0.0.0.0/0", "::/0"])
        for host in ("localhost", "", "10.0.0.1.5", "/tmp/socket"):
            self.assertFalse(allow.allows(host), host)

    def test_allows_peer(self) -> None:
        """
        allows_peer reads the host of IPv4 and IPv6 IAddresses; a UNIX
        socket peer has none and is not allowed.
        """
        allow = AllowList(["127.0.0.0/8", "::1"])
        self.assertTrue(allow.allows_peer(IPv4Address("TCP", "127.0.0.1", 5000)))
        self.assertTrue(allow.allows_peer(IPv6Address("TCP", "::1", 5000)))
        self.assertFalse(allow.allows_peer(IPv4Address("TCP", "10.0.0.1", 5000)))
        self.assertFalse(allow.allows_peer(UNIXAddress(b"/tmp/s")))

    def test_bad_value_named(self) -> None:
        """
        A value that is not a network raises ValueError naming it.
        """
        for bad in ("10.0.0.0/33", "banana", "10.0.0/8", "::1/129", ""):
            with self.assertRaises(ValueError) as caught:
                AllowList(["127.0.0.1", bad])
            self.assertIn(repr(bad), str(caught.exception))

    def test_host_bits_refused_with_hint(self) -> None:
        """
        10.1.2.3/8 is refused, and the message suggests 10.0.0.0/8.
        """
        with self.assertRaises(ValueError) as caught:
            parse_network("10.1.2.3/8")
        self.assertIn("10.0.0.0/8", str(caught.exception))
        self.assertIn("'10.1.2.3/8'", str(caught.exception))

    def test_overlapping_networks_merge(self) -> None:
        """
        Overlapping and adjacent networks are merged, with the same result.
        """
        allow = AllowList(["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16"])
        self.assertEqual([str(n) for n in allow.networks], ["10.0.0.0/8"])
        self.assertTrue(allow.allows("10.200.0.1"))


def _inside_and_outside(
    version: int,
) -> st.SearchStrategy[tuple[str, str, str]]:
    """
    A network (prefix 1..max), an address in it, and one outside it (the
    same address with the last prefix bit flipped).
    """
    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, str, str]:
        prefix = draw(st.integers(1, bits))
        inside_int = draw(st.integers(0, 2**bits - 1))
        network = ipaddress.ip_network((make(inside_int), prefix), strict=False)
        outside_int = inside_int ^ (1 << (bits - prefix))
        return str(network), str(make(inside_int)), str(make(outside_int))

    return build()


class AllowListPropertyTests(SynchronousTestCase):
    @settings(deadline=None)
    @given(_inside_and_outside(4))
    def test_ipv4_inside_allowed_outside_not(self, case: tuple[str, str, str]) -> None:
        """
        For any IPv4 network, an address in it is allowed, one outside not.
        """
        network, inside, outside = case
        allow = AllowList([network])
        self.assertTrue(allow.allows(inside))
        self.assertFalse(allow.allows(outside))
        self.assertTrue(allow.allows(f"::ffff:{inside}"))

    @settings(deadline=None)
    @given(_inside_and_outside(6))
    def test_ipv6_inside_allowed_outside_not(self, case: tuple[str, str, str]) -> None:
        """
        For any IPv6 network, an address in it is allowed, one outside not
        (IPv4-mapped networks and addresses are compared as IPv4, both
        sides alike, so the property holds for them too).
        """
        network, inside, outside = case
        allow = AllowList([network])
        self.assertTrue(allow.allows(inside))
        self.assertFalse(allow.allows(outside))


class TokenSetTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Not self.mktemp(): under pytest it litters the working directory.
        self.directory = Path(tempfile.mkdtemp(prefix="lineserver-access-"))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def write(self, text: bytes) -> Path:
        path = self.directory / "tokens"
        path.write_bytes(text)
        return path

    def test_from_file(self) -> None:
        """
        One token per line; blank lines, comments and surrounding blanks
        are ignored; a # inside a token is part of it.
        """
        path = self.write(
            b"# fleet tokens\n\n  alpha-1  \r\n\t# indented comment\nbe#ta\n"
        )
        tokens = TokenSet.from_file(path)
        self.assertEqual(len(tokens), 2)
        self.assertTrue(tokens.check(b"alpha-1"))
        self.assertTrue(tokens.check(b"be#ta"))
        for wrong in (b"", b"alpha", b"alpha-1 ", b"# fleet tokens", b"be"):
            self.assertFalse(tokens.check(wrong), wrong)

    def test_check_compares_every_token(self) -> None:
        """
        check runs compare_digest against every token, whether the first
        one matches or none does (no early exit).
        """
        calls: list[int] = []
        real = hmac.compare_digest

        def counting(a: bytes, b: bytes) -> bool:
            calls.append(1)
            return real(a, b)

        self.patch(hmac, "compare_digest", counting)
        tokens = TokenSet([b"one", b"two", b"three", b"four"])
        self.assertTrue(tokens.check(b"one"))
        self.assertEqual(len(calls), 4)
        self.assertFalse(tokens.check(b"five"))
        self.assertEqual(len(calls), 8)

    def test_missing_file(self) -> None:
        """
        A missing file raises TokenFileError naming it.
        """
        path = self.directory / "missing"
        with self.assertRaises(TokenFileError) as caught:
            TokenSet.from_file(path)
        self.assertIn(str(path), str(caught.exception))

    def test_no_tokens(self) -> None:
        """
        A file with only comments is refused: it would lock everyone out.
        """
        path = self.write(b"# nothing yet\n\n")
        with self.assertRaises(TokenFileError) as caught:
            TokenSet.from_file(path)
        self.assertIn("no tokens", str(caught.exception))

    def test_token_with_blank(self) -> None:
        """
        A line with two words is refused, naming its line number.
        """
        with self.assertRaises(TokenFileError) as caught:
            parse_tokens(b"good\nbad token\n", "f")
        self.assertIn("line 2", str(caught.exception))

    def test_reload(self) -> None:
        """
        reload reads the file again: new tokens count, removed ones no more.
        """
        path = self.write(b"old\n")
        tokens = TokenSet.from_file(path)
        path.write_bytes(b"new\nnewer\n")
        self.assertEqual(tokens.reload(), 2)
        self.assertTrue(tokens.check(b"new"))
        self.assertTrue(tokens.check(b"newer"))
        self.assertFalse(tokens.check(b"old"))

    def test_failed_reload_keeps_old(self) -> None:
        """
        If the file is gone or empty, reload raises and the old tokens stay.
        """
        path = self.write(b"old\n")
        tokens = TokenSet.from_file(path)
        path.write_bytes(b"\n")
        self.assertRaises(TokenFileError, tokens.reload)
        path.unlink()
        self.assertRaises(TokenFileError, tokens.reload)
        self.assertTrue(tokens.check(b"old"))

    def test_reload_without_file(self) -> None:
        """
        Tokens given in code have no file to reload.
        """
        self.assertRaises(TokenFileError, TokenSet([b"x"]).reload)


class ParseAuthLineTests(SynchronousTestCase):
    def test_auth_line(self) -> None:
        """
        AUTH <token> gives the token, without surrounding blanks.
        """
        self.assertEqual(parse_auth_line(b"AUTH s3cret"), b"s3cret")
        self.assertEqual(parse_auth_line(b"AUTH  s3cret \t"), b"s3cret")

    def test_not_auth(self) -> None:
        """
        Anything else, or AUTH without a token, gives None.
        """
        for line in (b"", b"AUTH", b"AUTH ", b"AUTH   ", b"auth x", b"AUTHx", b"x"):
            self.assertIsNone(parse_auth_line(line), line)
