"""The CA: pure certificate builders (:mod:`.builders`), reading and checking certificates
(:mod:`.certs`), the station's issuing chain (:mod:`.chain`), CA keys named by URI or file
(:mod:`.keys`) and the one-off ceremonies behind ``provline ca`` (:mod:`.ceremony`)."""

from .builders import (
    BACKDATE,
    Issuer,
    build_audit_signer,
    build_crl,
    build_intermediate,
    build_leaf,
    build_pop,
    build_root,
    not_after_within,
    parse_name,
    random_serial,
    signing_hash,
    utcnow,
)
from .certs import (
    Thumbprints,
    common_name,
    is_ca,
    key_matches,
    load_cert,
    load_certs,
    pem,
    public_key_sha256,
    require_key_matches,
    signed_by,
    thumbprints,
)
from .chain import Chain, load_chain

__all__ = [
    "BACKDATE",
    "Chain",
    "Issuer",
    "Thumbprints",
    "build_audit_signer",
    "build_crl",
    "build_intermediate",
    "build_leaf",
    "build_pop",
    "build_root",
    "common_name",
    "is_ca",
    "key_matches",
    "load_cert",
    "load_certs",
    "load_chain",
    "not_after_within",
    "parse_name",
    "pem",
    "public_key_sha256",
    "random_serial",
    "require_key_matches",
    "signed_by",
    "signing_hash",
    "thumbprints",
    "utcnow",
]
