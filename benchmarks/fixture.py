"""Key delivery at a programming fixture: a fixture token in its own SoftHSM2 directory
receives the station's transport key (the ceremony, as provline subprocesses: SoftHSM2 reads
SOFTHSM2_CONF once per process, and the security officer's step needs a process without a
user session on the station token), then delivers a wrapped batch.

``fixture_unwrap_per_s``: `provline fixture deliver` over a 10,000-device wrapped batch, keys
handed out as PKCS#8 PEM on an open descriptor (/dev/null): per device C_UnwrapKey in the
fixture's token, a challenge signed there and verified with the certificate, the key read
out once, the delivery logged (synced every 64 devices). Measured by the command itself over
that pass; ``fixture_detail.wall_seconds`` adds process start, login, the first pass that
checks every bundle, and the seal.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

from common import OUT, PROVLINE, ROOT, run, size


def _provline(*args: str, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> str:
    proc = subprocess.run(
        [*PROVLINE, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        pass_fds=pass_fds,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"provline {' '.join(args[:2])} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def _ceremony(ca_dir: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Fixture token, key pair, trust, handover (RSA-OAEP SHA-1: SoftHSM2 2.6), import."""
    pin = OUT / "secrets" / "fixture-pin"
    pin.write_text(secrets.token_hex(8))
    pin.chmod(0o600)
    hsm_dir = OUT / "fixture-hsm"
    fixture_env = {**os.environ, "SOFTHSM2_CONF": str(hsm_dir / "softhsm2.conf")}
    so = f"file:{OUT / 'secrets' / 'so-pin'}"
    _provline(
        "hsm",
        "init",
        str(hsm_dir),
        "--label",
        "bench-fixture",
        "--pin-source",
        f"file:{pin}",
        "--so-pin-source",
        so,
        env=fixture_env,
    )
    fixture_dir = OUT / "fixture"
    fixture_args = ["--dir", str(fixture_dir), "--pin-source", f"file:{pin}"]
    made = _provline(
        "fixture",
        "keypair",
        "--name",
        "bench-fixture",
        "--token",
        "bench-fixture",
        *fixture_args,
        env=fixture_env,
    )
    match = re.search(r"fingerprint\s+([0-9A-F]{64})", made)
    assert match, made
    station_env = {**os.environ, "SOFTHSM2_CONF": str(OUT / "hsm" / "softhsm2.conf")}
    station = str(OUT / "station-wrapped.yaml")
    request = str(fixture_dir / "request.pem")
    log_dir = str(OUT / "ceremony")
    _provline(
        "ca",
        "trust-fixture",
        "--station",
        station,
        "--request",
        request,
        "--fingerprint",
        match.group(1),
        "--log-dir",
        log_dir,
        "--so-pin-source",
        so,
        env=station_env,
    )
    handover = str(OUT / "handover.json")
    _provline(
        "ca",
        "transport-handover",
        "--station",
        station,
        "--request",
        request,
        "--out",
        handover,
        "--log-dir",
        log_dir,
        "--oaep-hash",
        "sha1",
        env=station_env,
    )
    _provline(
        "fixture",
        "import-transport",
        "--handover",
        handover,
        "--root",
        str(ca_dir / "root.cert.pem"),
        *fixture_args,
        env=fixture_env,
    )
    return fixture_dir, fixture_env, fixture_args


def measure(ca_dir: Path) -> dict[str, object]:
    count = size(10_000, 200)
    print(f"fixture delivery, {count:,} wrapped devices ...", flush=True)
    batch = Path(str(run("wrapped", ca_dir, "fixture10k", count)["batch_dir"]))
    _, env, args = _ceremony(ca_dir)
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        started = time.monotonic()
        out = _provline(
            "fixture",
            "deliver",
            str(batch),
            "--to",
            f"fd:{sink}",
            "--json",
            *args,
            env=env,
            pass_fds=(sink,),
        )
        wall = time.monotonic() - started
    finally:
        os.close(sink)
    summary = json.loads(out)
    assert summary["delivered"] == count, summary
    kept = size(500, 50)
    devices = [a for d in sorted(batch.glob("fixture10k-*"))[:kept] for a in ("--device", d.name)]
    kept_summary = json.loads(
        _provline(
            "fixture",
            "deliver",
            str(batch),
            "--keep-in-token",
            "--json",
            *devices,
            *args,
            env=env,
        )
    )
    return {
        "fixture_unwrap_per_s": summary["per_s"],
        "fixture_keep_in_token_per_s": kept_summary["per_s"],
        "fixture_detail": {
            "devices": count,
            "deliver_seconds": summary["seconds"],
            "wall_seconds": round(wall, 2),
            "wall_per_s": round(count / wall, 1),
            "kept_in_token": kept,
        },
    }
