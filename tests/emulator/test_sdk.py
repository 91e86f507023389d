"""Microsoft's device SDK (azure-iot-device) and paho-mqtt against the emulator on the
standard ports (8883 MQTT, 443 HTTPS and MQTT over WebSockets) of private loopback
addresses: provisioning over MQTT, telemetry to the assigned hub, and the refusals Azure
makes (401 / 401002) for a group without a verified CA and for a leaf that signs a leaf."""

from __future__ import annotations

import json
import queue
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.registration.device import DeviceClient
from pipeline.registration.endpoints import ConnectionString, Endpoints

from ..support import (
    CA,
    PASSPHRASE,
    STANDARD_PORTS_REASON,
    Emu,
    Hsm,
    can_bind_standard_ports,
    leaf_signed_chain,
    make_pkcs8_batch,
    provline,
    start_emulator,
    verify_ca,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not can_bind_standard_ports(), reason=STANDARD_PORTS_REASON),
    # azure-iot-device 2.14 builds its TLS context with ssl.PROTOCOL_TLSv1_2 (TLS 1.2 only,
    # as DPS and IoT Hub require), which Python deprecates: creating a client warns.
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def batch(hsm_env: Hsm, ca_env: CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sdkbatch")
    return make_pkcs8_batch(hsm_env, ca_env, base, "sdk", "sdk-dev-", 5)


def _enrol(emu: Emu, batch: Path, ca_env: CA) -> None:
    """sdk-dev-001 individually; every device of the issuing CA through a group."""
    with emu.service() as svc:
        leaf = (batch / "sdk-dev-001" / "device.cert.pem").read_text()
        individual = {
            "registrationId": "sdk-dev-001",
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": leaf}}},
            },
        }
        assert svc.put("/enrollments/sdk-dev-001", json=individual).status_code == 200
        group = {
            "enrollmentGroupId": "sdk-line",
            "attestation": {
                "type": "x509",
                "x509": {
                    "signingCertificates": {
                        "primary": {"certificate": ca_env.intermediate.read_text()}
                    }
                },
            },
            "initialTwin": {"tags": {"line": "sdk"}},
        }
        assert svc.put("/enrollmentGroups/sdk-line", json=group).status_code == 200


@pytest.fixture(scope="module")
def emu(
    batch: Path, ca_env: CA, hsm_env: Hsm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Emu]:
    """Enrolled, issuing CA verified by proof of possession."""
    base = tmp_path_factory.mktemp("sdkemu")
    e = start_emulator(base / "emu", "--assign-seconds", "0.2", standard_ports=True)
    _enrol(e, batch, ca_env)
    verify_ca(e, ca_env.intermediate, ca_env.issuer_key_uri, hsm_env, base, "issuing")
    yield e
    e.stop()


def _x509(chain: Path, key: Path, passphrase: str | None = PASSPHRASE) -> Any:
    from azure.iot.device import X509

    return X509(cert_file=str(chain), key_file=str(key), pass_phrase=passphrase)


def _bundle_x509(bundle: Path) -> Any:
    return _x509(bundle / "full-chain.cert.pem", bundle / "device.key.pem")


def _provision(emu: Emu, rid: str, x509: Any, websockets: bool = False) -> Any:
    from azure.iot.device import ProvisioningDeviceClient
    from azure.iot.device.common.evented_callback import EventedCallback

    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=emu.info["dps_host"],
        registration_id=rid,
        id_scope=emu.info["id_scope"],
        x509=x509,
        server_verification_cert=Path(emu.info["tls_ca_file"]).read_text(),
        websockets=websockets,
    )
    try:
        return client.register()
    except Exception:
        # register() shuts its pipeline down only on success; a refused client would keep
        # its timers (and this process) alive for another 30 s
        done = EventedCallback()
        client._pipeline.shutdown(callback=done)
        done.wait_for_completion()
        raise


def _send(emu: Emu, hub: str, device_id: str, x509: Any, websockets: bool = False) -> None:
    from azure.iot.device import IoTHubDeviceClient, Message

    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509,
        hostname=hub,
        device_id=device_id,
        server_verification_cert=Path(emu.info["tls_ca_file"]).read_text(),
        websockets=websockets,
    )
    try:
        message = Message(json.dumps({"temperature": 21.5}))
        message.custom_properties["station"] = "line A"
        message.content_type, message.content_encoding = "application/json", "utf-8"
        client.send_message(message)  # returns once the hub's PUBACK arrived
    finally:
        client.shutdown()


def _telemetry(emu: Emu) -> list[dict[str, Any]]:
    path = Path(emu.info["telemetry_log"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _refused(emu: Emu, rid: str, x509: Any) -> str:
    """The SDK's refusal: ClientError whose cause names the service's status code."""
    from azure.iot.device.exceptions import ClientError

    with pytest.raises(ClientError) as info:
        _provision(emu, rid, x509)
    return str(info.value.__cause__)


def _paho_register(emu: Emu, rid: str, chain: Path, key: Path) -> tuple[str, dict[str, Any]]:
    """A bare paho-mqtt client doing DPS's register request: (reply topic, reply body)."""
    import paho.mqtt.client as paho

    replies: queue.Queue[Any] = queue.Queue()
    client = paho.Client(client_id=rid, protocol=paho.MQTTv311, clean_session=True)
    client.username_pw_set(f"{emu.info['id_scope']}/registrations/{rid}/api-version=2019-03-31")
    client.tls_set(
        ca_certs=emu.info["tls_ca_file"],
        certfile=str(chain),
        keyfile=str(key),
        keyfile_password=PASSPHRASE,
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    client.on_message = lambda _c, _u, message: replies.put(message)
    client.connect(emu.info["dps_host"], int(emu.info["dps_mqtt_port"]))
    client.loop_start()
    try:
        client.subscribe("$dps/registrations/res/#", qos=1)
        client.publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=42",
            json.dumps({"registrationId": rid}),
            qos=1,
        )
        message = replies.get(timeout=20)
    finally:
        client.disconnect()
        client.loop_stop()
    return message.topic, json.loads(message.payload)


def test_sdk_provisions_individual_and_group_devices_and_sends_telemetry(
    emu: Emu, batch: Path
) -> None:
    assert emu.info["standard_ports"] == "true"
    for rid, websockets in (("sdk-dev-001", False), ("sdk-dev-002", True)):
        result = _provision(emu, rid, _bundle_x509(batch / rid), websockets)
        assert result.status == "assigned", result
        state = result.registration_state
        # the bare hub host, no port: what the SDK connects to on 8883 / 443
        assert state.assigned_hub == emu.info["hub_host"] and ":" not in state.assigned_hub
        assert state.device_id == rid and state.sub_status == "initialAssignment"
        _send(emu, state.assigned_hub, state.device_id, _bundle_x509(batch / rid), websockets)
    messages = {m["deviceId"]: m for m in _telemetry(emu)}
    assert messages["sdk-dev-001"]["transport"] == "mqtt"
    assert messages["sdk-dev-002"]["transport"] == "mqtt-ws"
    for message in messages.values():
        assert json.loads(message["body"]) == {"temperature": 21.5}
        assert message["properties"]["station"] == "line A"
        assert message["properties"]["$.ct"] == "application/json"
    with emu.service() as svc:
        individual = svc.get("/registrations/sdk-dev-001").json()
        grouped = svc.get("/registrations/sdk-dev-002").json()
    assert individual["status"] == grouped["status"] == "assigned"
    assert grouped["x509"]["enrollmentGroupId"] == "sdk-line"


def test_provline_https_device_client_reaches_the_bare_hub_host(emu: Emu, batch: Path) -> None:
    """provline's own device check (HTTPS) with assignedHub as the SDKs see it."""
    bundle = batch / "sdk-dev-003"
    endpoints = Endpoints(
        service=emu.info["dps_service_endpoint"],
        device=emu.info["dps_device_endpoint"],
        id_scope=emu.info["id_scope"],
        service_cs=ConnectionString.parse(emu.info["service_connection_string"]),
        hub_cs=None,
        tls_ca_file=Path(emu.info["tls_ca_file"]),
    )
    client = DeviceClient(
        endpoints, bundle / "full-chain.cert.pem", bundle / "device.key.pem", PASSPHRASE
    )
    try:
        result = client.register("sdk-dev-003")
        hub = result["registrationState"]["assignedHub"]
        assert hub == emu.info["hub_host"]
        assert client.send_telemetry(hub, "sdk-dev-003", {"check": 1}) == 204
    finally:
        client.close()
    assert any(
        m["deviceId"] == "sdk-dev-003" and m["transport"] == "https" for m in _telemetry(emu)
    )


def test_group_without_a_verified_ca_is_refused_over_mqtt_and_https(
    batch: Path, ca_env: CA, tmp_path: Path
) -> None:
    e = start_emulator(tmp_path / "emu", "--assign-seconds", "0.2", standard_ports=True)
    try:
        _enrol(e, batch, ca_env)
        with e.service() as svc:
            assert svc.get("/certificates").json() == {"value": []}
        bundle = batch / "sdk-dev-004"
        assert "401" in _refused(e, "sdk-dev-004", _bundle_x509(bundle))
        # the individual enrollment's CA-signed leaf needs a verified CA too
        assert "401" in _refused(e, "sdk-dev-001", _bundle_x509(batch / "sdk-dev-001"))
        topic, body = _paho_register(
            e, "sdk-dev-004", bundle / "full-chain.cert.pem", bundle / "device.key.pem"
        )
        assert topic == "$dps/registrations/res/401/?$rid=42" and body["errorCode"] == 401002
        https = httpx.put(
            f"{e.info['dps_device_endpoint']}/{e.info['id_scope']}/registrations/sdk-dev-004"
            "/register?api-version=2021-10-01",
            json={"registrationId": "sdk-dev-004"},
            verify=_client_tls(e, bundle / "full-chain.cert.pem", bundle / "device.key.pem"),
        )
        assert https.status_code == 401 and https.json()["errorCode"] == 401002
        with e.service() as svc:
            assert svc.get("/registrations/sdk-dev-004").status_code == 404
    finally:
        e.stop()


def _client_tls(emu: Emu, chain: Path, key: Path, password: str | None = PASSPHRASE) -> Any:
    ctx = ssl.create_default_context(cafile=emu.info["tls_ca_file"])
    ctx.load_cert_chain(str(chain), str(key), password=password)
    return ctx


def test_leaf_signing_a_leaf_is_refused_over_mqtt_and_https(
    emu: Emu, batch: Path, tmp_path: Path
) -> None:
    chain, key = leaf_signed_chain(batch / "sdk-dev-005", tmp_path, "sdk-rogue")
    assert "401" in _refused(emu, "sdk-rogue", _x509(chain, key, None))
    # the same request through a bare MQTT client, to read the body
    rogue_key_encrypted = tmp_path / "rogue.key.pem"
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    rogue_key_encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSPHRASE.encode()),
        )
    )
    topic, body = _paho_register(emu, "sdk-rogue", chain, rogue_key_encrypted)
    assert topic.startswith("$dps/registrations/res/401/") and body["errorCode"] == 401002
    https = httpx.put(
        f"{emu.info['dps_device_endpoint']}/{emu.info['id_scope']}/registrations/sdk-rogue"
        "/register?api-version=2021-10-01",
        json={"registrationId": "sdk-rogue"},
        verify=_client_tls(emu, chain, key, None),
    )
    assert https.status_code == 401 and https.json()["errorCode"] == 401002
    # IoT Hub refuses the chain at MQTT CONNECT for a CA-authenticated identity of that name
    hub_cs = ConnectionString.parse(emu.info["hub_connection_string"])
    created = httpx.put(
        f"https://{hub_cs.host}/devices/sdk-rogue?api-version=2021-04-12",
        json={"deviceId": "sdk-rogue", "authentication": {"type": "certificateAuthority"}},
        headers={"Authorization": hub_cs.token()},
        verify=ssl.create_default_context(cafile=emu.info["tls_ca_file"]),
    )
    assert created.status_code == 200, created.text
    from azure.iot.device.exceptions import ClientError, CredentialError

    with pytest.raises((CredentialError, ClientError)):
        _send(emu, emu.info["hub_host"], "sdk-rogue", _x509(chain, key, None))
    assert not any(m["deviceId"] == "sdk-rogue" for m in _telemetry(emu))


def test_a_taken_address_is_one_line_and_exit_2(emu: Emu, tmp_path: Path) -> None:
    """A second emulator on the same standard ports stops at once, says where, and leaves
    the first one serving."""
    proc = provline(
        "emulator",
        "serve",
        "--data-dir",
        str(tmp_path / "second"),
        "--host",
        emu.info["dps_host"],
        "--standard-ports",
        check=False,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert f"cannot listen on {emu.info['dps_host']}:443" in line and "in use" in line
    assert emu.proc.poll() is None
    with emu.service() as svc:
        assert svc.get("/enrollmentGroups/sdk-line").status_code == 200
