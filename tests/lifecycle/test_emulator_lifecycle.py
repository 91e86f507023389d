"""What the emulator gained for the lifecycle commands, through its service API: registration
state in individual enrollments, paged registration records of a group, a disabled
individual enrollment that overrides a group for one device, disabled identities refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.layout import DEVICE_CERT

from ..support import CA, Emu, Hsm
from .support import batch, hub_identity, load, register, station_file, telemetry

pytestmark = pytest.mark.integration


def test_registration_records_and_state(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, passphrase: str
) -> None:
    station = load(station_file(tmp_path, hsm_env, ca_env, emu))
    grp = batch(tmp_path, station, "eg", "eg-", 5, "group")
    ind = batch(tmp_path, station, "ei", "ei-", 1, "individual")
    for n in (1, 2, 4, 5):
        assert register(station, grp / f"eg-{n:04d}")[0] == "assigned"
    assert register(station, ind / "ei-0001")[0] == "assigned"
    with emu.service() as svc:
        [group] = svc.post("/enrollmentGroups/query", json={"query": "SELECT *"}).json()
        gid = group["enrollmentGroupId"]
        seen, token, pages = [], None, 0
        while True:
            headers = {"x-ms-max-item-count": "3"}
            if token:
                headers["x-ms-continuation"] = token
            page = svc.post(f"/registrations/{gid}/query", headers=headers)
            assert page.status_code == 200
            assert page.headers["x-ms-item-type"] == "DeviceRegistration"
            seen += page.json()
            pages += 1
            token = page.headers.get("x-ms-continuation")
            if not token:
                break
        assert pages == 2 and [r["registrationId"] for r in seen] == [
            "eg-0001",
            "eg-0002",
            "eg-0004",
            "eg-0005",
        ]
        assert all(r["x509"]["enrollmentGroupId"] == gid for r in seen)
        bad = svc.post(f"/registrations/{gid}/query", headers={"x-ms-continuation": "x"})
        assert bad.status_code == 400 and bad.json()["errorCode"] == 400004
        state = svc.get("/enrollments/ei-0001").json()["registrationState"]
        assert state["status"] == "assigned" and state["deviceId"] == "ei-0001"
        assert "x509" not in state and state["assignedHub"]
        # one device of the group blocked by a disabled individual enrollment
        leaf = (grp / "eg-0002" / DEVICE_CERT).read_text()
        blocked = svc.put(
            "/enrollments/eg-0002",
            json={
                "registrationId": "eg-0002",
                "provisioningStatus": "disabled",
                "attestation": {
                    "type": "x509",
                    "x509": {"clientCertificates": {"primary": {"certificate": leaf}}},
                },
            },
        )
        assert blocked.status_code == 200
        again = svc.get("/enrollments/eg-0002").json()  # the device's record, from the group
        assert again["registrationState"]["status"] == "assigned"
    assert register(station, grp / "eg-0002")[0] == "disabled"
    status, hub, device_id = register(station, grp / "eg-0001")
    assert status == "assigned" and hub and device_id
    assert register(station, grp / "eg-0003")[0] == "assigned"  # the group still enrols others
    assert telemetry(station, grp / "eg-0001", hub, device_id) == 204
    identity = hub_identity(emu, device_id)
    assert identity is not None and identity["status"] == "enabled"
