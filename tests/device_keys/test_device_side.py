"""The device side of custody device: keys the test holds (made with openssl, as a device
makes its own), CSRs signed by the station, then DPS registration over mTLS and telemetry
with those keys (`provline verify-device --key-dir`), in each registration mode, for a batch
and for an open lot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from pipeline.registration.endpoints import ConnectionString

from ..support import CA, PROVLINE, ROOT, Emu, Hsm, provline
from .support import device_station, openssl_csr, openssl_key

pytestmark = pytest.mark.integration


def _devices(tmp: Path, rids: list[str], profile: str = "ec-p256") -> tuple[Path, Path]:
    """Keys and CSRs as devices make them; the keys stay with the test (``keys/``)."""
    keys, csrs = tmp / "keys", tmp / "csrs"
    keys.mkdir(exist_ok=True)
    csrs.mkdir(exist_ok=True)
    for rid in rids:
        openssl_key(keys / f"{rid}.key.pem", profile)
        openssl_csr(keys / f"{rid}.key.pem", csrs / f"{rid}.csr", f"/CN={rid}")
    return keys, csrs


def _check(batch: Path, station: Path, keys: Path, h: Hsm, rids: list[str]) -> None:
    done = provline(
        "verify-device",
        str(batch),
        "--station",
        str(station),
        "--key-dir",
        str(keys),
        *[arg for rid in rids for arg in ("--device", rid)],
        "--json",
        env=h.env(),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.loads(done.stdout)["devices"]
    assert [c["registration_id"] for c in checks] == rids
    for check in checks:
        assert check["status"] == "assigned" and check["telemetry"] == "sent", check


def test_registered_devices_connect_with_keys_only_they_hold(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station = device_station(tmp_path, hsm_env, ca_env, f"dps:\n  emulator_dir: {emu.dir}\n")
    rids = {"individual": ["ind-1", "ind-2"], "group": ["grp-1", "grp-2"], "hub": ["hub-1"]}
    keys, _ = _devices(tmp_path, [r for group in rids.values() for r in group])
    for mode, devices in rids.items():
        manifest = tmp_path / f"{mode}.yaml"
        manifest.write_text(
            f"batch_id: lot-{mode}\nregistration: {mode}\ncsr_dir: csrs\ndevices:\n"
            + "".join(f"  - {{registration_id: {rid}, tags: {{line: L}}}}\n" for rid in devices)
        )
        done = provline(
            "run",
            str(manifest),
            "--station",
            str(station),
            "--upload-ca",
            "--json",
            env=hsm_env.env(),
        )
        assert json.loads(done.stdout)["counts"] == {"registered": len(devices)}
    for mode in ("individual", "group"):
        _check(tmp_path / "out" / f"lot-{mode}", station, keys, hsm_env, rids[mode])
    cs = ConnectionString.parse(emu.info["hub_connection_string"])
    with httpx.Client(verify=emu.tls()) as client:
        identity = client.get(
            f"https://{cs.host}/devices/hub-1",
            params={"api-version": "2021-04-12"},
            headers={"Authorization": cs.token()},
        ).json()
    assert identity["authentication"]["type"] == "certificateAuthority"

    # without the device's key the station cannot check it; with the wrong key neither
    done = provline(
        "verify-device",
        str(tmp_path / "out" / "lot-group"),
        "--station",
        str(station),
        env=hsm_env.env(),
        check=False,
    )
    assert done.returncode == 5 and "--key-dir" in done.stderr
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "grp-1.key.pem").write_bytes((keys / "grp-2.key.pem").read_bytes())
    done = provline(
        "verify-device",
        str(tmp_path / "out" / "lot-group"),
        "--station",
        str(station),
        "--key-dir",
        str(wrong),
        "--device",
        "grp-1",
        "--device",
        "grp-2",
        env=hsm_env.env(),
        check=False,
    )
    assert done.returncode == 5
    assert "grp-1: error" in done.stdout and "is not the key of grp-1's leaf" in done.stdout
    assert "grp-2: error" in done.stdout and "no grp-2.key.pem" in done.stdout


def test_an_open_lot_registers_when_it_closes(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    station = device_station(tmp_path, hsm_env, ca_env, f"dps:\n  emulator_dir: {emu.dir}\n")
    rids = ["mdm-1", "mdm-2", "mdm-3"]
    keys, csrs = _devices(tmp_path, rids, "rsa-2048")
    provline(
        "lot",
        "open",
        "--station",
        str(station),
        "--batch-id",
        "modems",
        "--key-profile",
        "rsa-2048",
        "--registration",
        "individual",
        env=hsm_env.env(),
    )
    requests = "".join(
        json.dumps({"csr": (csrs / f"{rid}.csr").read_text(), "id": rid}) + "\n" for rid in rids
    )
    served = subprocess.run(
        [
            *PROVLINE,
            "sign",
            "--serve",
            "--quiet",
            "--station",
            str(station),
            "--batch-id",
            "modems",
        ],
        input=requests.encode(),
        capture_output=True,
        env=hsm_env.env(),
        cwd=ROOT,
        timeout=120,
    )
    assert served.returncode == 0, served.stderr
    answers = [json.loads(line) for line in served.stdout.splitlines()]
    assert [a["id"] for a in answers] == rids and all(a["ok"] for a in answers)
    done = provline(
        "lot",
        "close",
        "--station",
        str(station),
        "--batch-id",
        "modems",
        "--upload-ca",
        "--json",
        env=hsm_env.env(),
    )
    assert json.loads(done.stdout)["counts"] == {"registered": 3}
    _check(tmp_path / "out" / "modems", station, keys, hsm_env, rids)
    verified = provline(
        "audit", "verify", str(tmp_path / "out" / "modems"), "--root", str(ca_env.root), check=False
    )
    assert verified.returncode == 0, verified.stderr
