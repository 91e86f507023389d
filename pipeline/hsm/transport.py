"""The station transport key: an AES-256 key that wraps device keys (wrapped custody), and how
a bundle names it so that whoever unwraps the blob can tell they hold the right key.

Two identifications, in order of preference (docs/hsm.md, "Transport key"):

``CKA_CHECK_VALUE``
    The token's key check value: the first 3 bytes of AES-ECB over a zero block (PKCS#11 v3.0
    base specification, section 4.10 "Secret key objects"). Optional in PKCS#11: tokens
    older than v2.40 lack the attribute (openCryptoki 3.8 returns
    ``CKR_ATTRIBUTE_TYPE_INVALID``), and a key made by ``C_UnwrapKey`` on SoftHSM2 reads
    empty.

``wrap-check-v1``
    The transport key wraps a fixed, public 32-byte AES key F = SHA-256("provline transport
    key check v1") with the batch's wrap mechanism, and the value is that blob in hex (40
    bytes: AES key wrap is deterministic). It uses the key only for what it is for
    (``CKF_WRAP``), needs no attribute beyond the key value, and a holder of the key checks it
    either by unwrapping the blob (the result must be F) or by wrapping F and comparing.

API for key delivery (the fixture side): :func:`identify` on the station, :func:`verify` on
any token that holds the same key (with ``CKA_UNWRAP``), and :data:`CHECK_KEY`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

from .errormap import translate
from .names import short_mechanism_name

CHECK_VALUE = "CKA_CHECK_VALUE"
WRAP_CHECK = "wrap-check-v1"
CHECK_KEY = hashlib.sha256(b"provline transport key check v1").digest()


@dataclass(frozen=True)
class TransportKeyCheck:
    """How ``device.json`` names the key that unwraps a blob."""

    method: str  # CHECK_VALUE or WRAP_CHECK
    value: str  # upper-case hex
    mechanism: str | None = None  # WRAP_CHECK: the wrap mechanism, e.g. CKM_AES_KEY_WRAP_KWP


def check_value(secret_key: Any) -> str | None:
    """CKA_CHECK_VALUE in hex, or ``None`` when the token has none for this key."""
    try:
        value = bytes(secret_key[Attribute.CHECK_VALUE])
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        return None
    except p11e.PKCS11Error as exc:
        from .errormap import raise_mapped

        raise_mapped(exc, "read CKA_CHECK_VALUE of the transport key")
    return value.hex().upper() or None


def _check_key(session: Any, *, extractable: bool) -> Any:
    """F as a session object: public by design, so it is created in clear and never stored."""
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: CHECK_KEY,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: False,
        Attribute.SENSITIVE: False,
        Attribute.EXTRACTABLE: extractable,
        Attribute.LABEL: "provline-transport-check",
    }
    with translate("create the public check key (session object)"):
        return session.create_object(template)


def wrap_check(session: Any, transport_key: Any, mechanism: int) -> str:
    """The ``wrap-check-v1`` value of ``transport_key``: C_WrapKey of F, in hex."""
    probe = _check_key(session, extractable=True)
    try:
        with translate("wrap the public check key", mechanism, "transport key identification"):
            blob = bytes(transport_key.wrap_key(probe, mechanism=mechanism))
    finally:
        probe.destroy()
    return blob.hex().upper()


def identify(session: Any, transport_key: Any, mechanism: int) -> TransportKeyCheck:
    """CKA_CHECK_VALUE where the token has one, otherwise the wrap check."""
    kcv = check_value(transport_key)
    if kcv:
        return TransportKeyCheck(CHECK_VALUE, kcv)
    return TransportKeyCheck(
        WRAP_CHECK, wrap_check(session, transport_key, mechanism), short_mechanism_name(mechanism)
    )


def verify(session: Any, transport_key: Any, expected: TransportKeyCheck) -> bool:
    """Whether ``transport_key`` (e.g. the fixture's unwrapped copy) is the key ``expected``
    names. For ``wrap-check-v1`` it unwraps the recorded blob as a session key and compares
    it with F, so a key that may only unwrap can check itself."""
    if expected.method == CHECK_VALUE:
        return check_value(transport_key) == expected.value
    from pkcs11 import Mechanism

    mechanism = Mechanism[expected.mechanism.removeprefix("CKM_")] if expected.mechanism else None
    try:
        unwrapped = transport_key.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            bytes.fromhex(expected.value),
            store=False,
            mechanism=mechanism,
            capabilities=MechanismFlag(0),
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    except p11e.PKCS11Error:
        return False  # a wrong key fails the RFC 5649 integrity check
    try:
        return bytes(unwrapped[Attribute.VALUE]) == CHECK_KEY
    finally:
        unwrapped.destroy()
