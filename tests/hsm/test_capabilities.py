"""Choosing a mechanism per function from what a token reports (pure: token descriptions are
data, as C_GetMechanismInfo returns them; the real queries are in test_negotiation.py)."""

from __future__ import annotations

from pkcs11 import Mechanism, MechanismFlag

from pipeline.hsm.capabilities import (
    MISSING,
    NOT_AVAILABLE,
    OK,
    OPENCRYPTOKI,
    SOFTHSM2,
    UNKNOWN,
    YUBIHSM2,
    Capabilities,
    CapabilityReport,
    KnownModule,
    Need,
    Offer,
    evaluate,
    format_report,
    identify,
    keygen_need,
    signing_options,
    wrap_need,
)
from pipeline.hsm.signers import P11ECPrivateKey, P11RSAPrivateKey
from pipeline.keyprofile import KeyProfile

F = MechanismFlag


def _caps(
    offers: dict[int, tuple[MechanismFlag, int | None, int | None]], known: KnownModule
) -> Capabilities:
    return Capabilities(
        module_path="/x.so",
        module={"manufacturer": "m", "description": "d", "version": "1.0", "cryptoki": "2.40"},
        token={"label": "t", "manufacturer": "m", "model": "x", "serial": "1"},
        figures=None,
        offers={int(m): Offer(int(m), int(f), lo, hi) for m, (f, lo, hi) in offers.items()},
        known=known,
    )


def test_module_families_are_recognised_from_their_identity() -> None:
    assert identify("SoftHSM", "SoftHSM project", "SoftHSM v2") is SOFTHSM2
    assert identify("IBM", "IBM Corp.", "IBM SoftTok") is OPENCRYPTOKI
    assert identify("Yubico (www.yubico.com)", "Yubico (www.yubico.com)", "YubiHSM") is YUBIHSM2
    assert identify("Safenet, Inc.", "Safenet, Inc.", "Luna K7") is UNKNOWN


def test_pad_counts_as_rfc_5649_only_on_softhsm2_and_kwp_needs_the_wrap_flag() -> None:
    pad = {Mechanism.AES_KEY_WRAP_PAD: (F.WRAP | F.UNWRAP, 16, 32)}
    assert evaluate(_caps(pad, SOFTHSM2), wrap_need("custody wrapped")).status == OK
    other = evaluate(_caps(pad, UNKNOWN), wrap_need("custody wrapped"))
    assert other.status == MISSING
    assert "CKM_AES_KEY_WRAP_KWP (0x210B) not offered" in other.detail
    assert "RFC 5649 only on SoftHSM2" in other.detail
    # YubiHSM 2 lists KWP for internal use only: without CKF_WRAP it does not count
    yubi = evaluate(_caps({Mechanism.AES_KEY_WRAP_KWP: (F.HW, 0, 0)}, YUBIHSM2), wrap_need("w"))
    assert yubi.status == MISSING and "offered without WRAP" in yubi.detail
    both = {**pad, Mechanism.AES_KEY_WRAP_KWP: (F.WRAP, 16, 32)}
    row = evaluate(_caps(both, SOFTHSM2), wrap_need("custody wrapped"))
    assert row.uses.startswith("CKM_AES_KEY_WRAP_KWP")  # the standard one first


def test_signing_prefers_raw_ecdsa_and_falls_back_to_hashed_mechanisms() -> None:
    need = Need("sign", "issuing CA key (ec-p384)", signing_options(KeyProfile.EC_P384))
    raw = _caps(
        {Mechanism.ECDSA: (F.SIGN, 256, 521), Mechanism.ECDSA_SHA384: (F.SIGN, 256, 521)}, UNKNOWN
    )
    assert evaluate(raw, need).uses == "CKM_ECDSA (SHA-384 on the host)"
    hashed = _caps({Mechanism.ECDSA_SHA384: (F.SIGN, 256, 521)}, UNKNOWN)
    assert evaluate(hashed, need).uses == "CKM_ECDSA_SHA384 (SHA-384 in the token)"
    rsa_need = Need("sign", "audit key (rsa-2048)", signing_options(KeyProfile.RSA_2048))
    raw_rsa = _caps({Mechanism.RSA_PKCS: (F.SIGN, 512, 4096)}, OPENCRYPTOKI)
    assert evaluate(raw_rsa, rsa_need).uses == "CKM_RSA_PKCS (PKCS#1 v1.5, SHA-256 on the host)"
    # the signers make the same choice
    ec_signer = P11ECPrivateKey(None, None, frozenset({Mechanism.ECDSA_SHA384}))  # type: ignore[arg-type]
    from cryptography.hazmat.primitives import hashes

    assert ec_signer.mechanism_for(hashes.SHA384()) is Mechanism.ECDSA_SHA384
    rsa_signer = P11RSAPrivateKey(None, None, frozenset({Mechanism.RSA_PKCS}))  # type: ignore[arg-type]
    assert rsa_signer.mechanism_for(hashes.SHA256()) is Mechanism.RSA_PKCS
    assert P11RSAPrivateKey(None, None).mechanism_for(hashes.SHA256()) is Mechanism.SHA256_RSA_PKCS  # type: ignore[arg-type]


def test_key_generation_checks_flags_and_key_sizes() -> None:
    caps = _caps({Mechanism.RSA_PKCS_KEY_PAIR_GEN: (F.GENERATE_KEY_PAIR, 512, 1024)}, UNKNOWN)
    row = evaluate(caps, keygen_need(KeyProfile.RSA_2048, "custody retain, key profile rsa-2048"))
    assert row.status == MISSING and "key sizes 512..1024, not 2048" in row.detail
    no_ec = evaluate(caps, keygen_need(KeyProfile.EC_P256, "custody retain, key profile ec-p256"))
    assert no_ec.status == MISSING
    assert no_ec.problem() == (
        "generate key pairs (custody retain, key profile ec-p256): "
        "CKM_EC_KEY_PAIR_GEN (0x1040) not offered"
    )
    optional = evaluate(
        caps, Need("sign", "verify-device", signing_options(KeyProfile.EC_P256), required=False)
    )
    assert optional.status == NOT_AVAILABLE and not optional.blocking


def test_the_report_lists_every_missing_function_and_renders_as_a_table() -> None:
    caps = _caps({Mechanism.RSA_PKCS: (F.SIGN, 512, 4096)}, OPENCRYPTOKI)
    report = CapabilityReport(
        caps,
        [
            evaluate(
                caps,
                Need(
                    "sign certificates",
                    "issuing CA key (rsa-2048)",
                    signing_options(KeyProfile.RSA_2048),
                ),
            ),
            evaluate(caps, keygen_need(KeyProfile.EC_P256, "custody wrapped, key profile ec-p256")),
            evaluate(caps, wrap_need("custody wrapped")),
        ],
    )
    assert [r.function for r in report.missing] == [
        "generate key pairs",
        "wrap device keys (RFC 5649)",
    ]
    data = report.to_json()
    assert data["ok"] is False and data["module"]["family"] == "openCryptoki"
    lines = format_report(data)
    assert lines[2].split()[:2] == ["function", "needed"]
    assert any(line.startswith("MISSING: wrap device keys") for line in lines)
    try:
        report.require("stations/s.yaml")
    except Exception as exc:
        text = exc.line()  # type: ignore[attr-defined]
        assert exc.exit_code == 34  # type: ignore[attr-defined]
        assert len(text.splitlines()) == 2
        assert "CKM_EC_KEY_PAIR_GEN (0x1040) not offered" in text
    else:
        raise AssertionError("require() accepted a token without the needed mechanisms")
