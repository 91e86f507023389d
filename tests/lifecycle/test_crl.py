"""The cumulative CRL builder with a software key (the HSM-signed one is checked with openssl
in test_revoke): CRL Number, AKI, times, reason codes, and the reason names accepted."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline import ca
from pipeline.errors import InputError
from pipeline.lifecycle.crl import REASONS, CrlEntry, build_crl, parse_reason

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def _issuer() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing")])
    return ca.build_root(key, name, 30, now=NOW - dt.timedelta(days=1)), key


def test_crl_carries_number_aki_times_and_reasons() -> None:
    cert, key = _issuer()
    entries = [
        CrlEntry(7, NOW - dt.timedelta(hours=1), "keyCompromise"),
        CrlEntry(9, NOW + dt.timedelta(hours=1), "superseded"),  # clamped to thisUpdate
        CrlEntry(11, NOW - dt.timedelta(days=2), "unspecified"),
    ]
    crl = build_crl(cert, key, entries, 42, NOW, NOW + dt.timedelta(days=7))
    assert crl.is_signature_valid(cert.public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + dt.timedelta(days=7)
    by_serial = {r.serial_number: r for r in crl}
    assert by_serial[9].revocation_date_utc == NOW
    reason = by_serial[7].extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    with pytest.raises(x509.ExtensionNotFound):  # RFC 5280: leave out "unspecified"
        by_serial[11].extensions.get_extension_for_class(x509.CRLReason)


def test_an_empty_crl_is_valid() -> None:
    cert, key = _issuer()
    crl = build_crl(cert, key, [], 1, NOW, NOW + dt.timedelta(days=1))
    assert list(crl) == [] and crl.is_signature_valid(cert.public_key())


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("keyCompromise", "keyCompromise"),
        ("key-compromise", "keyCompromise"),
        ("KEY_COMPROMISE", "keyCompromise"),
        ("cessationofoperation", "cessationOfOperation"),
    ],
)
def test_reason_names(given: str, name: str) -> None:
    assert parse_reason(given) == name and name in REASONS


@pytest.mark.parametrize("given", ["certificateHold", "cACompromise", "removeFromCRL", ""])
def test_reasons_provline_does_not_give_are_refused(given: str) -> None:
    with pytest.raises(InputError) as info:
        parse_reason(given)
    assert info.value.exit_code == 2 and "RFC 5280" in info.value.line()
