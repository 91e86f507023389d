"""Key profiles: the key algorithms a device or CA key may use, and the hash that goes with each."""

from __future__ import annotations

from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import CAError

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SigningHash = hashes.SHA256 | hashes.SHA384

RSA_EXPONENT = 65537  # the only RSA public exponent a profile allows (FIPS 186-5 default)


class KeyProfile(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    # RSA-3072 (NIST SP 800-57 Part 1: 128-bit security, the level of P-256) for devices whose
    # secure element or modem makes RSA keys of that size; token keygen supports it too.
    RSA_3072 = "rsa-3072"

    @property
    def is_ec(self) -> bool:
        return self in (KeyProfile.EC_P256, KeyProfile.EC_P384)

    @property
    def rsa_bits(self) -> int:
        """The modulus size of an RSA profile (0 for EC)."""
        return {KeyProfile.RSA_2048: 2048, KeyProfile.RSA_3072: 3072}.get(self, 0)

    def hash(self) -> SigningHash:
        """SHA-384 for P-384, SHA-256 otherwise (the leaf profile in README "Output contract")."""
        return hashes.SHA384() if self is KeyProfile.EC_P384 else hashes.SHA256()

    @classmethod
    def of_public_key(cls, key: object) -> KeyProfile:
        profile = cls.matching(key)
        if profile is None:
            raise CAError(f"unsupported public key {describe_key(key)}", rule="key profiles")
        return profile

    @classmethod
    def matching(cls, key: object) -> KeyProfile | None:
        """The profile ``key`` belongs to, or None (another curve, size or algorithm). The
        RSA public exponent is checked where keys come from outside (pipeline.ca.csr)."""
        if isinstance(key, ec.EllipticCurvePublicKey):
            if isinstance(key.curve, ec.SECP256R1):
                return cls.EC_P256
            if isinstance(key.curve, ec.SECP384R1):
                return cls.EC_P384
        if isinstance(key, rsa.RSAPublicKey):
            return {2048: cls.RSA_2048, 3072: cls.RSA_3072}.get(key.key_size)
        return None

    def generate_software_key(self) -> PrivateKey:
        """A key outside any HSM: the root in a PKCS#8 file, pkcs8 custody, benchmarks."""
        if self is KeyProfile.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        if self is KeyProfile.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=self.rsa_bits)


def describe_key(key: object) -> str:
    """A public key as an operator reads it: ``EC secp521r1``, ``RSA-1024``, ``Ed25519``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        exponent = key.public_numbers().e
        text = f"RSA-{key.key_size}"
        return text if exponent == RSA_EXPONENT else f"{text} with public exponent {exponent}"
    name = type(key).__name__.removeprefix("_").replace("PublicKey", "")
    return name or "unknown key type"


PROFILE_NAMES = tuple(p.value for p in KeyProfile)
