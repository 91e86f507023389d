"""Batch manifests: YAML (``manifests/*.yaml``) or CSV with a header row.

A manifest names the batch and its devices: an explicit list, a generator (prefix +
zero-padded counter + count), a CSV file, or any mix. Every rule is checked before anything
else happens and every violation is reported at once as ``file:line: device: what (rule)``.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ValidationFailed
from ..keyprofile import PROFILE_NAMES, KeyProfile
from ..vocabulary import RegistrationMode
from .yamlfile import Checker, Mapping, load, sorted_by_line

REGISTRATION_ID = re.compile(r"^[a-z0-9._:-]*[a-z0-9-]$")
REGISTRATION_ID_RULE = (
    "DPS registration ID: lowercase a-z 0-9 - . _ :, ends alphanumeric or -, <= 64"
)
DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")
DEVICE_ID_RULE = "IoT Hub device ID: <= 128 of A-Z a-z 0-9 - . % _ * ? ! ( ) , : = @ $ '"
BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_DEVICES = 1_000_000


@dataclass(frozen=True)
class Device:
    registration_id: str
    device_id: str
    tags: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # file:line it came from


@dataclass(frozen=True)
class Generator:
    prefix: str
    digits: int
    start: int
    count: int
    tags: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def registration_ids(self) -> Iterator[str]:
        for n in range(self.start, self.start + self.count):
            yield f"{self.prefix}{n:0{self.digits}d}"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Devices are expanded lazily, so a million-device generator costs
    no memory until it is iterated."""

    path: Path
    batch_id: str
    product: str
    key_profile: KeyProfile
    validity_days: int
    registration: RegistrationMode
    explicit: tuple[Device, ...]
    generators: tuple[Generator, ...]
    sha256: str

    def devices(self) -> Iterator[Device]:
        yield from self.explicit
        for gen in self.generators:
            for rid in gen.registration_ids():
                yield Device(rid, rid, gen.tags, gen.desired, gen.source)

    def __len__(self) -> int:
        return len(self.explicit) + sum(g.count for g in self.generators)


_TOP = {
    "batch_id",
    "product",
    "key_profile",
    "validity_days",
    "registration",
    "devices",
    "generator",
    "devices_csv",
}
_DEVICE = {"registration_id", "device_id", "tags", "desired"}
_GENERATOR = {"prefix", "digits", "start", "count", "tags", "desired"}


def load_manifest(path: Path, *, batch_id: str | None = None) -> Manifest:
    """Load a YAML or CSV manifest; raise :class:`ValidationFailed` listing every problem.
    A CSV manifest takes its batch id from ``batch_id`` or the file name, and defaults for
    the rest."""
    if path.suffix.lower() == ".csv":
        check = Checker(path)
        devices = _csv_devices(path, check)
        doc = Mapping()
        doc.line, doc.lines = 1, {}
        doc["batch_id"] = batch_id or path.stem
        return _build(path, doc, devices, [], check, path.read_bytes())
    doc, problems = load(path)
    check = Checker(path)
    check.problems += problems
    if batch_id:
        doc["batch_id"] = batch_id
    check.keys(doc, _TOP, {"batch_id"}, "")
    devices = _yaml_devices(doc, check)
    generators = _yaml_generators(doc, check)
    raw = path.read_bytes()
    if isinstance(doc.get("devices_csv"), str):
        csv_path = (path.parent / doc["devices_csv"]).resolve()
        csv_check = Checker(csv_path)
        devices += _csv_devices(csv_path, csv_check)
        check.problems += csv_check.problems
        if csv_path.exists():
            raw += csv_path.read_bytes()
    elif "devices_csv" in doc:
        check.add(doc.line_of("devices_csv"), "devices_csv must be a file name", "schema")
    return _build(path, doc, devices, generators, check, raw)


def _build(
    path: Path,
    doc: Mapping,
    devices: list[Device],
    generators: list[Generator],
    check: Checker,
    raw: bytes,
) -> Manifest:
    batch_id = check.typed(doc, "batch_id", str, "")
    if batch_id and not BATCH_ID.match(batch_id):
        check.add(
            doc.line_of("batch_id"),
            f"batch_id {batch_id!r} is not a safe directory name",
            "batch id: letters, digits, . _ -, at most 64",
        )
    profile_text = check.typed(doc, "key_profile", str, KeyProfile.EC_P256.value)
    try:
        profile = KeyProfile(profile_text)
    except ValueError:
        check.add(
            doc.line_of("key_profile"),
            f"unknown key profile {profile_text!r}",
            f"one of {', '.join(PROFILE_NAMES)}",
        )
        profile = KeyProfile.EC_P256
    validity = check.typed(doc, "validity_days", int, 365)
    if not 1 <= validity <= 36500:
        check.add(
            doc.line_of("validity_days"),
            f"validity_days {validity} is outside 1..36500",
            "validity",
        )
    mode_text = check.typed(doc, "registration", str, "none")
    try:
        mode = RegistrationMode(mode_text)
    except ValueError:
        check.add(
            doc.line_of("registration"),
            f"registration {mode_text!r} is not one of none, individual, group, hub",
            "registration modes",
        )
        mode = RegistrationMode.NONE
    _check_duplicates(devices, generators, check)
    total = len(devices) + sum(g.count for g in generators)
    if total == 0 and not check.problems:
        check.add(doc.line, "the manifest has no devices", "a batch has at least one device")
    if total > MAX_DEVICES:
        check.add(doc.line, f"{total} devices", f"at most {MAX_DEVICES} devices per batch")
    if check.problems:
        raise ValidationFailed(sorted_by_line(check.problems))
    return Manifest(
        path=path,
        batch_id=batch_id,
        product=check.typed(doc, "product", str, ""),
        key_profile=profile,
        validity_days=validity,
        registration=mode,
        explicit=tuple(devices),
        generators=tuple(generators),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _check_registration_id(rid: Any, check: Checker, line: int, subject: str) -> bool:
    if not isinstance(rid, str) or not rid:
        check.add(line, "registration_id is missing or not a string", "schema", subject)
        return False
    if len(rid) > 64 or not REGISTRATION_ID.match(rid):
        check.add(line, f"registration_id {rid!r} is invalid", REGISTRATION_ID_RULE, subject)
        return False
    return True


def _check_device_id(did: Any, check: Checker, line: int, subject: str) -> bool:
    if not isinstance(did, str) or not DEVICE_ID.match(did):
        check.add(line, f"device_id {did!r} is invalid", DEVICE_ID_RULE, subject)
        return False
    return True


def _yaml_devices(doc: Mapping, check: Checker) -> list[Device]:
    items = check.typed(doc, "devices", list, [])
    devices = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            check.add(doc.line_of("devices"), f"devices[{index}] must be a mapping", "schema")
            continue
        rid = item.get("registration_id")
        subject = rid if isinstance(rid, str) else f"devices[{index}]"
        check.keys(item, _DEVICE, {"registration_id"}, "")
        ok = _check_registration_id(rid, check, item.line_of("registration_id"), subject)
        did = item.get("device_id", rid)
        ok = _check_device_id(did, check, item.line_of("device_id"), subject) and ok
        tags = check.typed(item, "tags", dict, {})
        desired = check.typed(item, "desired", dict, {})
        if ok and isinstance(rid, str) and isinstance(did, str):
            devices.append(Device(rid, did, dict(tags), dict(desired), f"{check.path}:{item.line}"))
    return devices


def _yaml_generators(doc: Mapping, check: Checker) -> list[Generator]:
    if "generator" not in doc:
        return []
    raw = doc["generator"]
    entries = raw if isinstance(raw, list) else [raw]
    generators = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            check.add(doc.line_of("generator"), "generator must be a mapping", "schema")
            continue
        where = "generator"
        check.keys(entry, _GENERATOR, {"prefix", "count"}, "generator.")
        prefix = check.typed(entry, "prefix", str, "")
        digits = check.typed(entry, "digits", int, 6)
        start = check.typed(entry, "start", int, 1)
        count = check.typed(entry, "count", int, 0)
        if not 1 <= digits <= 18:
            check.add(
                entry.line_of("digits"), f"digits {digits} is outside 1..18", "generator", where
            )
            continue
        if count < 1 or start < 0:
            check.add(
                entry.line_of("count"),
                f"count {count} / start {start} must be positive",
                "generator",
                where,
            )
            continue
        last = start + count - 1
        if len(str(last)) > digits:
            check.add(
                entry.line_of("count"),
                f"counter {last} needs more than {digits} digits",
                "generator: the counter fits its zero padding",
                where,
            )
            continue
        first_id, last_id = f"{prefix}{start:0{digits}d}", f"{prefix}{last:0{digits}d}"
        line = entry.line_of("prefix")
        # The counter is digits only, so the first and last IDs stand for all of them.
        if not (
            _check_registration_id(first_id, check, line, first_id)
            and _check_registration_id(last_id, check, line, last_id)
        ):
            continue
        generators.append(
            Generator(
                prefix,
                digits,
                start,
                count,
                dict(check.typed(entry, "tags", dict, {})),
                dict(check.typed(entry, "desired", dict, {})),
                f"{check.path}:{entry.line}",
            )
        )
    return generators


def _csv_devices(path: Path, check: Checker) -> list[Device]:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        check.problems.append(f"{path}: does not exist (input files exist)")
        return []
    devices = []
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            check.add(1, "no header row", "CSV manifests start with a header row")
            return []
        header = [h.strip() for h in header]
        for name in header:
            if name not in ("registration_id", "device_id") and not (
                name.startswith(("tag.", "desired.")) and name.split(".", 1)[1]
            ):
                check.add(
                    1,
                    f"unknown column {name!r}",
                    "columns: registration_id, device_id, tag.<name>, desired.<name>",
                )
        if "registration_id" not in header:
            check.add(1, "no registration_id column", "schema")
            return []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                check.add(line, f"{len(row)} cells for {len(header)} columns", "CSV shape")
                continue
            cells = dict(zip(header, (c.strip() for c in row), strict=True))
            rid = cells["registration_id"]
            ok = _check_registration_id(rid, check, line, rid or "(empty)")
            did = cells.get("device_id") or rid
            ok = _check_device_id(did, check, line, rid) and ok
            if ok:
                devices.append(
                    Device(
                        rid,
                        did,
                        {k[4:]: v for k, v in cells.items() if k.startswith("tag.") and v},
                        {k[8:]: v for k, v in cells.items() if k.startswith("desired.") and v},
                        f"{path}:{line}",
                    )
                )
    return devices


def _check_duplicates(devices: list[Device], generators: list[Generator], check: Checker) -> None:
    seen: dict[str, str] = {}
    seen_device_ids: dict[str, str] = {}
    for dev in devices:
        for key, table, what in (
            (dev.registration_id, seen, "registration_id"),
            (dev.device_id, seen_device_ids, "device_id"),
        ):
            if key in table:
                check.problems.append(
                    f"{dev.source}: {dev.registration_id}: duplicate {what}, first at "
                    f"{table[key]} (unique within the batch)"
                )
                break  # one line per device is enough
            table[key] = dev.source
    for i, gen in enumerate(generators):
        for other in generators[:i]:
            small, large = sorted((gen, other), key=lambda g: g.count)
            clash = next((r for r in small.registration_ids() if _generated_by(large, r)), None)
            if clash:
                check.problems.append(
                    f"{gen.source}: {clash}: also produced by the generator "
                    f"at {other.source} (unique within the batch)"
                )
    for dev in devices:
        for gen in generators:
            if _generated_by(gen, dev.registration_id) or _generated_by(gen, dev.device_id):
                check.problems.append(
                    f"{dev.source}: {dev.registration_id}: also produced by the generator at "
                    f"{gen.source} (unique within the batch)"
                )


def _generated_by(gen: Generator, rid: str) -> bool:
    if not rid.startswith(gen.prefix):
        return False
    counter = rid[len(gen.prefix) :]
    return (
        len(counter) == gen.digits
        and counter.isdigit()
        and gen.start <= int(counter) < gen.start + gen.count
    )
