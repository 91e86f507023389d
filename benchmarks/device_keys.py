"""Device-held keys (custody device, docs/device-keys.md): a CSR batch end to end, and the
latency of one device added to an open lot.

``csr_devices_per_s``: a 10,000-device batch whose CSRs (EC P-256, made with cryptography
beforehand: setup, not measured) are in a ``csr_dir``, run like ``provline run``: every CSR
read, checked (signature, profile, CN, duplicates in the batch and in the station
inventory) before anything is signed, recorded in the journal, then leaves signed by the
HSM-held issuing key in the worker processes, bundles written and synced, the log sealed.

``sign_one_ms``: ``provline sign --serve`` on an open lot, driven as a programming fixture
drives it: one request, wait for the answer (the full chain), the next. Median and p99 of
the round trip, process start-up and token login excluded (one warm-up request); the
one-shot ``provline sign`` (a process per device) is in ``sign_one_detail``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from common import OUT, PROVLINE, ROOT, WORKERS, size, station


def _csrs(directory: Path, prefix: str, count: int) -> list[bytes]:
    """``count`` P-256 keys and CSRs, as devices make them; the keys are thrown away."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for n in range(count):
        rid = f"{prefix}{n:06d}"
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rid)]))
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        (directory / f"{rid}.csr").write_bytes(request)
        made.append(request)
    return made


def csr_batch(ca_dir: Path, count: int) -> dict[str, object]:
    from pipeline.config.manifest import load_manifest
    from pipeline.config.station import load_station
    from pipeline.run import run_batch

    path = station("device", ca_dir)
    _csrs(OUT / "csrs", "csr-", count)
    manifest = OUT / "csr10k.yaml"
    manifest.write_text(
        f"batch_id: csr10k\ncsr_dir: csrs\n"
        f"generator: {{prefix: csr-, digits: 6, start: 0, count: {count}}}\n"
    )
    st, mf = load_station(path), load_manifest(manifest)
    started = time.monotonic()
    result = run_batch(mf, st)
    wall = time.monotonic() - started
    assert result.report.counts == {"bundled": count}, result.report.counts
    report = result.report.to_json()
    return {
        "devices": count,
        "devices_per_s": round(count / wall, 1),
        "wall_seconds": round(wall, 2),
        "plan_seconds": round(report["stages"]["plan"]["seconds"], 2),
        "issue_seconds": round(report["stages"]["issue"]["seconds"], 2),
        "worker_seconds": report["stages"]["issue"]["worker_seconds"],
        "workers": WORKERS,
    }


def sign_one(ca_dir: Path, count: int, one_shot: int) -> dict[str, object]:
    path = station("device", ca_dir)
    env = {**os.environ}
    subprocess.run(
        [*PROVLINE, "lot", "open", "--station", str(path), "--batch-id", "lot-latency"],
        check=True,
        capture_output=True,
        env=env,
        cwd=ROOT,
    )
    requests = _csrs(OUT / "lot-csrs", "one-", count + 1 + one_shot)
    serve = subprocess.Popen(
        [
            *PROVLINE,
            "sign",
            "--serve",
            "--quiet",
            "--station",
            str(path),
            "--batch-id",
            "lot-latency",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert serve.stdin is not None and serve.stdout is not None
    latencies = []
    for n, request in enumerate(requests[: count + 1]):
        started = time.perf_counter()
        serve.stdin.write(json.dumps({"csr": request.decode()}).encode() + b"\n")
        serve.stdin.flush()
        answer = json.loads(serve.stdout.readline())
        took = time.perf_counter() - started
        assert answer["ok"], answer
        if n:  # the first request also waits for start-up and token login
            latencies.append(took * 1000)
    serve.stdin.close()
    assert serve.wait(timeout=120) == 0
    shots = []
    for request in requests[count + 1 :]:
        started = time.perf_counter()
        done = subprocess.run(
            [*PROVLINE, "sign", "--station", str(path), "--batch-id", "lot-latency"],
            input=request,
            capture_output=True,
            env=env,
            cwd=ROOT,
        )
        shots.append((time.perf_counter() - started) * 1000)
        assert done.returncode == 0, done.stderr
    latencies.sort()
    return {
        "median": round(statistics.median(latencies), 2),
        "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        "max": round(latencies[-1], 2),
        "devices": count,
        "one_shot_median": round(statistics.median(shots), 1),
        "one_shot_devices": one_shot,
    }


def measure(ca_dir: Path) -> dict[str, object]:
    count = size(10_000, 500)
    print(f"device custody, {count:,} CSRs ...", flush=True)
    batch = csr_batch(ca_dir, count)
    devices = size(1_000, 100)
    print(f"one device at a time, {devices} devices through provline sign --serve ...", flush=True)
    one = sign_one(ca_dir, devices, size(5, 2))
    return {
        "csr_devices_per_s": batch["devices_per_s"],
        "csr_detail": batch,
        "sign_one_ms": {"median": one["median"], "p99": one["p99"]},
        "sign_one_detail": one,
    }
