"""Names of PKCS#11 numbers and the one-line errors built from them (pure, no token)."""

from __future__ import annotations

import pkcs11.exceptions as p11e
import pytest
from pkcs11 import Mechanism

from pipeline.errors import HsmError, MechanismUnsupported, PinError
from pipeline.hsm.errormap import translate
from pipeline.hsm.names import mechanism_name, return_value_name, short_mechanism_name


def test_mechanisms_are_named_even_where_python_pkcs11_has_no_name() -> None:
    assert mechanism_name(Mechanism.ECDSA) == "CKM_ECDSA (0x1041)"
    assert mechanism_name(64) == "CKM_SHA256_RSA_PKCS (0x40)"  # was shown as "mechanism 64"
    assert mechanism_name(0x210B) == "CKM_AES_KEY_WRAP_KWP (0x210B)"
    assert mechanism_name(0x1054) == "CKM_RSA_AES_KEY_WRAP (0x1054)"  # not in python-pkcs11
    assert mechanism_name(0x8000216F) == "CKM_VENDOR_DEFINED+0x216F (0x8000216F)"
    assert mechanism_name(0x7777) == "unnamed mechanism (0x7777)"
    assert short_mechanism_name(0x7777) == "0x7777"
    assert short_mechanism_name(Mechanism.AES_KEY_WRAP_PAD) == "CKM_AES_KEY_WRAP_PAD"


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (p11e.MechanismInvalid(), "CKR_MECHANISM_INVALID"),
        (p11e.AttributeTypeInvalid(), "CKR_ATTRIBUTE_TYPE_INVALID"),
        (p11e.SlotIDInvalid(), "CKR_SLOT_ID_INVALID"),
        (p11e.SessionReadWriteSOExists(), "CKR_SESSION_READ_WRITE_SO_EXISTS"),
        (p11e.TokenNotRecognised(), "CKR_TOKEN_NOT_RECOGNIZED"),
        (p11e.PKCS11Error("Unmapped error code 0x1b"), "CKR_ACTION_PROHIBITED (0x1B)"),
        (p11e.PKCS11Error("Unmapped error code 0x9999"), "CKR (0x9999)"),
    ],
)
def test_return_values_are_named(exc: Exception, name: str) -> None:
    assert return_value_name(exc) == name


def test_errors_name_operation_mechanism_and_what_needs_it() -> None:
    with (
        pytest.raises(MechanismUnsupported) as info,
        translate(
            "generate a key pair", Mechanism.EC_KEY_PAIR_GEN, "custody retain, key profile ec-p256"
        ),
    ):
        raise p11e.MechanismInvalid()
    assert info.value.exit_code == 34
    assert info.value.what == (
        "generate a key pair with CKM_EC_KEY_PAIR_GEN (0x1040): the token does not offer "
        "this mechanism (CKR_MECHANISM_INVALID); needed by custody retain, key profile ec-p256"
    )
    with pytest.raises(HsmError) as attr, translate("read CKA_CHECK_VALUE"):
        raise p11e.AttributeTypeInvalid()
    assert "CKR_ATTRIBUTE_TYPE_INVALID" in attr.value.line()
    with pytest.raises(HsmError) as prohibited, translate("set an attribute"):
        raise p11e.PKCS11Error("Unmapped error code 0x1b")
    assert "CKR_ACTION_PROHIBITED (0x1B)" in prohibited.value.line()
    with pytest.raises(PinError), translate("log in"):
        raise p11e.PinLenRange()
