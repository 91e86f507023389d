"""provline benchmark (not a test): measures and prints; writes bench-results.json and the
figures section of docs/benchmarks.md.

    make bench                # everything, including the 100,000-device memory check
    BENCH_QUICK=1 make bench  # skip the 100,000-device run

Runs, on real SoftHSM2 tokens in bench-out/ (deleted afterwards):
  1. wrapped custody, 10,000 devices, bundles written and synced: devices/s end to end,
     with the audit log's share of the time;
  2. retain custody, 1,000 devices, next to SoftHSM2's own token keygen rate measured with the
     same number of processes;
  3. the openssl-CLI per-device flow of seed 001 with EC P-256 keys (200 devices, extrapolated);
  4. the raw in-process limit: cryptography software keys, same leaf profile, no HSM, no files;
  5. peak RSS of the orchestrator and of a worker, and (unless BENCH_QUICK) a 100,000-device
     wrapped batch to show memory does not grow with the batch;
  6. registration against the emulator on loopback: 2,000 devices under a 1,000 operations/min
     quota in bulk calls of 10 (time against the quota-limited minimum), and enrollments/s
     with no quota.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PROVLINE = [sys.executable, "-m", "pipeline.cli"]
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))


def sh(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(args, check=True, env=env, cwd=ROOT, capture_output=True, text=True)


def setup() -> tuple[Path, dict[str, str]]:
    """Tokens, CA, transport and audit keys, like `make demo-ca`, in bench-out/."""
    shutil.rmtree(OUT, ignore_errors=True)
    secrets_dir = OUT / "secrets"
    secrets_dir.mkdir(parents=True)
    for name in ("pin", "so-pin", "root-pin"):
        (secrets_dir / name).write_text(secrets.token_hex(8))
        (secrets_dir / name).chmod(0o600)
    pin = f"file:{secrets_dir / 'pin'}"
    root_pin = f"file:{secrets_dir / 'root-pin'}"
    so = f"file:{secrets_dir / 'so-pin'}"
    env = {**os.environ, "SOFTHSM2_CONF": str(OUT / "hsm" / "softhsm2.conf")}
    for label, p in (("bench-root", root_pin), ("bench-station", pin)):
        sh(*PROVLINE, "hsm", "init", str(OUT / "hsm"), "--label", label, "--pin-source", p,
           "--so-pin-source", so, env=env)
    ca_dir = OUT / "ca"
    sh(*PROVLINE, "ca", "init-root", "--out", str(ca_dir), "--token", "bench-root",
       "--pin-source", root_pin, env=env)
    sh(*PROVLINE, "ca", "init-intermediate", "--out", str(ca_dir), "--root-cert",
       str(ca_dir / "root.cert.pem"), "--root-key",
       f"pkcs11:token=bench-root;object=root;type=private?pin-source={root_pin}",
       "--token", "bench-station", "--pin-source", pin, env=env)
    sh(*PROVLINE, "ca", "transport-key", "--token", "bench-station", "--pin-source", pin, env=env)
    sh(*PROVLINE, "ca", "audit-key", "--out", str(ca_dir), "--issuer-cert",
       str(ca_dir / "intermediate.cert.pem"), "--issuer-key",
       "pkcs11:token=bench-station;object=intermediate;type=private", "--token",
       "bench-station", "--pin-source", pin, env=env)
    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
    return ca_dir, env


def station(custody: str, ca_dir: Path) -> Path:
    path = OUT / f"station-{custody}.yaml"
    path.write_text(f"""\
station: bench
hsm: {{module: {MODULE}, token: bench-station, pin: file:secrets/pin,
       softhsm2_conf: hsm/softhsm2.conf}}
ca:
  chain: ca/chain.pem
  issuer_key: pkcs11:token=bench-station;object=intermediate;type=private
  root_cert: ca/root.cert.pem
custody:
  policy: {custody}
  transport_key: pkcs11:token=bench-station;object=transport;type=secret-key
audit: {{key: "pkcs11:token=bench-station;object=audit;type=private", cert: ca/audit.cert.pem}}
output: out-{custody}
workers: {WORKERS}
""")
    return path


def manifest(batch_id: str, count: int) -> Path:
    path = OUT / f"{batch_id}.yaml"
    path.write_text(f"batch_id: {batch_id}\nkey_profile: ec-p256\nvalidity_days: 365\n"
                    f"generator: {{prefix: {batch_id}-, digits: 6, count: {count}}}\n")
    return path


def run(custody: str, ca_dir: Path, batch_id: str, count: int, dps: str = "",
        registration: str = "none", register: object = None) -> dict:
    from pipeline.manifest import load_manifest
    from pipeline.run import run_batch
    from pipeline.station import load_station

    path = station(custody, ca_dir)
    if dps:
        path.write_text(path.read_text() + dps)
    st = load_station(path)
    mf_path = manifest(batch_id, count)
    mf_path.write_text(mf_path.read_text() + f"registration: {registration}\n")
    mf = load_manifest(mf_path)
    started = time.monotonic()
    result = run_batch(mf, st, register=register)  # type: ignore[arg-type]
    wall = time.monotonic() - started
    final = "bundled" if registration == "none" else "registered"
    assert result.report["counts"] == {final: count}, result.report["counts"]
    report = result.report
    if registration != "none":
        return {"register": report["stages"]["register"], "wall_seconds": wall}
    return {"wall_seconds": wall, "devices_per_s": count / wall,
            "issue_seconds": report["stages"]["issue"]["seconds"],
            "audit_seconds": report["stages"]["audit"]["seconds"],
            "worker_seconds": report["stages"]["issue"]["worker_seconds"],
            "batch_dir": str(result.batch_dir)}


def _keygen_worker(args: tuple[str, str, int]) -> float:
    conf, pin_file, count = args
    os.environ["SOFTHSM2_CONF"] = conf
    from pipeline import hsm
    from pipeline.keyprofile import KeyProfile
    from pipeline.secret import SecretRef

    token = hsm.open_token(MODULE, "bench-station", SecretRef("file", pin_file))
    tag = secrets.token_hex(4)
    started = time.monotonic()
    made = [token.generate_keypair(KeyProfile.EC_P256, label=f"kg-{tag}-{i}", persistent=True)
            for i in range(count)]
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
    """Seed 001's per-device flow with EC P-256: key, CSR, CA-signed cert, full chain."""
    from cryptography.hazmat.primitives import serialization

    from pipeline import ca
    from pipeline.keyprofile import KeyProfile

    work = OUT / "openssl"
    work.mkdir()
    root_key = KeyProfile.EC_P256.generate_software_key()
    root = ca.build_root(root_key, ca.parse_name("CN=Bench OpenSSL Root"), 365)
    inter_key = KeyProfile.EC_P256.generate_software_key()
    inter = ca.build_intermediate(inter_key.public_key(), ca.parse_name("CN=Bench OpenSSL CA"),
                                  root, root_key, 300)
    (work / "inter.key.pem").write_bytes(inter_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (work / "inter.pem").write_bytes(ca.pem(inter))
    (work / "root.pem").write_bytes(ca.pem(root))
    (work / "ext.cnf").write_text(
        "[usr_cert]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    chain = (work / "inter.pem").read_bytes() + (work / "root.pem").read_bytes()
    started = time.monotonic()
    for n in range(count):
        rid = f"ossl-{n:05d}"
        key, csr, crt = (str(work / f"{rid}.{s}") for s in ("key.pem", "csr.pem", "cert.pem"))
        sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-out", key)
        sh("openssl", "req", "-new", "-key", key, "-subj", f"/CN={rid}", "-sha256", "-out", csr)
        sh("openssl", "x509", "-req", "-in", csr, "-CA", str(work / "inter.pem"), "-CAkey",
           str(work / "inter.key.pem"), "-set_serial", str(ca.random_serial()), "-days", "30",
           "-sha256", "-extfile", str(work / "ext.cnf"), "-extensions", "usr_cert", "-out", crt)
        (work / f"{rid}-full-chain.cert.pem").write_bytes(Path(crt).read_bytes() + chain)
    return count / (time.monotonic() - started)


def raw_crypto_rate(count: int) -> float:
    """The in-process ceiling: software keys and issuer, same leaf profile, no HSM, no files."""
    from pipeline import ca
    from pipeline.keyprofile import KeyProfile

    root_key = KeyProfile.EC_P256.generate_software_key()
    root = ca.build_root(root_key, ca.parse_name("CN=Raw Root"), 365)
    inter_key = KeyProfile.EC_P256.generate_software_key()
    inter = ca.build_intermediate(inter_key.public_key(), ca.parse_name("CN=Raw CA"), root,
                                  root_key, 300)
    issuer = ca.Issuer(inter, inter_key, ca.pem(inter) + ca.pem(root))
    started = time.monotonic()
    for n in range(count):
        key = KeyProfile.EC_P256.generate_software_key()
        ca.build_leaf(key.public_key(), f"raw-{n:06d}", issuer, serial=ca.random_serial(),
                      validity_days=365)
    return count / (time.monotonic() - started)


def registration(ca_dir: Path) -> dict[str, float]:
    """The registration stage against the emulator: quota efficiency and raw speed."""
    from pipeline.register import RegisterOptions

    results: dict[str, float] = {}
    for name, quota in (("quota", 1000), ("free", 10_000_000)):
        data = OUT / f"emu-{name}"
        data.mkdir()
        (data / "config.json").write_text(json.dumps({
            "operations_per_minute": quota, "registrations_per_minute": quota}))
        proc = subprocess.Popen([*PROVLINE, "emulator", "serve", "--data-dir", str(data)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                if (data / "emulator.json").exists():
                    break
                time.sleep(0.05)
            dps = f"dps:\n  emulator_dir: {data}\n"
            options = RegisterOptions(operations_per_minute=quota, concurrency=8, bulk_size=10,
                                      upload_ca=True)
            out = run("wrapped", ca_dir, f"reg{name}", 2_000 if name == "quota" else 5_000,
                      dps=dps, registration="individual", register=options)["register"]
        finally:
            proc.terminate()
            proc.wait()
        if name == "quota":
            minimum = math.ceil(2_000 / 10) * 60 / quota  # bulk calls x the quota's pace
            results["dps_quota_seconds"] = round(out["seconds"], 2)
            results["dps_quota_minimum_seconds"] = round(minimum, 2)
            results["dps_quota_efficiency"] = round(out["seconds"] / minimum, 3)
        else:
            results["dps_enrollments_per_s"] = round(out["devices_per_s"], 1)
    return results


def peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"orchestrator": round(own, 1), "largest_child": round(children, 1)}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.platform()}, "
            f"Python {platform.python_version()}")


def main() -> None:
    quick = bool(os.environ.get("BENCH_QUICK"))
    results: dict[str, object] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                  "machine": machine(), "workers": WORKERS}
    ca_dir, _ = setup()

    print("wrapped custody, 10,000 devices ...", flush=True)
    wrapped = run("wrapped", ca_dir, "wrapped10k", 10_000)
    rss_10k = peak_rss_mb()
    results["wrapped_devices_per_s"] = round(wrapped["devices_per_s"], 1)
    results["audit_overhead_pct"] = round(100 * wrapped["audit_seconds"] /
                                          wrapped["wall_seconds"], 2)
    results["wrapped_detail"] = {k: v for k, v in wrapped.items() if k != "batch_dir"}
    # bench-out/ is removed at the end: deleting 40,000 files now (discard on this VM's disk)
    # would slow the next measurements down.

    print("SoftHSM2 token keygen baseline ...", flush=True)
    results["softhsm_token_keygen_per_s"] = round(softhsm_keygen_rate(1_000 // WORKERS), 1)
    print("retain custody, 1,000 devices ...", flush=True)
    retain = run("retain", ca_dir, "retain1k", 1_000)
    results["retain_devices_per_s"] = round(retain["devices_per_s"], 1)
    results["retain_vs_keygen_pct"] = round(
        100 * retain["devices_per_s"] / results["softhsm_token_keygen_per_s"], 1)  # type: ignore

    print("openssl CLI flow, 200 devices ...", flush=True)
    results["openssl_cli_devices_per_s"] = round(openssl_cli_rate(200), 1)
    print("raw cryptography, 10,000 devices ...", flush=True)
    results["raw_crypto_devices_per_s"] = round(raw_crypto_rate(10_000), 1)
    results["peak_rss_mb"] = rss_10k
    print("registration against the emulator (2,000 at 1,000 ops/min; 5,000 free) ...",
          flush=True)
    results.update(registration(ca_dir))

    if not quick:
        print("wrapped custody, 100,000 devices (memory check) ...", flush=True)
        before = peak_rss_mb()["orchestrator"]
        big = run("wrapped", ca_dir, "wrapped100k", 100_000)
        results["wrapped_100k_devices_per_s"] = round(big["devices_per_s"], 1)
        results["peak_rss_mb_100k"] = peak_rss_mb()
        results["peak_rss_mb_orchestrator_before_100k"] = before

    w = results["wrapped_devices_per_s"]
    results["ratios"] = {
        "wrapped_vs_openssl_cli": round(w / results["openssl_cli_devices_per_s"], 1),  # type: ignore
        "wrapped_vs_raw_crypto": round(w / results["raw_crypto_devices_per_s"], 3),  # type: ignore
        "retain_vs_softhsm_keygen": round(results["retain_vs_keygen_pct"] / 100, 3),  # type: ignore
    }
    (ROOT / "bench-results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    write_doc(results)
    shutil.rmtree(OUT, ignore_errors=True)


def write_doc(results: dict[str, object]) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    marker = "<!-- bench:latest -->"
    head = text.split(marker)[0].rstrip() + "\n\n"
    rows = [(k, v) for k, v in results.items() if not isinstance(v, dict)]
    table = "\n".join(f"| `{k}` | {v} |" for k, v in rows)
    nested = "\n".join(f"- `{k}`: `{json.dumps(v)}`" for k, v in results.items()
                       if isinstance(v, dict))
    doc.write_text(f"{head}{marker}\n## Latest run (written by `make bench`)\n\n"
                   f"| key | value |\n|---|---|\n{table}\n\n{nested}\n")


if __name__ == "__main__":
    main()
