"""The words every stage shares, spelled once: device states, serial states, audit events,
custody policies and registration modes.

The journal, the audit log, the verifier and the report all read and write these values, so
they are defined here, below every stage. The string values are part of the output contract
(journal rows, ``audit.jsonl`` events, ``report.json``): change a value and old batches no
longer verify.
"""

from __future__ import annotations

from enum import StrEnum


class DeviceState(StrEnum):
    """Where a device is in its batch: planned → intent → bundled → registered, or one of the
    end states that need rework (failed, conflict, register_failed)."""

    PLANNED = "planned"
    INTENT = "intent"  # a serial is reserved and may be signed; no durable bundle yet
    BUNDLED = "bundled"  # the bundle is durable
    FAILED = "failed"  # issuance failed for this device
    REGISTERED = "registered"
    CONFLICT = "conflict"  # DPS / IoT Hub holds another certificate or identity
    REGISTER_FAILED = "register_failed"

    @property
    def has_bundle(self) -> bool:
        return self in _WITH_BUNDLE


_WITH_BUNDLE = frozenset(
    {DeviceState.BUNDLED, DeviceState.REGISTERED, DeviceState.CONFLICT, DeviceState.REGISTER_FAILED}
)
REWORK_STATES = (DeviceState.FAILED, DeviceState.CONFLICT, DeviceState.REGISTER_FAILED)


class SerialState(StrEnum):
    """Every serial the CA was asked to sign ends issued, void, unused or released."""

    INTENT = "intent"  # journaled and logged before signing
    ISSUED = "issued"  # its bundle is durable
    VOID = "void"  # it may have been signed but its bundle is not durable: revoke it
    UNUSED = "unused"  # the worker proved it was never signed (the device failed)
    RELEASED = "released"  # reserved, never reached a signer: nothing to revoke, device again


class AuditEvent(StrEnum):
    """The ``event`` field of ``audit.jsonl`` lines."""

    BATCH_START = "batch_start"
    RESUME = "resume"
    TORN_TAIL_REMOVED = "torn_tail_removed"
    ORPHAN_REMOVED = "orphan_removed"
    ORPHAN_KEPT = "orphan_kept"  # looked like debris but not provably provline's: left alone
    INTENT = "intent"
    ISSUED = "issued"
    VOID = "void"
    UNUSED = "unused"
    RELEASED = "released"
    FAILED = "failed"
    REGISTERED = "registered"
    REGISTRATION_CONFLICT = "registration_conflict"
    REGISTRATION_FAILED = "registration_failed"
    ABORTED = "aborted"
    CA_UPLOADED = "ca_uploaded"  # the issuing CA uploaded to the DPS certificate API
    CA_VERIFIED = "ca_verified"  # ... and verified there by proof of possession (HSM-held key)
    RUN_END = "run_end"
    REPORT = "report"  # SHA-256 of report.json and report.txt, just before the seal
    SEAL = "seal"
    SEAL_SKIPPED = "seal_skipped"
    # The station lifecycle log (docs/lifecycle.md): after the factory.
    STATION_LOG_START = "station_log_start"
    OPERATION_START = "operation_start"
    OPERATION_END = "operation_end"
    REVOKED = "revoked"
    CRL_ISSUED = "crl_issued"
    ENROLLMENT_DISABLED = "enrollment_disabled"
    HUB_IDENTITY_DISABLED = "hub_identity_disabled"
    SHUT_OUT_FAILED = "shut_out_failed"
    RENEWAL_INTENT = "renewal_intent"
    RENEWED = "renewed"
    RENEWAL_VOID = "renewal_void"
    RENEWAL_ENROLLED = "renewal_enrolled"
    PROMOTED = "promoted"
    HUB_IDENTITY_UPDATED = "hub_identity_updated"
    LIFECYCLE_STEP_FAILED = "lifecycle_step_failed"
    RECONCILE_FIXED = "reconcile_fixed"
    # Key delivery logs (docs/key-delivery.md): a station's ceremony log and a programming
    # fixture's log. Each starts with log_start, which names its kind.
    LOG_START = "log_start"
    FIXTURE_KEYPAIR = "fixture_keypair"  # fixture: its unwrap-only key pair and log key
    FIXTURE_TRUSTED = "fixture_trusted"  # station: the SO imported a fixture key as trusted
    TRANSPORT_HANDOVER = "transport_handover"  # station: transport key wrapped to a fixture
    TRANSPORT_IMPORTED = "transport_imported"  # fixture: transport key unwrapped and checked
    DELIVERED = "delivered"  # fixture: one device key handed to the flasher or kept
    DELIVERY_REFUSED = "delivery_refused"  # fixture: a bundle it would not deliver


# A registration outcome is a device state in the journal and an event in the audit log.
REGISTRATION_EVENTS: dict[DeviceState, AuditEvent] = {
    DeviceState.REGISTERED: AuditEvent.REGISTERED,
    DeviceState.CONFLICT: AuditEvent.REGISTRATION_CONFLICT,
    DeviceState.REGISTER_FAILED: AuditEvent.REGISTRATION_FAILED,
}
REGISTRATION_STATES: dict[AuditEvent, DeviceState] = {
    event: state for state, event in REGISTRATION_EVENTS.items()
}


class Custody(StrEnum):
    """Who holds a device's private key (docs/custody in README "Output contract")."""

    WRAPPED = "wrapped"
    RETAIN = "retain"
    PKCS8 = "pkcs8"
    DEVICE = "device"  # the device makes its key and sends a CSR; no private key at the station


class RegistrationMode(StrEnum):
    NONE = "none"
    INDIVIDUAL = "individual"
    GROUP = "group"
    HUB = "hub"


class CertificateStatus(StrEnum):
    """Where an issued certificate is in its life after the factory (the station inventory,
    docs/lifecycle.md). Every status but ``active`` and ``staged`` puts the serial on the
    issuing CA's CRL."""

    ACTIVE = "active"  # the device's certificate
    STAGED = "staged"  # a renewal, usable, not yet promoted (individual: the secondary slot)
    RETIRED = "retired"  # replaced by a promoted renewal (CRL reason superseded)
    REVOKED = "revoked"  # revoked by the operator, with an RFC 5280 reason
    VOID = "void"  # may have been signed, never delivered (CRL reason superseded)

    @property
    def on_crl(self) -> bool:
        return self not in (CertificateStatus.ACTIVE, CertificateStatus.STAGED)


class LogKind(StrEnum):
    """What a log that starts with ``log_start`` records (its ``data.kind``)."""

    STATION_CEREMONY = "station-ceremony"
    FIXTURE = "fixture"


class ExportFormat(StrEnum):
    """What `provline export` makes for flashers and a MES from a sealed batch
    (docs/key-delivery.md, "Flasher formats"); station config ``delivery.exports``."""

    PEM = "pem"  # device and CA certificates, full chain, one PEM file each
    DER = "der"  # the same certificates in DER, one file each
    TLS_CHAIN = "tls-chain"  # leaf + issuing CA(s), no root: what a TLS client sends
    C_HEADER = "c-header"  # const unsigned char arrays with lengths, for MCU firmware
    ARCHIVE = "archive"  # one .tar.gz per device: its bundle and its formats
    INDEX = "index"  # index.csv and index.json of the batch, for a MES
