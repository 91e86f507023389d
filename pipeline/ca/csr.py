"""Certificate signing requests from devices that make their own keys (custody ``device``,
docs/device-keys.md): decoding and every check made before a station signs.

Pure functions of bytes: nothing here reads files, opens a token or looks at earlier batches
(batch/requests.py reads the files and checks duplicates; batch/sign.py serves one device at
a time). A request is accepted only if:

* it is exactly one PKCS#10 request (RFC 2986), PEM (``CERTIFICATE REQUEST`` or the older
  ``NEW CERTIFICATE REQUEST`` label) or DER, and nothing else: a certificate, a public key or
  a private key where a request belongs is named as such (a private key's bytes are never
  shown);
* its key belongs to the batch's key profile (P-256, P-384, RSA-2048 or RSA-3072 with public
  exponent 65537): no RSA under 2048 bits, no other curve, no other algorithm;
* its signature verifies with its own public key, made with SHA-256 or stronger: the proof
  that whoever sent it holds the private key (RFC 2986 §3; RFC 4211 §4 calls this proof of
  possession);
* its subject has no CN (the station sets it) or exactly one, equal to the registration ID.

Everything else a request asks for is ignored: other subject attributes, requested
extensions (key usage, SAN, basic constraints, ...), attributes such as a challenge
password. The leaf is the station's profile (ca/builders.build_leaf), never the requester's.

The request's SHA-256 is taken over its DER encoding, whichever form it came in, so the same
request has the same digest as PEM and as DER.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ..config.manifest import REGISTRATION_ID_RULE, valid_registration_id
from ..errors import InputError, shown
from ..inputfile import KIB
from ..keyprofile import RSA_EXPONENT, KeyProfile, PublicKey, describe_key

# A P-384 or RSA-3072 request is under 2 KiB as PEM; 16 KiB leaves room for the extensions
# and attestation attributes some secure elements add, and bounds what one request costs.
MAX_CSR_BYTES = 16 * KIB

CSR_RULE = "a PKCS#10 certificate signing request, PEM or DER"
POSSESSION_RULE = "proof of possession: a CSR is signed by its own key"
PROFILE_RULE = "device keys of the batch's key profile"
CN_RULE = "the subject CN is the registration ID, or absent"
PRIVATE_KEY_RULE = "a CSR carries only the public key: a device's private key never leaves it"
PUBLIC_KEY_RULE = "a CSR, not a bare public key: its signature proves possession of the key"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")
_REQUEST_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check: what the station certifies and records."""

    registration_id: str
    der: bytes  # the request, DER
    public_key: PublicKey
    profile: KeyProfile
    csr_sha256: str  # hex, over ``der``
    public_key_sha256: str  # hex, over the SubjectPublicKeyInfo DER (as the audit log names keys)


def problem(what: str, rule: str) -> InputError:
    return InputError(what, rule=rule)


def decode_request(data: bytes) -> tuple[x509.CertificateSigningRequest, bytes]:
    """The one request in ``data`` (PEM or DER) and its DER encoding. Anything else raises
    InputError saying what the bytes are instead, without showing them."""
    if len(data) > MAX_CSR_BYTES:
        raise problem(f"{len(data):,} bytes", f"a CSR is at most {MAX_CSR_BYTES // KIB} KiB")
    if not data.strip():
        raise problem("empty, not a certificate signing request", CSR_RULE)
    labels = _PEM_BLOCK.findall(data)
    if labels:
        return _decode_pem(data, labels)
    try:
        request = x509.load_der_x509_csr(data)
    except x509.InvalidVersion as exc:
        raise _bad_version(exc) from None
    except ValueError:
        kind, rule = _what_der_is(data)
        raise problem(f"{kind}, not a certificate signing request", rule) from None
    return request, request.public_bytes(serialization.Encoding.DER)


def _decode_pem(data: bytes, labels: list[bytes]) -> tuple[x509.CertificateSigningRequest, bytes]:
    requests = [label for label in labels if label in _REQUEST_LABELS]
    others = [label for label in labels if label not in _REQUEST_LABELS]
    if others:
        kind, rule = _pem_kind(others[0])
        if not requests:
            raise problem(f"{kind}, not a certificate signing request", rule)
        raise problem(f"a CSR together with {kind}", rule if rule != CSR_RULE else "one CSR alone")
    if len(requests) > 1:
        raise problem(f"{len(requests)} CSRs in one file", "one CSR per device")
    try:
        request = x509.load_pem_x509_csr(_as_standard_label(data))
    except x509.InvalidVersion as exc:
        raise _bad_version(exc) from None
    except ValueError as exc:
        raise problem(f"a damaged PEM CSR ({_reason(exc)})", CSR_RULE) from None
    return request, request.public_bytes(serialization.Encoding.DER)


def _bad_version(exc: x509.InvalidVersion) -> InputError:
    """RFC 2986 §4.1 knows one version of a request (v1, encoded 0); cryptography raises
    InvalidVersion, not ValueError, for any other."""
    return problem(
        f"a CSR of unknown version {shown(exc.parsed_version)}",
        "PKCS#10 requests are version 1 (encoded 0; RFC 2986 section 4.1)",
    )


def _as_standard_label(data: bytes) -> bytes:
    return data.replace(b"NEW CERTIFICATE REQUEST-----", b"CERTIFICATE REQUEST-----")


def _pem_kind(label: bytes) -> tuple[str, str]:
    """What a PEM block is, and the rule to quote."""
    text = label.decode("ascii")
    if "PRIVATE KEY" in text:
        return "a private key", PRIVATE_KEY_RULE
    if "CERTIFICATE" in text:
        return "a certificate", CSR_RULE
    if "PUBLIC KEY" in text:
        return "a public key", PUBLIC_KEY_RULE
    return f"PEM {text!r}", CSR_RULE


def _what_der_is(data: bytes) -> tuple[str, str]:
    """What DER bytes that are not a request are, if they are something known."""
    try:
        x509.load_der_x509_certificate(data)
        return "a certificate (DER)", CSR_RULE
    except ValueError:
        pass
    try:
        serialization.load_der_private_key(data, password=None)
        return "a private key (DER)", PRIVATE_KEY_RULE
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass
    try:
        serialization.load_der_public_key(data)
        return "a public key (DER)", PUBLIC_KEY_RULE
    except (ValueError, UnsupportedAlgorithm):
        pass
    return ("DER that is not a CSR" if data[:1] == b"\x30" else "not PEM and not DER"), CSR_RULE


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__


def check_request(
    data: bytes,
    registration_id: str | None,
    profile: KeyProfile,
    verified: Callable[[str], bool] | None = None,
) -> CheckedRequest:
    """Decode and check one request for the device ``registration_id`` (None: the request's
    CN names it, as in the one-device-at-a-time flow) in a batch of key profile ``profile``.
    Raises InputError with the first problem found, in the order of the module docstring.
    ``verified(csr_sha256)`` may say that these exact bytes were verified before (the
    signature is then not checked again)."""
    request, der = decode_request(data)
    digest = hashlib.sha256(der).hexdigest()
    public = _public_key(request)
    if public is None:
        raise problem(
            f"its key is {describe_key(request.public_key())}, the batch's key profile is "
            f"{profile}",
            PROFILE_RULE,
        )
    _check_profile(public, profile)
    if verified is None or not verified(digest):
        _check_signature(request)
    rid = _check_subject(request, registration_id)
    return CheckedRequest(
        registration_id=rid,
        der=der,
        public_key=public,
        profile=profile,
        csr_sha256=digest,
        public_key_sha256=public_key_sha256(public),
    )


def public_key_sha256(public: PublicKey) -> str:
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _public_key(request: x509.CertificateSigningRequest) -> PublicKey | None:
    """The request's key if it is EC or RSA (None for another algorithm: Ed25519, DSA)."""
    try:
        public = request.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise problem(
            f"its key cannot be used ({_reason(exc)}; an unknown curve or algorithm)",
            PROFILE_RULE,
        ) from None
    if not isinstance(public, PublicKey):
        return None
    return public


def _check_signature(request: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = request.signature_hash_algorithm
        if not isinstance(algorithm, _STRONG_HASHES):
            name = algorithm.name.upper() if algorithm is not None else "no hash"
            raise problem(f"it is signed with {name}", "CSRs are signed with SHA-256 or stronger")
        valid = request.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise problem(
            f"its signature cannot be checked ({_reason(exc)})", POSSESSION_RULE
        ) from None
    if not valid:
        raise problem("its signature does not verify with its own key", POSSESSION_RULE)


def _check_profile(public: PublicKey, profile: KeyProfile) -> None:
    exponent_ok = (
        not isinstance(public, rsa.RSAPublicKey) or public.public_numbers().e == RSA_EXPONENT
    )
    if KeyProfile.matching(public) is profile and exponent_ok:
        return
    described = describe_key(public)
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        rule = "RSA keys under 2048 bits are never accepted"
    else:
        rule = PROFILE_RULE
    raise problem(f"its key is {described}, the batch's key profile is {profile}", rule)


def _check_subject(request: x509.CertificateSigningRequest, registration_id: str | None) -> str:
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) > 1:
        raise problem(f"its subject has {len(names)} CNs", CN_RULE)
    cn = str(names[0].value) if names else None
    if registration_id is None:
        if cn is None:
            raise problem(
                "it has no subject CN and no registration ID was given with it",
                "the one-device flow takes the registration ID from the CN or the request",
            )
        if not valid_registration_id(cn):
            raise problem(
                f"its subject CN {shown(cn)} is not a registration ID", REGISTRATION_ID_RULE
            )
        return cn
    if cn is not None and cn != registration_id:
        raise problem(
            f"its subject CN {shown(cn)} is not the registration ID {registration_id}", CN_RULE
        )
    return registration_id


def decode_base64(text: str) -> bytes:
    """A DER request sent as base64 text (the serve protocol); InputError if it is not."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise problem("csr is neither PEM nor base64 DER", CSR_RULE) from None
