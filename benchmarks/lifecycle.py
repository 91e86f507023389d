"""After the factory: revoking a 10,000-device lot with the DPS side at the quota, signing a
100,000-entry CRL in the HSM, and inventory look-ups at 1,000,000 certificates."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import time
from pathlib import Path

from common import OUT, PROVLINE, ROOT, run, size, station

QUOTA = 1000  # DPS operations a minute (Microsoft Learn, "Quotas and limits")


def measure(ca_dir: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    results.update(_revoke(ca_dir, size(10_000, 300)))
    results.update(_crl(ca_dir, size(100_000, 5_000)))
    results.update(_lookups(size(1_000_000, 20_000)))
    return results


def _station(ca_dir: Path, output: str = "out-wrapped", extra: str = "") -> Path:
    """The wrapped-custody bench station, with another output directory or more settings."""
    text = (
        station("wrapped", ca_dir).read_text().replace("output: out-wrapped", f"output: {output}")
    )
    path = OUT / f"station-lifecycle-{output}.yaml"
    path.write_text(text + extra)
    return path


def _emulator(data: Path, quota: int) -> subprocess.Popen[bytes]:
    """The emulator on ``data`` (state kept across restarts) at ``quota`` operations/min."""
    (data / "config.json").write_text(
        json.dumps({"operations_per_minute": quota, "registrations_per_minute": quota})
    )
    (data / "emulator.json").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*PROVLINE, "emulator", "serve", "--data-dir", str(data)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        if (data / "emulator.json").exists():
            break
        time.sleep(0.05)
    return proc


def _revoke(ca_dir: Path, devices: int) -> dict[str, object]:
    """A lot registered with individual enrollments (emulator unthrottled), then revoked as a
    whole against an emulator enforcing the 1,000 operations/min quota, the station pacing
    at the same rate. The quota-limited minimum is the calls it cannot avoid (one bulk
    update per 10 enrollments and one query page per 1,000) at the quota's pace."""
    from pipeline.config.station import load_station
    from pipeline.lifecycle.revoke import revoke
    from pipeline.lifecycle.targets import Targets
    from pipeline.registration.stage import RegisterOptions

    data = OUT / "emu-lifecycle"
    data.mkdir()
    dps = f"dps:\n  emulator_dir: {data}\n"
    proc = _emulator(data, 10_000_000)
    try:
        options = RegisterOptions(operations_per_minute=10_000_000, upload_ca=True)
        run(
            "wrapped",
            ca_dir,
            "revoke10k",
            devices,
            dps=dps,
            registration="individual",
            register=options,
        )
    finally:
        proc.terminate()
        proc.wait()
    proc = _emulator(data, QUOTA)
    try:
        st = load_station(_station(ca_dir, extra=dps))
        started = time.monotonic()
        result = revoke(st, Targets(batches=("revoke10k",)), "keyCompromise", note=lambda _: None)
        seconds = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait()
    assert result.exit_code == 0 and result.dps == {"disabled": devices}, result.to_json()
    minimum = (math.ceil(devices / 10) + math.ceil(devices / 1000)) * 60 / QUOTA
    return {
        "revoke_10k_seconds": round(seconds, 1),
        "revoke_10k_quota_minimum_seconds": round(minimum, 1),
        "revoke_10k_quota_efficiency": round(seconds / minimum, 3),
        "revoke_10k_detail": {
            "devices": devices,
            "dps_calls": result.dps_calls,
            "crl_entries": result.crl.entries if result.crl else 0,
        },
    }


def _crl(ca_dir: Path, entries: int) -> dict[str, object]:
    """A CRL of ``entries`` revoked serials signed by the issuing key in SoftHSM2: reading
    the inventory, building, signing, writing, logging (the CRL step of every revoke)."""
    from pipeline.ca.chain import load_chain
    from pipeline.config.station import load_station
    from pipeline.lifecycle.crl import issue_crl
    from pipeline.lifecycle.inventory import CertificateRecord, Inventory, issuer_key_id
    from pipeline.lifecycle.log import StationLog
    from pipeline.vocabulary import CertificateStatus

    st = load_station(_station(ca_dir, output="out-crl"))
    issuer = issuer_key_id(load_chain(st).issuer)
    inventory = Inventory.of(st)
    inventory.add_certificates(
        CertificateRecord(
            format(random.getrandbits(159) | 1 << 150, "X"),
            f"crl-{n}",
            f"crl-{n}",
            "crl",
            "bench",
            issuer,
            None,
            None,
            None,
            "wrapped",
            "ec-p256",
            None,
            CertificateStatus.REVOKED,
            "keyCompromise",
            "2026-01-01T00:00:00Z",
        )
        for n in range(entries)
    )
    log = StationLog(st)
    try:
        started = time.monotonic()
        issued = issue_crl(st, inventory, log)
        seconds = time.monotonic() - started
    finally:
        log.close(lambda _: None)
        inventory.close()
    check = subprocess.run(
        ["openssl", "crl", "-in", str(issued.path), "-CAfile", str(ca_dir / "chain.pem"), "-noout"],
        capture_output=True,
        text=True,
    )
    assert issued.entries == entries and "verify OK" in check.stdout + check.stderr
    return {
        "crl_100k_seconds": round(seconds, 2),
        "crl_100k_detail": {"entries": entries, "bytes": issued.path.stat().st_size},
    }


def _lookups(certificates: int, lookups: int = 4000) -> dict[str, object]:
    """An inventory of ``certificates`` recorded the way ``provline run`` records a batch,
    then look-ups by serial, registration ID, SHA-1 and SHA-256 (p50 and p99, ms)."""
    from pipeline.lifecycle.inventory import Inventory

    path = OUT / "inventory-bench.sqlite"
    inventory = Inventory.open(path)
    meta = {"batch_id": "lookup", "custody": "wrapped", "key_profile": "ec-p256"}

    def rows(start: int, count: int):  # type: ignore[no-untyped-def]
        for n in range(start, start + count):
            detail = {
                "sha1_thumbprint": f"{n * 7919:040X}",
                "sha256_thumbprint": f"{n * 104729:064X}",
                "not_after": "2027-01-01T00:00:00+00:00",
            }
            yield (f"dev-{n:07d}", f"dev-{n:07d}", "bundled", f"{n + 2**150:X}", json.dumps(detail))

    started = time.monotonic()
    per_batch = 100_000
    for start in range(0, certificates, per_batch):
        meta["batch_id"] = f"lookup-{start // per_batch}"
        count = min(per_batch, certificates - start)
        batch_dir = OUT / meta["batch_id"]
        inventory.add_batch("bench", batch_dir, meta, rows(start, count), [], "AB" * 20)
    record_seconds = time.monotonic() - started
    rng = random.Random(7)
    queries = []
    for _ in range(lookups):
        n = rng.randrange(certificates)
        queries += [
            f"{n + 2**150:X}",
            f"dev-{n:07d}",
            f"{n * 7919:040X}",
            f"{n * 104729:064X}",
        ]
    times = []
    for query in queries:
        t0 = time.perf_counter()
        found = inventory.find(query)
        times.append((time.perf_counter() - t0) * 1000)
        assert len(found) == 1, query
    inventory.close()
    times.sort()
    return {
        "inventory_lookup_ms": round(times[int(len(times) * 0.99)], 3),
        "inventory_lookup_detail": {
            "certificates": certificates,
            "lookups": len(times),
            "p50_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[int(len(times) * 0.99)], 3),
            "max_ms": round(times[-1], 3),
            "record_per_s": round(certificates / record_seconds),
            "bytes": path.stat().st_size,
        },
    }
