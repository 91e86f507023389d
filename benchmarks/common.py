"""What every benchmark shares: a bench-out/ directory with SoftHSM2 tokens and a CA (like
`make demo-ca`), station and manifest files, one batch run, memory and machine facts.

``BENCH_QUICK=1`` makes every figure small (a smoke run of the benchmark code, seconds to a
minute); the full run measures the sizes the figures are defined at.
"""

from __future__ import annotations

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
QUICK = bool(os.environ.get("BENCH_QUICK"))


def size(full: int, quick: int) -> int:
    """A benchmark size: ``full`` normally, ``quick`` with BENCH_QUICK=1."""
    return quick if QUICK else full


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
        sh(
            *PROVLINE,
            "hsm",
            "init",
            str(OUT / "hsm"),
            "--label",
            label,
            "--pin-source",
            p,
            "--so-pin-source",
            so,
            env=env,
        )
    ca_dir = OUT / "ca"
    sh(
        *PROVLINE,
        "ca",
        "init-root",
        "--out",
        str(ca_dir),
        "--token",
        "bench-root",
        "--pin-source",
        root_pin,
        env=env,
    )
    sh(
        *PROVLINE,
        "ca",
        "init-intermediate",
        "--out",
        str(ca_dir),
        "--root-cert",
        str(ca_dir / "root.cert.pem"),
        "--root-key",
        f"pkcs11:token=bench-root;object=root;type=private?pin-source={root_pin}",
        "--token",
        "bench-station",
        "--pin-source",
        pin,
        env=env,
    )
    sh(*PROVLINE, "ca", "transport-key", "--token", "bench-station", "--pin-source", pin, env=env)
    sh(
        *PROVLINE,
        "ca",
        "audit-key",
        "--out",
        str(ca_dir),
        "--issuer-cert",
        str(ca_dir / "intermediate.cert.pem"),
        "--issuer-key",
        "pkcs11:token=bench-station;object=intermediate;type=private",
        "--token",
        "bench-station",
        "--pin-source",
        pin,
        env=env,
    )
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
    path.write_text(
        f"batch_id: {batch_id}\nkey_profile: ec-p256\nvalidity_days: 365\n"
        f"generator: {{prefix: {batch_id}-, digits: {max(6, len(str(count)))}, count: {count}}}\n"
    )
    return path


def run(
    custody: str,
    ca_dir: Path,
    batch_id: str,
    count: int,
    dps: str = "",
    registration: str = "none",
    register: object = None,
) -> dict:
    from pipeline.config.manifest import load_manifest
    from pipeline.config.station import load_station
    from pipeline.run import run_batch

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
    assert result.report.counts == {final: count}, result.report.counts
    report = result.report.to_json()
    if registration != "none":
        return {"register": report["stages"]["register"], "wall_seconds": wall}
    return {
        "wall_seconds": wall,
        "devices_per_s": count / wall,
        "issue_seconds": report["stages"]["issue"]["seconds"],
        "audit_seconds": report["stages"]["audit"]["seconds"],
        "worker_seconds": report["stages"]["issue"]["worker_seconds"],
        "batch_dir": str(result.batch_dir),
    }


def peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"orchestrator": round(own, 1), "largest_child": round(children, 1)}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
