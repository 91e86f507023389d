"""Station configuration (``stations/*.yaml``): which HSM, which CA, which custody, where to
write, how to reach DPS. Relative paths are relative to the station file."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .errors import InputError, ValidationFailed
from .hsm import DEFAULT_MODULE, Pkcs11Uri
from .keyprofile import PROFILE_NAMES, KeyProfile
from .secret import SecretRef
from .yamlfile import Checker, Mapping, load, sorted_by_line


class Custody(StrEnum):
    WRAPPED = "wrapped"
    RETAIN = "retain"
    PKCS8 = "pkcs8"


@dataclass(frozen=True)
class HsmConfig:
    module: str
    token: str
    pin: SecretRef
    softhsm2_conf: str | None = None


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


@dataclass(frozen=True)
class DpsConfig:
    emulator_dir: Path | None = None
    service_endpoint: str | None = None
    device_endpoint: str | None = None
    id_scope: str | None = None
    connection_string: SecretRef | None = None
    hub_connection_string: SecretRef | None = None
    tls_ca_file: Path | None = None
    operations_per_minute: int = 1000
    concurrency: int = 8
    bulk_size: int = 10


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


def default_chunk_size(policy: Custody) -> int:
    """Devices per chunk (one filesystem sync and two journal commits each). Token keygen
    runs at tens of keys/s per worker, so retain chunks are small to keep workers balanced
    at the end of a batch; the CPU-bound custodies take large ones to amortise the syncs."""
    return 32 if policy is Custody.RETAIN else 256


_TOP = {"station", "hsm", "ca", "custody", "audit", "output", "key_profiles", "workers",
        "chunk_size", "dps"}
_DPS = {"emulator_dir", "service_endpoint", "device_endpoint", "id_scope", "connection_string",
        "hub_connection_string", "tls_ca_file", "operations_per_minute", "concurrency",
        "bulk_size"}


def load_station(path: Path) -> Station:
    """Load and check a station config; every problem is reported at once."""
    doc, problems = load(path)
    check = Checker(path)
    check.problems += problems
    base = path.resolve().parent

    def rel(value: str | None) -> Path | None:
        return None if value is None else (base / value).resolve()

    def uri(section: Mapping, key: str, required: bool) -> Pkcs11Uri | None:
        text = check.typed(section, key, str, None)
        if text is None:
            if required:
                check.add(section.line, f"missing key {key!r}", "schema")
            return None
        try:
            return Pkcs11Uri.parse(text)
        except InputError as exc:
            check.add(section.line_of(key), exc.what, exc.rule)
            return None

    def secret(section: Mapping, key: str) -> SecretRef | None:
        text = check.typed(section, key, str, None)
        if text is None:
            return None
        try:
            return SecretRef.parse(text, base=base)
        except InputError as exc:
            check.add(section.line_of(key), exc.what, exc.rule)
            return None

    check.keys(doc, _TOP, {"station", "hsm", "ca", "custody", "output"}, "")
    name = check.typed(doc, "station", str, "")

    hsm_doc = check.section(doc, "hsm", required=True)
    check.keys(hsm_doc, {"module", "token", "pin", "softhsm2_conf"}, {"token", "pin"}, "hsm.")
    conf = check.typed(hsm_doc, "softhsm2_conf", str, None)
    pin = secret(hsm_doc, "pin")
    hsm = HsmConfig(
        module=check.typed(hsm_doc, "module", str, DEFAULT_MODULE),
        token=check.typed(hsm_doc, "token", str, ""),
        pin=pin or SecretRef("env", "PROVLINE_PIN"),
        softhsm2_conf=str(rel(conf)) if conf else None,
    )

    ca_doc = check.section(doc, "ca", required=True)
    check.keys(ca_doc, {"chain", "issuer_key", "root_cert"}, {"chain", "root_cert"}, "ca.")
    ca = CAConfig(
        chain=rel(check.typed(ca_doc, "chain", str, "")) or Path(),
        issuer_key=uri(ca_doc, "issuer_key", True) or Pkcs11Uri(),
        root_cert=rel(check.typed(ca_doc, "root_cert", str, "")) or Path(),
    )

    cust_doc = check.section(doc, "custody", required=True)
    check.keys(cust_doc, {"policy", "transport_key", "pkcs8_passphrase", "pkcs12"}, {"policy"},
               "custody.")
    policy_text = check.typed(cust_doc, "policy", str, "wrapped")
    try:
        policy = Custody(policy_text)
    except ValueError:
        check.add(cust_doc.line_of("policy"), f"custody.policy {policy_text!r} is not one of "
                  "wrapped, retain, pkcs8", "custody policies")
        policy = Custody.WRAPPED
    custody = CustodyConfig(
        policy=policy,
        transport_key=uri(cust_doc, "transport_key", policy is Custody.WRAPPED),
        pkcs8_passphrase=secret(cust_doc, "pkcs8_passphrase"),
        pkcs12=check.typed(cust_doc, "pkcs12", bool, False),
    )
    if policy is Custody.PKCS8 and custody.pkcs8_passphrase is None:
        check.add(cust_doc.line, "pkcs8 custody needs custody.pkcs8_passphrase",
                  "secrets come from env vars or files")

    audit = None
    if "audit" in doc:
        audit_doc = check.section(doc, "audit")
        check.keys(audit_doc, {"key", "cert"}, {"key", "cert"}, "audit.")
        key = uri(audit_doc, "key", False)
        cert = rel(check.typed(audit_doc, "cert", str, None))
        if key and cert:
            audit = AuditConfig(key=key, cert=cert)

    profiles: list[KeyProfile] = []
    for text in check.typed(doc, "key_profiles", list, list(PROFILE_NAMES)):
        try:
            profiles.append(KeyProfile(text))
        except ValueError:
            check.add(doc.line_of("key_profiles"), f"unknown key profile {text!r}",
                      f"one of {', '.join(PROFILE_NAMES)}")

    workers = check.typed(doc, "workers", int, 2)
    chunk = check.typed(doc, "chunk_size", int, default_chunk_size(policy))
    for key, value, low, high in (("workers", workers, 1, 64), ("chunk_size", chunk, 1, 10000)):
        if not low <= value <= high:
            check.add(doc.line_of(key), f"{key} {value} is outside {low}..{high}", "schema")

    dps_doc = check.section(doc, "dps")
    check.keys(dps_doc, _DPS, set(), "dps.")
    emulator_dir = check.typed(dps_doc, "emulator_dir", str, None)
    tls = check.typed(dps_doc, "tls_ca_file", str, None)
    dps = DpsConfig(
        emulator_dir=rel(emulator_dir),
        service_endpoint=check.typed(dps_doc, "service_endpoint", str, None),
        device_endpoint=check.typed(dps_doc, "device_endpoint", str, None),
        id_scope=check.typed(dps_doc, "id_scope", str, None),
        connection_string=secret(dps_doc, "connection_string"),
        hub_connection_string=secret(dps_doc, "hub_connection_string"),
        tls_ca_file=rel(tls),
        operations_per_minute=check.typed(dps_doc, "operations_per_minute", int, 1000),
        concurrency=check.typed(dps_doc, "concurrency", int, 8),
        bulk_size=check.typed(dps_doc, "bulk_size", int, 10),
    )
    if not 1 <= dps.bulk_size <= 10:
        check.add(dps_doc.line_of("bulk_size"), f"dps.bulk_size {dps.bulk_size} is outside 1..10",
                  "DPS bulk operations take at most 10 items")

    output = check.typed(doc, "output", str, "")
    if check.problems:
        raise ValidationFailed(sorted_by_line(check.problems))
    return Station(
        path=path, name=name, hsm=hsm, ca=ca, custody=custody, audit=audit,
        output=rel(output) or Path(), key_profiles=tuple(profiles), workers=workers,
        chunk_size=chunk, dps=dps,
    )


def station_secret_problems(station: Station) -> list[str]:
    """Secrets the station needs that are not available now (env var unset, file missing)."""
    needed: list[tuple[str, SecretRef | None]] = [("hsm.pin", station.hsm.pin)]
    if station.custody.policy is Custody.PKCS8:
        needed.append(("custody.pkcs8_passphrase", station.custody.pkcs8_passphrase))
    problems = []
    for key, ref in needed:
        if ref is not None and (issue := ref.problem()):
            problems.append(f"{station.path}: {key}: {issue} (secrets present in the environment)")
    return problems
