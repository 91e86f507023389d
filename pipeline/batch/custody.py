"""Device key custody (README "Key custody"): who holds a device's private key.

* ``wrapped``: key pair made as session objects, the private key wrapped in the HSM under the
  station transport key (RFC 5649: CKM_AES_KEY_WRAP_KWP, or CKM_AES_KEY_WRAP_PAD where the
  module is known to mean RFC 5649 by it), both halves destroyed. Only the wrapped blob
  leaves the HSM.
* ``retain``: token objects, never extractable, label = registration ID, CKA_ID = SHA-1 of
  the public key (a pending mark until then); the bundle names the key by PKCS#11 URI.
* ``pkcs8``: development only. A software key in an encrypted PKCS#8 PEM (and PKCS#12).
* ``device``: the device made its key (a secure element, a TPM, a modem) and sent a CSR; the
  batch journal recorded it after every check (batch/requests.py, ca/csr.py). No private key
  exists at the station: the bundle has no private file and device.json names the CSR by
  its SHA-256 (docs/device-keys.md).

Each maker runs inside one worker process and uses that process's token session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import pkcs11.exceptions as p11e
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from pkcs11 import Attribute, Mechanism, ObjectClass

from .. import hsm
from ..ca.csr import public_key_sha256
from ..config.station import CustodyConfig
from ..errors import InputError
from ..hsm.capabilities import Option, keygen_need, wrap_need
from ..hsm.errormap import translate
from ..hsm.transport import identify as identify_transport_key
from ..keyprofile import KeyProfile, PublicKey
from ..layout import PKCS8_KEY, PKCS12, WRAPPED_KEY
from ..vocabulary import Custody
from .journal import RequestReader, RequestRow
from .records import KeyReference

# Called once the certificate and chain exist (PKCS#12 needs them); returns more private files.
WithCertificate = Callable[[x509.Certificate, list[x509.Certificate]], dict[str, bytes]]


@dataclass
class DeviceKey:
    public: PublicKey
    reference: KeyReference  # goes into device.json
    files: dict[str, bytes] = field(default_factory=dict)  # private files of the bundle
    generated: bool = True  # False when an existing token key was reused
    with_certificate: WithCertificate | None = None


class KeyMaker(Protocol):
    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        """The device's key; ``may_exist`` when an earlier run may have made it already."""
        ...


class WrappedKeys:
    """Session-object key pairs wrapped under the transport key. The wrap mechanism is the
    first the token offers of CKM_AES_KEY_WRAP_KWP (RFC 5649 by definition) and, on modules
    known to mean RFC 5649 by it (SoftHSM2), CKM_AES_KEY_WRAP_PAD; device.json records which
    one made the blob and how the transport key is identified (:mod:`pipeline.hsm.transport`)."""

    def __init__(self, token: hsm.Token, profile: KeyProfile, transport: hsm.Pkcs11Uri) -> None:
        self._token = token
        self._profile = profile
        self._needed_by = f"custody wrapped, key profile {profile}"
        _, wrap = token.require(
            [
                keygen_need(profile, self._needed_by, "generate device key pairs"),
                wrap_need("custody wrapped"),
            ]
        )
        assert wrap is not None
        self._mechanism = wrap.mechanism
        self._kek = token.find(ObjectClass.SECRET_KEY, label=transport.object, key_id=transport.id)
        check = identify_transport_key(token.session, self._kek, self._mechanism)
        self._reference = KeyReference(
            custody=Custody.WRAPPED,
            file=WRAPPED_KEY,
            format=_wrapped_format(wrap),
            transport_key=str(transport),
            transport_key_check_value=check.value,
            transport_key_check_method=check.method,
            wrap_mechanism=wrap.name(),
        )

    @property
    def reference(self) -> KeyReference:
        return self._reference

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        public_obj, private_obj = self._token.generate_keypair(
            self._profile, persistent=False, wrappable=True, needed_by=self._needed_by
        )
        try:
            blob = self._token.wrap(self._kek, private_obj, self._mechanism, "custody wrapped")
            public = hsm.public_key_of(public_obj)
        finally:
            private_obj.destroy()
            public_obj.destroy()
        return DeviceKey(public, self._reference, {WRAPPED_KEY: blob})


def _wrapped_format(option: Option) -> str:
    text = f"PKCS#8 PrivateKeyInfo wrapped with RFC 5649 ({option.name()})"
    if option.mechanism == Mechanism.AES_KEY_WRAP_PAD:
        # SoftHSM2 pads the key data with zeros to a multiple of 8 bytes before RFC 5649.
        text += "; the plaintext may end in zero bytes after the DER: read its length"
    return text


# Retain custody marks the keys it makes, so that orphan removal can prove which objects are
# provline's: CKA_LABEL = the registration ID, and CKA_ID = PENDING_ID_PREFIX + registration
# ID from C_GenerateKeyPair until it is replaced by the SKI once both halves exist.
PENDING_ID_PREFIX = b"provline-pending:"


def pending_key_id(registration_id: str) -> bytes:
    return PENDING_ID_PREFIX + registration_id.encode()


@dataclass(frozen=True)
class KeyObject:
    obj: Any
    kind: str  # "public" | "private"
    label: str
    key_id: bytes


def _key_objects(token: hsm.Token, label: str | None = None) -> list[KeyObject]:
    found = []
    for kind, object_class in (
        ("public", ObjectClass.PUBLIC_KEY),
        ("private", ObjectClass.PRIVATE_KEY),
    ):
        template: dict[Attribute, Any] = {Attribute.CLASS: object_class}
        if label is not None:
            template[Attribute.LABEL] = label
        with translate("list key objects"):
            objects = list(token.session.get_objects(template))
        for obj in objects:
            found.append(KeyObject(obj, kind, *_label_and_id(obj)))
    return found


def _label_and_id(obj: Any) -> tuple[str, bytes]:
    """Label and CKA_ID; a half-written object may lack either (a crash inside
    C_GenerateKeyPair on SoftHSM2 leaves objects whose attributes stop part-way)."""
    values = []
    for attribute in (Attribute.LABEL, Attribute.ID):
        try:
            values.append(obj[attribute])
        except p11e.PKCS11Error:
            values.append(None)
    label, key_id = values
    return (label or ""), bytes(key_id or b"")


def _ski(item: KeyObject) -> bytes | None:
    """The SKI of a public half's own key (what provline sets as CKA_ID), if readable."""
    try:
        return hsm.key_id_for(hsm.public_key_of(item.obj))
    except Exception:  # an unreadable or unsupported public key is not provably ours
        return None


def _marked(item: KeyObject) -> bool:
    """Made by provline's retain custody for this label (the label itself is checked
    against the journal by the caller): no CKA_ID yet, the pending mark, or (a public
    half) the SKI of its own key."""
    if item.key_id in (b"", pending_key_id(item.label)):
        return True
    return item.kind == "public" and item.key_id == _ski(item)


@dataclass
class LabelGroup:
    """The key objects labelled with one attempted registration ID, sorted out."""

    pair: tuple[Any, Any] | None = None  # (private, public): a complete pair to reuse
    ours: list[KeyObject] = field(default_factory=list)  # half-made: provably provline's
    foreign: list[KeyObject] = field(default_factory=list)  # not provably ours: left alone


def sort_label(items: list[KeyObject]) -> LabelGroup:
    privates = [i for i in items if i.kind == "private"]
    publics = [i for i in items if i.kind == "public"]
    group = LabelGroup()
    if len(privates) == 1 and len(publics) == 1:
        public, private = publics[0], privates[0]
        valid = {pending_key_id(public.label), _ski(public)}
        if public.key_id in valid and private.key_id in valid:
            group.pair = (private.obj, public.obj)
            return group
    for item in items:
        (group.ours if _marked(item) else group.foreign).append(item)
    return group


class RetainedKeys:
    """Token keys labelled with the registration ID. A key an earlier run generated but never
    certified is found by label and reused (lookups are O(objects) on SoftHSM2, so only devices
    the journal says were attempted before are looked up)."""

    def __init__(self, token: hsm.Token, profile: KeyProfile) -> None:
        self._token = token
        self._profile = profile
        self._needed_by = f"custody retain, key profile {profile}"
        token.require([keygen_need(profile, self._needed_by, "generate device key pairs")])

    def _existing(self, label: str) -> tuple[Any, Any] | None:
        group = sort_label(_key_objects(self._token, label))
        if group.pair:
            return group.pair
        for item in group.ours:  # half a pair cannot be certified: start again
            with translate("destroy a half-made device key"):
                item.obj.destroy()
        if group.foreign:
            raise InputError(
                f"token {self._token.label} holds {len(group.foreign)} key object(s) labelled "
                f"{label!r} that provline cannot prove it made; left alone",
                rule="retain keys are labelled with a registration ID no one else uses",
            )
        return None

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        found = self._existing(registration_id) if may_exist else None
        if found:
            private_obj, public_obj = found
        else:
            public_obj, private_obj = self._token.generate_keypair(
                self._profile,
                label=registration_id,
                key_id=pending_key_id(registration_id),
                persistent=True,
                needed_by=self._needed_by,
            )
        public = hsm.public_key_of(public_obj)
        key_id = hsm.key_id_for(public)
        if found is None or _label_and_id(private_obj)[1] != key_id:
            for obj in (public_obj, private_obj):
                with translate("set CKA_ID of a device key"):
                    obj[Attribute.ID] = key_id
        uri = hsm.Pkcs11Uri(
            token=self._token.label, object=registration_id, id=key_id, type="private"
        )
        return DeviceKey(
            public, KeyReference(Custody.RETAIN, uri=str(uri)), generated=found is None
        )


class Pkcs8Keys:
    """Development only: the private key exists in software, outside any HSM."""

    def __init__(self, profile: KeyProfile, passphrase: str, with_pkcs12: bool) -> None:
        self._profile = profile
        self._encryption = serialization.BestAvailableEncryption(passphrase.encode())
        self._pkcs12 = with_pkcs12
        self._passphrase = passphrase.encode()

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        key = self._profile.generate_software_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, self._encryption
        )
        reference = KeyReference(Custody.PKCS8, file=PKCS8_KEY, format="encrypted PKCS#8 PEM")
        extra = None
        if self._pkcs12:
            reference = replace(reference, pkcs12=PKCS12)

            def extra(cert: x509.Certificate, chain: list[x509.Certificate]) -> dict[str, bytes]:
                pfx = pkcs12.serialize_key_and_certificates(
                    registration_id.encode(),
                    key,
                    cert,
                    chain,
                    serialization.BestAvailableEncryption(self._passphrase),
                )
                return {PKCS12: pfx}

        return DeviceKey(key.public_key(), reference, {PKCS8_KEY: pem}, with_certificate=extra)


DEVICE_KEY_FORMAT = "held by the device; certified from its PKCS#10 CSR (csr_sha256)"


def device_key(row: RequestRow, profile: KeyProfile) -> DeviceKey:
    """The key of a checked request: its public key, and a reference naming the request.
    The request was checked before it was recorded; what is checked again here is cheap
    and guards the record itself (it parses, its key is of the batch's profile and is the
    key it was recorded with)."""
    registration_id, der, csr_sha256, key_sha256 = row
    try:
        public = x509.load_der_x509_csr(der).public_key()
    except ValueError as exc:
        raise InputError(
            f"{registration_id}: the recorded CSR does not parse", rule="recorded requests"
        ) from exc
    if (
        not isinstance(public, PublicKey)
        or KeyProfile.matching(public) is not profile
        or public_key_sha256(public) != key_sha256
    ):
        raise InputError(
            f"{registration_id}: the recorded CSR's key is not the one it was checked with",
            rule="recorded requests",
        )
    reference = KeyReference(Custody.DEVICE, format=DEVICE_KEY_FORMAT, csr_sha256=csr_sha256)
    return DeviceKey(public, reference, generated=False)


class DeviceKeys:
    """Custody ``device``: each device's key comes from the CSR the journal recorded for it
    (a read-only look-up per device; nothing is made, nothing touches the token)."""

    def __init__(self, profile: KeyProfile, requests: RequestReader) -> None:
        self._profile = profile
        self._requests = requests

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        row = self._requests.get(registration_id)
        if row is None:
            raise InputError(
                f"{registration_id}: no CSR recorded in the batch journal",
                rule="custody device: one CSR per device",
            )
        return device_key(row, self._profile)


def warn_pkcs8() -> None:
    print(
        "WARNING: custody policy pkcs8 is for development only: device private keys are "
        "generated in software and written to disk (encrypted).",
        file=sys.stderr,
    )


def key_maker(
    config: CustodyConfig,
    token: hsm.Token,
    profile: KeyProfile,
    passphrase: str | None,
    batch_dir: Path | None = None,
) -> KeyMaker:
    """The key maker of a custody policy. Custody ``device`` reads the requests of the batch
    in ``batch_dir``."""
    if config.policy is Custody.DEVICE:
        if batch_dir is None:
            raise InputError("custody device signs recorded CSRs", rule="a batch directory")
        return DeviceKeys(profile, RequestReader(batch_dir))
    if config.policy is Custody.WRAPPED:
        assert config.transport_key is not None
        return WrappedKeys(token, profile, config.transport_key)
    if config.policy is Custody.RETAIN:
        return RetainedKeys(token, profile)
    if passphrase is None:
        raise InputError("pkcs8 custody needs a passphrase", rule="custody.pkcs8_passphrase")
    return Pkcs8Keys(profile, passphrase, config.pkcs12)


@dataclass
class OrphanSweep:
    """What :func:`remove_orphans` destroyed and what it saw but left alone."""

    removed: list[dict[str, str]] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)


KEPT_REPORTED = 100  # objects left alone that are listed one by one; the rest are counted


def remove_orphans(
    token: hsm.Token,
    attempted: Collection[str],
    before_destroy: Callable[[dict[str, str]], None] | None = None,
) -> OrphanSweep:
    """Destroy what a crash inside C_GenerateKeyPair left of this batch's retained keys, and
    nothing else. An object is destroyed only when provline can prove it made it and left it
    half-made: its label is a registration ID ``attempted`` by this batch (the journal has a
    serial for it), its CKA_ID is provline's mark (empty, the pending id, or the SKI of its
    own public key), and it is not part of a complete pair (those are reused). Everything
    else that looks like debris (a half pair, an unlabelled key) may belong to another
    application on a shared token or partition: it is reported in ``kept`` and left alone.
    ``before_destroy`` is called with each removal before it happens (the orchestrator logs
    it durably first)."""
    sweep = OrphanSweep()
    kept: list[dict[str, str]] = []
    by_label: dict[str, list[KeyObject]] = {}
    for item in _key_objects(token):
        by_label.setdefault(item.label, []).append(item)
    attempted = set(attempted)
    for label, items in sorted(by_label.items()):
        kinds = {i.kind for i in items}
        if not label:
            kept += [_entry(i, "no label: cannot tell who made it") for i in items]
        elif label in attempted:
            group = sort_label(items)
            for item in group.ours:
                entry = _entry(item, _missing_half(item, items))
                if before_destroy is not None:
                    before_destroy(entry)
                with translate("destroy a half-made device key"):
                    item.obj.destroy()
                sweep.removed.append(entry)
            kept += [
                _entry(i, "labelled like a device of this batch but not marked as provline's")
                for i in group.foreign
            ]
        elif len(kinds) == 1:
            kept += [_entry(i, f"{_missing_half(i, items)}, not made by this batch") for i in items]
    sweep.kept = kept[:KEPT_REPORTED]
    if len(kept) > KEPT_REPORTED:
        sweep.kept.append(
            {"object": "more", "label": "", "why": f"{len(kept) - KEPT_REPORTED} more left alone"}
        )
    return sweep


def _entry(item: KeyObject, why: str) -> dict[str, str]:
    return {"object": item.kind, "label": item.label, "why": why}


def _missing_half(item: KeyObject, items: list[KeyObject]) -> str:
    other = "private" if item.kind == "public" else "public"
    if any(i.kind == other for i in items):
        return "duplicate or mismatched half"
    return f"no {other} half"
