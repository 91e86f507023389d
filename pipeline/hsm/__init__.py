"""The HSM layer: PKCS#11 URIs (:mod:`.uri`, pure), token sessions, key generation, wrapping
and lookups (:mod:`.token`), signers that cryptography's builders accept (:mod:`.signers`),
the mapping of python-pkcs11's exceptions to provline's (:mod:`.errormap`), and SoftHSM2
token set-up for demos and tests (:mod:`.softhsm`)."""

from .signers import HsmSigner, P11ECPrivateKey, P11RSAPrivateKey, signer_for
from .token import (
    DEFAULT_MODULE,
    Token,
    check_value,
    key_id_for,
    load_module,
    open_token,
    public_key_of,
    resolve_signer,
)
from .uri import Pkcs11Uri

__all__ = [
    "DEFAULT_MODULE",
    "HsmSigner",
    "P11ECPrivateKey",
    "P11RSAPrivateKey",
    "Pkcs11Uri",
    "Token",
    "check_value",
    "key_id_for",
    "load_module",
    "open_token",
    "public_key_of",
    "resolve_signer",
    "signer_for",
]
