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
any token that holds the same key (with ``CKA_UNWRAP``), and :data:`CHECK_KEY`; the handover
of the key itself (RSA-OAEP to a trusted fixture key, docs/key-delivery.md) is at the end.
"""

from __future__ import annotations

import hashlib
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from ..errors import HsmError, InputError, MechanismUnsupported
from .capabilities import WRAP_OPTIONS, Option
from .errormap import raise_mapped, translate
from .names import mechanism_name, return_value_name, short_mechanism_name

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


# ------------------------------------------------------------------------- key delivery
# The transport-key handover between a station and a programming fixture
# (docs/key-delivery.md): the station wraps its transport key with RSA-OAEP under the
# fixture's public key, which its security officer imported as trusted; the fixture unwraps
# it with a private key that can do nothing else.
#
# RSA-OAEP parameters (PKCS#11 v2.40 Current Mechanisms, section 2.1.8, CK_RSA_PKCS_OAEP_PARAMS):
# the hash and the MGF1 hash are the same, and there is no label (pSourceData empty).
OAEP_HASHES: dict[str, tuple[Mechanism, MGF]] = {
    "sha1": (Mechanism.SHA_1, MGF.SHA1),
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}
DEFAULT_OAEP_HASH = "sha256"  # what production HSMs document; SoftHSM2 2.6 has only SHA-1

HANDOVER_WRAP = Option(Mechanism.RSA_PKCS_OAEP, MechanismFlag.WRAP, "RSA-OAEP wrap of AES-256")
HANDOVER_UNWRAP = Option(
    Mechanism.RSA_PKCS_OAEP, MechanismFlag.UNWRAP, "RSA-OAEP unwrap of AES-256"
)
# Device blobs are RFC 5649 whichever of the two numbers made them (docs/hsm.md); a fixture
# unwraps with the first of these its own token offers for unwrapping.
RFC5649_NAMES = frozenset({"CKM_AES_KEY_WRAP_KWP", "CKM_AES_KEY_WRAP_PAD"})
RFC5649_UNWRAP = tuple(
    Option(o.mechanism, MechanismFlag.UNWRAP, o.how, o.key_size, o.families) for o in WRAP_OPTIONS
)


def oaep_param(hash_name: str) -> tuple[Mechanism, MGF, None]:
    """python-pkcs11's CK_RSA_PKCS_OAEP_PARAMS: (hash, MGF1 with the same hash, no label)."""
    if hash_name not in OAEP_HASHES:
        raise InputError(
            f"OAEP hash {hash_name!r} is not one of {', '.join(OAEP_HASHES)}",
            rule="RSA-OAEP hashes",
        )
    mechanism, mgf = OAEP_HASHES[hash_name]
    return mechanism, mgf, None


def oaep_text(hash_name: str) -> str:
    """``CKM_RSA_PKCS_OAEP (0x9), SHA-256, MGF1-SHA-256``."""
    spelled = hash_name.upper().replace("SHA", "SHA-")
    return f"{mechanism_name(Mechanism.RSA_PKCS_OAEP)}, {spelled}, MGF1-{spelled}"


def _bool_attribute(key: Any, attribute: Attribute) -> bool | None:
    try:
        return bool(key[attribute])
    except p11e.AttributeTypeInvalid:
        return None
    except p11e.PKCS11Error as exc:
        raise_mapped(exc, f"read {attribute.name} of the transport key")


def deliverable_problem(key: Any) -> str | None:
    """Why ``key`` may not be handed to a fixture, or ``None``. provline hands over only a
    key that is sensitive and extractable solely by wrapping under trusted keys."""
    if not _bool_attribute(key, Attribute.EXTRACTABLE):
        return (
            "is never extractable, so no fixture can ever receive it: make a new transport "
            "key (`provline ca transport-key --label ...`) and point custody.transport_key at "
            "it; blobs made under the old key stay unwrappable only where it already is"
        )
    if not _bool_attribute(key, Attribute.SENSITIVE):
        return "is not sensitive (its value can be read in clear)"
    if not _bool_attribute(key, Attribute.WRAP_WITH_TRUSTED):
        return (
            "may be wrapped by any key (CKA_WRAP_WITH_TRUSTED is false or unsupported); "
            "provline hands over only keys limited to trusted wrapping keys"
        )
    return None


def import_trusted_wrapping_key(
    so_session: Any, public: rsa.RSAPublicKey, label: str, key_id: bytes
) -> Any:
    """Create, in a security-officer session, a token public key with ``CKA_TRUSTED`` that can
    only wrap: the only kind of key the transport key may then be wrapped under. CKA_TRUSTED
    can be set by the SO only and only at creation; a token that refuses it is reported, and
    what a refused ``C_CreateObject`` left behind (SoftHSM2 2.6 keeps a half-built object) is
    removed: only objects that appeared during the call and carry no label."""
    from pkcs11.util.rsa import decode_rsa_public_key

    template = decode_rsa_public_key(
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
        capabilities=MechanismFlag.WRAP,
    )
    template.update(
        {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.TRUSTED: True,
            Attribute.MODIFIABLE: False,
            Attribute.WRAP: True,
            Attribute.ENCRYPT: False,
            Attribute.VERIFY: False,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
        }
    )
    before = _handles(so_session)
    try:
        return so_session.create_object(template)
    except p11e.PKCS11Error as exc:
        _remove_debris(so_session, before)
        if isinstance(
            exc, (p11e.AttributeReadOnly, p11e.AttributeTypeInvalid, p11e.AttributeValueInvalid)
        ):
            raise MechanismUnsupported(
                f"the token does not let its security officer create a trusted key "
                f"(CKA_TRUSTED: {return_value_name(exc)})",
                rule="docs/key-delivery.md, tokens without trusted wrapping",
            ) from exc
        raise_mapped(exc, "create the trusted fixture key")


def _handles(session: Any) -> set[int]:
    with translate("list objects"):
        return {o.handle for o in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})}


def _remove_debris(session: Any, before: set[int]) -> None:
    with suppress(p11e.PKCS11Error):
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
            if obj.handle not in before and not obj[Attribute.LABEL]:
                obj.destroy()


def trusted_wrapping_key(session: Any, key_id: bytes) -> Any | None:
    """The token public key with CKA_ID ``key_id`` and CKA_TRUSTED, or ``None``."""
    with translate("list objects"):
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id})
        )
    for obj in found:
        if _bool_attribute(obj, Attribute.TRUSTED):
            return obj
    return None


def wrap_to_trusted(transport_key: Any, trusted_public: Any, hash_name: str) -> bytes:
    """C_WrapKey of the transport key under a trusted RSA public key with RSA-OAEP."""
    param = oaep_param(hash_name)
    try:
        return bytes(
            trusted_public.wrap_key(
                transport_key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param
            )
        )
    except (p11e.ArgumentsBad, p11e.MechanismParamInvalid) as exc:
        raise MechanismUnsupported(
            f"wrap the transport key with {oaep_text(hash_name)}: the token rejects these "
            f"parameters ({return_value_name(exc)}); SoftHSM2 2.6 offers RSA-OAEP with SHA-1 "
            "only (--oaep-hash sha1)",
            rule="RSA-OAEP hashes the token offers: docs/key-delivery.md",
        ) from exc
    except p11e.KeyNotWrappable as exc:
        raise HsmError(
            "the token refuses to wrap the transport key under this key "
            f"({return_value_name(exc)}): the key is not marked trusted",
            rule="the transport key is wrapped only under trusted keys",
        ) from exc
    except p11e.PKCS11Error as exc:
        raise_mapped(exc, "wrap the transport key", Mechanism.RSA_PKCS_OAEP)


def unwrap_transport_key(
    unwrapping_private: Any,
    blob: bytes,
    hash_name: str,
    *,
    label: str,
    key_id: bytes,
    store: bool = True,
) -> Any:
    """The fixture's side: C_UnwrapKey of the handed-over transport key into a token object
    that is sensitive, never extractable, never modifiable and can only unwrap."""
    try:
        return unwrapping_private.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            blob,
            label=label,
            id=key_id,
            store=store,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=oaep_param(hash_name),
            capabilities=MechanismFlag.UNWRAP,
            template=_UNWRAP_ONLY_AES,
        )
    except (p11e.ArgumentsBad, p11e.MechanismParamInvalid) as exc:
        raise MechanismUnsupported(
            f"unwrap the transport key with {oaep_text(hash_name)}: the token rejects these "
            f"parameters ({return_value_name(exc)})",
            rule="RSA-OAEP hashes the token offers: docs/key-delivery.md",
        ) from exc
    except (
        p11e.EncryptedDataInvalid,
        p11e.EncryptedDataLenRange,
        p11e.WrappedKeyInvalid,
        p11e.WrappedKeyLenRange,
        p11e.GeneralError,
    ) as exc:
        raise HsmError(
            f"the handed-over transport key does not unwrap with this fixture's key "
            f"({return_value_name(exc)}): it was wrapped for another fixture, or damaged",
            rule="a handover is wrapped under the receiving fixture's key",
        ) from exc
    except p11e.PKCS11Error as exc:
        raise_mapped(exc, "unwrap the transport key", Mechanism.RSA_PKCS_OAEP)


_UNWRAP_ONLY_AES = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.UNWRAP: True,
    Attribute.WRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
_ZERO_BLOCK = bytes(16)


def check_unwrapped(
    session: Any,
    key: Any,
    unwrapping_private: Any,
    blob: bytes,
    hash_name: str,
    expected: TransportKeyCheck,
) -> str | None:
    """How the fixture's unwrapped ``key`` was shown to be the key ``expected`` names, or
    ``None`` when it is not. For ``CKA_CHECK_VALUE``: the token's own check value where it
    keeps one; SoftHSM2 keeps none for unwrapped keys, so the blob is unwrapped once more as a
    session key that may encrypt, which encrypts one zero block (the definition of the AES
    check value) and is destroyed. For ``wrap-check-v1``: :func:`verify`."""
    if expected.method != CHECK_VALUE:
        return "wrap-check-v1 blob unwrapped to F" if verify(session, key, expected) else None
    kcv = check_value(key)
    if kcv:
        return "CKA_CHECK_VALUE" if kcv == expected.value else None
    try:
        probe = unwrapping_private.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            blob,
            store=False,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=oaep_param(hash_name),
            capabilities=MechanismFlag.ENCRYPT,
            template={
                Attribute.ENCRYPT: True,
                Attribute.UNWRAP: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
    except p11e.PKCS11Error as exc:
        raise_mapped(exc, "compute the transport key's check value", Mechanism.RSA_PKCS_OAEP)
    try:
        with translate("compute the transport key's check value", Mechanism.AES_ECB):
            block = bytes(probe.encrypt(_ZERO_BLOCK, mechanism=Mechanism.AES_ECB))
    finally:
        with suppress(p11e.PKCS11Error):
            probe.destroy()
    computed = block[: len(expected.value) // 2].hex().upper()
    return "AES-ECB of a zero block (a session copy)" if computed == expected.value else None
