"""Device key custody (README "Key custody"): who holds a device's private key.

* ``wrapped``: key pair made as session objects, the private key wrapped in the HSM under the
  station transport key (CKM_AES_KEY_WRAP_PAD), both halves destroyed. Only the wrapped blob
  leaves the HSM.
* ``retain``: token objects, never extractable, label = registration ID, CKA_ID = SHA-1 of
  the public key; the bundle names the key by PKCS#11 URI.
* ``pkcs8``: development only. A software key in an encrypted PKCS#8 PEM (and PKCS#12).

Each maker runs inside one worker process and uses that process's token session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from pkcs11 import Attribute, ObjectClass

from .. import hsm
from ..config.station import CustodyConfig
from ..errors import InputError
from ..keyprofile import KeyProfile, PublicKey
from ..layout import PKCS8_KEY, PKCS12, WRAPPED_KEY
from ..vocabulary import Custody
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
    def __init__(self, token: hsm.Token, profile: KeyProfile, transport: hsm.Pkcs11Uri) -> None:
        self._token = token
        self._profile = profile
        self._kek = token.find(ObjectClass.SECRET_KEY, label=transport.object, key_id=transport.id)
        self._reference = KeyReference(
            custody=Custody.WRAPPED,
            file=WRAPPED_KEY,
            format="PKCS#8 PrivateKeyInfo wrapped with CKM_AES_KEY_WRAP_PAD (RFC 5649)",
            transport_key=str(transport),
            transport_key_check_value=hsm.check_value(self._kek),
        )

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        public_obj, private_obj = self._token.generate_keypair(
            self._profile, persistent=False, wrappable=True
        )
        try:
            blob = self._token.wrap(self._kek, private_obj)
            public = hsm.public_key_of(public_obj)
        finally:
            private_obj.destroy()
            public_obj.destroy()
        return DeviceKey(public, self._reference, {WRAPPED_KEY: blob})


class RetainedKeys:
    """Token keys labelled with the registration ID. A key an earlier run generated but never
    certified is found by label and reused (lookups are O(objects) on SoftHSM2, so only devices
    the journal says were attempted before are looked up)."""

    def __init__(self, token: hsm.Token, profile: KeyProfile) -> None:
        self._token = token
        self._profile = profile

    def _existing(self, label: str) -> tuple[Any, Any] | None:
        halves = {
            o.object_class: o
            for o in self._token.session.get_objects({Attribute.LABEL: label})
            if o.object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
        }
        if len(halves) == 2:
            return halves[ObjectClass.PRIVATE_KEY], halves[ObjectClass.PUBLIC_KEY]
        for obj in halves.values():  # half a pair cannot be certified: start again
            obj.destroy()
        return None

    def make(self, registration_id: str, may_exist: bool) -> DeviceKey:
        found = self._existing(registration_id) if may_exist else None
        if found:
            private_obj, public_obj = found
        else:
            public_obj, private_obj = self._token.generate_keypair(
                self._profile, label=registration_id, persistent=True
            )
        public = hsm.public_key_of(public_obj)
        key_id = hsm.key_id_for(public)
        if found is None or private_obj[Attribute.ID] != key_id:
            for obj in (public_obj, private_obj):
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


def warn_pkcs8() -> None:
    print(
        "WARNING: custody policy pkcs8 is for development only: device private keys are "
        "generated in software and written to disk (encrypted).",
        file=sys.stderr,
    )


def key_maker(
    config: CustodyConfig, token: hsm.Token, profile: KeyProfile, passphrase: str | None
) -> KeyMaker:
    if config.policy is Custody.WRAPPED:
        assert config.transport_key is not None
        return WrappedKeys(token, profile, config.transport_key)
    if config.policy is Custody.RETAIN:
        return RetainedKeys(token, profile)
    if passphrase is None:
        raise InputError("pkcs8 custody needs a passphrase", rule="custody.pkcs8_passphrase")
    return Pkcs8Keys(profile, passphrase, config.pkcs12)


def remove_orphans(
    token: hsm.Token, before_destroy: Callable[[dict[str, str]], None] | None = None
) -> list[dict[str, str]]:
    """Destroy what a crash inside C_GenerateKeyPair leaves behind on SoftHSM2: key halves
    whose partner is missing and key objects with no label. The station token is provline's
    own, so an unlabelled key object cannot be anyone else's. ``before_destroy`` is called
    with each removal before it happens (the orchestrator logs it durably first)."""
    publics = token.objects(ObjectClass.PUBLIC_KEY)
    privates = token.objects(ObjectClass.PRIVATE_KEY)
    public_labels = {o.label for o in publics if o.label}
    private_labels = {o.label for o in privates if o.label}
    removed = []
    for kind, other, objects, partners in (
        ("public", "private", publics, private_labels),
        ("private", "public", privates, public_labels),
    ):
        for obj in objects:
            label = obj.label
            if not label or label not in partners:
                removed.append(
                    {
                        "object": kind,
                        "label": label or "",
                        "why": f"no {other} half" if label else "no label",
                    }
                )
                if before_destroy is not None:
                    before_destroy(removed[-1])
                obj.destroy()
    return removed
