"""Private keys that live in a token, usable wherever cryptography takes a private key.

cryptography's certificate, CSR, CRL and PKCS#7 builders accept any subclass of its
private-key classes and only call ``sign``; these subclasses sign inside the token, so an
HSM-held CA key signs exactly like a software key (pyca/cryptography issue #11616 describes
this as the supported way).
"""

from __future__ import annotations

from typing import Any, ClassVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Mechanism

from ..errors import MechanismUnsupported
from .errormap import call


class P11ECPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC key that lives in the token. cryptography's X.509, CSR, CRL and PKCS#7 builders
    only call :meth:`sign`; we hash locally and use raw ``CKM_ECDSA`` because SoftHSM2 has
    no ``CKM_ECDSA_SHA256`` and every real HSM has ``CKM_ECDSA``."""

    def __init__(self, p11_key: Any, public: ec.EllipticCurvePublicKey) -> None:
        self._key = p11_key
        self._public = public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA signatures")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
        else:
            h = hashes.Hash(algorithm)
            h.update(data)
            digest = h.finalize()
        raw = call(self._key.sign, digest, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise NotImplementedError("HSM keys are for signing only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError("the private key never leaves the HSM")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise NotImplementedError("the private key never leaves the HSM")

    def __copy__(self) -> P11ECPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> P11ECPrivateKey:
        return self


class P11RSAPrivateKey(rsa.RSAPrivateKey):
    """An RSA key in the token, PKCS#1 v1.5 signatures hashed inside the token."""

    _MECHANISMS: ClassVar[dict[str, Mechanism]] = {
        "sha256": Mechanism.SHA256_RSA_PKCS,
        "sha384": Mechanism.SHA384_RSA_PKCS,
        "sha512": Mechanism.SHA512_RSA_PKCS,
    }

    def __init__(self, p11_key: Any, public: rsa.RSAPublicKey) -> None:
        self._key = p11_key
        self._public = public

    def sign(self, data: bytes, padding_: Any, algorithm: Any) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15) or isinstance(algorithm, Prehashed):
            raise MechanismUnsupported(
                "only PKCS#1 v1.5 over unhashed data", rule="HSM RSA signing mechanisms"
            )
        mechanism = self._MECHANISMS.get(algorithm.name)
        if mechanism is None:
            raise MechanismUnsupported(f"RSA with {algorithm.name}", rule="HSM RSA signing")
        return bytes(call(self._key.sign, data, mechanism=mechanism))

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def decrypt(self, ciphertext: bytes, padding: Any) -> bytes:
        raise NotImplementedError("HSM keys are for signing only")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise NotImplementedError("the private key never leaves the HSM")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise NotImplementedError("the private key never leaves the HSM")

    def __copy__(self) -> P11RSAPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> P11RSAPrivateKey:
        return self


HsmSigner = P11ECPrivateKey | P11RSAPrivateKey


def signer_for(private: Any, public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> HsmSigner:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return P11ECPrivateKey(private, public)
    return P11RSAPrivateKey(private, public)
