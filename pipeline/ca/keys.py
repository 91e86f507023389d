"""Key references as operators write them: a PKCS#11 URI for a key in a token, or the path of
an encrypted PKCS#8 PEM file (an offline root kept outside any HSM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .. import hsm
from ..errors import InputError
from ..files import write_atomic
from ..keyprofile import PrivateKey
from ..secret import SecretRef


@dataclass(frozen=True)
class HsmDefaults:
    """What a URI does not say: which module, which PIN, which SoftHSM2 config."""

    module: str = hsm.DEFAULT_MODULE
    pin: SecretRef = field(default_factory=lambda: SecretRef("env", "PROVLINE_PIN"))
    softhsm2_conf: str | None = None

    def open(self, token: str) -> hsm.Token:
        return hsm.open_token(self.module, token, self.pin, self.softhsm2_conf)


def load_signing_key(
    ref: str, defaults: HsmDefaults, passphrase: SecretRef | None = None
) -> tuple[PrivateKey, str]:
    """The signer and a printable location (URI or file path) for ``ref``."""
    if ref.startswith("pkcs11:"):
        uri = hsm.Pkcs11Uri.parse(ref)
        _, signer = hsm.resolve_signer(
            uri, module_path=defaults.module, pin=defaults.pin, softhsm2_conf=defaults.softhsm2_conf
        )
        return signer, str(uri)
    path = Path(ref)
    if passphrase is None:
        raise InputError(f"{path} needs a passphrase source", rule="--passphrase-source")
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"key file {path} does not exist", rule="key paths exist") from exc
    try:
        key = serialization.load_pem_private_key(data, passphrase.read().encode())
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"cannot decrypt {path}: wrong passphrase or not an encrypted PKCS#8 key",
            rule="encrypted PKCS#8 PEM",
        ) from exc
    return key, str(path.resolve())  # type: ignore[return-value]


def save_encrypted_pkcs8(key: PrivateKey, path: Path, passphrase: str) -> None:
    if len(passphrase) < 8:
        raise InputError("the key passphrase has fewer than 8 characters", rule="passphrase length")
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )
    write_atomic(path, data, private=True, fsync=True)
