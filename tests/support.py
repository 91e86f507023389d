"""Helpers the integration tests share: provline as a subprocess, real SoftHSM2 tokens in a
temporary directory with their own SOFTHSM2_CONF, a real CA hierarchy made through the CLI,
station configs, openssl, and the emulator as a subprocess. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import random
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


def token_labels(h: Hsm, object_class: str = "PRIVATE_KEY") -> list[str]:
    """Labels of the objects of one class in ``h``'s station token, read in a subprocess
    (the tokens need not be the session's)."""
    script = (
        "import json, sys\n"
        "from pkcs11 import ObjectClass\n"
        "from pipeline import hsm\n"
        "from pipeline.secret import SecretRef\n"
        "token = hsm.open_token(sys.argv[1], sys.argv[2], SecretRef('file', sys.argv[3]), "
        "sys.argv[4])\n"
        "print(json.dumps([o.label for o in token.objects(ObjectClass[sys.argv[5]])]))\n"
    )
    args = [MODULE, h.token, str(h.pin_file), str(h.conf), object_class]
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=h.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    labels: list[str] = json.loads(out.stdout)
    return labels


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


def _random_loopback() -> str:
    return f"127.{random.randrange(64, 250)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def can_bind_standard_ports() -> bool:
    """Whether this process may listen on 443 (root, CAP_NET_BIND_SERVICE, or a lowered
    net.ipv4.ip_unprivileged_port_start): the device SDKs' fixed port (docs/emulator.md)."""
    with socket.socket() as probe:
        try:
            probe.bind((_random_loopback(), 443))
        except PermissionError:
            return False
        except OSError:
            return True  # taken, but not for want of permission
    return True


STANDARD_PORTS_REASON = (
    "needs ports 443 and 8883 on a loopback address (the device SDKs' fixed ports): run as "
    "root, or lower net.ipv4.ip_unprivileged_port_start (docs/emulator.md)"
)


def loopback_addresses(n: int = 2) -> list[str]:
    """``n`` loopback addresses (all of 127.0.0.0/8 is on ``lo`` on Linux) whose standard
    ports are free now: each emulator in a test gets its own, so emulators never clash."""
    found: list[str] = []
    for _ in range(200):
        address = _random_loopback()
        try:
            for port in (443, 8883):
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        if address not in found:
            found.append(address)
        if len(found) == n:
            return found
    raise AssertionError(f"no free loopback address for 443/8883: {STANDARD_PORTS_REASON}")


def emulator_dir(base: Path, **config: object) -> Path:
    """``base/emu`` holding the emulator's config.json: free ports for DPS, its service API and
    IoT Hub, and ``config`` on top (rates, ``assign_seconds``...)."""
    data = base / "emu"
    data.mkdir()
    port, service, hub = free_ports(3)
    settings = {"port": port, "service_port": service, "hub_port": hub, **config}
    (data / "config.json").write_text(json.dumps(settings))
    return data


def start_emulator(data_dir: Path, *args: str, standard_ports: bool = False) -> Emu:
    """The emulator as a subprocess. ``standard_ports``: DPS and IoT Hub on 443 and 8883 of
    two private loopback addresses (what the device SDKs need; a restart keeps the
    addresses), retried on other addresses if one was taken meanwhile."""
    info_path = data_dir / "emulator.json"
    previous = json.loads(info_path.read_text()) if info_path.exists() else {}
    info_path.unlink(missing_ok=True)
    for attempt in range(5):
        extra: list[str] = []
        if standard_ports:
            if previous.get("standard_ports") == "true" and attempt == 0:
                hosts = [previous["dps_host"], previous["hub_host"]]
            else:
                hosts = loopback_addresses(2)
            extra = ["--host", hosts[0], "--hub-host", hosts[1], "--standard-ports"]
        proc = subprocess.Popen(
            [*PROVLINE, "emulator", "serve", "--data-dir", str(data_dir), *extra, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not info_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if info_path.exists():
            return Emu(data_dir, json.loads(info_path.read_text()), proc)
        proc.kill()
        stderr = proc.stderr.read().decode() if proc.stderr else ""  # type: ignore[union-attr]
        proc.wait()
        if not (standard_ports and "cannot listen" in stderr):
            raise AssertionError(f"emulator did not start: {stderr}")
    raise AssertionError("emulator did not start: no free loopback address")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_pkcs8_batch(h: Hsm, c: CA, base: Path, batch_id: str, prefix: str, count: int) -> Path:
    """A pkcs8-custody batch run in this process (the session's tokens): bundles whose key
    files curl, paho and the device SDKs can use (passphrase :data:`PASSPHRASE`)."""
    from pipeline.config.manifest import load_manifest
    from pipeline.config.station import load_station
    from pipeline.run import run_batch

    os.environ["PROVLINE_TEST_PASSPHRASE"] = PASSPHRASE
    base.mkdir(parents=True, exist_ok=True)
    station = load_station(write_station(base / "s.yaml", h, c, custody="pkcs8", output=base))
    manifest = base / f"{batch_id}.yaml"
    manifest.write_text(
        f"batch_id: {batch_id}\ngenerator: {{prefix: {prefix}, digits: 3, count: {count}}}\n"
    )
    result = run_batch(load_manifest(manifest), station)
    assert result.exit_code == 0, result.report
    return result.batch_dir


def verify_ca(emu: Emu, cert: Path, key_uri: str, h: Hsm, tmp: Path, name: str) -> None:
    """Upload a CA to the emulator and prove possession with its HSM-held key, the way an
    operator does (``provline ca pop`` signs the verification code)."""
    with emu.service() as svc:
        put = svc.put(
            f"/certificates/{name}", json={"properties": {"certificate": cert.read_text()}}
        )
        assert put.status_code == 200 and put.json()["properties"]["isVerified"] is False
        code = svc.post(
            f"/certificates/{name}/generateVerificationCode",
            headers={"If-Match": put.json()["etag"]},
        )
        assert code.status_code == 200, code.text
        pop = tmp / f"pop-{name}.pem"
        provline(
            "ca",
            "pop",
            "--code",
            code.json()["properties"]["verificationCode"],
            "--ca-cert",
            str(cert),
            "--ca-key",
            key_uri,
            "--out",
            str(pop),
            env=h.env(),
        )
        done = svc.post(
            f"/certificates/{name}/verify",
            headers={"If-Match": code.json()["etag"]},
            json={"certificate": pop.read_text()},
        )
        assert done.status_code == 200, done.text
        assert done.json()["properties"]["isVerified"] is True


def leaf_signed_chain(bundle: Path, out: Path, cn: str) -> tuple[Path, Path]:
    """(chain file, key file) of a certificate CN=``cn`` signed by a device's *leaf* key,
    followed by the device's real chain: every link's signature verifies, but the signer is
    not a CA, so RFC 5280 path validation (and ``openssl verify``) must refuse it."""
    from cryptography import x509 as x
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    leaf_key = serialization.load_pem_private_key(
        (bundle / "device.key.pem").read_bytes(), PASSPHRASE.encode()
    )
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    device_chain = (bundle / "full-chain.cert.pem").read_bytes()
    leaf = x.load_pem_x509_certificate(device_chain)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = leaf.extensions.get_extension_for_class(x.SubjectKeyIdentifier).value
    rogue = (
        x.CertificateBuilder()
        .subject_name(x.Name([x.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(leaf.subject)
        .public_key(key.public_key())
        .serial_number(x.random_serial_number())
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(x.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(leaf_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    chain_file, key_file = out / f"{cn}.chain.pem", out / f"{cn}.key.pem"
    chain_file.write_bytes(rogue.public_bytes(serialization.Encoding.PEM) + device_chain)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return chain_file, key_file


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


def start_fast_emulator(base: Path, **config: object) -> Emu:
    """The emulator in ``base/emu`` on free ports with quick assignment (tests of provline's
    own clients); ``config`` adds config.json settings (e.g. ``certificate_api=False``)."""
    return start_emulator(emulator_dir(base, assign_seconds=0.1, retry_after=1, **config))


def group_id(issuer_cert: Path) -> str:
    """The enrollment group provline makes for an issuing CA (``provline-<sha256>``)."""
    import hashlib

    from cryptography import x509 as x
    from cryptography.hazmat.primitives import serialization

    cert = x.load_pem_x509_certificate(issuer_cert.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    return "provline-" + hashlib.sha256(der).hexdigest()[:24]


def enrol_elsewhere(emu: Emu, registration_ids: list[str]) -> None:
    """Individual enrollments for ``registration_ids`` made by someone else (with another
    certificate: the emulator's TLS CA), in bulk calls of 10."""
    other = (emu.dir / "server-ca.pem").read_text()
    with emu.service() as svc:
        for i in range(0, len(registration_ids), 10):
            body = {
                "mode": "create",
                "enrollments": [
                    {
                        "registrationId": rid,
                        "attestation": {
                            "type": "x509",
                            "x509": {"clientCertificates": {"primary": {"certificate": other}}},
                        },
                    }
                    for rid in registration_ids[i : i + 10]
                ],
            }
            answer = svc.post("/enrollments", json=body)
            assert answer.status_code == 200 and answer.json()["isSuccessful"], answer.text


def reopen_intent(batch: Path, rid: str) -> str:
    """The state a kill leaves while a device's bundle is being written: its serial an open
    intent in the journal, its bundle incomplete (no device.json yet). Returns the serial
    (the next run voids it: its certificate is on disk, so it was signed)."""
    import sqlite3

    db = sqlite3.connect(batch / "journal.sqlite")
    serial = db.execute("SELECT serial FROM devices WHERE registration_id = ?", (rid,)).fetchone()
    db.execute("UPDATE devices SET state = 'intent' WHERE registration_id = ?", (rid,))
    db.execute("UPDATE serials SET state = 'intent' WHERE serial = ?", serial)
    db.commit()
    db.close()
    (batch / rid / "device.json").unlink()
    return str(serial[0])


UNTHROTTLED = {"operations_per_minute": 600_000, "registrations_per_minute": 600_000}
