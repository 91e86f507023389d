"""The DPS / IoT Hub emulator over real TLS on loopback: the service API with plain httpx,
the device API with real mTLS (curl, as in Microsoft's "How to use X.509 certificates over
HTTPS without an SDK"), IoT Hub through azure-iot-hub."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.registration.endpoints import ConnectionString

from ..support import (
    CA,
    PASSPHRASE,
    PROVLINE,
    ROOT,
    Emu,
    Hsm,
    leaf_signed_chain,
    make_pkcs8_batch,
    openssl,
    start_emulator,
    verify_ca,
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
    return make_pkcs8_batch(
        hsm_env, ca_env, tmp_path_factory.mktemp("emubatch"), "emu", "emu-dev-", 6
    )


def curl(
    emu: Emu,
    bundle: Path,
    method: str,
    url: str,
    body: str | None = None,
    cert_and_key: tuple[Path, Path] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """The documented curl command, plus --cacert for the emulator's own server CA."""
    cert, key = cert_and_key or (bundle / "full-chain.cert.pem", bundle / "device.key.pem")
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
        str(cert),
        "--key",
        str(key),
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


def register(
    emu: Emu, bundle: Path, rid: str | None = None, cert_and_key: tuple[Path, Path] | None = None
) -> dict[str, Any]:
    rid = rid or bundle.name
    base = f"{emu.info['dps_device_endpoint']}/{emu.info['id_scope']}/registrations/{rid}"
    status, headers, body = curl(
        emu,
        bundle,
        "PUT",
        f"{base}/register?api-version=2019-03-31",
        json.dumps({"registrationId": rid}),
        cert_and_key,
    )
    if status != 202:
        return {"http": status, **(body or {})}
    assert body["status"] == "assigning" and int(headers["retry-after"]) >= 1
    # an absolute URL, as DPS sends it
    assert headers["location"] == f"{base}/operations/{body['operationId']}"
    for _ in range(20):
        time.sleep(0.3)
        status, _, body = curl(
            emu,
            bundle,
            "GET",
            f"{base}/operations/{body['operationId']}?api-version=2021-06-01",
            cert_and_key=cert_and_key,
        )
        if status == 200:
            return {"http": 200, **body}
        assert status == 202 and body["status"] == "assigning"
    raise AssertionError("never assigned")


def _pem(path: Path) -> str:
    return path.read_text()


def _upload_and_verify_root(emu: Emu, ca_env: CA, hsm_env: Hsm, tmp_path: Path, name: str) -> None:
    verify_ca(emu, ca_env.root, ca_env.root_key_uri, hsm_env, tmp_path, name)


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


def _group(gid: str, signing: Path) -> dict[str, Any]:
    return {
        "enrollmentGroupId": gid,
        "attestation": {
            "type": "x509",
            "x509": {"signingCertificates": {"primary": {"certificate": _pem(signing)}}},
        },
    }


def test_group_needs_a_verified_ca_and_a_leaf_cannot_sign(
    batch: Path, ca_env: CA, hsm_env: Hsm, tmp_path: Path
) -> None:
    """DPS refuses a group's device until a CA of its chain is verified by proof of
    possession, and refuses a chain where a device leaf signed another "leaf" (RFC 5280:
    only a CA signs), as openssl does; both with 401 / 401002."""
    e = start_emulator(tmp_path / "emu", "--assign-seconds", "0.2")
    try:
        with e.service() as svc:
            assert svc.put("/enrollmentGroups/line-v", json=_group("line-v", ca_env.intermediate))
            assert svc.get("/certificates").json() == {"value": []}
        device = batch / "emu-dev-002"
        refused = register(e, device)
        assert refused["http"] == 401 and refused["errorCode"] == 401002, refused
        assert "verified" in refused["message"]
        verify_ca(e, ca_env.intermediate, ca_env.issuer_key_uri, hsm_env, tmp_path, "issuing")
        assert register(e, device)["status"] == "assigned"
        rogue = leaf_signed_chain(device, tmp_path / "rogue", "emu-rogue")
        refused = register(e, device, rid="emu-rogue", cert_and_key=rogue)
        assert refused["http"] == 401 and refused["errorCode"] == 401002, refused
        assert "basicConstraints" in refused["message"]
        # openssl agrees: the chain is refused, the device's own chain is not
        args = ["verify", "-purpose", "sslclient", "-CAfile", str(ca_env.root)]
        own_chain = str(device / "full-chain.cert.pem")
        bad = openssl(*args, "-untrusted", own_chain, str(rogue[0]))
        assert bad.returncode != 0 and b"invalid CA certificate" in bad.stdout + bad.stderr
        good = openssl(*args, "-untrusted", own_chain, str(device / "device.cert.pem"))
        assert good.returncode == 0, good.stderr
        # the hub refuses the same chain for a CA-authenticated identity of that name
        hub_cs = ConnectionString.parse(e.info["hub_connection_string"])
        created = httpx.put(
            f"https://{hub_cs.host}/devices/emu-rogue?api-version=2021-04-12",
            json={"deviceId": "emu-rogue", "authentication": {"type": "certificateAuthority"}},
            headers={"Authorization": hub_cs.token()},
            verify=e.tls(),
        )
        assert created.status_code == 200, created.text
        url = f"https://{hub_cs.host}/devices/{{}}/messages/events?api-version=2020-03-13"
        assert curl(e, device, "POST", url.format("emu-rogue"), "{}", rogue)[0] == 401
        assert curl(e, device, "POST", url.format("emu-dev-002"), "{}")[0] == 204
    finally:
        e.stop()


def test_registry_list_and_query_with_azure_iot_hub(
    emu: Emu, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-iot-hub's get_devices and query_iot_hub against the emulated registry; the
    times arrive with a time zone, as IoT Hub sends them."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", emu.info["tls_ca_file"])
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import QuerySpecification

    manager = IoTHubRegistryManager.from_connection_string(emu.info["hub_connection_string"])
    for n in range(1, 6):
        manager.create_device_with_certificate_authority(f"reg-{n}", "enabled")
    manager.create_device_with_certificate_authority("reg-off", "disabled")
    listed = manager.get_devices()
    ids = [d.device_id for d in listed]
    assert {f"reg-{n}" for n in range(1, 6)} | {"reg-off"} <= set(ids)
    assert len(manager.get_devices(max_number_of_devices=2)) == 2
    device = next(d for d in listed if d.device_id == "reg-1")
    assert device.last_activity_time.tzinfo is not None
    assert device.connection_state == "Disconnected"

    everything = manager.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"))
    assert set(ids) <= {t.device_id for t in everything.items}
    assert everything.type == "Twin" and everything.continuation_token is None
    one = manager.query_iot_hub(
        QuerySpecification(query="SELECT * FROM devices WHERE deviceId = 'reg-3'")
    )
    assert [t.device_id for t in one.items] == ["reg-3"]
    assert one.items[0].status == "enabled" and one.items[0].authentication_type == (
        "certificateAuthority"
    )
    off = manager.query_iot_hub(
        QuerySpecification(
            query="select * from devices where status = 'disabled' and deviceId IN ['reg-off', 'x']"
        )
    )
    assert [t.device_id for t in off.items] == ["reg-off"]
    paged = manager.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"), None, 2)
    assert len(paged.items) == 2 and paged.continuation_token
    rest = manager.query_iot_hub(
        QuerySpecification(query="SELECT * FROM devices"), paged.continuation_token, 1000
    )
    seen = [t.device_id for t in paged.items + rest.items]
    assert sorted(seen) == sorted(set(seen)) and set(ids) <= set(seen)
    with pytest.raises(Exception, match="Bad Request"):
        manager.query_iot_hub(QuerySpecification(query="SELECT COUNT() FROM devices"))


def test_emulator_json_paths_are_absolute_with_a_relative_data_dir(tmp_path: Path) -> None:
    """``--data-dir`` relative to the working directory (as make demo starts it): every
    path in emulator.json is absolute, so provline run from elsewhere finds the trust."""
    proc = subprocess.Popen(
        [*PROVLINE, "emulator", "serve", "--data-dir", "rel/emu"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    info_path = tmp_path / "rel" / "emu" / "emulator.json"
    try:
        deadline = time.monotonic() + 30
        while not info_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(info_path.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    for key in ("tls_ca_file", "data_dir", "telemetry_log"):
        assert Path(info[key]).is_absolute(), (key, info[key])
    assert Path(info["tls_ca_file"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert Path(info["data_dir"]) == (tmp_path / "rel" / "emu").resolve()
    assert tmp_path != ROOT
