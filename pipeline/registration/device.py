"""The device side of DPS and IoT Hub (what a device does after flashing): register over
mTLS, poll the operation until it is assigned, send telemetry to the assigned hub (Microsoft
Learn, "How to use X.509 certificates over HTTPS without an SDK").

:class:`DeviceClient` uses a key file; :class:`CurlDevice` signs the TLS handshake inside the
HSM (curl with OpenSSL's PKCS#11 engine) for keys that never leave the token.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ca.certs import key_matches
from ..config.station import HsmConfig
from ..errors import InputError, RegistrationError
from ..inputfile import KIB, read_input
from ..keyprofile import PrivateKey
from ..layout import DEVICE_JSON, FULL_CHAIN, PKCS8_KEY
from ..secret import SecretRef
from ..vocabulary import Custody
from .endpoints import DEVICE_API, HUB_TELEMETRY_API, Endpoints
from .service import ServiceError, error_of, json_object, short_reason

ENGINE_GLOB = "/usr/lib/*/engines-3/pkcs11.so"
MAX_KEY_FILE_BYTES = 64 * KIB


class _Device:
    """What every device does, over whichever transport :meth:`_request` is: register, poll
    the operation until it is no longer ``assigning``, send telemetry."""

    def __init__(self, endpoints: Endpoints) -> None:
        if not endpoints.device or not endpoints.id_scope:
            raise InputError(
                "no DPS device endpoint or ID scope",
                rule="dps.device_endpoint + dps.id_scope, or dps.emulator_dir",
            )
        self._endpoints = endpoints

    def _request(self, method: str, url: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        """Status, lower-case headers and JSON body; raises :class:`ServiceError` for a
        status of 300 or more."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds."""

    def register(self, registration_id: str, deadline: float = 60.0) -> dict[str, Any]:
        """PUT register, then poll the operation until it is no longer ``assigning``
        (a throttled poll waits its Retry-After and asks again)."""
        base = (
            f"{self._endpoints.device}/{self._endpoints.id_scope}/registrations/"
            f"{quote(registration_id, safe='')}"
        )
        _, headers, body = self._request(
            "PUT", f"{base}/register?api-version={DEVICE_API}", {"registrationId": registration_id}
        )
        give_up = time.monotonic() + deadline
        while isinstance(body, dict) and body.get("status") in ("assigning", "unassigned"):
            time.sleep(max(1.0, float(headers.get("retry-after") or 2)))
            if time.monotonic() > give_up:
                raise ServiceError(408, None, "registration still assigning at the deadline")
            try:
                _, headers, body = self._request(
                    "GET", f"{base}/operations/{body['operationId']}?api-version={DEVICE_API}"
                )
            except ServiceError as exc:
                if exc.status != 429:
                    raise
                headers = {"retry-after": str(exc.retry_after or 2)}
        if not isinstance(body, dict):
            raise ServiceError(200, None, "the response is not a JSON object")
        return dict(body)

    def send_telemetry(self, hub: str, device_id: str, payload: dict[str, Any]) -> int:
        status, _, _ = self._request(
            "POST",
            f"https://{hub}/devices/{quote(device_id, safe='')}/messages/events"
            f"?api-version={HUB_TELEMETRY_API}",
            payload,
        )
        return status


class DeviceClient(_Device):
    """The device side of DPS and IoT Hub over mTLS (what a device does after flashing)."""

    def __init__(
        self,
        endpoints: Endpoints,
        cert_file: Path,
        key_file: Path,
        key_password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(endpoints)
        ctx = endpoints.tls()
        ctx.load_cert_chain(str(cert_file), str(key_file), password=key_password)
        self._client = httpx.Client(verify=ctx, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, url: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        response = self._client.request(method, url, json=body)
        if response.status_code >= 300:
            raise error_of(response)
        data = json_object(response) if response.content.strip() else None
        return response.status_code, dict(response.headers), data


class CurlDevice(_Device):
    """The same device flow for a key that never leaves the HSM (retain custody): curl with
    OpenSSL's PKCS#11 engine (Debian libengine-pkcs11-openssl) signs the TLS handshake inside
    the token. The PIN reaches the engine through a 0600 file (``pin-source``), never argv."""

    def __init__(
        self,
        endpoints: Endpoints,
        cert_file: Path,
        key_uri: str,
        module: str,
        pin: str,
        softhsm2_conf: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(endpoints)
        if shutil.which("curl") is None or not glob.glob(ENGINE_GLOB):
            raise InputError(
                "the retain device check needs curl and the OpenSSL PKCS#11 engine",
                rule="run `make setup` (curl, libengine-pkcs11-openssl)",
            )
        self._dir = tempfile.TemporaryDirectory(prefix="provline-pin-")
        pin_file = Path(self._dir.name) / "pin"
        pin_file.touch(mode=0o600)
        pin_file.write_text(pin)  # no newline: libp11 reads the file as is
        uri = key_uri.split("?")[0]
        self._args = [
            "curl",
            "-s",
            "-S",
            "-D",
            "-",
            "--max-time",
            str(timeout),
            "--engine",
            "pkcs11",
            "--key-type",
            "ENG",
            "--key",
            f"{uri};pin-source=file:{pin_file}",
            "--cert",
            str(cert_file),
            "-H",
            "Content-Type: application/json",
        ]
        if endpoints.tls_ca_file:
            self._args += ["--cacert", str(endpoints.tls_ca_file)]
        self._env = {**os.environ, "PKCS11_MODULE_PATH": module}
        if softhsm2_conf:
            self._env["SOFTHSM2_CONF"] = softhsm2_conf

    def close(self) -> None:
        self._dir.cleanup()

    def _request(self, method: str, url: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        args = [*self._args, "-X", method, url]
        if body is not None:
            args += ["--data-binary", json.dumps(body)]
        out = subprocess.run(args, capture_output=True, text=True, env=self._env, check=False)
        if out.returncode != 0:
            raise ServiceError(0, None, f"curl: {out.stderr.strip()[-200:]}")
        head, _, payload = out.stdout.replace("\r\n", "\n").partition("\n\n")
        lines = head.splitlines()
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        status = int(lines[0].split()[1])
        data = json.loads(payload) if payload.strip() else None
        if status >= 300:
            data = data if isinstance(data, dict) else {}
            raise ServiceError(
                status,
                data.get("errorCode"),
                str(data.get("message", "")),
                float(headers["retry-after"]) if "retry-after" in headers else None,
            )
        return status, headers, data


@dataclass(frozen=True)
class DeviceCheck:
    """What one device check saw: DPS status, assigned hub and device id, telemetry."""

    registration_id: str
    status: str | None
    assigned_hub: str | None = None
    device_id: str | None = None
    telemetry: str | None = None  # "sent"
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "assigned" and self.telemetry == "sent"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def device_check(
    batch_dir: Path,
    endpoints: Endpoints,
    registration_ids: list[str],
    passphrase: SecretRef | None,
    hsm: HsmConfig | None = None,
    key_dir: Path | None = None,
) -> list[DeviceCheck]:
    """What a device does after flashing, for each device: register over mTLS with its
    bundle, poll until assigned, send one telemetry message to the assigned hub. pkcs8 keys
    are used from their files; retained keys sign inside the HSM (curl + the PKCS#11 engine).
    Wrapped keys are only usable once a device has unwrapped them, so they cannot be checked
    here. Device-custody keys never reach the station: ``key_dir`` holds keys the caller
    has (a device lab, a test that made its devices' keys with openssl), as
    ``<registration-id>.key.pem`` or ``<registration-id>.key``, unencrypted PEM."""
    results = []
    for rid in registration_ids:
        bundle = batch_dir / rid
        key = json.loads((bundle / DEVICE_JSON).read_text())["key"]
        client: DeviceClient | CurlDevice
        if key["custody"] == Custody.DEVICE:
            held = _held_key(key_dir, rid, bundle)
            if isinstance(held, DeviceCheck):
                results.append(held)
                continue
            client = DeviceClient(endpoints, bundle / FULL_CHAIN, held)
        elif key["custody"] == Custody.PKCS8:
            client = DeviceClient(
                endpoints,
                bundle / FULL_CHAIN,
                bundle / PKCS8_KEY,
                passphrase.read() if passphrase else None,
            )
        elif key["custody"] == Custody.RETAIN and hsm is not None:
            client = CurlDevice(
                endpoints,
                bundle / FULL_CHAIN,
                key["uri"],
                hsm.module,
                hsm.pin.read(),
                hsm.softhsm2_conf,
            )
        else:
            raise RegistrationError(
                f"{rid}: {key['custody']} custody: the device's key is not usable from the station",
                rule="device check needs pkcs8 or retain custody",
            )
        try:
            result = client.register(rid)
            state = result.get("registrationState", {})
            seen = DeviceCheck(
                rid, result.get("status"), state.get("assignedHub"), state.get("deviceId")
            )
            if seen.status == "assigned":
                client.send_telemetry(
                    state["assignedHub"],
                    state["deviceId"],
                    {"provline": "device check", "registrationId": rid},
                )
                seen = replace(seen, telemetry="sent")
        except (ServiceError, httpx.HTTPError, OSError) as exc:
            seen = DeviceCheck(rid, "error", reason=short_reason(exc))
        finally:
            client.close()
        results.append(seen)
    return results


def _held_key(key_dir: Path | None, rid: str, bundle: Path) -> Path | DeviceCheck:
    """The caller's key file of a device-custody device, checked against its leaf (a
    mismatch is that device's failed check, not an error of the whole command)."""
    if key_dir is None:
        raise RegistrationError(
            f"{rid}: device custody: the device holds its key, the station never does",
            rule="check device-custody devices with --key-dir (keys you hold)",
        )
    found = [p for p in (key_dir / f"{rid}.key.pem", key_dir / f"{rid}.key") if p.is_file()]
    if not found:
        return DeviceCheck(rid, "error", reason=f"no {rid}.key.pem or {rid}.key in {key_dir}")
    try:
        private = serialization.load_pem_private_key(
            read_input(found[0], limit=MAX_KEY_FILE_BYTES, what="device key file"), None
        )
        leaf = x509.load_pem_x509_certificate((bundle / FULL_CHAIN).read_bytes())
    except (ValueError, TypeError, InputError) as exc:
        return DeviceCheck(rid, "error", reason=f"{found[0]}: {short_reason(exc)}")
    if not isinstance(private, PrivateKey) or not key_matches(private, leaf):
        return DeviceCheck(rid, "error", reason=f"{found[0]} is not the key of {rid}'s leaf")
    return found[0]


def sample(ids: list[str], count: int) -> list[str]:
    """``count`` devices spread evenly over the batch (first and last included)."""
    if count >= len(ids):
        return ids
    if count <= 1:
        return ids[:count]
    step = (len(ids) - 1) / (count - 1)
    return [ids[round(i * step)] for i in range(count)]
