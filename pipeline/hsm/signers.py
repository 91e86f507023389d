"""Private keys that live in a token, usable wherever cryptography takes a private key.

cryptography's certificate, CSR, CRL and PKCS#7 builders accept any subclass of its
private-key classes and only call ``sign``; these subclasses sign inside the token, so an
HSM-held CA key signs exactly like a software key (pyca/cryptography issue #11616 describes
this as the supported way).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, NoReturn, Self

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Mechanism

from ..errors import MechanismUnsupported
from .errormap import translate
from .names import mechanism_name

# Token-hashed mechanisms per hash (PKCS#11 v2.40 Current Mechanisms, sections 2.3.6 ECDSA
# with hashing and 2.1.11 PKCS #1 v1.5 RSA signature with hashing).
_ECDSA_HASHED = {
    "sha256": Mechanism.ECDSA_SHA256,
    "sha384": Mechanism.ECDSA_SHA384,
    "sha512": Mechanism.ECDSA_SHA512,
}
_RSA_HASHED = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
# DER DigestInfo prefixes for raw CKM_RSA_PKCS signatures (RFC 8017, section 9.2, note 1).
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _hash_name(algorithm: Any) -> str:
    """``sha256``; a Prehashed wrapper names the hash it wraps."""
    inner = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
    return str(inner.name)


def _digest(data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


class _TokenKey:
    """What both key types share: the token object, its public half read once, the
    mechanisms the token offers, and refusals for everything that would need the private
    key outside the token. Copies are the same object (a session handle cannot be copied)."""

    def __init__(
        self,
        p11_key: Any,
        public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        mechanisms: Collection[int] | None = None,
        needed_by: str = "",
    ) -> None:
        self._key = p11_key
        self._public = public
        self._mechanisms = mechanisms
        self._needed_by = needed_by

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def private_numbers(self) -> NoReturn:
        raise NotImplementedError("the private key never leaves the HSM")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> NoReturn:
        raise NotImplementedError("the private key never leaves the HSM")

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class P11ECPrivateKey(_TokenKey, ec.EllipticCurvePrivateKey):
    """An EC key that lives in the token. cryptography's X.509, CSR, CRL and PKCS#7 builders
    only call :meth:`sign`. Raw ``CKM_ECDSA`` over a digest computed on the host is used
    where the token offers it (SoftHSM2 has no ``CKM_ECDSA_SHA256``); otherwise the token's
    ``CKM_ECDSA_SHA256/384`` hashes the data itself. ``mechanisms`` is what the token offers
    for signing (``None``: assume raw ECDSA, which every EC token offers in practice)."""

    def mechanism_for(self, algorithm: Any) -> Mechanism:
        """The mechanism :meth:`sign` uses for ``algorithm`` on this token."""
        offered = self._mechanisms
        if offered is None or Mechanism.ECDSA in offered:
            return Mechanism.ECDSA
        name = _hash_name(algorithm)
        hashed = _ECDSA_HASHED.get(name)
        if hashed is not None and hashed in offered and not isinstance(algorithm, Prehashed):
            return hashed
        raise MechanismUnsupported(
            f"sign with ECDSA over {name.upper()}: the token offers neither "
            f"{mechanism_name(Mechanism.ECDSA)} nor "
            f"{mechanism_name(hashed) if hashed else 'a hashed ECDSA mechanism'}"
            + (f"; needed by {self._needed_by}" if self._needed_by else ""),
            rule="mechanisms the token offers: `provline hsm check`",
        )

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA signatures")
        algorithm = signature_algorithm.algorithm
        mechanism = self.mechanism_for(algorithm)
        if mechanism is not Mechanism.ECDSA:
            message = bytes(data)  # the token hashes
        elif isinstance(algorithm, Prehashed):
            message = bytes(data)
        else:
            message = _digest(bytes(data), algorithm)
        with translate("sign", mechanism, self._needed_by):
            raw = bytes(self._key.sign(message, mechanism=mechanism))
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    _public: ec.EllipticCurvePublicKey

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise NotImplementedError("HSM keys are for signing only")


class P11RSAPrivateKey(_TokenKey, rsa.RSAPrivateKey):
    """An RSA key in the token, PKCS#1 v1.5 signatures. The token's hashed mechanism
    (``CKM_SHA256_RSA_PKCS``...) is preferred; where the token lacks it (openCryptoki 3.8 has
    none), raw ``CKM_RSA_PKCS`` signs a DigestInfo made on the host, which yields the same
    signature (RFC 8017, section 8.2.1)."""

    def mechanism_for(self, algorithm: Any) -> Mechanism:
        name = _hash_name(algorithm)
        hashed = _RSA_HASHED.get(name)
        offered = self._mechanisms
        prehashed = isinstance(algorithm, Prehashed)
        if hashed is not None and not prehashed and (offered is None or hashed in offered):
            return hashed
        if (offered is None or Mechanism.RSA_PKCS in offered) and name in _DIGEST_INFO:
            return Mechanism.RSA_PKCS
        raise MechanismUnsupported(
            f"sign with RSA PKCS#1 v1.5 over {name.upper()}: the token offers "
            f"neither {mechanism_name(hashed) if hashed else 'a hashed RSA mechanism'} nor "
            f"{mechanism_name(Mechanism.RSA_PKCS)}"
            + (f"; needed by {self._needed_by}" if self._needed_by else ""),
            rule="mechanisms the token offers: `provline hsm check`",
        )

    def sign(self, data: bytes, padding_: Any, algorithm: Any) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15):
            raise MechanismUnsupported(
                "RSA signatures are PKCS#1 v1.5 only", rule="HSM RSA signing mechanisms"
            )
        mechanism = self.mechanism_for(algorithm)
        if mechanism is Mechanism.RSA_PKCS:
            digest = bytes(data) if isinstance(algorithm, Prehashed) else _digest(data, algorithm)
            message = _DIGEST_INFO[_hash_name(algorithm)] + digest
        else:
            message = bytes(data)
        with translate("sign", mechanism, self._needed_by):
            return bytes(self._key.sign(message, mechanism=mechanism))

    _public: rsa.RSAPublicKey

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def decrypt(self, ciphertext: bytes, padding: Any) -> bytes:
        raise NotImplementedError("HSM keys are for signing only")


HsmSigner = P11ECPrivateKey | P11RSAPrivateKey


def signer_for(
    private: Any,
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    mechanisms: Collection[int] | None = None,
    needed_by: str = "",
) -> HsmSigner:
    """A signer for a token key; ``mechanisms`` (the token's signing mechanisms) decides
    between raw and hashed mechanisms."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        return P11ECPrivateKey(private, public, mechanisms, needed_by)
    return P11RSAPrivateKey(private, public, mechanisms, needed_by)
