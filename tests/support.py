"""Helpers the integration tests share: provline as a subprocess, real SoftHSM2 tokens in a
temporary directory with their own SOFTHSM2_CONF, a real CA hierarchy made through the CLI,
station configs, openssl, and the emulator as a subprocess. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------------------- openCryptoki
# openCryptoki (Debian `opencryptoki`, 3.8) is the second, independent PKCS#11 implementation
# the HSM-facing tests run on. Its paths are compiled in (/etc/opencryptoki, the token store
# /var/lib/opencryptoki, the pkcsslotd socket and pid file in /run, shared memory in
# /dev/shm), so each test session runs its own pkcsslotd in a private mount namespace where
# those paths are bind-mounted from a temporary directory: the system's openCryptoki state is
# never touched. That needs root (unshare/nsenter), as `make test` runs in CI.
OCK_LABEL = "ock-station"
OCK_DEFAULT_SO_PIN = "87654321"  # the software token's documented initial SO PIN


def ock_module() -> str | None:
    import glob

    found = glob.glob("/usr/lib/*/pkcs11/libopencryptoki.so")
    return found[0] if found else None


def ock_unavailable() -> str | None:
    """Why the openCryptoki tests cannot run here, or None."""
    import shutil

    if ock_module() is None or shutil.which("pkcsslotd") is None:
        return "openCryptoki is not installed (run `make setup`: Debian opencryptoki)"
    if os.geteuid() != 0:
        return "openCryptoki runs in a private mount namespace, which needs root"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    return None


@dataclass
class Ock:
    """One pkcsslotd and one initialised software token in a private mount namespace."""

    dir: Path
    holder: subprocess.Popen[bytes]
    module: str
    token: str
    pin_file: Path

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *args]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PROVLINE_PIN": self.pin_file.read_text().strip()}
        env.pop("SOFTHSM2_CONF", None)
        return env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args), capture_output=True, text=True, env=self.env(), cwd=ROOT, timeout=600
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def provline(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(*PROVLINE, *args, check=check)

    def python(self, code: str) -> str:
        """Run python-pkcs11 code against the token inside the namespace; ``session`` is a
        logged-in R/W session. Returns stdout."""
        prelude = (
            "import pkcs11, os\n"
            f"lib = pkcs11.lib({self.module!r})\n"
            f"session = lib.get_token(token_label={self.token!r}).open(rw=True, "
            "user_pin=os.environ['PROVLINE_PIN'])\n"
        )
        return self.run(sys.executable, "-c", prelude + code).stdout

    def stop(self) -> None:
        pid_file = self.dir / "run" / "pkcsslotd.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        self.holder.kill()
        self.holder.wait(timeout=10)


def start_opencryptoki(base: Path, label: str = OCK_LABEL) -> Ock:
    from pipeline.hsm.softhsm import _run_with_pins

    module = ock_module()
    assert module is not None
    base.mkdir(parents=True, exist_ok=True)
    for sub in ("lib/swtok/TOK_OBJ", "run/lock/opencryptoki/swtok", "etc", "shm"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "etc" / "opencryptoki.conf").write_text(
        "version opencryptoki-3.1\nslot 0\n{\nstdll = libpkcs11_sw.so\n}\n"
    )
    script = (
        "set -e; "
        f"mount --bind {base}/run /run; "
        f"mount --bind {base}/lib /var/lib/opencryptoki; "
        f"mount --bind {base}/etc/opencryptoki.conf /etc/opencryptoki/opencryptoki.conf; "
        f"mount --bind {base}/shm /dev/shm; "
        "pkcsslotd; echo ready; exec sleep 86400"
    )
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != b"ready":
        holder.kill()
        raise AssertionError(f"pkcsslotd did not start: {holder.stderr.read()!r}")  # type: ignore[union-attr]
    pin = base / "pin"
    pin.write_text(secrets.token_hex(4) + "\n")  # openCryptoki's software token: PINs of 4-8
    pin.chmod(0o600)
    ock = Ock(base, holder, module, label, pin)
    user_pin = pin.read_text().strip()
    nsenter = [
        "/usr/bin/nsenter",
        "-t",
        str(holder.pid),
        "-m",
        "--",
        "/usr/sbin/pkcsconf",
        "-c",
        "0",
    ]
    env = {**os.environ}
    for argv, answers in (
        ([*nsenter, "-I"], [OCK_DEFAULT_SO_PIN, label]),
        ([*nsenter, "-u"], [OCK_DEFAULT_SO_PIN, user_pin, user_pin]),
    ):
        out, code = _run_with_pins(argv, answers, env)
        if code != 0:
            ock.stop()
            raise AssertionError(f"pkcsconf {argv[-1]} failed: {out}")
    return ock
