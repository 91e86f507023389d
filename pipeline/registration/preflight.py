"""The chain pre-flight: before the first registration call, every bundle is checked the way
DPS will check the device that presents it (Microsoft Learn, "X.509 certificate
attestation": the device sends the chain from its leaf up to a certificate verified by proof
of possession; the leaf's CN is the registration ID). The chain is validated by RFC 5280
path validation (:mod:`pipeline.ca.validation`: basic constraints, path length, key usage,
clientAuth), so a leaf that signs another "leaf" is refused here as DPS refuses it with
401002 and as ``openssl verify`` does, before anything is registered."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509

from ..ca.certs import common_name, is_ca, thumbprints
from ..ca.validation import PathError, validate_client_path
from ..layout import FULL_CHAIN
from .target import Target


def check_chain(
    chain: list[x509.Certificate],
    registration_id: str,
    root: x509.Certificate,
    must_contain: x509.Certificate | None = None,
    verified: set[str] | None = None,
) -> str | None:
    """The first reason DPS would refuse a device presenting ``chain`` (leaf first), or
    None. ``must_contain``: the group's signing certificate; ``verified``: SHA-1 thumbprints
    of the CAs DPS has verified (None when the endpoint cannot say)."""
    if not chain or is_ca(chain[0]):
        return "the leaf is not first"
    leaf = chain[0]
    if common_name(leaf) != registration_id:
        return f"CN {common_name(leaf)!r} is not the registration ID"
    try:
        path = validate_client_path(leaf, chain[1:], [root])
    except PathError as exc:
        return f"the chain does not validate to the station root (RFC 5280): {exc}"
    if chain[-1] != root:
        return "the chain does not end at the station root"
    if must_contain is not None and must_contain not in path[1:]:
        return "the group's signing certificate is not in the chain"
    if verified is not None and not any(thumbprints(c).sha1 in verified for c in path[1:]):
        return (
            "no certificate of the chain is a CA verified by proof of possession (use --upload-ca)"
        )
    return None


def preflight(
    targets: Iterable[Target],
    root: x509.Certificate,
    must_contain: x509.Certificate | None,
    verified: set[str] | None,
) -> list[str]:
    """Every problem that would make DPS refuse a device, one line each, naming the bundle
    file: all of them, so that a count of what is left out is the true count."""
    problems = []
    for t in targets:
        path = t.bundle / FULL_CHAIN
        try:
            chain = x509.load_pem_x509_certificates(path.read_bytes())
            leaf = t.leaf
        except (OSError, ValueError):
            problems.append(f"{path}: unreadable chain or certificate")
            continue
        problem = (
            "the leaf is not first"
            if chain[0] != leaf
            else check_chain(chain, t.registration_id, root, must_contain, verified)
        )
        if problem:
            problems.append(f"{path}: {problem}")
    return problems
