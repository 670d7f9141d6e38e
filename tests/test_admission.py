"""The admission rules: STARTTLS, required TLS, AUTH tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lineserver.admission import (
    Admission,
    AdmissionPolicy,
    Verdict,
    parse_auth_line,
)
from lineserver.errors import ErrorCode


def good(token: bytes) -> bool:
    return token == b"s3cret"


class AdmissionTests(SynchronousTestCase):
    def test_trivial_policy_opens_on_first_line(self) -> None:
        """
        With no requirement, the first line is delivered and opens the
        connection; only a first line of STARTTLS is refused.
        """
        policy = AdmissionPolicy()
        admission = Admission(policy)
        self.assertFalse(admission.open)
        self.assertEqual(admission.on_line(b"hello", False).verdict, Verdict.DELIVER)
        self.assertTrue(admission.open)
        refused = Admission(policy).on_line(b"STARTTLS", True)
        self.assertEqual(refused.code, ErrorCode.TLS_UNAVAILABLE)

    def test_starttls(self) -> None:
        """
        STARTTLS as the last thing sent upgrades; lines after it in the same
        read are a protocol error; where not offered it is refused.
        """
        offered = Admission(AdmissionPolicy(starttls=True))
        self.assertEqual(
            offered.on_line(b"STARTTLS", last=True).verdict, Verdict.START_TLS
        )
        decision = offered.on_line(b"STARTTLS", last=False)
        self.assertEqual(decision.code, ErrorCode.PROTOCOL)
        refused = Admission(AdmissionPolicy()).on_line(b"STARTTLS", last=True)
        self.assertEqual(refused.code, ErrorCode.TLS_UNAVAILABLE)
        offered.tls_started()
        again = offered.on_line(b"STARTTLS", last=True)
        self.assertEqual(again.code, ErrorCode.TLS_UNAVAILABLE)

    def test_require_tls(self) -> None:
        """
        With TLS required, any line before the upgrade is refused; after it,
        lines are delivered.
        """
        admission = Admission(AdmissionPolicy(starttls=True, require_tls=True))
        self.assertFalse(admission.open)
        self.assertEqual(admission.on_line(b"hello", True).code, ErrorCode.TLS_REQUIRED)
        admission.tls_started()
        self.assertEqual(admission.on_line(b"hello", True).verdict, Verdict.DELIVER)
        self.assertTrue(admission.open)

    def test_auth(self) -> None:
        """
        The first line must be a good AUTH; it is consumed, not delivered.
        """
        admission = Admission(AdmissionPolicy(check_token=good))
        self.assertEqual(
            admission.on_line(b"AUTH s3cret", True).verdict, Verdict.CONSUMED
        )
        self.assertEqual(
            admission.on_line(b"AUTH s3cret", True).verdict, Verdict.DELIVER
        )
        self.assertTrue(admission.open)
        for bad in (b"AUTH wrong", b"hello", b"AUTH ", b"auth s3cret"):
            decision = Admission(AdmissionPolicy(check_token=good)).on_line(bad, True)
            self.assertEqual(decision.code, ErrorCode.UNAUTHORIZED, bad)

    def test_starttls_then_auth(self) -> None:
        """
        STARTTLS may come before AUTH; with TLS required, AUTH in plaintext
        is refused (the token would travel in clear).
        """
        policy = AdmissionPolicy(starttls=True, require_tls=True, check_token=good)
        plain = Admission(policy)
        self.assertEqual(
            plain.on_line(b"AUTH s3cret", True).code, ErrorCode.TLS_REQUIRED
        )
        admission = Admission(policy)
        self.assertEqual(
            admission.on_line(b"STARTTLS", True).verdict, Verdict.START_TLS
        )
        admission.tls_started()
        self.assertEqual(
            admission.on_line(b"AUTH s3cret", True).verdict, Verdict.CONSUMED
        )
        self.assertFalse(admission.open)

    def test_starttls_after_lines(self) -> None:
        """
        Where STARTTLS is offered (and TLS not required), plaintext lines
        may come first; STARTTLS stays a command until TLS is on, and the
        connection opens only then.  Where it is not offered, STARTTLS
        after the first line is data.
        """
        admission = Admission(AdmissionPolicy(starttls=True))
        self.assertEqual(admission.on_line(b"plain", False).verdict, Verdict.DELIVER)
        self.assertFalse(admission.open)
        self.assertEqual(
            admission.on_line(b"STARTTLS", True).verdict, Verdict.START_TLS
        )
        admission.tls_started()
        self.assertTrue(admission.open)
        elsewhere = Admission(AdmissionPolicy())
        self.assertEqual(elsewhere.on_line(b"plain", False).verdict, Verdict.DELIVER)
        self.assertTrue(elsewhere.open)

    def test_auth_then_starttls(self) -> None:
        """
        Without required TLS, STARTTLS may also follow AUTH: it is a
        command until the first line is delivered, data after that.
        """
        admission = Admission(AdmissionPolicy(starttls=True, check_token=good))
        self.assertEqual(
            admission.on_line(b"AUTH s3cret", True).verdict, Verdict.CONSUMED
        )
        self.assertEqual(
            admission.on_line(b"STARTTLS", True).verdict, Verdict.START_TLS
        )
        admission.tls_started()
        self.assertEqual(admission.on_line(b"data", False).verdict, Verdict.DELIVER)
        self.assertTrue(admission.open)

    @given(st.binary(max_size=40))
    def test_parse_auth_line(self, token: bytes) -> None:
        """
        Property: AUTH <token> parses back to the token (stripped); other
        prefixes do not parse.
        """
        parsed = parse_auth_line(b"AUTH " + token)
        self.assertEqual(parsed, token.strip() or None)
        self.assertIsNone(parse_auth_line(b"XAUTH " + token))
