"""The records the batch passes around, at their JSON edge."""

from __future__ import annotations

from pipeline.batch.records import KeyReference
from pipeline.registration.target import RegistrationOutcome
from pipeline.vocabulary import Custody, DeviceState, RegistrationMode


def test_key_reference_json_keeps_only_what_the_custody_says() -> None:
    retain = KeyReference(Custody.RETAIN, uri="pkcs11:token=t;object=d;type=private")
    assert retain.to_json() == {"custody": "retain", "uri": "pkcs11:token=t;object=d;type=private"}
    wrapped = KeyReference(
        Custody.WRAPPED,
        file="device.key.wrapped",
        format="RFC 5649",
        transport_key="pkcs11:token=t;object=transport",
        transport_key_check_value="A8D79B",
    )
    assert KeyReference.from_json(wrapped.to_json()) == wrapped


def test_registration_outcome_detail() -> None:
    done = RegistrationOutcome(
        "d1", DeviceState.REGISTERED, RegistrationMode.INDIVIDUAL, enrollment="d1", already=True
    )
    assert done.detail() == {"mode": "individual", "enrollment": "d1", "already": True}
    failed = RegistrationOutcome(
        "d2", DeviceState.REGISTER_FAILED, RegistrationMode.HUB, reason="HTTP 500", device_id="d2"
    )
    assert failed.detail() == {"mode": "hub", "device_id": "d2", "reason": "HTTP 500"}
