"""The HSM layer: PKCS#11 URIs (:mod:`.uri`, pure), token sessions, key generation, wrapping
and lookups (:mod:`.token`), capability negotiation (:mod:`.capabilities`, with the full
``CK_TOKEN_INFO`` from :mod:`.tokeninfo`), the transport key and how bundles name it
(:mod:`.transport`), signers that cryptography's builders accept (:mod:`.signers`), names of
PKCS#11 numbers (:mod:`.names`), the mapping of python-pkcs11's exceptions to provline's
(:mod:`.errormap`), and SoftHSM2 token set-up for demos and tests (:mod:`.softhsm`)."""

from .capabilities import Capabilities, CapabilitiesMissing, CapabilityReport, Need, Row
from .signers import HsmSigner, P11ECPrivateKey, P11RSAPrivateKey, signer_for
from .token import (
    DEFAULT_MODULE,
    Token,
    key_id_for,
    load_module,
    open_token,
    public_key_of,
    resolve_signer,
)
from .transport import TransportKeyCheck, check_value
from .uri import Pkcs11Uri

__all__ = [
    "DEFAULT_MODULE",
    "Capabilities",
    "CapabilitiesMissing",
    "CapabilityReport",
    "HsmSigner",
    "Need",
    "P11ECPrivateKey",
    "P11RSAPrivateKey",
    "Pkcs11Uri",
    "Row",
    "Token",
    "TransportKeyCheck",
    "check_value",
    "key_id_for",
    "load_module",
    "open_token",
    "public_key_of",
    "resolve_signer",
    "signer_for",
]
