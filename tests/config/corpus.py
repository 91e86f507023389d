"""The hostile-input corpus: manifests (YAML, CSV) and station configs, as an attacker or a
careless upstream system would write them, each with what provline must answer.

Data only (no tests here): ``test_corpus_unit.py`` loads every case in-process (no HSM, no
subprocess), ``test_corpus_cli.py`` runs every case through the CLI (validate, plan, run) and
checks that nothing was written, no HSM object was made and no connection was opened.

A case directory holds ``station.yaml`` (the template below, edited by the case), the
manifest (``m.yaml`` by default), ``pin`` (the token PIN, 0600) and the case's own files;
``out/`` is the station's output and does not exist.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

STATION = """\
station: corpus
hsm:
  module: {module}
  token: {token}
  pin: file:{pin}
  softhsm2_conf: {conf}
ca:
  chain: {chain}
  issuer_key: pkcs11:token={token};object=intermediate;type=private
  root_cert: {root}
custody:
  policy: wrapped
  transport_key: pkcs11:token={token};object=transport;type=secret-key
audit:
  key: pkcs11:token={token};object=audit;type=private
  cert: {audit}
output: {output}
workers: 1
key_profiles: [ec-p256, ec-p384]
dps:
  service_endpoint: https://127.0.0.1:{port}
  device_endpoint: https://127.0.0.1:{port}
  id_scope: 0ne00000001
  connection_string: env:PROVLINE_CORPUS_CS
"""
# Lines of the template, for the cases' expectations.
L_HSM, L_TOKEN, L_PIN, L_CONF, L_CHAIN, L_ISSUER, L_ROOT = 2, 4, 5, 6, 8, 9, 10
L_CUSTODY, L_AUDIT_CERT, L_OUTPUT, L_WORKERS, L_PROFILES, L_DPS = 11, 16, 17, 18, 19, 20

# A connection string with the right shape; nothing listens for it but the tests' socket.
CONNECTION_STRING = (
    "HostName=127.0.0.1;SharedAccessKeyName=provisioningserviceowner;"
    "SharedAccessKey=c2VjcmV0LWtleS1mb3ItdGhlLWNvcnB1cy0wMTIzNDU2Nzg5"
)

HEAD = "batch_id: corpus\nregistration: individual\n"
ONE = "devices:\n  - registration_id: dev-1\n"
GOOD = HEAD + ONE


@dataclass(frozen=True)
class Case:
    id: str
    manifest: str | bytes = GOOD
    manifest_name: str = "m.yaml"
    station: Callable[[str], str] | None = None  # edits the station template
    station_encoding: str = "utf-8"
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None  # FIFOs, symlinks, sparse files, modes
    where: str = ""  # the file (and line) the first problem names, relative to the case
    says: tuple[str, ...] = ()  # fragments of the problem lines (as printed: escaped)
    hidden: tuple[str, ...] = ()  # never printed (secrets, another file's first line)
    code: int = 2
    lines: int | None = 1  # problem lines (None: one or more)
    args: tuple[str, ...] = ()  # more CLI arguments (--batch-id ...)
    stage: str = "validate"  # validate: decided by validate; hsm: validate passes, run fails
    devices: int = 0  # accepted cases: devices in the batch
    run: bool = True  # accepted cases: run the batch as well
    slow: bool = False  # generates large inputs (the CLI layer runs these too)

    @property
    def accepted(self) -> bool:
        return self.code == 0


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def manifest(*lines: str, head: str = HEAD) -> str:
    return head + "".join(f"{line}\n" for line in lines)


def device(body: str) -> str:
    """A manifest with one device given as a YAML flow mapping body."""
    return manifest("devices:", f"  - {{{body}}}")


def tags(value: str, section: str = "tags") -> str:
    return device(f"registration_id: dev-1, {section}: {value}")


CSV = manifest("devices_csv: d.csv")


def bomb(levels: int, width: int = 10, use: str = "tags: {x: *l%d}") -> str:
    """The billion laughs: each level a list of ``width`` aliases of the one before."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * width) + "]")
    target = use % (levels - 1) if "%d" in use else use
    return HEAD + "\n".join(lines) + f"\ndevices:\n  - {{registration_id: dev-1, {target}}}\n"


def nested_block(depth: int) -> str:
    return HEAD + ONE + "".join(f"{'  ' * n}k{n}:\n" for n in range(depth)) + "  " * depth + "v\n"


def _sparse(name: str, size: int) -> Callable[[Path], None]:
    def make(case_dir: Path) -> None:
        with open(case_dir / name, "wb") as handle:
            handle.truncate(size)

    return make


def _fifo(name: str) -> Callable[[Path], None]:
    return lambda case_dir: os.mkfifo(case_dir / name)


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda case_dir: (case_dir / name).mkdir()


def _mode(name: str, mode: int) -> Callable[[Path], None]:
    return lambda case_dir: (case_dir / name).chmod(mode)


def _symlink(name: str, target: str) -> Callable[[Path], None]:
    return lambda case_dir: (case_dir / name).symlink_to(target)


def _csv_rows(count: int) -> bytes:
    return ("registration_id\n" + "".join(f"c-{i:07d}\n" for i in range(count))).encode()


def _write_rows(name: str, count: int) -> Callable[[Path], None]:
    """A CSV of ``count`` devices, written when the case runs (not when the corpus loads)."""
    return lambda case_dir: (case_dir / name).write_bytes(_csv_rows(count))


def _batch_dir_with(name: str) -> Callable[[Path], None]:
    def make(case_dir: Path) -> None:
        (case_dir / "out" / "corpus").mkdir(parents=True)
        (case_dir / "out" / "corpus" / name).write_text("someone else's file\n")

    return make


LOCAL = manifest(ONE.rstrip(), head="batch_id: corpus\n")  # registers nothing
# ----------------------------------------------------------------- device-custody CSRs
# Made once at import (cryptography): what a device, a vendor or a careless script supplies
# where the manifest names a CSR (docs/device-keys.md).
DEVICE = sub("  policy: wrapped\n", "  policy: device\n")


def _key(kind: str = "p256") -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return ec.generate_private_key(ec.SECP256R1())


def _csr(
    cn: str | None, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
) -> bytes:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    return request.sign(key or _key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _self_signed() -> bytes:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _broken_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(_csr("dev-1")).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 1
    return bytes(der)


_SHARED_KEY = _key()
_PRIVATE_KEY_PEM = _key().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
CSR_ONE = manifest("devices:", "  - {registration_id: dev-1, csr: c.csr}")


PIN_SECRET = "s3cret-PIN-4711"  # what an operator typed where a source belongs
TLS_FILE = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
IDS = "DPS registration ID"
DEVICE_IDS = "IoT Hub device ID"
TWIN = "twin limits"
M = "m.yaml"
S = "station.yaml"


CASES: list[Case] = [
    # ------------------------------------------------------------------ resource bombs
    Case("alias-bomb-in-tags", bomb(9), where=f"{M}:", says=("aliases stand for more than",)),
    Case("alias-bomb-in-desired", bomb(9, use="desired: {x: *l%d}"), where=f"{M}:"),
    Case(
        "alias-bomb-under-unknown-key",
        HEAD + ONE + "\n".join(bomb(9).splitlines()[2:11]) + "\n",
        where=f"{M}:",
        says=("alias bombs are refused",),
    ),
    Case(
        "alias-bomb-as-device-list",
        HEAD + "\n".join(bomb(8).splitlines()[2:10]) + "\ndevices: *l7\n",
        where=f"{M}:",
        says=("aliases stand for more than",),
    ),
    Case(
        "alias-bomb-wide-not-deep",
        HEAD
        + ONE
        + "a: &a ["
        + ", ".join(["x"] * 1000)
        + "]\nb: ["
        + ", ".join(["*a"] * 1001)
        + "]\n",
        where=f"{M}:",
        says=("aliases stand for more than 1,000,000 values",),
    ),
    Case(
        "small-bomb-in-tags-within-alias-budget",
        bomb(5),
        where=f"{M}:9",
        says=("tags are larger than 8 KB", TWIN),
        lines=None,
    ),
    Case(
        "flow-nesting-1000",
        HEAD + ONE + "x: " + "[" * 1000 + "]" * 1000 + "\n",
        where=f"{M}:5",
        says=("nest",),
    ),
    Case(
        "flow-nesting-unclosed-100000",
        HEAD + ONE + "x: " + "[" * 100_000 + "\n",
        where=f"{M}:5",
        says=("nest",),
    ),
    Case("block-nesting-100", nested_block(100), where=f"{M}:", says=("nested deeper than 24",)),
    Case(
        "twin-nesting-11",
        tags("{a: {b: {c: {d: {e: {f: {g: {h: {i: {j: {k: 1}}}}}}}}}}}"),
        where=f"{M}:4",
        says=("nested deeper than 10 levels",),
    ),
    Case(
        "manifest-over-16-mib",
        setup=_sparse("m.yaml", 17 * 1024 * 1024),
        manifest="",
        where=M,
        says=("is 17,825,792 bytes", "a manifest is at most 16 MiB"),
    ),
    Case(
        "two-billion-generated",
        manifest(
            "generator:",
            "  - {prefix: a-, digits: 18, count: 1000000000}",
            "  - {prefix: a-, digits: 18, count: 1000000000}",
        ),
        where=f"{M}:3",
        says=("2,000,000,000 devices", "at most 1,000,000 devices per batch"),
    ),
    Case(
        "one-generator-over-the-limit",
        manifest("generator: {prefix: a-, digits: 7, count: 1000001}"),
        where=f"{M}:3",
        says=("1,000,001 devices",),
    ),
    Case(
        "generators-plus-explicit-over-the-limit",
        manifest("generator: {prefix: a-, digits: 7, count: 1000000}", ONE.rstrip()),
        where=f"{M}:3",
        says=("1,000,001 devices",),
    ),
    Case(
        "too-many-generators",
        manifest(
            "generator:", *(f"  - {{prefix: g{i}-, digits: 1, count: 1}}" for i in range(1001))
        ),
        where=f"{M}:3",
        says=("1,001 generators", "at most 1,000 generators"),
    ),
    Case(
        "1000-generators-all-overlapping",
        manifest(
            "generator:",
            *(f"  - {{prefix: g-, digits: 3, start: {i}, count: 2}}" for i in range(1000)),
        ),
        where=f"{M}:",
        says=("also produced by the generator at",),
        lines=999,
    ),
    Case(
        "csv-one-row-over-the-limit",
        CSV,
        setup=_write_rows("d.csv", 1_000_001),
        where="d.csv:1000002",
        says=("more than 1,000,000 devices",),
        slow=True,
    ),
    Case(
        "csv-of-2-million-blank-lines",
        CSV,
        setup=lambda d: (d / "d.csv").write_bytes(b"registration_id\n" + b"\n" * 2_000_000),
        where="d.csv:2000001",
        says=("more than 2,000,000 lines",),
        slow=True,
    ),
    Case(
        "csv-of-5000-bad-devices",
        CSV,
        files={"d.csv": "registration_id\n" + "BAD\n" * 5000},
        where="d.csv:2",
        says=("checking stopped after 1,000 problems",),
        lines=1001,
    ),
    Case(
        "yaml-of-5000-bad-devices",
        manifest("devices:", *["  - 1"] * 5000),
        where=f"{M}:4",
        says=("devices[0] must be a mapping", "checking stopped after 1,000 problems"),
        lines=1001,
    ),
    Case(
        "csv-plus-generator-over-the-limit",
        manifest("generator: {prefix: g-, digits: 7, count: 999999}", "devices_csv: d.csv"),
        files={"d.csv": _csv_rows(2)},
        where="d.csv:3",
        says=("more than 1,000,000 devices",),
    ),
    Case(
        "csv-over-256-mib",
        CSV,
        setup=_sparse("d.csv", 257 * 1024 * 1024),
        where=f"{M}:3",
        says=("is 269,484,032 bytes", "a device CSV is at most 256 MiB"),
    ),
    Case(
        "csv-one-line-of-100-kib",
        CSV,
        files={"d.csv": b"registration_id,tag.x\ndev-1," + b"y" * 100_000},
        where="d.csv:2",
        says=("a record longer than 64 KiB",),
    ),
    Case(
        "csv-field-over-the-csv-module-limit",
        CSV,
        files={"d.csv": b'registration_id,tag.x\ndev-1,"' + b"y\n" * 70_000 + b'"\n'},
        where="d.csv:",
        says=("a record longer than 64 KiB",),
    ),
    Case(
        "product-of-one-mib",
        HEAD + ONE + "product: " + "p" * (1024 * 1024) + "\n",
        where=f"{M}:5",
        says=("is longer than 128", "(1048576 characters)"),
    ),
    Case(
        "tag-string-over-4-kb",
        tags("{note: " + "n" * 5000 + "}"),
        where=f"{M}:4",
        says=("tags.note is a string of 5,000 bytes",),
    ),
    Case(
        "tags-over-8-kb",
        tags("{" + ", ".join(f"k{i}: {'v' * 90}" for i in range(100)) + "}"),
        where=f"{M}:4",
        says=("tags are larger than 8 KB",),
    ),
    Case(
        "desired-over-32-kb",
        tags("{" + ", ".join(f"k{i}: {'v' * 3000}" for i in range(12)) + "}", "desired"),
        where=f"{M}:4",
        says=("desired are larger than 32 KB",),
    ),
    Case(
        "tag-key-over-1-kb",
        manifest(
            "devices:",
            "  - registration_id: dev-1",
            "    tags:",
            "      ? " + "k" * 1100,  # a key over 1024 characters must be explicit in YAML
            "      : v",
        ),
        where=f"{M}:5",
        says=("is longer than 1 KB",),
    ),
    # ---------------------------------------------------------- values JSON cannot hold
    Case("date-in-tags", tags("{made: 2024-01-01}"), where=f"{M}:4", says=("a date (2024-01-01)",)),
    Case(
        "datetime-in-desired",
        tags("{at: 2024-01-01 10:00:00}", "desired"),
        where=f"{M}:4",
        says=("desired.at is a date",),
    ),
    Case("binary-in-tags", tags("{b: !!binary aGVsbG8=}"), where=f"{M}:4", says=("binary data",)),
    Case(
        "set-as-tags", tags("!!set {a, b}"), where=f"{M}:4", says=("tag 'tag:yaml.org,2002:set'",)
    ),
    Case("omap-in-tags", tags("{o: !!omap [{a: 1}]}"), where=f"{M}:4", says=("omap",)),
    Case("pairs-in-desired", tags("{o: !!pairs [{a: 1}]}", "desired"), where=f"{M}:4"),
    Case(
        "int-key-in-tags", tags("{1: one}"), where=f"{M}:4", says=("mapping key 1 is not a string",)
    ),
    Case("on-key-in-tags", tags("{on: 1}"), where=f"{M}:4", says=("mapping key True",)),
    Case("null-key-in-tags", tags("{~: 1}"), where=f"{M}:4", says=("mapping key None",)),
    Case(
        "nan-in-desired", tags("{x: .nan}", "desired"), where=f"{M}:4", says=("not a JSON number",)
    ),
    Case("inf-in-desired", tags("{x: -.inf}", "desired"), where=f"{M}:4", says=("-inf",)),
    Case(
        "int-beyond-2-52",
        tags("{x: 4503599627370496}"),
        where=f"{M}:4",
        says=("outside IoT Hub's integers",),
    ),
    Case(
        "int-of-5000-digits",
        tags("{x: " + "9" * 5000 + "}"),
        where=f"{M}:4",
        says=("cannot be read as int",),
    ),
    Case(
        "python-object-tag",
        manifest("x: !!python/object/apply:os.system [echo pwned]", ONE.rstrip()),
        where=f"{M}:3",
        says=("is not supported",),
    ),
    Case(
        "python-name-tag",
        tags("{x: !!python/name:os.system ''}"),
        where=f"{M}:4",
        says=("python/name:os.system",),
    ),
    Case("local-tag", tags("{x: !secret abc}"), where=f"{M}:4", says=("tag '!secret'",)),
    Case("impossible-date", tags("{x: 2024-13-45}"), where=f"{M}:4", says=("month must be",)),
    Case("float-tag-on-text", tags("{x: !!float abc}"), where=f"{M}:4", says=("as float",)),
    Case("dot-in-tag-key", tags('{"a.b": 1}'), where=f"{M}:4", says=("'.'",)),
    Case("dollar-in-tag-key", tags('{"$version": 1}', "desired"), where=f"{M}:4", says=("'$'",)),
    Case("space-in-tag-key", tags('{"a b": 1}'), where=f"{M}:4", says=("' '",)),
    Case("tab-in-tag-key", tags('{"a\\tb": 1}'), where=f"{M}:4", says=("'\\t'",)),
    Case("empty-tag-key", tags('{"": 1}'), where=f"{M}:4", says=("an empty key",)),
    Case("tags-a-list", tags("[a, b]"), where=f"{M}:4", says=("tags must be a mapping",)),
    Case("tags-a-string", tags("line-a"), where=f"{M}:4", says=("tags must be a mapping",)),
    Case("desired-a-number", tags("30", "desired"), where=f"{M}:4", says=("desired must be",)),
    # ------------------------------------------------------------------- identifiers
    Case(
        "rid-trailing-newline",
        device('registration_id: "dev-1\\n"'),
        where=f"{M}:4",
        says=("registration_id 'dev-1\\n' is invalid", IDS),
        lines=2,  # the device ID defaults to it and is invalid too
    ),
    Case("rid-leading-newline", device('registration_id: "\\ndev-1"'), where=f"{M}:4", lines=2),
    Case("rid-uppercase", device("registration_id: Dev-1"), where=f"{M}:4", says=(IDS,)),
    Case("rid-65-chars", device("registration_id: " + "d" * 65), where=f"{M}:4", says=(IDS,)),
    Case("rid-ends-with-dot", device("registration_id: dev-1."), where=f"{M}:4", says=(IDS,)),
    Case(
        "rid-nul",
        device('registration_id: "dev-\\0"'),
        where=f"{M}:4",
        says=("'dev-\\x00'",),
        lines=2,
    ),
    Case(
        "rid-terminal-escape",
        device('registration_id: "dev-\\e[2J\\e[31m"'),
        where=f"{M}:4",
        says=("dev-\\x1b[2J\\x1b[31m",),
        lines=2,
    ),
    Case(
        "rid-bidi-override",
        device('registration_id: "dev-\\u202e1"'),
        where=f"{M}:4",
        says=("dev-\\u202e1",),
        lines=2,
    ),
    Case("rid-cyrillic-homoglyph", device("registration_id: dev-а"), where=f"{M}:4", lines=2),
    Case(
        "rid-an-int",
        device("registration_id: 123"),
        where=f"{M}:4",
        says=("not a string",),
        lines=2,
    ),
    Case("rid-a-list", device("registration_id: [a, b]"), where=f"{M}:4", lines=2),
    Case("rid-missing", device("device_id: dev-1"), where=f"{M}:4", says=("missing key",), lines=2),
    Case("rid-empty", device('registration_id: ""'), where=f"{M}:4", lines=2),
    Case(
        "did-trailing-newline",
        device('registration_id: dev-1, device_id: "dev-1\\n"'),
        where=f"{M}:4",
        says=("device_id 'dev-1\\n' is invalid", DEVICE_IDS),
    ),
    Case(
        "did-129-chars", device("registration_id: dev-1, device_id: " + "d" * 129), where=f"{M}:4"
    ),
    Case("did-space", device("registration_id: dev-1, device_id: 'dev 1'"), where=f"{M}:4"),
    Case("did-a-mapping", device("registration_id: dev-1, device_id: {a: 1}"), where=f"{M}:4"),
    Case(
        "batch-id-trailing-newline",
        manifest(ONE.rstrip(), head='batch_id: "corpus\\n"\n'),
        where=f"{M}:1",
        says=("batch_id 'corpus\\n' is not a safe directory name",),
    ),
    Case(
        "batch-id-null",
        manifest(ONE.rstrip(), head="batch_id:\n"),
        where=f"{M}:1",
        says=("batch_id is missing or empty",),
    ),
    Case("batch-id-empty", manifest(ONE.rstrip(), head='batch_id: ""\n'), where=f"{M}:1"),
    Case("batch-id-missing", manifest(ONE.rstrip(), head=""), where=f"{M}:1"),
    Case(
        "batch-id-dotdot-path", manifest(ONE.rstrip(), head="batch_id: ../../etc\n"), where=f"{M}:1"
    ),
    Case("batch-id-dot", manifest(ONE.rstrip(), head="batch_id: .\n"), where=f"{M}:1"),
    Case("batch-id-slash", manifest(ONE.rstrip(), head="batch_id: a/b\n"), where=f"{M}:1"),
    Case(
        "batch-id-65-chars", manifest(ONE.rstrip(), head=f"batch_id: {'b' * 65}\n"), where=f"{M}:1"
    ),
    Case("batch-id-an-int", manifest(ONE.rstrip(), head="batch_id: 42\n"), where=f"{M}:1"),
    Case("batch-id-a-list", manifest(ONE.rstrip(), head="batch_id: [a]\n"), where=f"{M}:1"),
    Case(
        "cli-batch-id-empty",
        args=("--batch-id", ""),
        where="--batch-id",
        says=("batch_id is missing or empty",),
    ),
    Case(
        "cli-batch-id-newline",
        args=("--batch-id", "lot\n7"),
        where="--batch-id",
        says=("'lot\\n7'",),
    ),
    Case(
        "product-a-list",
        manifest("product: [1, 2]", ONE.rstrip()),
        where=f"{M}:3",
        says=("'product' must be str, not a list of 2 items",),
    ),
    Case("product-a-mapping", manifest("product: {a: 1}", ONE.rstrip()), where=f"{M}:3"),
    Case("product-129-chars", manifest(f"product: {'p' * 129}", ONE.rstrip()), where=f"{M}:3"),
    Case(
        "product-terminal-escape",
        manifest('product: "\\e]0;pwned\\a"', ONE.rstrip()),
        where=f"{M}:3",
        says=("\\x1b]0;pwned\\x07", "control character"),
    ),
    Case("key-profile-unknown", manifest("key_profile: ec-p521", ONE.rstrip()), where=f"{M}:3"),
    Case("key-profile-a-list", manifest("key_profile: [ec-p256]", ONE.rstrip()), where=f"{M}:3"),
    Case(
        "registration-unknown",
        manifest(ONE.rstrip(), head="batch_id: c\nregistration: sms\n"),
        where=f"{M}:2",
    ),
    Case("validity-zero", manifest("validity_days: 0", ONE.rstrip()), where=f"{M}:3"),
    Case("validity-a-string", manifest("validity_days: '365'", ONE.rstrip()), where=f"{M}:3"),
    Case("validity-a-bool", manifest("validity_days: true", ONE.rstrip()), where=f"{M}:3"),
    Case("validity-a-float", manifest("validity_days: 1e9", ONE.rstrip()), where=f"{M}:3"),
    Case(
        "generator-prefix-uppercase",
        manifest("generator: {prefix: Dev-, count: 3}"),
        where=f"{M}:3",
    ),
    Case(
        "generator-prefix-newline",
        manifest('generator: {prefix: "dev-\\n", count: 3}'),
        where=f"{M}:3",
        says=("'dev-\\n",),
    ),
    Case(
        "generator-digits-19",
        manifest("generator: {prefix: d-, digits: 19, count: 3}"),
        where=f"{M}:3",
    ),
    Case("generator-count-zero", manifest("generator: {prefix: d-, count: 0}"), where=f"{M}:3"),
    Case(
        "generator-count-negative", manifest("generator: {prefix: d-, count: -5}"), where=f"{M}:3"
    ),
    Case(
        "generator-start-negative",
        manifest("generator: {prefix: d-, start: -1, count: 2}"),
        where=f"{M}:3",
    ),
    Case(
        "generator-counter-overflow",
        manifest("generator: {prefix: d-, digits: 2, start: 95, count: 10}"),
        where=f"{M}:3",
        says=("counter 104 needs more than 2 digits",),
    ),
    Case(
        "generator-huge-start",
        manifest(f"generator: {{prefix: d-, digits: 18, start: {'9' * 4000}, count: 1}}"),
        where=f"{M}:3",
        says=("an integer of",),
    ),
    Case("generator-a-string", manifest("generator: dev-001"), where=f"{M}:3"),
    Case("generator-list-of-strings", manifest("generator: [a, b]"), where=f"{M}:3", lines=2),
    Case(
        "duplicate-registration-id",
        manifest("devices:", "  - registration_id: dev-1", "  - registration_id: dev-1"),
        where=f"{M}:5",
        says=("duplicate registration_id, first at", f"{M}:4"),
    ),
    Case(
        "duplicate-device-id",
        manifest(
            "devices:",
            "  - {registration_id: dev-1, device_id: same}",
            "  - {registration_id: dev-2, device_id: same}",
        ),
        where=f"{M}:5",
        says=("duplicate device_id",),
    ),
    Case(
        "explicit-clashes-with-generator",
        manifest(
            "generator: {prefix: node-, digits: 3, count: 20}",
            "devices:",
            "  - registration_id: node-007",
        ),
        where=f"{M}:5",
        says=("node-007: also produced by the generator at",),
    ),
    Case(
        "generators-overlap-through-prefix-digits",
        manifest(
            "generator:",
            "  - {prefix: node-, digits: 3, start: 1, count: 20}",
            "  - {prefix: node-0, digits: 2, start: 15, count: 3}",
        ),
        where=f"{M}:5",
        says=("node-015: also produced by the generator at",),
    ),
    Case(
        "unknown-top-key",
        manifest("colour: blue", ONE.rstrip()),
        where=f"{M}:3",
        says=("unknown key 'colour'",),
    ),
    Case("unknown-device-key", device("registration_id: dev-1, serial: 5"), where=f"{M}:4"),
    Case(
        "duplicate-top-key",
        manifest(ONE.rstrip(), "registration: none"),
        where=f"{M}:5",
        says=("duplicate key 'registration'",),
    ),
    Case("devices-a-mapping", manifest("devices: {registration_id: dev-1}"), where=f"{M}:3"),
    Case("devices-items-scalars", manifest("devices: [dev-1, dev-2]"), where=f"{M}:3", lines=2),
    Case("no-devices", manifest("devices: []"), where=f"{M}:1", says=("has no devices",)),
    # ------------------------------------------------------------ YAML syntax, structure
    Case(
        "list-as-mapping-key",
        HEAD + ONE + "? [a, b]\n: 1\n",
        where=f"{M}:5",
        says=("mapping key a list",),
    ),
    Case("mapping-as-mapping-key", HEAD + ONE + "? {a: 1}\n: 1\n", where=f"{M}:5"),
    Case("list-as-device-key", device("[a]: 1, registration_id: dev-1"), where=f"{M}:4"),
    Case(
        "two-documents",
        GOOD + "---\n" + GOOD,
        where=f"{M}:5",
        says=("more than one YAML document",),
    ),
    Case("empty-file", "", where=f"{M}:1", says=("holds no YAML document",)),
    Case("only-comments", "# nothing\n# here\n", where=f"{M}:1"),
    Case("top-level-list", "- a\n- b\n", where=f"{M}:1", says=("not a mapping",)),
    Case("top-level-scalar", "just text\n", where=f"{M}:1"),
    Case("tab-indentation", HEAD + "devices:\n\t- registration_id: dev-1\n", where=f"{M}:4"),
    Case("unclosed-quote", HEAD + 'product: "abc\n' + ONE, where=f"{M}:"),
    Case("nul-byte-in-file", HEAD + "product: a\0b\n" + ONE, where=f"{M}:3", says=("'\\x00'",)),
    Case(
        "raw-escape-in-file", HEAD + "product: a\x1b[2Jb\n" + ONE, where=f"{M}:3", says=("'\\x1b'",)
    ),
    Case(
        "latin-1-manifest",
        (HEAD + ONE + "product: caf\xe9\n").encode("latin-1"),
        where=f"{M}:5",
        says=("byte 0xe9 is not UTF-8",),
    ),
    Case(
        "utf-16-manifest",
        GOOD.encode("utf-16"),
        where=f"{M}:1",
        says=("UTF-16",),
    ),
    Case("undefined-alias", manifest("product: *nowhere", ONE.rstrip()), where=f"{M}:3"),
    Case(
        "anchor-on-device-list",
        manifest("devices: &all", "  - registration_id: dev-1"),
        where=f"{M}:",
    ),
    Case(
        "merge-of-a-scalar",
        device("<<: 1, registration_id: dev-1"),
        where=f"{M}:4",
        says=("merges mappings",),
    ),
    Case(
        "manifest-is-a-directory",
        manifest="",
        setup=lambda d: ((d / M).unlink(), (d / M).mkdir()),
        where=M,
        says=("is a directory",),
    ),
    Case(
        "manifest-is-a-fifo",
        manifest="",
        setup=lambda d: ((d / M).unlink(), os.mkfifo(d / M)),
        where=M,
        says=("is not a regular file",),
    ),
    Case(
        "manifest-is-dev-zero",
        manifest="",
        setup=lambda d: ((d / M).unlink(), (d / M).symlink_to("/dev/zero")),
        where=M,
        says=("is not a regular file",),
    ),
    Case(
        "manifest-missing",
        manifest="",
        setup=lambda d: (d / M).unlink(),
        where=M,
        says=("does not exist",),
    ),
    # ------------------------------------------------------------------------ CSV
    Case(
        "csv-latin-1",
        CSV,
        files={
            "d.csv": "registration_id,tag.city\ndev-1,Berlin\ndev-2,K\xf6ln\n".encode("latin-1")
        },
        where="d.csv:3",
        says=("byte 0xf6 is not UTF-8",),
    ),
    Case(
        "csv-utf-16",
        CSV,
        files={"d.csv": "registration_id\ndev-1\n".encode("utf-16")},
        where="d.csv:1",
        says=("UTF-16",),
    ),
    Case(
        "csv-utf-16-no-bom",
        CSV,
        files={"d.csv": "registration_id\ndev-1\n".encode("utf-16-le")},
        where="d.csv:1",
        says=("no registration_id column",),
    ),
    Case(
        "csv-duplicate-columns",
        CSV,
        files={"d.csv": "registration_id,tag.line,tag.line\ndev-1,A,B\n"},
        where="d.csv:1",
        says=("column 'tag.line' appears more than once",),
    ),
    Case(
        "csv-is-etc-passwd",
        manifest("devices_csv: /etc/passwd"),
        where="/etc/passwd:1",
        says=("no registration_id column",),
        hidden=("root:x:0",),
    ),
    Case(
        "csv-is-the-pin-file",
        manifest("devices_csv: secret"),
        files={"secret": PIN_SECRET + "\n"},
        setup=_mode("secret", 0o600),
        where="secret:1",
        hidden=(PIN_SECRET,),
    ),
    Case("csv-a-directory", CSV, setup=_mkdir("d.csv"), where=f"{M}:3", says=("is a directory",)),
    Case(
        "csv-dev-zero",
        manifest("devices_csv: /dev/zero"),
        where=f"{M}:3",
        says=("is not a regular file",),
    ),
    Case("csv-fifo", CSV, setup=_fifo("d.csv"), where=f"{M}:3", says=("is not a regular file",)),
    Case("csv-empty", CSV, files={"d.csv": ""}, where="d.csv:1", says=("no header row",)),
    Case("csv-missing", CSV, where=f"{M}:3", says=("does not exist",)),
    Case("csv-devices-csv-empty-name", manifest('devices_csv: ""', ONE.rstrip()), where=f"{M}:3"),
    Case("csv-devices-csv-a-list", manifest("devices_csv: [a.csv]", ONE.rstrip()), where=f"{M}:3"),
    Case(
        "csv-manifest-is-a-directory",
        manifest_name="lot.csv",
        manifest="",
        setup=lambda d: ((d / "lot.csv").unlink(), (d / "lot.csv").mkdir()),
        where="lot.csv",
        says=("is a directory",),
    ),
    Case(
        "csv-cell-count",
        CSV,
        files={"d.csv": "registration_id,device_id\ndev-1\ndev-2,dev-2,extra\n"},
        where="d.csv:2",
        says=("1 cells for 2 columns",),
        lines=2,
    ),
    Case(
        "csv-newline-inside-quoted-id",
        CSV,
        files={"d.csv": 'registration_id\n"dev\n1"\n'},
        where="d.csv:3",
        says=("'dev\\n1'",),
        lines=2,
    ),
    Case(
        "csv-dot-in-tag-column",
        CSV,
        files={"d.csv": "registration_id,tag.a.b\ndev-1,x\n"},
        where="d.csv:1",
        says=("'.'",),
    ),
    Case(
        "csv-unknown-column",
        CSV,
        files={"d.csv": "registration_id,colour\ndev-1,blue\n"},
        where="d.csv:1",
        says=("unknown column 'colour'",),
    ),
    Case(
        "csv-header-only",
        CSV,
        files={"d.csv": "registration_id\n"},
        where=f"{M}:1",
        says=("no devices",),
    ),
    Case(
        "csv-empty-desired-name",
        CSV,
        files={"d.csv": "registration_id,desired.\ndev-1,x\n"},
        where="d.csv:1",
    ),
    Case(
        "csv-escape-in-id",
        CSV,
        files={"d.csv": "registration_id\ndev-\x1b[31m1\n"},
        where="d.csv:2",
        says=("dev-\\x1b[31m1",),
        lines=2,
    ),
    Case(
        "csv-duplicate-id",
        CSV,
        files={"d.csv": "registration_id\ndev-1\ndev-2\ndev-1\n"},
        where="d.csv:4",
        says=("duplicate registration_id, first at", "d.csv:2"),
    ),
    Case(
        "csv-id-also-in-yaml",
        manifest(ONE.rstrip(), "devices_csv: d.csv"),
        files={"d.csv": "registration_id\ndev-1\n"},
        where="d.csv:2",
        says=("duplicate registration_id, first at", f"{M}:4"),
    ),
    Case(
        "csv-tag-over-4-kb",
        CSV,
        files={"d.csv": "registration_id,tag.note\ndev-1," + "n" * 4100 + "\n"},
        where="d.csv:2",
        says=("tags.note is a string of 4,100 bytes",),
    ),
    Case(
        "csv-cr-line-endings",
        CSV,
        files={"d.csv": "registration_id\rdev-1\rdev-2\r"},
        where="d.csv:1",
        says=("not valid CSV",),
    ),
    Case(
        "csv-nul-in-cell",
        CSV,
        files={"d.csv": "registration_id\ndev-\x001\n"},
        where="d.csv:2",
        says=("dev-\\x001",),
        lines=2,
    ),
    # ------------------------------------------------------------------ station configs
    Case(
        "pin-inline-string",
        station=sub("pin: file:{pin}", f"pin: {PIN_SECRET}"),
        where=f"{S}:{L_PIN}",
        says=("not a secret source", "the value is not shown"),
        hidden=(PIN_SECRET,),
    ),
    Case(
        "pin-inline-number",
        station=sub("pin: file:{pin}", "pin: 4711123"),
        where=f"{S}:{L_PIN}",
        says=("'pin' must be str", "the value is not shown"),
        hidden=("4711123",),
    ),
    Case(
        "pin-inline-with-escape",
        station=sub("pin: file:{pin}", 'pin: "pin\\e[8m4711"'),
        where=f"{S}:{L_PIN}",
        hidden=("4711",),
    ),
    Case(
        "pin-file-world-readable",
        setup=_mode("pin", 0o644),
        where=f"{S}:{L_PIN}",
        says=("accessible to group or others (mode 0644); chmod 600 it",),
    ),
    Case(
        "pin-file-group-readable",
        setup=_mode("pin", 0o640),
        where=f"{S}:{L_PIN}",
        says=("(mode 0640)",),
    ),
    Case(
        "pin-file-missing",
        station=sub("pin: file:{pin}", "pin: file:no-such-pin"),
        where=f"{S}:{L_PIN}",
        says=("does not exist",),
    ),
    Case(
        "pin-file-a-directory",
        station=sub("pin: file:{pin}", "pin: file:pindir"),
        setup=_mkdir("pindir"),
        where=f"{S}:{L_PIN}",
        says=("is not a regular file",),
    ),
    Case(
        "pin-file-dev-zero",
        station=sub("pin: file:{pin}", "pin: file:/dev/zero"),
        where=f"{S}:{L_PIN}",
        says=("is not a regular file",),
    ),
    Case(
        "pin-env-empty-name",
        station=sub("pin: file:{pin}", "pin: 'env:'"),
        where=f"{S}:{L_PIN}",
        says=("not a secret source",),
    ),
    Case(
        "pin-value-in-key-uri",
        station=sub(";type=private\n  root_cert", ";type=private?pin-value=4711999\n  root_cert"),
        where=f"{S}:{L_ISSUER}",
        says=("pin-value is not accepted",),
        hidden=("4711999",),
    ),
    Case(
        "connection-string-inline",
        station=sub(
            "connection_string: env:PROVLINE_CORPUS_CS", f'connection_string: "{CONNECTION_STRING}"'
        ),
        where=f"{S}:24",
        hidden=("c2VjcmV0LWtleS1mb3ItdGhlLWNvcnB1cy0wMTIzNDU2Nzg5",),
    ),
    Case(
        "chain-a-directory",
        station=sub("chain: {chain}", "chain: chaindir"),
        setup=_mkdir("chaindir"),
        where=f"{S}:{L_CHAIN}",
        says=("is a directory",),
    ),
    Case(
        "chain-empty",
        station=sub("chain: {chain}", "chain: empty.pem"),
        files={"empty.pem": ""},
        where=f"{S}:{L_CHAIN}",
        says=("is empty",),
    ),
    Case(
        "chain-dev-zero",
        station=sub("chain: {chain}", "chain: /dev/zero"),
        where=f"{S}:{L_CHAIN}",
        says=("is not a regular file",),
    ),
    Case(
        "chain-fifo",
        station=sub("chain: {chain}", "chain: chain.fifo"),
        setup=_fifo("chain.fifo"),
        where=f"{S}:{L_CHAIN}",
        says=("is not a regular file",),
    ),
    Case(
        "chain-missing",
        station=sub("chain: {chain}", "chain: nowhere.pem"),
        where=f"{S}:{L_CHAIN}",
        says=("does not exist",),
    ),
    Case(
        "chain-garbage",
        station=sub("chain: {chain}", "chain: bad.pem"),
        files={"bad.pem": TLS_FILE},
        where=f"{S}:{L_CHAIN}",
        says=("holds no readable PEM certificate",),
    ),
    Case(
        "chain-binary",
        station=sub("chain: {chain}", "chain: bin.pem"),
        files={"bin.pem": bytes(range(256)) * 4},
        where=f"{S}:{L_CHAIN}",
    ),
    Case(
        "chain-over-1-mib",
        station=sub("chain: {chain}", "chain: big.pem"),
        setup=_sparse("big.pem", 2 * 1024 * 1024),
        where=f"{S}:{L_CHAIN}",
        says=("a certificate file is at most 1 MiB",),
    ),
    Case(
        "root-cert-a-directory",
        station=sub("root_cert: {root}", "root_cert: rootdir"),
        setup=_mkdir("rootdir"),
        where=f"{S}:{L_ROOT}",
    ),
    Case(
        "chain-path-nul",
        station=sub("chain: {chain}", 'chain: "chain\\0.pem"'),
        where=f"{S}:{L_CHAIN}",
        says=("control character",),
    ),
    Case(
        "chain-path-newline",
        station=sub("chain: {chain}", 'chain: "chain.pem\\n"'),
        where=f"{S}:{L_CHAIN}",
        says=("'chain.pem\\n'",),
    ),
    Case(
        "chain-path-empty",
        station=sub("chain: {chain}", 'chain: ""'),
        where=f"{S}:{L_CHAIN}",
        says=("is empty",),
    ),
    Case(
        "output-is-a-file",
        station=sub("output: {output}", "output: outfile"),
        files={"outfile": "not a directory\n"},
        where=f"{S}:{L_OUTPUT}",
        says=("is not a directory",),
    ),
    Case(
        "output-under-a-file",
        station=sub("output: {output}", "output: outfile/batches"),
        files={"outfile": "not a directory\n"},
        where=f"{S}:{L_OUTPUT}",
        says=("is not a directory",),
    ),
    Case(
        "output-symlink-into-a-file",
        station=sub("output: {output}", "output: outlink"),
        files={"outfile": "not a directory\n"},
        setup=_symlink("outlink", "outfile/batches"),
        where=f"{S}:{L_OUTPUT}",
        says=("is not a directory",),
    ),
    Case(
        "output-name-too-long",
        station=sub("output: {output}", f"output: {'o' * 300}"),
        where=f"{S}:{L_OUTPUT}",
        says=("longer than 255 bytes",),
    ),
    Case(
        "batch-dir-is-a-file",
        setup=lambda d: ((d / "out").mkdir(), (d / "out" / "corpus").write_text("x\n")),
        where=f"{S}:{L_OUTPUT}",
        says=("exists and is not a directory",),
    ),
    Case(
        "batch-dir-not-empty-no-journal",
        setup=_batch_dir_with("notes.txt"),
        where=f"{S}:{L_OUTPUT}",
        says=("exists, is not empty and has no journal",),
    ),
    Case(
        "station-unknown-key", station=sub("workers: 1", "workers: 1\ncolour: red"), where=f"{S}:19"
    ),
    Case(
        "station-list-as-key", station=sub("workers: 1", "workers: 1\n? [a]\n: 1"), where=f"{S}:19"
    ),
    Case(
        "station-alias-bomb",
        station=sub("station: corpus", "\n".join(bomb(9).splitlines()[2:11]) + "\nstation: corpus"),
        where=f"{S}:",
        says=("aliases stand for more than",),
    ),
    Case(
        "station-deep-nesting",
        station=sub(
            "workers: 1", "workers: 1\n" + nested_block(40)[len(GOOD) :].replace("k0", "x")
        ),
        where=f"{S}:",
        says=("nested deeper than 24",),
    ),
    Case(
        "station-is-a-directory",
        station=lambda text: "",
        setup=lambda d: ((d / S).unlink(), (d / S).mkdir()),
        where=S,
        says=("is a directory",),
    ),
    Case(
        "station-is-dev-zero",
        setup=lambda d: ((d / S).unlink(), (d / S).symlink_to("/dev/zero")),
        where=S,
        says=("is not a regular file",),
    ),
    Case(
        "station-over-256-kib",
        station=lambda text: text + "#" * (300 * 1024) + "\n",
        where=S,
        says=("a station config is at most 256 KiB",),
    ),
    Case(
        "station-latin-1",
        station=sub("station: corpus", "station: caf\xe9"),
        station_encoding="latin-1",
        where=f"{S}:1",
        says=("byte 0xe9 is not UTF-8",),
    ),
    Case(
        "station-empty", station=lambda text: "", where=f"{S}:1", says=("holds no YAML document",)
    ),
    Case("workers-zero", station=sub("workers: 1", "workers: 0"), where=f"{S}:{L_WORKERS}"),
    Case("workers-a-string", station=sub("workers: 1", "workers: two"), where=f"{S}:{L_WORKERS}"),
    Case(
        "chunk-size-huge",
        station=sub("workers: 1", "workers: 1\nchunk_size: 10000000000"),
        where=f"{S}:19",
    ),
    Case(
        "operations-per-minute-zero",
        station=sub("id_scope:", "operations_per_minute: 0\n  id_scope:"),
        where=f"{S}:23",
        says=("dps.operations_per_minute 0 is outside",),
    ),
    Case(
        "concurrency-negative",
        station=sub("id_scope:", "concurrency: -1\n  id_scope:"),
        where=f"{S}:23",
    ),
    Case(
        "bulk-size-eleven", station=sub("id_scope:", "bulk_size: 11\n  id_scope:"), where=f"{S}:23"
    ),
    Case(
        "tls-ca-file-a-directory",
        station=sub("id_scope:", "tls_ca_file: tlsdir\n  id_scope:"),
        setup=_mkdir("tlsdir"),
        where=f"{S}:23",
        says=("is a directory",),
    ),
    Case(
        "tls-ca-file-garbage",
        station=sub("id_scope:", "tls_ca_file: tls.pem\n  id_scope:"),
        files={"tls.pem": TLS_FILE},
        where=f"{S}:23",
        says=("holds no readable PEM certificate",),
    ),
    Case(
        "emulator-json-a-directory",
        station=sub("id_scope:", "emulator_dir: emu\n  id_scope:"),
        setup=lambda d: (d / "emu" / "emulator.json").mkdir(parents=True),
        where=f"{S}:23",
        says=("is a directory",),
    ),
    Case(
        "emulator-json-garbage",
        station=lambda text: text.replace(
            "  service_endpoint: https://127.0.0.1:{port}\n", "  emulator_dir: emu\n"
        ).replace("  connection_string: env:PROVLINE_CORPUS_CS\n", ""),
        files={"emu/emulator.json": "[1, 2, 3]"},
        where=f"{S}:{L_DPS}",
        says=("cannot read the registration settings",),
    ),
    Case(
        "connection-string-key-not-base64",
        station=sub("env:PROVLINE_CORPUS_CS", "file:cs"),
        files={"cs": "HostName=h;SharedAccessKeyName=n;SharedAccessKey=not base64!!\n"},
        setup=_mode("cs", 0o600),
        where=f"{S}:24",
        says=("SharedAccessKey is not base64",),
        hidden=("not base64!!",),
    ),
    Case(
        "profile-not-allowed-by-station",
        manifest("key_profile: rsa-2048", ONE.rstrip()),
        where=f"{M}:3",
        says=("is not allowed by station", f"{S}:{L_PROFILES}"),
    ),
    Case(
        "validity-beyond-the-issuer",
        manifest("validity_days: 36500", ONE.rstrip()),
        where=f"{M}:3",
        says=("after the issuer's notAfter", f"{S}:{L_CHAIN}"),
    ),
    Case("custody-unknown", station=sub("policy: wrapped", "policy: lenient"), where=f"{S}:12"),
    Case(
        "wrapped-without-transport-key",
        station=sub("  transport_key: pkcs11:token={token};object=transport;type=secret-key\n", ""),
        where=f"{S}:{L_CUSTODY + 1}",  # a block mapping starts at its first key
        says=("missing key 'transport_key'",),
    ),
    Case(
        "audit-cert-a-directory",
        station=sub("cert: {audit}", "cert: auditdir"),
        setup=_mkdir("auditdir"),
        where=f"{S}:{L_AUDIT_CERT}",
        says=("is a directory",),
    ),
    Case(
        "audit-cert-garbage",
        station=sub("cert: {audit}", "cert: audit.pem"),
        files={"audit.pem": "hello\n"},
        where=f"{S}:{L_AUDIT_CERT}",
    ),
    Case(
        "station-name-escape",
        station=sub("station: corpus", 'station: "line\\e[1Aup"'),
        where=f"{S}:1",
        says=("\\x1b[1Aup",),
    ),
    Case("token-empty", station=sub("token: {token}", 'token: ""'), where=f"{S}:{L_TOKEN}"),
    Case(
        "issuer-key-not-a-uri",
        station=sub("issuer_key: pkcs11:", "issuer_key: x-pkcs11:"),
        where=f"{S}:{L_ISSUER}",
    ),
    # ------------------------------------------------- refused by the HSM, not by validate
    Case(
        "token-not-found",
        LOCAL,
        station=sub("token: {token}", "token: no-such-token"),
        stage="hsm",
        code=31,
        where=f"{S}:{L_HSM}",
        says=("no token labelled 'no-such-token'",),
    ),
    Case(
        "wrong-pin",
        LOCAL,
        station=sub("pin: file:{pin}", "pin: file:wrong-pin"),
        files={"wrong-pin": "not-the-pin\n"},
        setup=_mode("wrong-pin", 0o600),
        stage="hsm",
        code=32,
        where=f"{S}:{L_HSM}",
        says=("wrong PIN",),
        hidden=("not-the-pin",),
    ),
    Case(
        "module-missing",
        LOCAL,
        station=sub("module: {module}", "module: /nonexistent/libpkcs11.so"),
        stage="hsm",
        code=30,
        where=f"{S}:{L_HSM}",
    ),
    Case(
        "issuer-key-not-in-token",
        LOCAL,
        station=sub("object=intermediate", "object=no-such-key"),
        stage="hsm",
        code=33,
        where=f"{S}:{L_ISSUER}",
    ),
    Case(
        "transport-key-not-in-token",
        LOCAL,
        station=sub("object=transport;", "object=no-such-transport;"),
        stage="hsm",
        code=33,
        where=f"{S}:13",
        says=("no secret_key object labelled 'no-such-transport'",),
    ),
    # ------------------------------------------- accepted: validate, plan and run agree
    Case(
        "ok-aliases-for-shared-tags",
        manifest(
            "registration: none",
            "devices:",
            "  - {registration_id: dev-1, tags: &common {line: A, shift: 2}}",
            "  - {registration_id: dev-2, tags: *common}",
            "  - {registration_id: dev-3, tags: *common, desired: {interval: 30}}",
            head="batch_id: corpus\n",
        ),
        code=0,
        devices=3,
    ),
    Case(
        "ok-merge-keys",
        manifest(
            "devices:",
            "  - &base {registration_id: dev-1, tags: {line: A}}",
            "  - {<<: *base, registration_id: dev-2}",
            head="batch_id: corpus\n",
        ),
        code=0,
        devices=2,
    ),
    Case(
        "ok-quoted-date-and-unicode",
        manifest(
            "product: Zürich sensor",
            "devices:",
            "  - {registration_id: dev-1, tags: {made: '2024-01-01', city: Zürich, emoji: '🙂'}}",
            head="batch_id: corpus\n",
        ),
        code=0,
        devices=1,
    ),
    Case(
        "ok-limits-exactly",
        manifest(
            "devices:",
            f"  - registration_id: {'d' * 64}",
            f"    device_id: {'D' * 128}",
            "    tags: {a: {b: {c: {d: {e: {f: {g: {h: {i: {j: 1}}}}}}}}}}",
            "    desired: {max: 4503599627370495, min: -4503599627370496, flag: true, none: null}",
            head="batch_id: " + "b" * 64 + "\n",
        ),
        code=0,
        devices=1,
    ),
    Case(
        "ok-csv-bom-crlf-quotes",
        manifest("devices_csv: d.csv", head="batch_id: corpus\n"),
        files={
            "d.csv": b"\xef\xbb\xbfregistration_id,tag.note,desired.rate\r\n"
            b'dev-1,"a, b",10\r\n"dev-2",,\r\n\r\n'
        },
        code=0,
        devices=2,
    ),
    Case(
        "ok-csv-manifest-with-batch-id",
        manifest_name="lot.csv",
        manifest="registration_id,device_id\ndev-1,\ndev-2,Dev-Two\n",
        args=("--batch-id", "corpus"),
        code=0,
        devices=2,
    ),
    Case(
        "ok-adjacent-generators-and-devices",
        manifest(
            "generator:",
            "  - {prefix: n-, digits: 3, start: 1, count: 3}",
            "  - {prefix: n-00, digits: 1, start: 4, count: 3}",
            "devices:",
            "  - registration_id: n-007",
            "  - registration_id: n-0001",
            head="batch_id: corpus\n",
        ),
        code=0,
        devices=8,
    ),
    Case(
        "ok-1000-generators",
        manifest(
            "generator:",
            *(f"  - {{prefix: g{i}-, digits: 1, count: 1}}" for i in range(1000)),
            head="batch_id: corpus\n",
        ),
        code=0,
        devices=1000,
        run=False,
    ),
    Case(
        "ok-pin-file-read-only",
        manifest(ONE.rstrip(), head="batch_id: corpus\n"),
        setup=_mode("pin", 0o400),
        code=0,
        devices=1,
    ),
    Case(
        "ok-comments-and-document-marker",
        "# a lot for line A\n---\nbatch_id: corpus  # the lot\n" + ONE + "...\n",
        code=0,
        devices=1,
    ),
    # -- device custody: CSR files (bounded reads, like every input file; docs/device-keys.md)
    Case(
        "csr-is-a-directory",
        CSR_ONE,
        station=DEVICE,
        setup=_mkdir("c.csr"),
        where=f"{M}:4",
        says=("dev-1: CSR ", "/c.csr is a directory"),
    ),
    Case(
        "csr-dev-zero",
        manifest("devices:", "  - {registration_id: dev-1, csr: /dev/zero}"),
        station=DEVICE,
        where=f"{M}:4",
        says=("CSR /dev/zero is not a regular file",),
    ),
    Case(
        "csr-fifo",
        CSR_ONE,
        station=DEVICE,
        setup=_fifo("c.csr"),
        where=f"{M}:4",
        says=("is not a regular file",),
    ),
    Case(
        "csr-over-16-kib",
        CSR_ONE,
        station=DEVICE,
        setup=_sparse("c.csr", 17 * 1024),
        where=f"{M}:4",
        says=("is 17,408 bytes", "a CSR is at most 16 KiB"),
    ),
    Case(
        "csr-missing-file",
        CSR_ONE,
        station=DEVICE,
        where=f"{M}:4",
        says=("dev-1: CSR ", "/c.csr does not exist"),
    ),
    Case(
        "csr-symlink-to-dev-zero",
        CSR_ONE,
        station=DEVICE,
        setup=_symlink("c.csr", "/dev/zero"),
        where=f"{M}:4",
        says=("is not a regular file",),
    ),
    Case(
        "csr-garbage-with-terminal-escapes",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": b"\x1b]0;owned\x07\x1b[2J junk \xff\xfe"},
        where=f"{M}:4",
        says=("not PEM and not DER",),
        hidden=("owned",),
    ),
    Case(
        "csr-is-a-certificate",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": _self_signed()},
        where=f"{M}:4",
        says=("a certificate, not a certificate signing request",),
    ),
    Case(
        "csr-is-a-private-key",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": _PRIVATE_KEY_PEM},
        where=f"{M}:4",
        says=("a private key",),
        hidden=(_PRIVATE_KEY_PEM.decode().splitlines()[1][:24],),
    ),
    Case(
        "csr-wrong-cn",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": _csr("dev-2")},
        where=f"{M}:4",
        says=("subject CN 'dev-2' is not the registration ID dev-1",),
    ),
    Case(
        "csr-cn-with-terminal-escape",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": _csr("dev-1\x1b[2J")},
        where=f"{M}:4",
        says=("\\x1b[2J",),
    ),
    Case(
        "csr-rsa-1024",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": _csr("dev-1", _key("rsa1024"))},
        where=f"{M}:4",
        says=("RSA-1024", "under 2048 bits"),
    ),
    Case(
        "csr-broken-signature",
        CSR_ONE,
        station=DEVICE,
        files={"c.csr": _broken_signature()},
        where=f"{M}:4",
        says=("signature does not verify",),
    ),
    Case(
        "csr-same-key-twice",
        manifest(
            "devices:",
            "  - {registration_id: dev-1, csr: a.csr}",
            "  - {registration_id: dev-2, csr: b.csr}",
        ),
        station=DEVICE,
        files={"a.csr": _csr("dev-1", _SHARED_KEY), "b.csr": _csr(None, _SHARED_KEY)},
        where=f"{M}:5",
        says=(
            "dev-2: CSR ",
            "/b.csr: its key is also the key of dev-1",
        ),
    ),
    Case(
        "csr-dir-without-the-device",
        manifest("csr_dir: csrs", ONE.rstrip()),
        station=DEVICE,
        setup=_mkdir("csrs"),
        where=f"{M}:5",
        says=("dev-1: no CSR in ", "/csrs (looked for dev-1.csr, dev-1.pem, dev-1.der)"),
    ),
    Case(
        "csr-dir-two-suffixes",
        manifest("csr_dir: csrs", ONE.rstrip()),
        station=DEVICE,
        files={"csrs/dev-1.csr": _csr("dev-1"), "csrs/dev-1.der": _csr("dev-1")},
        where=f"{M}:5",
        says=("2 CSRs in ", "dev-1.csr, dev-1.der"),
    ),
    Case(
        "csr-dir-is-a-file",
        manifest("csr_dir: f", ONE.rstrip()),
        station=DEVICE,
        files={"f": "x"},
        where=f"{M}:3",
        says=("csr_dir ", "/f is not a directory"),
    ),
    Case(
        "csr-empty-name",
        manifest("devices:", "  - {registration_id: dev-1, csr: ''}"),
        station=DEVICE,
        where=f"{M}:4",
        says=("csr is empty",),
    ),
    Case(
        "csr-name-with-control-character",
        manifest("devices:", '  - {registration_id: dev-1, csr: "c\\x1b[8m.csr"}'),
        station=DEVICE,
        where=f"{M}:4",
        says=("control character",),
    ),
    Case(
        "csr-csv-column-missing-file",
        CSV,
        station=DEVICE,
        files={"d.csv": "registration_id,csr\ndev-1,nowhere.csr\n"},
        where="d.csv:2",
        says=("dev-1: CSR ", "/nowhere.csr does not exist"),
    ),
    Case(
        "csrs-with-wrapped-custody",
        manifest("csr_dir: csrs", ONE.rstrip()),
        files={"csrs/dev-1.csr": _csr("dev-1")},
        where=f"{M}:3",
        says=("custody is wrapped (CSRs are for custody device)",),
    ),
    Case(
        "device-custody-without-csrs",
        station=DEVICE,
        where=M,
        says=("needs a CSR per device",),
    ),
    Case(
        "ok-device-csrs-dir-yaml-and-csv-column",
        manifest(
            "csr_dir: csrs",
            "devices_csv: d.csv",
            "devices:",
            "  - {registration_id: dev-1}",
            "  - {registration_id: dev-2, csr: own.der}",
            head="batch_id: corpus\n",
        ),
        station=DEVICE,
        files={
            "csrs/dev-1.pem": _csr("dev-1"),
            "own.der": x509.load_pem_x509_csr(_csr(None)).public_bytes(serialization.Encoding.DER),
            "d.csv": "registration_id,csr\ndev-3,sub/dev-3.csr\ndev-4,\n",
            "sub/dev-3.csr": _csr("dev-3"),
            "csrs/dev-4.csr": _csr(None),
        },
        code=0,
        devices=4,
    ),
]

REFUSED = [c for c in CASES if not c.accepted]
ACCEPTED = [c for c in CASES if c.accepted]


# ------------------------------------------------------------------------------ harness
@dataclass(frozen=True)
class Setting:
    """What the station template's placeholders stand for in one test layer."""

    module: str
    token: str
    conf: str
    chain: Path
    root: Path
    audit: Path
    pin_text: str
    port: int


def materialize(case: Case, case_dir: Path, setting: Setting) -> tuple[Path, Path]:
    """Write the case's station, manifest and files into ``case_dir``; return the station
    and manifest paths."""
    case_dir.mkdir(parents=True)
    pin = case_dir / "pin"
    pin.write_text(setting.pin_text)
    pin.chmod(0o600)
    template = case.station(STATION) if case.station else STATION
    text = template.format(
        module=setting.module,
        token=setting.token,
        pin=pin,
        conf=setting.conf,
        chain=setting.chain,
        root=setting.root,
        audit=setting.audit,
        output=case_dir / "out",
        port=setting.port,
    )
    station = case_dir / S
    station.write_bytes(text.encode(case.station_encoding))
    manifest_path = case_dir / case.manifest_name
    content = case.manifest
    manifest_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for name, data in case.files.items():
        path = case_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    if case.setup:
        case.setup(case_dir)
    return station, manifest_path


def batch_id_argument(case: Case) -> str | None:
    return case.args[1] if case.args[:1] == ("--batch-id",) else None


def check_problems(case: Case, case_dir: Path, stderr: str, stdout: str = "") -> None:
    """What provline printed for a refused case: one ``error:`` line per problem, each
    printable (escaped), the expected count, the file and line, the expected words, and
    nothing that must stay hidden."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert lines, "no problem was printed"
    for line in lines:
        assert line.startswith("error: "), lines
        assert line.isprintable(), line
    if case.lines is not None:
        assert len(lines) == case.lines, "\n".join(lines)
    if case.where:
        expected = case.where if case.where.startswith(("/", "--")) else f"{case_dir}/{case.where}"
        assert any(expected in line for line in lines), (expected, lines)
    for fragment in case.says:
        assert any(fragment in line for line in lines), (fragment, lines)
    for secret in case.hidden:
        assert secret not in stderr and secret not in stdout, secret


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` with its type, size and modification time (not followed
    through symlinks): two equal snapshots mean nothing was created, removed or written."""
    entries: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries
