"""The station inventory on its own (a real SQLite file, no HSM): what a batch records, the
indexed look-ups, lifecycle states a later batch sync never undoes, CRL and expiry queries."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.lifecycle.inventory import CertificateRecord, Inventory, normalise_hex
from pipeline.vocabulary import CertificateStatus

ISSUER = "AB" * 20
META = {
    "batch_id": "lot-1",
    "custody": "wrapped",
    "key_profile": "ec-p256",
    "registration": "individual",
}


def _row(n: int, state: str = "registered") -> tuple[str, str, str, str, str]:
    detail = {
        "sha1_thumbprint": f"{n:040X}",
        "sha256_thumbprint": f"{n:064X}",
        "not_after": f"2027-01-{n % 28 + 1:02d}T00:00:00+00:00",
        "registration": {"mode": "individual", "enrollment": f"dev-{n}"},
    }
    return (f"dev-{n}", f"device-{n}", state, f"{n + 0xABC:X}", json.dumps(detail))


def _inventory(tmp_path: Path, devices: int = 5) -> Inventory:
    inventory = Inventory.open(tmp_path / "inventory.sqlite")
    inventory.add_batch(
        "station-1",
        tmp_path / "lot-1",
        META,
        [_row(n) for n in range(1, devices + 1)] + [("dev-x", "x", "failed", None, None)],
        [("dev-1", "DEAD01")],
        ISSUER,
    )
    return inventory


def test_a_batch_is_found_by_serial_registration_id_and_thumbprints(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path)
    [by_serial] = inventory.find("ABD")  # dev-1: 0xABC + 1
    assert by_serial.certificate.registration_id == "dev-1"
    assert by_serial.certificate.status is CertificateStatus.ACTIVE
    assert by_serial.certificate.bundle == str(tmp_path / "lot-1" / "dev-1")
    assert by_serial.device is not None and by_serial.device.device_id == "device-1"
    assert by_serial.device.enrollment == "dev-1"
    assert [f.certificate.serial for f in inventory.find("00:0a:bd")] == ["ABD"]
    assert [f.certificate.registration_id for f in inventory.find(f"{2:040x}")] == ["dev-2"]
    assert [f.certificate.registration_id for f in inventory.find(f"{3:064X}")] == ["dev-3"]
    # a registration id finds every certificate of the device, the void serial included
    statuses = sorted(f.certificate.status.value for f in inventory.find("DEV-1"))
    assert statuses == ["active", "void"]
    assert inventory.find("dev-x") == [] and inventory.find("  ") == []
    assert inventory.counts()["certificates"] == {"active": 5, "void": 1}


def test_a_later_sync_never_undoes_a_revocation(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path)
    with inventory.tx():
        inventory.set_certificate_status(
            "ABD", CertificateStatus.REVOKED, "keyCompromise", "2026-01-01T00:00:00Z"
        )
        inventory.revoke_device("dev-1", "keyCompromise", "2026-01-01T00:00:00Z")
        inventory.set_shut_out("dev-1", dps="disabled", hub_device_id="device-1")
    inventory.add_batch(
        "station-1", tmp_path / "lot-1", META, [_row(1)], [("dev-1", "DEAD01")], ISSUER
    )
    cert = inventory.certificate("ABD")
    device = inventory.device("dev-1")
    assert cert is not None and cert.status is CertificateStatus.REVOKED
    assert device is not None and device.revoked and device.dps == "disabled"
    assert device.hub_device_id == "device-1"
    assert list(inventory.on_crl(ISSUER)) == [
        ("ABD", "revoked", "keyCompromise", "2026-01-01T00:00:00Z"),
        ("DEAD01", "void", "superseded", inventory.certificate("DEAD01").revoked_at),  # type: ignore[union-attr]
    ]
    assert list(inventory.on_crl("another issuer")) == []


def test_expiring_lists_active_certificates_soonest_first(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path)
    inventory.add_certificate(
        CertificateRecord(
            "F00D",
            "dev-2",
            "device-2",
            "renew-1",
            "station-1",
            ISSUER,
            "A" * 40,
            "B" * 64,
            "2028-01-01T00:00:00+00:00",
            "wrapped",
            "ec-p256",
            None,
            CertificateStatus.STAGED,
        )
    )
    rows = inventory.expiring("2027-01-03T12:00:00+00:00")
    assert [(c.registration_id, staged) for c, staged in rows] == [
        ("dev-1", False),  # 2027-01-02
        ("dev-2", True),  # 2027-01-03, a renewal staged
    ]


def test_crl_numbers_only_go_up(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path)
    assert [inventory.reserve_crl_number(ISSUER) for _ in range(3)] == [1, 2, 3]
    with inventory.tx():
        inventory.record_crl(ISSUER, 2, tmp_path / "x.crl.pem", "00", 1, "t", "n")
    assert inventory.crls()[0]["number"] == 3  # a replayed, older record never lowers it
    assert inventory.reserve_crl_number(ISSUER) == 4


@settings(max_examples=50, deadline=None)
@given(serial=st.integers(min_value=1, max_value=2**159 - 1))
def test_serials_are_found_however_they_are_written(serial: int) -> None:
    stored = format(serial, "X")
    written = format(serial, "x").zfill(40)
    with_colons = ":".join(written[i : i + 2] for i in range(0, len(written), 2))
    assert normalise_hex(with_colons).lstrip("0") == stored
