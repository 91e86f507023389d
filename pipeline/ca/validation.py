"""RFC 5280 path validation of a device's certificate chain, the way a TLS server that
authenticates clients judges it: ``cryptography.x509.verification``'s client verifier checks
signatures, validity, basic constraints (only a CA may sign), path length, key usage and the
clientAuth extended key usage. ``openssl verify -purpose sslclient`` refuses the same chains.

One checker for provline's registration pre-flight and for the emulator's device
authentication, so a chain provline lets through is a chain DPS and IoT Hub accept, and a
device leaf that signs another "leaf" is refused in both places.

Device leaves carry no subjectAltName (the registration ID is the subject CN, Microsoft Learn
"X.509 certificate attestation"), so the end-entity policy is the Web PKI default with the
subjectAltName made optional. A self-signed device certificate (an individual enrollment's
own trust) is its own anchor and has no authorityKeyIdentifier to check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from .certs import is_ca, signed_by

__all__ = ["PathError", "extend_path", "is_self_signed", "validate_client_path"]


class PathError(ValueError):
    """The chain does not validate; the message says why (one line)."""


def _ee_policy(self_signed: bool) -> ExtensionPolicy:
    policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    if self_signed:
        policy = policy.may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    return policy


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and signed_by(cert, cert)


def validate_client_path(
    leaf: x509.Certificate,
    presented: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    at: dt.datetime | None = None,
) -> list[x509.Certificate]:
    """The validated path, leaf first and ending at one of ``anchors``; raises
    :class:`PathError`. ``presented`` are the other certificates the device sent (untrusted
    intermediates, in any order; extra ones are ignored)."""
    if not anchors:
        raise PathError("no trust anchor to validate against")
    self_signed = is_self_signed(leaf)
    builder = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(at or dt.datetime.now(dt.UTC))
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy(self_signed)
        )
    )
    intermediates = [c for c in presented if c != leaf]
    try:
        verified = builder.build_client_verifier().verify(leaf, intermediates)
    except VerificationError as exc:
        raise PathError(_reason(exc)) from exc
    return list(verified.chain)


def extend_path(
    path: list[x509.Certificate], presented: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """``path`` continued upwards with presented CA certificates that signed its last link
    (a device may send its chain up to the root while a lower CA is the verified one)."""
    out = list(path)
    rest = [c for c in presented if c not in out]
    grew = True
    while grew and rest:
        grew = False
        for cert in rest:
            if out[-1] != cert and is_ca(cert) and signed_by(out[-1], cert):
                out.append(cert)
                rest.remove(cert)
                grew = not is_self_signed(cert)
                break
    return out


def _reason(exc: VerificationError) -> str:
    text = str(exc).removeprefix("validation failed: ")
    return text.split(" (encountered processing")[0]
