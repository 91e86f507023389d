"""Key profiles: the key algorithms a device or CA key may use, and the hash that goes with each."""

from __future__ import annotations

from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import CAError

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SigningHash = hashes.SHA256 | hashes.SHA384


class KeyProfile(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"

    @property
    def is_ec(self) -> bool:
        return self is not KeyProfile.RSA_2048

    def hash(self) -> SigningHash:
        """SHA-384 for P-384, SHA-256 otherwise (the leaf profile in README "Output contract")."""
        return hashes.SHA384() if self is KeyProfile.EC_P384 else hashes.SHA256()

    @classmethod
    def of_public_key(cls, key: object) -> KeyProfile:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if isinstance(key.curve, ec.SECP256R1):
                return cls.EC_P256
            if isinstance(key.curve, ec.SECP384R1):
                return cls.EC_P384
        if isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048:
            return cls.RSA_2048
        raise CAError(f"unsupported public key {type(key).__name__}", rule="key profiles")

    def generate_software_key(self) -> PrivateKey:
        """A key outside any HSM: the root in a PKCS#8 file, pkcs8 custody, benchmarks."""
        if self is KeyProfile.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        if self is KeyProfile.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)


PROFILE_NAMES = tuple(p.value for p in KeyProfile)
