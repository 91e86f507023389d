"""Names for PKCS#11 numbers, so every message says ``CKM_ECDSA_SHA256 (0x1044)`` instead of a
bare number or an empty string.

python-pkcs11 names most mechanisms (its ``Mechanism`` enum) and most return values (one
exception class each), but not all: mechanisms added in PKCS#11 3.0/3.1 that it lacks (e.g.
``CKM_RSA_AES_KEY_WRAP``, 0x1054) and return values without a class (e.g.
``CKR_ACTION_PROHIBITED``, 0x1B) are named here from the specification (PKCS#11 v3.1 "Base
Specification", section 6 "Data types" / "Return values"; "Current Mechanisms
Specification", the mechanism tables). Vendor-defined numbers (``CKM_VENDOR_DEFINED`` and
above, 0x80000000) are shown as such, since their meaning depends on the module.
"""

from __future__ import annotations

import re

from pkcs11 import Mechanism

CKM_VENDOR_DEFINED = 0x80000000

# Mechanisms python-pkcs11 0.10.1 cannot name (PKCS#11 v3.0/v3.1 Current Mechanisms).
_EXTRA_MECHANISMS = {
    0x1054: "CKM_RSA_AES_KEY_WRAP",
    0x1057: "CKM_EDDSA",
}

# Return values python-pkcs11 0.10.1 has no exception class for (it raises PKCS11Error with
# "Unmapped error code 0x..").
_EXTRA_RETURN_VALUES = {
    0x1B: "CKR_ACTION_PROHIBITED",
    0x1C: "CKR_ATTRIBUTE_SENSITIVE",
    0xB8: "CKR_PIN_TOO_WEAK",
    0x1B5: "CKR_OPERATION_CANCEL_FAILED",
    0x1B6: "CKR_TOKEN_RESOURCE_EXCEEDED",
    0x1B7: "CKR_OPERATION_NOT_VALIDATED",
    0x1B8: "CKR_KEY_NOT_VALIDATED",
    0x31: "CKR_DEVICE_MEMORY",
}

# python-pkcs11 exception classes whose name does not spell the CKR_ constant.
_CLASS_SPELLINGS = {"TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED"}


def mechanism_name(mechanism: int | Mechanism | None) -> str:
    """``CKM_ECDSA (0x1041)``; an unnamed number still gets its hex value and, above
    CKM_VENDOR_DEFINED, says it is vendor-defined."""
    if mechanism is None:
        return "(no mechanism)"
    code = int(mechanism)
    try:
        name = "CKM_" + Mechanism(code).name
    except ValueError:
        if code in _EXTRA_MECHANISMS:
            name = _EXTRA_MECHANISMS[code]
        elif code >= CKM_VENDOR_DEFINED:
            name = f"CKM_VENDOR_DEFINED+0x{code - CKM_VENDOR_DEFINED:X}"
        else:
            name = "unnamed mechanism"
    return f"{name} (0x{code:X})"


def short_mechanism_name(mechanism: int | Mechanism) -> str:
    """``CKM_ECDSA``, or the hex number when there is no name (for tables)."""
    full = mechanism_name(mechanism)
    return full.split(" (")[0] if not full.startswith("unnamed") else f"0x{int(mechanism):X}"


def return_value_name(exc: BaseException) -> str:
    """The CKR_ name of a python-pkcs11 exception, including codes it leaves unmapped."""
    cls = type(exc).__name__
    if cls in _CLASS_SPELLINGS:
        return _CLASS_SPELLINGS[cls]
    match = re.search(r"Unmapped error code (0x[0-9a-fA-F]+)", str(exc))
    if match:
        code = int(match.group(1), 16)
        return f"{_EXTRA_RETURN_VALUES.get(code, 'CKR')} (0x{code:X})"
    if cls in ("PKCS11Error", "Exception"):
        return cls
    return "CKR_" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls).upper()
