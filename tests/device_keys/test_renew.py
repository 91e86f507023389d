"""Renewing device-custody devices (`provline renew --csr-dir`): the device makes a new key
and CSR, the station checks it like a batch's and signs it; the old key is refused (a
renewal is a key rollover)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.audit.lifecycle_verify import verify_lifecycle
from pipeline.ca.certs import load_cert
from pipeline.config.station import load_station
from pipeline.lifecycle.paths import lifecycle_dir

from ..support import CA, Hsm, provline
from .support import check_bundle, crypto_csr, device_station, software_key

pytestmark = pytest.mark.integration


def test_renew_with_a_new_csr(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station = device_station(tmp_path, hsm_env, ca_env)
    (tmp_path / "csrs").mkdir()
    old_key = software_key("ec-p256")
    (tmp_path / "csrs" / "rn-1.csr").write_bytes(crypto_csr(old_key, "rn-1"))
    (tmp_path / "csrs" / "rn-2.csr").write_bytes(crypto_csr(software_key("ec-p256"), "rn-2"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "batch_id: lot-rn\ncsr_dir: csrs\ngenerator: {prefix: rn-, digits: 1, count: 2}\n"
    )
    provline("run", str(manifest), "--station", str(station), "--quiet", env=hsm_env.env())
    renew = ["renew", "--device", "rn-1", "--station", str(station)]

    done = provline(*renew, env=hsm_env.env(), check=False)
    assert done.returncode == 2 and "give --csr-dir" in done.stderr
    new = tmp_path / "new"
    new.mkdir()
    (new / "rn-1.csr").write_bytes(crypto_csr(old_key, "rn-1"))
    done = provline(*renew, "--csr-dir", str(new), env=hsm_env.env(), check=False)
    assert done.returncode == 2 and "certified for rn-1 in lot-rn" in done.stderr, done.stderr
    (new / "rn-1.csr").write_bytes(crypto_csr(software_key("ec-p256"), "rn-2"))
    done = provline(*renew, "--csr-dir", str(new), env=hsm_env.env(), check=False)
    assert done.returncode == 2 and "CN 'rn-2' is not the registration ID rn-1" in done.stderr

    request = crypto_csr(software_key("ec-p256"), "rn-1")
    (new / "rn-1.csr").write_bytes(request)
    done = provline(*renew, "--csr-dir", str(new), "--json", env=hsm_env.env())
    result = json.loads(done.stdout)
    assert result["issued"] == 1 and result["exit_code"] == 0
    check_bundle(Path(result["directory"]), "rn-1", request)
    found = json.loads(
        provline("find", "rn-1", "--station", str(station), "--json", env=hsm_env.env()).stdout
    )
    assert sorted(f["certificate"]["status"] for f in found["certificates"]) == ["active", "staged"]
    # the lifecycle log verifies offline (the library call: `provline audit verify` on a
    # lifecycle directory is the same function)
    summary = verify_lifecycle(lifecycle_dir(load_station(station)), load_cert(ca_env.root))
    assert summary.renewals == {"issued": 1, "void": 0}
