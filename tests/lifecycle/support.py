"""Helpers the lifecycle tests share: a station with the emulator, batches of each
registration mode, device-side registration and telemetry with a bundle's key, openssl CRL
checks, reading the emulator's state through its service API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from pipeline.config.manifest import load_manifest
from pipeline.config.station import Station, load_station
from pipeline.layout import AUDIT_LOG, FULL_CHAIN, PKCS8_KEY
from pipeline.registration.device import DeviceClient
from pipeline.registration.endpoints import resolve
from pipeline.registration.service import ServiceError
from pipeline.registration.stage import RegisterOptions
from pipeline.run import run_batch

from ..support import CA, Emu, Hsm, openssl, write_station

PASSPHRASE = "lifecycle-test-passphrase"


def station_file(
    tmp: Path, h: Hsm, c: CA, e: Emu, custody: str = "pkcs8", pace: int = 60000
) -> Path:
    return write_station(
        tmp / f"station-{custody}.yaml",
        h,
        c,
        custody=custody,
        output=tmp / "out",
        extra=f"dps:\n  emulator_dir: {e.dir}\n  operations_per_minute: {pace}\n"
        "lifecycle:\n  crl_days: 3\n",
    )


def batch(tmp: Path, station: Station, batch_id: str, prefix: str, count: int, mode: str) -> Path:
    path = tmp / f"{batch_id}.yaml"
    path.write_text(
        f"batch_id: {batch_id}\nregistration: {mode}\n"
        f"generator: {{prefix: {prefix}, digits: 4, count: {count}, tags: {{line: L}}}}\n"
    )
    result = run_batch(
        load_manifest(path), station, register=RegisterOptions(upload_ca=mode != "none")
    )
    assert result.exit_code == 0, result.report.failures
    return result.batch_dir


class Device:
    """A device with its bundle: registers with DPS over mTLS, sends telemetry."""

    def __init__(self, station: Station, bundle: Path) -> None:
        self.client = DeviceClient(
            resolve(station.dps), bundle / FULL_CHAIN, bundle / PKCS8_KEY, PASSPHRASE
        )
        self.rid = bundle.name

    def register(self) -> dict[str, Any]:
        return self.client.register(self.rid, deadline=30)

    def telemetry(self, hub: str, device_id: str) -> int:
        """204 when accepted; the HTTP status of the refusal otherwise."""
        try:
            return self.client.send_telemetry(hub, device_id, {"test": "lifecycle"})
        except ServiceError as exc:
            return exc.status

    def close(self) -> None:
        self.client.close()


def register(station: Station, bundle: Path) -> tuple[str, str | None, str | None]:
    """(status, hub, device id) of a device's registration with DPS."""
    device = Device(station, bundle)
    try:
        body = device.register()
    except ServiceError as exc:
        return f"http {exc.status}", None, None
    finally:
        device.close()
    state = body.get("registrationState", {})
    return str(body.get("status")), state.get("assignedHub"), state.get("deviceId")


def telemetry(station: Station, bundle: Path, hub: str, device_id: str) -> int:
    device = Device(station, bundle)
    try:
        return device.telemetry(hub, device_id)
    finally:
        device.close()


def enrollment(e: Emu, rid: str) -> dict[str, Any] | None:
    with e.service() as svc:
        response = svc.get(f"/enrollments/{rid}")
    return response.json() if response.status_code == 200 else None


def hub_identity(e: Emu, device_id: str) -> dict[str, Any] | None:
    from pipeline.registration.endpoints import ConnectionString

    cs = ConnectionString.parse(e.info["hub_connection_string"])
    with httpx.Client(verify=e.tls()) as client:
        response = client.get(
            f"https://{cs.host}/devices/{device_id}",
            params={"api-version": "2021-04-12"},
            headers={"Authorization": cs.token()},
        )
    return response.json() if response.status_code == 200 else None


def crl_rejects(chain: Path, crl: Path, cert: Path) -> tuple[bool, str]:
    """(openssl verify -crl_check refuses the certificate, its output)."""
    proc = openssl("verify", "-crl_check", "-CAfile", str(chain), "-CRLfile", str(crl), str(cert))
    out = (proc.stdout + proc.stderr).decode()
    return proc.returncode != 0, out


def log_events(lifecycle_dir: Path, event: str) -> list[dict[str, Any]]:
    return [
        record
        for line in (lifecycle_dir / AUDIT_LOG).read_text().splitlines()
        if (record := json.loads(line))["event"] == event
    ]


def load(path: Path) -> Station:
    return load_station(path)
