"""The station's half of the transport-key ceremony (docs/key-delivery.md), and the two files
that cross between a station and a programming fixture.

A fixture never shares a token with the station. It makes, in its own token, an RSA key pair
whose private half can only unwrap, and a log-signing key; it sends the station a
:class:`FixtureRequest` (its RSA public key and a CSR of its log key). At the station:

1. the security officer imports the RSA public key as a *trusted* token key
   (:func:`trust_fixture`, after comparing its fingerprint with the one the fixture showed);
2. the user wraps the transport key under it with RSA-OAEP, which the token allows only
   because the transport key is ``CKA_WRAP_WITH_TRUSTED`` and the target ``CKA_TRUSTED``, and
   certifies the fixture's log key with the issuing CA (:func:`hand_over`). The result is a
   :class:`Handover` file the fixture imports.

This module does the token and certificate work only; :mod:`pipeline.fixture.station` logs
each step in the station's signed ceremony log.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from .. import hsm
from ..config.station import Station
from ..errors import InputError, KeyNotFound
from ..hsm import transport
from ..hsm.capabilities import Need, wrap_need
from ..hsm.token import so_session
from ..hsm.transport import TransportKeyCheck
from ..secret import SecretRef
from .builders import build_audit_signer, utcnow
from .certs import pem, signed_by, spki_der, thumbprints
from .chain import load_chain

REQUEST_FORMAT = "provline fixture request v1"
HANDOVER_FORMAT = "provline-transport-handover/1"
FIXTURE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
FIXTURE_NAME_RULE = "fixture names: a-z 0-9 . _ -, at most 64, starting with a letter or digit"
MIN_RSA_BITS = 2048
LOG_CERT_DAYS = 825


def fingerprint(public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, upper-case hex: what operators compare."""
    return hashlib.sha256(spki_der(public)).hexdigest().upper()


def normalise_fingerprint(text: str) -> str:
    return re.sub(r"[\s:]", "", text).upper()


def trusted_label(fixture: str) -> str:
    return f"provline-fixture:{fixture}"


# ------------------------------------------------------------------------ the request
@dataclass(frozen=True)
class FixtureRequest:
    """What a fixture sends the station: its unwrap-only RSA public key and a CSR of its
    log-signing key, CN = the fixture's name (the CSR proves the fixture holds that key)."""

    name: str
    unwrap_public: rsa.RSAPublicKey
    csr: x509.CertificateSigningRequest

    @property
    def unwrap_fingerprint(self) -> str:
        return fingerprint(self.unwrap_public)

    def to_pem(self) -> bytes:
        log_public = self.csr.public_key()
        assert isinstance(log_public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
        header = (
            f"{REQUEST_FORMAT} (docs/key-delivery.md)\n"
            f"fixture: {self.name}\n"
            f"unwrap key: RSA-{self.unwrap_public.key_size}, SHA-256 of its "
            f"SubjectPublicKeyInfo {self.unwrap_fingerprint} (compare out of band)\n"
            f"log key: SHA-256 {fingerprint(log_public)}\n"
        )
        return (
            header.encode()
            + self.unwrap_public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            + self.csr.public_bytes(serialization.Encoding.PEM)
        )

    @classmethod
    def load(cls, path: Path) -> FixtureRequest:
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(
                f"cannot read the fixture request: {exc.strerror}", where=where, rule="--request"
            ) from exc
        if not data.startswith(REQUEST_FORMAT.encode()):
            raise InputError(
                "not a fixture request (made by `provline fixture keypair`)",
                where=where,
                rule=REQUEST_FORMAT,
            )
        public = _pem_block(data, b"PUBLIC KEY", where)
        request = _pem_block(data, b"CERTIFICATE REQUEST", where)
        try:
            unwrap_public = serialization.load_pem_public_key(public)
            csr = x509.load_pem_x509_csr(request)
        except ValueError as exc:
            raise InputError(
                f"damaged fixture request: {exc}", where=where, rule=REQUEST_FORMAT
            ) from exc
        if not isinstance(unwrap_public, rsa.RSAPublicKey) or (
            unwrap_public.key_size < MIN_RSA_BITS
        ):
            raise InputError(
                f"the unwrap key is not RSA of at least {MIN_RSA_BITS} bits",
                where=where,
                rule="RSA-OAEP fixture keys",
            )
        if not csr.is_signature_valid:
            raise InputError(
                "the log key's CSR signature does not verify", where=where, rule="PKCS#10"
            )
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        if not FIXTURE_NAME.match(name):
            raise InputError(
                f"fixture name {name!r} is invalid", where=where, rule=FIXTURE_NAME_RULE
            )
        return cls(name, unwrap_public, csr)


def _pem_block(data: bytes, kind: bytes, where: str) -> bytes:
    match = re.search(
        rb"-----BEGIN " + kind + rb"-----.+?-----END " + kind + rb"-----", data, re.DOTALL
    )
    if not match:
        raise InputError(
            f"no {kind.decode()} block in the fixture request", where=where, rule=REQUEST_FORMAT
        )
    return match.group(0) + b"\n"


# ----------------------------------------------------------------------- the handover
@dataclass(frozen=True)
class Handover:
    """The station's answer: its transport key wrapped under the fixture's key with RSA-OAEP,
    how bundles name that key, and a certificate for the fixture's log key with its chain
    (issuing CA first, root last), so the fixture's log verifies offline to the same root."""

    station: str
    fixture: str
    created: str
    unwrap_key_sha256: str
    transport_label: str
    check: TransportKeyCheck
    oaep_hash: str
    wrapped_key: bytes
    log_certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HANDOVER_FORMAT,
            "station": self.station,
            "fixture": self.fixture,
            "created": self.created,
            "unwrap_key_sha256": self.unwrap_key_sha256,
            "transport_key": {
                "label": self.transport_label,
                "type": "AES-256",
                "check_method": self.check.method,
                "check_value": self.check.value,
                "check_mechanism": self.check.mechanism,
            },
            "wrap": {
                "mechanism": "CKM_RSA_PKCS_OAEP",
                "hash": self.oaep_hash,
                "mgf": f"MGF1-{self.oaep_hash.upper()}",
                "source_data": None,
            },
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
            "log_certificate": pem(self.log_certificate).decode(),
            "chain": b"".join(pem(c) for c in self.chain).decode(),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode() + b"\n"

    @classmethod
    def load(cls, path: Path) -> tuple[Handover, bytes]:
        """The handover and the file's bytes (their SHA-256 goes into both logs)."""
        where = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(
                f"cannot read the handover: {exc.strerror}", where=where, rule="--handover"
            ) from exc
        try:
            doc = json.loads(data)
            if doc.get("format") != HANDOVER_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, not {HANDOVER_FORMAT}")
            key, wrap = doc["transport_key"], doc["wrap"]
            if wrap["mechanism"] != "CKM_RSA_PKCS_OAEP":
                raise ValueError(f"wrap mechanism {wrap['mechanism']} is not CKM_RSA_PKCS_OAEP")
            transport.oaep_param(wrap["hash"])
            handover = cls(
                station=str(doc["station"]),
                fixture=str(doc["fixture"]),
                created=str(doc["created"]),
                unwrap_key_sha256=normalise_fingerprint(doc["unwrap_key_sha256"]),
                transport_label=str(key["label"]),
                check=TransportKeyCheck(
                    key["check_method"], key["check_value"], key.get("check_mechanism")
                ),
                oaep_hash=wrap["hash"],
                wrapped_key=base64.b64decode(doc["wrapped_key"], validate=True),
                log_certificate=x509.load_pem_x509_certificate(doc["log_certificate"].encode()),
                chain=tuple(x509.load_pem_x509_certificates(doc["chain"].encode())),
            )
        except (ValueError, KeyError, TypeError, InputError) as exc:
            raise InputError(
                f"not a transport-key handover: {exc}", where=where, rule=HANDOVER_FORMAT
            ) from exc
        if handover.check.method not in (transport.CHECK_VALUE, transport.WRAP_CHECK):
            raise InputError(
                f"unknown check method {handover.check.method!r}",
                where=where,
                rule=HANDOVER_FORMAT,
            )
        return handover, data


# ------------------------------------------------------------------ station, SO step
@dataclass(frozen=True)
class Trusted:
    """The trusted token key a fixture's request became."""

    fixture: str
    unwrap_key_sha256: str
    label: str
    key_id: bytes
    created: bool  # False: the token already held it, trusted


def require_fingerprint(request: FixtureRequest, expected: str) -> None:
    got = request.unwrap_fingerprint
    if normalise_fingerprint(expected) != got:
        raise InputError(
            f"fixture {request.name}'s unwrap key has SHA-256 {got}, not the fingerprint given",
            rule="compare the fixture's fingerprint out of band",
        )


def trust_fixture(
    station: Station, request: FixtureRequest, expected_fingerprint: str, so_pin: SecretRef
) -> Trusted:
    """The security officer's step: import the fixture's RSA public key into the station token
    as a trusted, wrap-only, unmodifiable public key. ``expected_fingerprint`` is the one the
    fixture's operator read out (out of band); a mismatch is refused before the token is
    touched. Must run before this process opens a user session on the station token."""
    require_fingerprint(request, expected_fingerprint)
    got = request.unwrap_fingerprint
    config = station.hsm
    key_id = hsm.key_id_for(request.unwrap_public)
    label = trusted_label(request.name)
    with so_session(config.module, config.token, so_pin, config.softhsm2_conf) as session:
        if transport.trusted_wrapping_key(session, key_id) is not None:
            return Trusted(request.name, got, label, key_id, created=False)
        transport.import_trusted_wrapping_key(session, request.unwrap_public, label, key_id)
    return Trusted(request.name, got, label, key_id, created=True)


# ---------------------------------------------------------------- station, user step
def hand_over(
    station: Station,
    request: FixtureRequest,
    transport_uri: hsm.Pkcs11Uri,
    oaep_hash: str,
    *,
    days: int = LOG_CERT_DAYS,
) -> Handover:
    """Wrap the station's transport key under the fixture's trusted key with RSA-OAEP and
    certify the fixture's log key with the issuing CA. Refuses, before wrapping, a
    transport key that is not deliverable (:func:`pipeline.hsm.transport.deliverable_problem`)
    and a fixture key the security officer has not trusted."""
    transport.oaep_param(oaep_hash)
    config = station.hsm
    chain = load_chain(station)
    token = hsm.open_token(config.module, config.token, config.pin, config.softhsm2_conf)
    _, wrap_option = token.require(
        [
            Need(
                "hand the transport key over", "transport-key ceremony", (transport.HANDOVER_WRAP,)
            ),
            wrap_need("transport key identification"),
        ]
    )
    assert wrap_option is not None
    key = token.find(ObjectClass.SECRET_KEY, label=transport_uri.object, key_id=transport_uri.id)
    problem = transport.deliverable_problem(key)
    if problem:
        raise InputError(
            f"transport key {transport_uri} {problem}",
            rule="only deliverable transport keys are handed over: docs/key-delivery.md",
        )
    target = transport.trusted_wrapping_key(token.session, hsm.key_id_for(request.unwrap_public))
    if target is None:
        raise KeyNotFound(
            f"fixture {request.name}'s key ({request.unwrap_fingerprint}) is not a trusted key "
            f"of token {token.label}",
            rule="the security officer runs `provline ca trust-fixture` first",
        )
    if (
        int.from_bytes(bytes(target[Attribute.MODULUS]), "big")
        != request.unwrap_public.public_numbers().n
    ):
        raise InputError(
            f"the trusted key with fixture {request.name}'s key id has another modulus",
            rule="a trusted key matches its request",
        )
    check = transport.identify(token.session, key, wrap_option.mechanism)
    wrapped = transport.wrap_to_trusted(key, target, oaep_hash)
    _, issuer_key = hsm.resolve_signer(
        station.ca.issuer_key,
        module_path=config.module,
        pin=config.pin,
        softhsm2_conf=config.softhsm2_conf,
        needed_by="certify the fixture's log key",
    )
    log_public = request.csr.public_key()
    assert isinstance(log_public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, request.name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "provline programming fixture"),
        ]
    )
    days = min(days, max(1, (chain.issuer.not_valid_after_utc - utcnow()).days))
    log_cert = build_audit_signer(log_public, subject, chain.issuer, issuer_key, days)
    return Handover(
        station=station.name,
        fixture=request.name,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        unwrap_key_sha256=request.unwrap_fingerprint,
        transport_label=transport_uri.object or "",
        check=check,
        oaep_hash=oaep_hash,
        wrapped_key=wrapped,
        log_certificate=log_cert,
        chain=chain.certs,
    )


def check_handover_chain(
    handover: Handover, root: x509.Certificate | None, where: str
) -> x509.Certificate:
    """The handover's root, after checking its chain: the log certificate is issued by the
    first CA, each CA by the next, the last is self-signed, and it is ``root`` when given."""
    certs = [handover.log_certificate, *handover.chain]
    for child, parent in pairwise(certs):
        if not signed_by(child, parent):
            raise InputError(
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}",
                where=where,
                rule="handover chain: log certificate, issuing CA, ..., root",
            )
    anchor = certs[-1]
    if anchor.subject != anchor.issuer or not signed_by(anchor, anchor):
        raise InputError("the chain does not end at a root", where=where, rule="handover chain")
    if root is not None and anchor != root:
        raise InputError(
            f"the chain ends at {anchor.subject.rfc4514_string()} (SHA-256 "
            f"{thumbprints(anchor).sha256}), not the --root given",
            where=where,
            rule="the station's root is the fixture's trust anchor",
        )
    return anchor


def csr_for(name: str, log_key: Any) -> x509.CertificateSigningRequest:
    """The log key's CSR, CN = the fixture's name, signed by the key (in the token)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(log_key, hashes.SHA256())
    )
