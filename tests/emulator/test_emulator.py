"""The DPS / IoT Hub emulator over real TLS on loopback: the service API with plain httpx,
the device API with real mTLS (curl, as in Microsoft's "How to use X.509 certificates over
HTTPS without an SDK"), IoT Hub through azure-iot-hub."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.registration.endpoints import ConnectionString
from pipeline.run import run_batch

from ..support import (
    CA,
    PASSPHRASE,
    Emu,
    Hsm,
    provline,
    start_emulator,
    write_station,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emu]:
    e = start_emulator(tmp_path_factory.mktemp("emulator"), "--assign-seconds", "0.2")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def batch(hsm_env: Hsm, ca_env: CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pkcs8-custody batch: what curl and the SDK samples consume."""
    os.environ["PROVLINE_TEST_PASSPHRASE"] = PASSPHRASE
    base = tmp_path_factory.mktemp("emubatch")
    station = load_station(
        write_station(base / "s.yaml", hsm_env, ca_env, custody="pkcs8", output=base / "out")
    )
    manifest = base / "m.yaml"
    manifest.write_text("batch_id: emu\ngenerator: {prefix: emu-dev-, digits: 3, count: 6}\n")
    result = run_batch(load_manifest(manifest), station)
    assert result.exit_code == 0
    return result.batch_dir


def curl(
    emu: Emu, bundle: Path, method: str, url: str, body: str | None = None
) -> tuple[int, dict[str, str], Any]:
    """The documented curl command, plus --cacert for the emulator's own server CA."""
    cmd = [
        "curl",
        "-s",
        "-L",
        "-i",
        "-X",
        method,
        "--cacert",
        emu.info["tls_ca_file"],
        "--cert",
        str(bundle / "full-chain.cert.pem"),
        "--key",
        str(bundle / "device.key.pem"),
        "--pass",
        PASSPHRASE,
        "-H",
        "Content-Type: application/json",
        "-H",
        "Content-Encoding:  utf-8",
    ]
    if body is not None:
        cmd += ["-d", body]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=30, check=True)
    head, _, payload = out.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, json.loads(payload) if payload.strip() else None


def register(emu: Emu, bundle: Path, rid: str | None = None) -> dict[str, Any]:
    rid = rid or bundle.name
    base = f"{emu.info['dps_device_endpoint']}/{emu.info['id_scope']}/registrations/{rid}"
    status, headers, body = curl(
        emu,
        bundle,
        "PUT",
        f"{base}/register?api-version=2019-03-31",
        json.dumps({"registrationId": rid}),
    )
    if status != 202:
        return {"http": status, **(body or {})}
    assert body["status"] == "assigning" and int(headers["retry-after"]) >= 1
    for _ in range(20):
        time.sleep(0.3)
        status, _, body = curl(
            emu, bundle, "GET", f"{base}/operations/{body['operationId']}?api-version=2021-06-01"
        )
        if status == 200:
            return {"http": 200, **body}
        assert status == 202 and body["status"] == "assigning"
    raise AssertionError("never assigned")


def _pem(path: Path) -> str:
    return path.read_text()


def _upload_and_verify_root(emu: Emu, ca_env: CA, hsm_env: Hsm, tmp_path: Path, name: str) -> None:
    with emu.service() as svc:
        put = svc.put(
            f"/certificates/{name}", json={"properties": {"certificate": _pem(ca_env.root)}}
        )
        assert put.status_code == 200 and put.json()["properties"]["isVerified"] is False
        code = svc.post(
            f"/certificates/{name}/generateVerificationCode",
            headers={"If-Match": put.json()["etag"]},
        )
        assert code.status_code == 200, code.text
        verification = code.json()["properties"]["verificationCode"]
        pop = tmp_path / "pop.pem"
        provline(
            "ca",
            "pop",
            "--code",
            verification,
            "--ca-cert",
            str(ca_env.root),
            "--ca-key",
            ca_env.root_key_uri,
            "--out",
            str(pop),
            env=hsm_env.env(),
        )
        done = svc.post(
            f"/certificates/{name}/verify",
            headers={"If-Match": code.json()["etag"]},
            json={"certificate": _pem(pop)},
        )
        assert done.status_code == 200, done.text
        assert done.json()["properties"]["isVerified"] is True


def test_individual_enrollment_curl_flow_and_unverified_ca(
    emu: Emu, batch: Path, ca_env: CA, hsm_env: Hsm, tmp_path: Path
) -> None:
    device = batch / "emu-dev-001"
    with emu.service() as svc:
        body = {
            "registrationId": "emu-dev-001",
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": _pem(device / "device.cert.pem")}
                    }
                },
            },
        }
        put = svc.put("/enrollments/emu-dev-001", json=body)
        assert put.status_code == 200, put.text
        assert "certificate" not in json.dumps(put.json()["attestation"]).replace(
            "clientCertificates", ""
        )
    # the leaf is CA-signed and the CA is not verified yet: DPS refuses the device
    refused = register(emu, device)
    assert refused["http"] == 401 and refused["errorCode"] == 401002
    _upload_and_verify_root(emu, ca_env, hsm_env, tmp_path, "test-root")
    result = register(emu, device)
    assert result.get("status") == "assigned", result
    state = result["registrationState"]
    assert state["deviceId"] == "emu-dev-001" and state["substatus"] == "initialAssignment"
    hub = state["assignedHub"]
    status, _, _ = curl(
        emu,
        device,
        "POST",
        f"https://{hub}/devices/{state['deviceId']}/messages/events?api-version=2020-03-13",
        '{"temperature": 30}',
    )
    assert status == 204
    # a wrong registration ID in the URL fails the way DPS fails
    wrong = register(emu, device, rid="emu-dev-002")
    assert wrong["http"] == 401 and wrong["errorCode"] == 401002
    with emu.service() as svc:
        reg = svc.get("/registrations/emu-dev-001")
        assert reg.status_code == 200 and reg.json()["status"] == "assigned"


def test_group_enrollment_and_disabled(emu: Emu, batch: Path, ca_env: CA) -> None:
    with emu.service() as svc:
        group = {
            "enrollmentGroupId": "line-a",
            "attestation": {
                "type": "x509",
                "x509": {
                    "signingCertificates": {"primary": {"certificate": _pem(ca_env.intermediate)}}
                },
            },
        }
        assert svc.put("/enrollmentGroups/line-a", json=group).status_code == 200
    result = register(emu, batch / "emu-dev-003")
    assert result.get("status") == "assigned", result
    state = result["registrationState"]
    assert state["x509"]["enrollmentGroupId"] == "line-a"
    status, _, _ = curl(
        emu,
        batch / "emu-dev-003",
        "POST",
        f"https://{state['assignedHub']}/devices/emu-dev-003/messages/events"
        "?api-version=2020-03-13",
        '{"temperature": 31}',
    )
    assert status == 204
    # a disabled individual enrollment wins over the group, and refuses the device
    with emu.service() as svc:
        body = {
            "registrationId": "emu-dev-004",
            "provisioningStatus": "disabled",
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": _pem(batch / "emu-dev-004" / "device.cert.pem")}
                    }
                },
            },
        }
        assert svc.put("/enrollments/emu-dev-004", json=body).status_code == 200
    disabled = register(emu, batch / "emu-dev-004")
    assert disabled["status"] == "disabled"
    assert "assignedHub" not in disabled["registrationState"]


def test_service_api_etags_bulk_and_paging(emu: Emu, batch: Path) -> None:
    cert = _pem(batch / "emu-dev-005" / "device.cert.pem")

    def enrollment(rid: str) -> dict[str, Any]:
        return {
            "registrationId": rid,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": cert}}},
            },
        }

    with emu.service() as svc:
        first = svc.put("/enrollments/etag-1", json=enrollment("etag-1"))
        assert first.status_code == 200
        etag = first.json()["etag"]
        assert svc.put("/enrollments/etag-1", json=enrollment("etag-1")).status_code == 409
        assert (
            svc.put(
                "/enrollments/etag-1", json=enrollment("etag-1"), headers={"If-Match": "bm9wZQ=="}
            ).status_code
            == 412
        )
        updated = svc.put(
            "/enrollments/etag-1", json=enrollment("etag-1"), headers={"If-Match": etag}
        )
        assert updated.status_code == 200 and updated.json()["etag"] != etag
        assert (
            svc.put(
                "/enrollments/etag-1", json=enrollment("etag-1"), headers={"If-Match": "*"}
            ).status_code
            == 200
        )
        assert svc.delete("/enrollments/etag-1", headers={"If-Match": etag}).status_code == 412
        assert svc.delete("/enrollments/etag-1", headers={"If-Match": "*"}).status_code == 204
        assert svc.get("/enrollments/etag-1").json()["errorCode"] == 404201
        too_many = svc.post(
            "/enrollments",
            json={"mode": "create", "enrollments": [enrollment(f"bulk-{i}") for i in range(11)]},
        )
        assert too_many.status_code == 400
        ok = svc.post(
            "/enrollments",
            json={"mode": "create", "enrollments": [enrollment(f"bulk-{i}") for i in range(10)]},
        )
        assert ok.json() == {"isSuccessful": True, "errors": []}
        again = svc.post(
            "/enrollments",
            json={"mode": "create", "enrollments": [enrollment("bulk-0"), enrollment("bulk-new")]},
        )
        assert again.json() == {
            "isSuccessful": False,
            "errors": [
                {
                    "registrationId": "bulk-0",
                    "errorCode": 409201,
                    "errorStatus": "Enrollment already exists.",
                }
            ],
        }
        ids, continuation = [], None
        for _ in range(20):
            headers = {"x-ms-max-item-count": "4"}
            if continuation:
                headers["x-ms-continuation"] = continuation
            page = svc.post("/enrollments/query", json={"query": "SELECT *"}, headers=headers)
            assert page.status_code == 200 and len(page.json()) <= 4
            assert page.headers["x-ms-item-type"] == "Enrollment"
            ids += [e["registrationId"] for e in page.json()]
            continuation = page.headers.get("x-ms-continuation")
            if not continuation:
                break
        assert {f"bulk-{i}" for i in range(10)} | {"bulk-new"} <= set(ids)
        assert len(ids) == len(set(ids))
        deleted = svc.post(
            "/enrollments", json={"mode": "delete", "enrollments": [{"registrationId": "bulk-new"}]}
        )
        assert deleted.json()["isSuccessful"] is True


def test_sas_is_checked(emu: Emu) -> None:
    cs = ConnectionString.parse(emu.info["service_connection_string"])
    url = f"{emu.info['dps_service_endpoint']}/enrollments/x?api-version=2021-10-01"
    bad_key = ConnectionString(cs.host, cs.key_name, "AAAA" * 11).token()
    expired = cs.token(ttl=-10)
    wrong_policy = ConnectionString(cs.host, "enrollmentread", cs.key).token()
    for token in (bad_key, expired, wrong_policy, None):
        response = httpx.get(
            url, verify=emu.tls(), headers={"Authorization": token} if token else {}
        )
        assert response.status_code == 401 and response.json()["errorCode"] == 401000


def test_quota_restart_and_registry_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "emu"
    data.mkdir()
    (data / "config.json").write_text(
        json.dumps({"operations_per_minute": 5, "quota_window_seconds": 3})
    )
    e = start_emulator(data)
    try:
        with e.service() as svc:
            time.sleep(3 - time.time() % 3 + 0.05)  # start at a window boundary
            codes = [svc.get("/enrollments/nope").status_code for _ in range(6)]
            assert codes == [404] * 5 + [429]
            throttled = svc.get("/enrollments/nope")
            assert throttled.json()["errorCode"] == 429001
            assert 1 <= int(throttled.headers["retry-after"]) <= 3
            time.sleep(int(throttled.headers["retry-after"]))
            assert svc.get("/enrollments/nope").status_code == 404  # the next window
            group = {
                "enrollmentGroupId": "kept",
                "attestation": {
                    "type": "x509",
                    "x509": {
                        "signingCertificates": {
                            "primary": {"certificate": (data / "server-ca.pem").read_text()}
                        }
                    },
                },
            }
            assert svc.put("/enrollmentGroups/kept", json=group).status_code == 200
        before = e.info["service_connection_string"].split("SharedAccessKey=")[1]
        e.stop()
        e = start_emulator(data)  # new free ports; same keys, same state
        assert e.info["service_connection_string"].split("SharedAccessKey=")[1] == before
        with e.service() as svc:
            assert svc.get("/enrollmentGroups/kept").status_code == 200
        # injected faults, changed live through faults.json
        (data / "faults.json").write_text(json.dumps({"error_rate": 1.0}))
        with e.service() as svc:
            statuses = {svc.get("/enrollmentGroups/kept").status_code for _ in range(12)}
        assert statuses <= {500, 503} and statuses
        (data / "faults.json").write_text(json.dumps({"drop_rate": 1.0}))
        with e.service() as svc, pytest.raises(httpx.TransportError):
            svc.get("/enrollmentGroups/kept")
        (data / "faults.json").write_text(json.dumps({}))
        with e.service() as svc:
            assert svc.get("/enrollmentGroups/kept").status_code == 200
        # IoT Hub registry through the real azure-iot-hub SDK
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", e.info["tls_ca_file"])
        from azure.iot.hub import IoTHubRegistryManager

        manager = IoTHubRegistryManager.from_connection_string(e.info["hub_connection_string"])
        created = manager.create_device_with_certificate_authority("hub-dev-1", "enabled")
        assert created.authentication.type == "certificateAuthority"
        fetched = manager.get_device("hub-dev-1")
        assert fetched.device_id == "hub-dev-1" and fetched.etag == created.etag
        updated = manager.update_device_with_certificate_authority(
            "hub-dev-1", etag=fetched.etag, status="disabled"
        )
        assert updated.status == "disabled"
        thumb = "A" * 40
        selfsigned = manager.create_device_with_x509("hub-dev-2", thumb, thumb, "enabled")
        assert selfsigned.authentication.x509_thumbprint.primary_thumbprint == thumb
        manager.delete_device("hub-dev-1")  # etag None: the SDK sends If-Match: "*"
        with pytest.raises(Exception, match="Not Found"):
            manager.get_device("hub-dev-1")
    finally:
        e.stop()


def test_device_polling_limit(emu: Emu, batch: Path) -> None:
    """Operation status lookups are limited to 5 per 10 s per device (not adjustable)."""
    device = batch / "emu-dev-006"
    base = f"{emu.info['dps_device_endpoint']}/{emu.info['id_scope']}/registrations/emu-dev-006"
    statuses = [
        curl(emu, device, "GET", f"{base}/operations/none?api-version=2021-10-01") for _ in range(6)
    ]
    assert [s for s, _, _ in statuses[:5]] == [404] * 5
    status, headers, body = statuses[5]
    assert status == 429 and body["errorCode"] == 429001 and int(headers["retry-after"]) >= 1
