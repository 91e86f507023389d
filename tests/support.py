"""Helpers the integration tests share: provline as a subprocess, real SoftHSM2 tokens in a
temporary directory with their own SOFTHSM2_CONF, a real CA hierarchy made through the CLI,
station configs, openssl, and the emulator as a subprocess. Fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.registration.endpoints import ConnectionString

ROOT = Path(__file__).resolve().parents[1]
PROVLINE = [sys.executable, "-m", "pipeline.cli"]
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def provline(
    *args: str, env: dict[str, str] | None = None, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*PROVLINE, *args],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        cwd=cwd or ROOT,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"provline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class Hsm:
    dir: Path
    conf: Path
    token: str
    root_token: str
    pin_file: Path
    root_pin_file: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SOFTHSM2_CONF": str(self.conf),
            "PROVLINE_PIN": self.pin_file.read_text().strip(),
        }


@dataclass
class CA:
    dir: Path
    root: Path
    intermediate: Path
    chain: Path
    audit_cert: Path
    root_key_uri: str
    issuer_key_uri: str


def _secret_file(path: Path) -> Path:
    path.write_text(secrets.token_hex(8) + "\n")
    path.chmod(0o600)
    return path


def make_hsm(base: Path, token: str = "test-station", root_token: str = "test-root") -> Hsm:
    base.mkdir(parents=True, exist_ok=True)
    pin = _secret_file(base / "pin")
    root_pin = _secret_file(base / "root-pin")
    so_pin = _secret_file(base / "so-pin")
    env = {**os.environ}
    for label, pin_file in ((root_token, root_pin), (token, pin)):
        provline(
            "hsm",
            "init",
            str(base / "hsm"),
            "--label",
            label,
            "--pin-source",
            f"file:{pin_file}",
            "--so-pin-source",
            f"file:{so_pin}",
            env=env,
        )
    return Hsm(base / "hsm", base / "hsm" / "softhsm2.conf", token, root_token, pin, root_pin)


def make_ca(h: Hsm, out: Path, profile: str = "ec-p256") -> CA:
    env = h.env()
    root_uri = (
        f"pkcs11:token={h.root_token};object=root;type=private?pin-source=file:{h.root_pin_file}"
    )
    provline(
        "ca",
        "init-root",
        "--out",
        str(out),
        "--token",
        h.root_token,
        "--pin-source",
        f"file:{h.root_pin_file}",
        "--subject",
        "CN=Test Root,O=provline",
        env=env,
    )
    provline(
        "ca",
        "init-intermediate",
        "--out",
        str(out),
        "--root-cert",
        str(out / "root.cert.pem"),
        "--root-key",
        root_uri,
        "--token",
        h.token,
        "--pin-source",
        f"file:{h.pin_file}",
        "--profile",
        profile,
        "--subject",
        "CN=Test Issuing CA,O=provline",
        env=env,
    )
    provline(
        "ca", "transport-key", "--token", h.token, "--pin-source", f"file:{h.pin_file}", env=env
    )
    issuer_uri = f"pkcs11:token={h.token};object=intermediate;type=private"
    provline(
        "ca",
        "audit-key",
        "--out",
        str(out),
        "--issuer-cert",
        str(out / "intermediate.cert.pem"),
        "--issuer-key",
        issuer_uri,
        "--token",
        h.token,
        "--pin-source",
        f"file:{h.pin_file}",
        env=env,
    )
    return CA(
        out,
        out / "root.cert.pem",
        out / "intermediate.cert.pem",
        out / "chain.pem",
        out / "audit.cert.pem",
        root_uri,
        issuer_uri,
    )


def write_station(
    path: Path,
    h: Hsm,
    c: CA,
    *,
    custody: str = "wrapped",
    output: Path,
    extra: str = "",
    workers: int = 2,
    chunk_size: int = 64,
) -> Path:
    path.write_text(f"""\
station: test-station
hsm:
  module: {MODULE}
  token: {h.token}
  pin: file:{h.pin_file}
  softhsm2_conf: {h.conf}
ca:
  chain: {c.chain}
  issuer_key: {c.issuer_key_uri}
  root_cert: {c.root}
custody:
  policy: {custody}
  transport_key: pkcs11:token={h.token};object=transport;type=secret-key
  pkcs8_passphrase: env:PROVLINE_TEST_PASSPHRASE
audit:
  key: pkcs11:token={h.token};object=audit;type=private
  cert: {c.audit_cert}
output: {output}
workers: {workers}
chunk_size: {chunk_size}
{extra}""")
    return path


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, input=input, timeout=120)


# --------------------------------------------------------------------------------- emulator
PASSPHRASE = "emulator-test-passphrase"


@dataclass
class Emu:
    dir: Path
    info: dict[str, str]
    proc: subprocess.Popen[bytes]

    def service(self) -> httpx.Client:
        token = ConnectionString.parse(self.info["service_connection_string"]).token()
        return httpx.Client(
            base_url=self.info["dps_service_endpoint"],
            verify=self.tls(),
            headers={"Authorization": token},
            params={"api-version": "2021-10-01"},
        )

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.info["tls_ca_file"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def start_emulator(data_dir: Path, *args: str) -> Emu:
    info_path = data_dir / "emulator.json"
    info_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*PROVLINE, "emulator", "serve", "--data-dir", str(data_dir), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not info_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"emulator did not start: {proc.stderr.read()!r}")  # type: ignore
        time.sleep(0.05)
    return Emu(data_dir, json.loads(info_path.read_text()), proc)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ------------------------------------------------------------------- runs that are killed
@dataclass
class Started:
    """``provline run`` as a subprocess in its own process group, output to files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def start_run(
    manifest: Path,
    station: Path,
    *args: str,
    env: dict[str, str],
    logs: Path,
    crash_at: str | None = None,
) -> Started:
    """Start ``provline run``; ``crash_at`` sets PROVLINE_CRASH_AT (see pipeline/crashpoint.py)."""
    logs.mkdir(parents=True, exist_ok=True)
    run_env = {k: v for k, v in env.items() if k != "PROVLINE_CRASH_AT"}
    if crash_at:
        run_env["PROVLINE_CRASH_AT"] = crash_at
    n = len(list(logs.glob("*.out")))
    out, err = logs / f"{n:03d}.out", logs / f"{n:03d}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [*PROVLINE, "run", str(manifest), "--station", str(station), *args],
            env=run_env,
            cwd=ROOT,
            start_new_session=True,
            stdout=o,
            stderr=e,
        )
    return Started(proc, out, err)


def wait_stopped(started: Started, timeout: float = 120) -> None:
    """Wait until the process stopped itself (SIGSTOP from a ``:stop`` crash point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise AssertionError(
                f"provline exited {started.proc.returncode} before its stop point:\n"
                f"{started.stderr[-3000:]}"
            )
        stat = Path(f"/proc/{started.proc.pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.02)
    raise AssertionError("provline never reached its stop point")


def group_gone(pgid: int, timeout: float = 15) -> bool:
    """Whether every process of the group (the run and its workers) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def audit_events(batch: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (batch / "audit.jsonl").open()]


def serial_states(batch: Path) -> dict[str, str]:
    """Final state of every serial, replayed from the audit log."""
    closing = {"intent", "issued", "void", "unused", "released"}
    states: dict[str, str] = {}
    for event in audit_events(batch):
        data = event["data"]
        if event["event"] in closing and isinstance(data, dict):
            states[str(data["serial"])] = str(event["event"])
    return states


def write_manifest(
    path: Path, batch_id: str, prefix: str, count: int, registration: str = "none"
) -> Path:
    path.write_text(
        f"batch_id: {batch_id}\nregistration: {registration}\n"
        f"generator: {{prefix: {prefix}, digits: 5, count: {count}}}\n"
    )
    return path
