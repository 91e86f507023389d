"""Shared fixtures: real SoftHSM2 tokens in a temporary directory with their own
SOFTHSM2_CONF, and a real CA hierarchy made through the CLI.

SoftHSM2 reads SOFTHSM2_CONF once per process (at C_Initialize), so the in-process tests share
one session-wide token directory; tests that need a different one run provline as a
subprocess.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROVLINE = [sys.executable, "-m", "pipeline.cli"]
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def provline(*args: str, env: dict[str, str] | None = None, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PROVLINE, *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), cwd=cwd or ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"provline {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
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
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf),
                "PROVLINE_PIN": self.pin_file.read_text().strip()}


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
        provline("hsm", "init", str(base / "hsm"), "--label", label,
                 "--pin-source", f"file:{pin_file}", "--so-pin-source", f"file:{so_pin}", env=env)
    return Hsm(base / "hsm", base / "hsm" / "softhsm2.conf", token, root_token, pin, root_pin)


def make_ca(h: Hsm, out: Path, profile: str = "ec-p256") -> CA:
    env = h.env()
    root_uri = (f"pkcs11:token={h.root_token};object=root;type=private"
                f"?pin-source=file:{h.root_pin_file}")
    provline("ca", "init-root", "--out", str(out), "--token", h.root_token,
             "--pin-source", f"file:{h.root_pin_file}", "--subject", "CN=Test Root,O=provline",
             env=env)
    provline("ca", "init-intermediate", "--out", str(out), "--root-cert",
             str(out / "root.cert.pem"), "--root-key", root_uri, "--token", h.token,
             "--pin-source", f"file:{h.pin_file}", "--profile", profile,
             "--subject", "CN=Test Issuing CA,O=provline", env=env)
    provline("ca", "transport-key", "--token", h.token, "--pin-source",
             f"file:{h.pin_file}", env=env)
    issuer_uri = f"pkcs11:token={h.token};object=intermediate;type=private"
    provline("ca", "audit-key", "--out", str(out), "--issuer-cert",
             str(out / "intermediate.cert.pem"), "--issuer-key", issuer_uri, "--token", h.token,
             "--pin-source", f"file:{h.pin_file}", env=env)
    return CA(out, out / "root.cert.pem", out / "intermediate.cert.pem", out / "chain.pem",
              out / "audit.cert.pem", root_uri, issuer_uri)


def write_station(path: Path, h: Hsm, c: CA, *, custody: str = "wrapped", output: Path,
                  extra: str = "", workers: int = 2, chunk_size: int = 64) -> Path:
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


@pytest.fixture(scope="session", autouse=True)
def _tools() -> None:
    for tool in ("softhsm2-util", "pkcs11-tool", "openssl", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make setup` (it installs softhsm2, opensc)")


@pytest.fixture(scope="session")
def hsm_env(tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    """The session's SoftHSM2 tokens; this process's SOFTHSM2_CONF points at them."""
    h = make_hsm(tmp_path_factory.mktemp("softhsm"))
    os.environ["SOFTHSM2_CONF"] = str(h.conf)
    os.environ["PROVLINE_PIN"] = h.pin_file.read_text().strip()
    return h


@pytest.fixture(scope="session")
def ca_env(hsm_env: Hsm, tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(hsm_env, tmp_path_factory.mktemp("ca"))


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, input=input, timeout=120)
