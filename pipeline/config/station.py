"""Station configuration (``stations/*.yaml``): which HSM, which CA, which custody, where to
write, how to reach DPS. Relative paths are relative to the station file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, ProvlineError, ValidationFailed, shown
from ..hsm.token import DEFAULT_MODULE
from ..hsm.transport import DEFAULT_OAEP_HASH, OAEP_HASHES
from ..hsm.uri import Pkcs11Uri
from ..inputfile import KIB
from ..keyprofile import PROFILE_NAMES, KeyProfile
from ..secret import SecretRef
from ..vocabulary import Custody, ExportFormat
from .yamlfile import Checker, Mapping, TooManyProblems, load, sorted_by_line


@dataclass(frozen=True)
class HsmConfig:
    module: str
    token: str
    pin: SecretRef
    softhsm2_conf: str | None = None
    max_objects: int | None = None  # objects the token holds, when it cannot say (retain)


@dataclass(frozen=True)
class CAConfig:
    chain: Path  # issuing CA first, root last
    issuer_key: Pkcs11Uri
    root_cert: Path


@dataclass(frozen=True)
class CustodyConfig:
    policy: Custody
    transport_key: Pkcs11Uri | None = None
    pkcs8_passphrase: SecretRef | None = None
    pkcs12: bool = False


@dataclass(frozen=True)
class AuditConfig:
    key: Pkcs11Uri
    cert: Path
    require_operator: bool = False  # every run must name its operator (--operator)


# Registration pacing defaults. DPS allows 1,000 operations a minute per service and at most
# 10 enrollments per bulk call (Microsoft Learn, "Azure IoT Hub Device Provisioning Service
# quotas and limits"; the bulk operation in the DPS service REST API).
DEFAULT_OPERATIONS_PER_MINUTE = 1000
DEFAULT_CONCURRENCY = 8
MAX_BULK_SIZE = 10
MAX_OPERATIONS_PER_MINUTE = 1_000_000
MAX_CONCURRENCY = 256

MAX_STATION_BYTES = 256 * KIB  # a hand-edited file of a few dozen lines


@dataclass(frozen=True)
class DpsConfig:
    emulator_dir: Path | None = None
    service_endpoint: str | None = None
    device_endpoint: str | None = None
    id_scope: str | None = None
    connection_string: SecretRef | None = None
    hub_connection_string: SecretRef | None = None
    tls_ca_file: Path | None = None
    operations_per_minute: int = DEFAULT_OPERATIONS_PER_MINUTE
    concurrency: int = DEFAULT_CONCURRENCY
    bulk_size: int = MAX_BULK_SIZE


@dataclass(frozen=True)
class LifecycleConfig:
    """Where the station's lifecycle state lives (docs/lifecycle.md); None: the defaults
    under ``output`` (README "Output contract")."""

    dir: Path | None = None  # lifecycle log, CRLs, renewals
    inventory: Path | None = None  # the station inventory (SQLite)
    crl_days: int = 7  # nextUpdate of the CRLs, days after thisUpdate


@dataclass(frozen=True)
class DeliveryConfig:
    """Key delivery (docs/key-delivery.md): the flasher formats `provline run` and
    `provline export` make, and the RSA-OAEP hash of the transport-key handover."""

    exports: tuple[ExportFormat, ...] = ()
    oaep_hash: str = DEFAULT_OAEP_HASH


@dataclass(frozen=True)
class Station:
    path: Path
    name: str
    hsm: HsmConfig
    ca: CAConfig
    custody: CustodyConfig
    audit: AuditConfig | None
    output: Path
    key_profiles: tuple[KeyProfile, ...]
    workers: int = 2
    chunk_size: int = 256
    dps: DpsConfig = field(default_factory=DpsConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    lines: dict[str, int] = field(default_factory=dict, compare=False)  # "ca.chain" -> line

    def where(self, key: str) -> str:
        """``file:line`` of a setting (``hsm.pin``), or of its section when it was defaulted."""
        line = self.lines.get(key) or self.lines.get(key.split(".", 1)[0]) or 1
        return f"{self.path}:{line}"

    @contextmanager
    def located(self, key: str) -> Iterator[None]:
        """Errors raised inside (an HSM that refuses the PIN, a key that is not there) name
        this station file and the line of ``key``."""
        try:
            yield
        except ProvlineError as exc:
            exc.where = f"{self.where(key)}: {exc.where}" if exc.where else self.where(key)
            raise


def default_chunk_size(policy: Custody) -> int:
    """Devices per chunk (one filesystem sync and two journal commits each). Token keygen
    runs at tens of keys/s per worker, so retain chunks are small to keep workers balanced
    at the end of a batch; the CPU-bound custodies take large ones to amortise the syncs."""
    return 32 if policy is Custody.RETAIN else 256


_TOP = {
    "station",
    "hsm",
    "ca",
    "custody",
    "audit",
    "output",
    "key_profiles",
    "workers",
    "chunk_size",
    "dps",
    "lifecycle",
    "delivery",
}
_DPS = {
    "emulator_dir",
    "service_endpoint",
    "device_endpoint",
    "id_scope",
    "connection_string",
    "hub_connection_string",
    "tls_ca_file",
    "operations_per_minute",
    "concurrency",
    "bulk_size",
}


class _Reader:
    """Reads one station file: typed values, paths relative to the file, URIs and secret
    sources, every problem collected with its line."""

    def __init__(self, path: Path, check: Checker) -> None:
        self.check = check
        self.base = path.resolve().parent

    def path(self, section: Mapping, key: str) -> Path | None:
        value: str | None = self.check.typed(section, key, str, None)
        if value is None:
            return None
        if not value.strip():
            self.check.add(section.line_of(key), f"{key!r} is empty", "paths name a file")
            return None
        try:
            return (self.base / value).resolve()
        except (OSError, RuntimeError) as exc:
            self.check.add(section.line_of(key), f"{key!r} cannot be resolved: {exc}", "paths")
            return None

    def uri(self, section: Mapping, key: str, required: bool) -> Pkcs11Uri | None:
        text = self.check.typed(section, key, str, None)
        if text is None:
            if required:
                self.check.add(section.line, f"missing key {key!r}", "schema")
            return None
        try:
            return Pkcs11Uri.parse(text)
        except InputError as exc:
            self.check.add(section.line_of(key), exc.what, exc.rule)
            return None

    def secret(self, section: Mapping, key: str) -> SecretRef | None:
        text = self.check.typed(section, key, str, None, secret=True)
        if text is None:
            return None
        try:
            return SecretRef.parse(text, base=self.base)
        except InputError as exc:
            self.check.add(section.line_of(key), exc.what, exc.rule)
            return None

    def hsm(self, doc: Mapping) -> HsmConfig:
        section = self.check.section(doc, "hsm", required=True)
        self.check.keys(
            section,
            {"module", "token", "pin", "softhsm2_conf", "max_objects"},
            {"token", "pin"},
            "hsm.",
        )
        conf = self.path(section, "softhsm2_conf")
        if section.get("token") == "":
            self.check.add(section.line_of("token"), "hsm.token is empty", "a token label")
        return HsmConfig(
            module=self.check.typed(section, "module", str, DEFAULT_MODULE),
            token=self.check.typed(section, "token", str, ""),
            pin=self.secret(section, "pin") or SecretRef("env", "PROVLINE_PIN"),
            softhsm2_conf=str(conf) if conf else None,
            max_objects=self.max_objects(section),
        )

    def max_objects(self, section: Mapping) -> int | None:
        """hsm.max_objects: how many objects the token holds, for tokens that cannot say
        (YubiHSM 2: 256); retain custody refuses a batch that would not fit."""
        value: int | None = self.check.typed(section, "max_objects", int, None)
        if value is not None and value < 1:
            self.check.add(section.line_of("max_objects"), "hsm.max_objects must be >= 1", "schema")
        return value

    def ca(self, doc: Mapping) -> CAConfig:
        section = self.check.section(doc, "ca", required=True)
        self.check.keys(
            section, {"chain", "issuer_key", "root_cert"}, {"chain", "root_cert"}, "ca."
        )
        return CAConfig(
            chain=self.path(section, "chain") or Path(),
            issuer_key=self.uri(section, "issuer_key", True) or Pkcs11Uri(),
            root_cert=self.path(section, "root_cert") or Path(),
        )

    def custody(self, doc: Mapping) -> CustodyConfig:
        check = self.check
        section = check.section(doc, "custody", required=True)
        check.keys(
            section,
            {"policy", "transport_key", "pkcs8_passphrase", "pkcs12"},
            {"policy"},
            "custody.",
        )
        policy_text = check.typed(section, "policy", str, Custody.WRAPPED.value)
        try:
            policy = Custody(policy_text)
        except ValueError:
            check.add(
                section.line_of("policy"),
                f"custody.policy {policy_text!r} is not one "
                f"of {', '.join(c.value for c in Custody)}",
                "custody policies",
            )
            policy = Custody.WRAPPED
        custody = CustodyConfig(
            policy=policy,
            transport_key=self.uri(section, "transport_key", policy is Custody.WRAPPED),
            pkcs8_passphrase=self.secret(section, "pkcs8_passphrase"),
            pkcs12=check.typed(section, "pkcs12", bool, False),
        )
        if policy is Custody.PKCS8 and custody.pkcs8_passphrase is None:
            check.add(
                section.line,
                "pkcs8 custody needs custody.pkcs8_passphrase",
                "secrets come from env vars or files",
            )
        return custody

    def audit(self, doc: Mapping) -> AuditConfig | None:
        if "audit" not in doc:
            return None
        section = self.check.section(doc, "audit")
        self.check.keys(section, {"key", "cert", "require_operator"}, {"key", "cert"}, "audit.")
        key = self.uri(section, "key", False)
        cert = self.path(section, "cert")
        required = self.check.typed(section, "require_operator", bool, False)
        return AuditConfig(key=key, cert=cert, require_operator=required) if key and cert else None

    def key_profiles(self, doc: Mapping) -> tuple[KeyProfile, ...]:
        profiles: list[KeyProfile] = []
        for text in self.check.typed(doc, "key_profiles", list, list(PROFILE_NAMES)):
            try:
                profiles.append(KeyProfile(text))
            except ValueError:
                self.check.add(
                    doc.line_of("key_profiles"),
                    f"unknown key profile {shown(text)}",
                    f"one of {', '.join(PROFILE_NAMES)}",
                )
        return tuple(profiles)

    def bounded(
        self, doc: Mapping, key: str, default: int, low: int, high: int, where: str = ""
    ) -> int:
        value: int = self.check.typed(doc, key, int, default)
        if not low <= value <= high:
            self.check.add(
                doc.line_of(key), f"{where}{key} {shown(value)} is outside {low}..{high}", "schema"
            )
            return default
        return value

    def dps(self, doc: Mapping) -> DpsConfig:
        check = self.check
        section = check.section(doc, "dps")
        check.keys(section, _DPS, set(), "dps.")
        dps = DpsConfig(
            emulator_dir=self.path(section, "emulator_dir"),
            service_endpoint=check.typed(section, "service_endpoint", str, None),
            device_endpoint=check.typed(section, "device_endpoint", str, None),
            id_scope=check.typed(section, "id_scope", str, None),
            connection_string=self.secret(section, "connection_string"),
            hub_connection_string=self.secret(section, "hub_connection_string"),
            tls_ca_file=self.path(section, "tls_ca_file"),
            operations_per_minute=self.bounded(
                section,
                "operations_per_minute",
                DEFAULT_OPERATIONS_PER_MINUTE,
                1,
                MAX_OPERATIONS_PER_MINUTE,
                "dps.",
            ),
            concurrency=self.bounded(
                section, "concurrency", DEFAULT_CONCURRENCY, 1, MAX_CONCURRENCY, "dps."
            ),
            bulk_size=check.typed(section, "bulk_size", int, MAX_BULK_SIZE),
        )
        if not 1 <= dps.bulk_size <= MAX_BULK_SIZE:
            check.add(
                section.line_of("bulk_size"),
                f"dps.bulk_size {shown(dps.bulk_size)} is outside 1..{MAX_BULK_SIZE}",
                f"DPS bulk operations take at most {MAX_BULK_SIZE} items",
            )
        return dps

    def lifecycle(self, doc: Mapping) -> LifecycleConfig:
        section = self.check.section(doc, "lifecycle")
        self.check.keys(section, {"dir", "inventory", "crl_days"}, set(), "lifecycle.")
        return LifecycleConfig(
            dir=self.path(section, "dir"),
            inventory=self.path(section, "inventory"),
            crl_days=self.bounded(section, "crl_days", 7, 1, 366),
        )

    def delivery(self, doc: Mapping) -> DeliveryConfig:
        """delivery.exports (flasher formats) and delivery.oaep_hash (transport-key handover)."""
        check = self.check
        section = check.section(doc, "delivery")
        check.keys(section, {"exports", "oaep_hash"}, set(), "delivery.")
        formats: list[ExportFormat] = []
        for text in check.typed(section, "exports", list, []):
            try:
                formats.append(ExportFormat(text))
            except ValueError:
                check.add(
                    section.line_of("exports"),
                    f"unknown export format {text!r}",
                    f"one of {', '.join(f.value for f in ExportFormat)}",
                )
        oaep_hash = check.typed(section, "oaep_hash", str, DEFAULT_OAEP_HASH)
        if oaep_hash not in OAEP_HASHES:
            check.add(
                section.line_of("oaep_hash"),
                f"delivery.oaep_hash {oaep_hash!r} is not one of {', '.join(OAEP_HASHES)}",
                "RSA-OAEP hashes",
            )
        return DeliveryConfig(tuple(formats), oaep_hash)


def load_station(path: Path) -> Station:
    """Load and check a station config; every problem is reported at once."""
    try:
        return _load_station(path)
    except TooManyProblems as full:
        raise ValidationFailed(sorted_by_line(full.problems), stopped=True) from None


def _load_station(path: Path) -> Station:
    doc, problems = load(path, limit=MAX_STATION_BYTES, what="station config")
    check = Checker(path)
    check.extend(problems)
    read = _Reader(path, check)
    check.keys(doc, _TOP, {"station", "hsm", "ca", "custody", "output"}, "")
    custody = read.custody(doc)
    station = Station(
        path=path,
        name=check.typed(doc, "station", str, ""),
        hsm=read.hsm(doc),
        ca=read.ca(doc),
        custody=custody,
        audit=read.audit(doc),
        output=read.path(doc, "output") or Path(),
        key_profiles=read.key_profiles(doc),
        workers=read.bounded(doc, "workers", 2, 1, 64),
        chunk_size=read.bounded(doc, "chunk_size", default_chunk_size(custody.policy), 1, 10000),
        dps=read.dps(doc),
        lines=_lines(doc),
        lifecycle=read.lifecycle(doc),
        delivery=read.delivery(doc),
    )
    if check.problems:
        raise ValidationFailed(sorted_by_line(check.problems))
    return station


def _lines(doc: Mapping) -> dict[str, int]:
    """The line of every top-level key and of every key of a section (``"hsm.pin"``), so a
    later check can say ``station.yaml:7``."""
    lines: dict[str, int] = {}
    for key, value in doc.items():
        lines[key] = doc.line_of(key)
        if isinstance(value, Mapping):
            lines.update({f"{key}.{sub}": value.line_of(sub) for sub in value})
    return lines


def station_secret_problems(station: Station) -> list[str]:
    """Secrets the station needs that are not available now (env var unset, file missing)."""
    needed: list[tuple[str, SecretRef | None]] = [("hsm.pin", station.hsm.pin)]
    if station.custody.policy is Custody.PKCS8:
        needed.append(("custody.pkcs8_passphrase", station.custody.pkcs8_passphrase))
    problems = []
    for key, ref in needed:
        if ref is not None and (issue := ref.problem()):
            problems.append(
                f"{station.where(key)}: {key}: {issue} (secrets present in the environment)"
            )
    return problems
