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
    RUN_END = "run_end"
    SEAL = "seal"
    SEAL_SKIPPED = "seal_skipped"


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


class RegistrationMode(StrEnum):
    NONE = "none"
    INDIVIDUAL = "individual"
    GROUP = "group"
    HUB = "hub"
