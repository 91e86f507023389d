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


# ----------------------------------------------------------------------- the CLI, forked
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    maxrss_kb: int  # peak resident memory of that one process
    timed_out: bool


class ForkedCli:
    """Runs provline commands, each in its own process, forked from one server process that
    has imported the CLI once: the same entry point as ``python -m pipeline.cli`` (argv, exit
    code, stdout, stderr, a fresh address space per command) without paying ~0.4 s of imports
    per command. Each command may get an address-space cap (RLIMIT_AS) on top of what the
    imports already use, and a wall-clock limit after which it is killed; the server reports
    the command's own peak RSS (wait4)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.support import serve_cli; serve_cli()"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self,
        *args: str,
        env: dict[str, str],
        cwd: Path,
        memory_mb: int | None = None,
        timeout: float = 60,
    ) -> CliResult:
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        request = {
            "args": list(args),
            "env": env,
            "cwd": str(cwd),
            "stdout": str(out),
            "stderr": str(err),
            "memory_mb": memory_mb,
            "timeout": timeout,
        }
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return CliResult(
            reply["code"],
            out.read_text(errors="backslashreplace"),
            err.read_text(errors="backslashreplace"),
            reply["maxrss_kb"],
            reply["timed_out"],
        )

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def serve_cli() -> None:
    """The server side of :class:`ForkedCli`: one JSON request per line on stdin, one JSON
    reply per line on stdout."""
    import contextlib
    import io
    import resource
    import traceback

    from pipeline import cli

    # One command in this process first, so what the CLI imports on first use (typer's
    # pydantic adapters, importlib.metadata) is imported once, not in every child.
    sys.argv = ["provline", "--version"]
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        cli.main()
    for text in sys.stdin:
        request = json.loads(text)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(target, fd)
                    os.close(target)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                if request["memory_mb"]:
                    cap = _vm_size() + request["memory_mb"] * 1024 * 1024
                    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
                sys.argv = ["provline", *request["args"]]
                try:
                    cli.main()
                    code = 0
                except SystemExit as exc:
                    if isinstance(exc.code, int) or exc.code is None:
                        code = exc.code or 0
                    else:
                        print(exc.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                done, status, usage = os.wait4(pid, 0)
                timed_out = True
                break
            time.sleep(0.002)
        reply = {
            "code": os.waitstatus_to_exitcode(status),
            "maxrss_kb": usage.ru_maxrss,
            "timed_out": timed_out,
        }
        print(json.dumps(reply), flush=True)
