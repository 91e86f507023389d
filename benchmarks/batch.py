"""Batch throughput: wrapped custody end to end against its two ceilings (the HSM's work alone,
the bundle files alone: :mod:`ceilings`), retain custody against SoftHSM2's own keygen rate,
the openssl CLI flow, raw cryptography, and memory on a 100,000-device lot (the 1,000,000-device
lot is :mod:`lot`, run last)."""

from __future__ import annotations

import multiprocessing
import os
import resource
import secrets
import time
from pathlib import Path

from ceilings import disk_ceiling, hsm_ceiling
from common import MODULE, OUT, QUICK, WORKERS, peak_rss_mb, run, sh, size


def _keygen_worker(args: tuple[str, str, int]) -> float:
    conf, pin_file, count = args
    os.environ["SOFTHSM2_CONF"] = conf
    from pipeline import hsm
    from pipeline.keyprofile import KeyProfile
    from pipeline.secret import SecretRef

    token = hsm.open_token(MODULE, "bench-station", SecretRef("file", pin_file))
    tag = secrets.token_hex(4)
    started = time.monotonic()
    made = [
        token.generate_keypair(KeyProfile.EC_P256, label=f"kg-{tag}-{i}", persistent=True)
        for i in range(count)
    ]
    took = time.monotonic() - started
    for pub, priv in made:
        pub.destroy()
        priv.destroy()
    return took


def softhsm_keygen_rate(per_process: int) -> float:
    """SoftHSM2's own rate: bare C_GenerateKeyPair of P-256 token objects in WORKERS
    processes at once, nothing else."""
    ctx = multiprocessing.get_context("spawn")
    args = (os.environ["SOFTHSM2_CONF"], str(OUT / "secrets" / "pin"), per_process)
    with ctx.Pool(WORKERS) as pool:
        times = pool.map(_keygen_worker, [args] * WORKERS)  # generate-only time per process
    return per_process * WORKERS / max(times)


def openssl_cli_rate(count: int) -> float:
    """The per-device openssl CLI flow with EC P-256: key, CSR, CA-signed cert, full chain."""
    from cryptography.hazmat.primitives import serialization

    from pipeline import ca
    from pipeline.keyprofile import KeyProfile

    work = OUT / "openssl"
    work.mkdir()
    root_key = KeyProfile.EC_P256.generate_software_key()
    root = ca.build_root(root_key, ca.parse_name("CN=Bench OpenSSL Root"), 365)
    inter_key = KeyProfile.EC_P256.generate_software_key()
    inter = ca.build_intermediate(
        inter_key.public_key(), ca.parse_name("CN=Bench OpenSSL CA"), root, root_key, 300
    )
    (work / "inter.key.pem").write_bytes(
        inter_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (work / "inter.pem").write_bytes(ca.pem(inter))
    (work / "root.pem").write_bytes(ca.pem(root))
    (work / "ext.cnf").write_text(
        "[usr_cert]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    chain = (work / "inter.pem").read_bytes() + (work / "root.pem").read_bytes()
    started = time.monotonic()
    for n in range(count):
        rid = f"ossl-{n:05d}"
        key, csr, crt = (str(work / f"{rid}.{s}") for s in ("key.pem", "csr.pem", "cert.pem"))
        sh(
            "openssl",
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            key,
        )
        sh("openssl", "req", "-new", "-key", key, "-subj", f"/CN={rid}", "-sha256", "-out", csr)
        sh(
            "openssl",
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            str(work / "inter.pem"),
            "-CAkey",
            str(work / "inter.key.pem"),
            "-set_serial",
            str(ca.random_serial()),
            "-days",
            "30",
            "-sha256",
            "-extfile",
            str(work / "ext.cnf"),
            "-extensions",
            "usr_cert",
            "-out",
            crt,
        )
        (work / f"{rid}-full-chain.cert.pem").write_bytes(Path(crt).read_bytes() + chain)
    return count / (time.monotonic() - started)


def raw_crypto_rate(count: int) -> float:
    """The in-process ceiling: software keys and issuer, same leaf profile, no HSM, no files."""
    from pipeline import ca
    from pipeline.keyprofile import KeyProfile

    root_key = KeyProfile.EC_P256.generate_software_key()
    root = ca.build_root(root_key, ca.parse_name("CN=Raw Root"), 365)
    inter_key = KeyProfile.EC_P256.generate_software_key()
    inter = ca.build_intermediate(
        inter_key.public_key(), ca.parse_name("CN=Raw CA"), root, root_key, 300
    )
    issuer = ca.Issuer(inter, inter_key, ca.pem(inter) + ca.pem(root))
    started = time.monotonic()
    for n in range(count):
        key = KeyProfile.EC_P256.generate_software_key()
        ca.build_leaf(
            key.public_key(), f"raw-{n:06d}", issuer, serial=ca.random_serial(), validity_days=365
        )
    return count / (time.monotonic() - started)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far, this process and its finished children, user and system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "orchestrator_user": own.ru_utime,
        "orchestrator_system": own.ru_stime,
        "workers_user": children.ru_utime,
        "workers_system": children.ru_stime,
    }


def wrapped_against_ceilings(ca_dir: Path, count: int) -> dict[str, object]:
    """The two ceilings, then the wrapped batch, in the same run and the same number of
    processes; the batch's CPU seconds say whether the machine's cores were the limit."""
    print(f"disk ceiling, {count:,} devices ...", flush=True)
    disk = disk_ceiling(ca_dir, count)
    print(f"HSM ceiling, {count:,} devices ...", flush=True)
    hsm = hsm_ceiling(ca_dir, count)
    print(f"wrapped custody, {count:,} devices ...", flush=True)
    before = cpu_seconds()
    wrapped = run("wrapped", ca_dir, f"wrapped{count // 1000}k", count)
    after = cpu_seconds()
    detail = {k: v for k, v in wrapped.items() if k != "batch_dir"}
    detail["cpu_seconds"] = {k: round(after[k] - before[k], 2) for k in after}
    rate = wrapped["devices_per_s"]
    return {
        "wrapped_devices": count,
        "wrapped_devices_per_s": round(rate, 1),
        "hsm_ceiling_devices_per_s": round(hsm, 1),
        "disk_ceiling_devices_per_s": round(disk, 1),
        "wrapped_vs_ceiling": round(rate / min(hsm, disk), 3),
        "audit_overhead_pct": round(100 * wrapped["audit_seconds"] / wrapped["wall_seconds"], 2),
        "wrapped_detail": detail,
    }


def measure(ca_dir: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    count = size(10_000, 1_000)
    results.update(wrapped_against_ceilings(ca_dir, count))
    rss = peak_rss_mb()
    # bench-out/ is removed at the end: deleting files now would slow the next measurements
    # down (docs/benchmarks.md, "Variance").

    print("SoftHSM2 token keygen baseline ...", flush=True)
    keygen = round(softhsm_keygen_rate(size(1_000, 100) // WORKERS), 1)
    results["softhsm_token_keygen_per_s"] = keygen
    count = size(1_000, 100)
    print(f"retain custody, {count:,} devices ...", flush=True)
    retain = run("retain", ca_dir, "retain1k", count)
    results["retain_devices_per_s"] = round(retain["devices_per_s"], 1)
    results["retain_vs_keygen_pct"] = round(100 * retain["devices_per_s"] / keygen, 1)

    count = size(200, 20)
    print(f"openssl CLI flow, {count} devices ...", flush=True)
    openssl = round(openssl_cli_rate(count), 1)
    results["openssl_cli_devices_per_s"] = openssl
    count = size(10_000, 1_000)
    print(f"raw cryptography, {count:,} devices ...", flush=True)
    raw = round(raw_crypto_rate(count), 1)
    results["raw_crypto_devices_per_s"] = raw
    results["peak_rss_mb"] = rss

    if not QUICK:
        print("wrapped custody, 100,000 devices (memory check) ...", flush=True)
        before = peak_rss_mb()["orchestrator"]
        big = run("wrapped", ca_dir, "wrapped100k", 100_000)
        results["wrapped_100k_devices_per_s"] = round(big["devices_per_s"], 1)
        results["wrapped_100k_worker_seconds"] = big["worker_seconds"]
        results["peak_rss_mb_100k"] = peak_rss_mb()
        results["peak_rss_mb_orchestrator_before_100k"] = before

    w = float(results["wrapped_devices_per_s"])  # type: ignore[arg-type]
    results["wrapped_vs_openssl_cli"] = round(w / openssl, 1)
    results["ratios"] = {
        "wrapped_vs_ceiling": results["wrapped_vs_ceiling"],
        "wrapped_vs_openssl_cli": round(w / openssl, 1),
        "wrapped_vs_raw_crypto": round(w / raw, 3),
        "retain_vs_softhsm_keygen": round(float(results["retain_vs_keygen_pct"]) / 100, 3),  # type: ignore[arg-type]
    }
    return results
