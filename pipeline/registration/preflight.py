"""The chain pre-flight: before the first registration call, every bundle is checked the way
DPS will check the device that presents it (Microsoft Learn, "X.509 certificate
attestation": the device sends the chain from its leaf up to a certificate verified by proof
of possession; the leaf's CN is the registration ID). A device DPS would refuse with 401002
in the field is refused here, before anything is registered."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

from cryptography import x509

from ..ca.certs import common_name, is_ca, signed_by, thumbprints
from ..layout import FULL_CHAIN
from .target import Target

MAX_PROBLEMS = 20


def preflight(
    targets: Iterable[Target],
    root: x509.Certificate,
    must_contain: x509.Certificate | None,
    verified: set[str] | None,
) -> list[str]:
    """Problems (at most :data:`MAX_PROBLEMS`) that would make DPS refuse a device.
    ``must_contain``: the group's signing certificate; ``verified``: SHA-1 thumbprints of
    the CAs DPS has verified, None when the endpoint cannot say."""
    problems = []
    for t in targets:
        path = t.bundle / FULL_CHAIN
        try:
            chain = x509.load_pem_x509_certificates(path.read_bytes())
            leaf = t.leaf
        except (OSError, ValueError):
            problems.append(f"{path}: unreadable chain or certificate")
            continue
        if chain[0] != leaf or is_ca(chain[0]):
            problems.append(f"{path}: the leaf is not first")
        elif common_name(chain[0]) != t.registration_id:
            problems.append(f"{path}: CN {common_name(chain[0])!r} is not the registration ID")
        elif any(not signed_by(c, p) for c, p in pairwise(chain)):
            problems.append(f"{path}: a link is not signed by the next certificate")
        elif chain[-1] != root:
            problems.append(f"{path}: the chain does not end at the station root")
        elif must_contain is not None and must_contain not in chain:
            problems.append(f"{path}: the group's signing certificate is not in the chain")
        elif verified is not None and not any(thumbprints(c).sha1 in verified for c in chain[1:]):
            problems.append(
                f"{path}: no certificate of the chain is a CA verified by proof "
                "of possession (use --upload-ca)"
            )
        if len(problems) >= MAX_PROBLEMS:
            break
    return problems
