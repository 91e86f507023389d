"""Batch manifests: YAML (``manifests/*.yaml``) or CSV with a header row.

A manifest names the batch and its devices: an explicit list, a generator (prefix +
zero-padded counter + count), a CSV file, or any mix. Every rule is checked before anything
else happens and every violation is reported at once as ``file:line: device: what (rule)``.

Bounded time and memory (docs/limits.md): the files are read with size caps, the YAML device
list and the CSV are streamed (a device is checked, fingerprinted in 8 bytes and forgotten),
the device count is checked before any duplicate scan, and the duplicate checks are linear:
explicit IDs by sorting their 64-bit hashes, generators as numeric intervals. Nothing holds a
million devices: :meth:`Manifest.devices` reads the sources again (and refuses a file that
changed since it was validated).
"""

from __future__ import annotations

import csv
import hashlib
import re
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from ..errors import InputError, ValidationFailed, shown
from ..inputfile import KIB, MIB, Bounded, open_input, read_input, size_text
from ..keyprofile import PROFILE_NAMES, KeyProfile
from ..vocabulary import RegistrationMode
from . import twin
from .yamlfile import (
    Checker,
    Document,
    Mapping,
    Streamed,
    TooManyProblems,
    decode,
    empty_mapping,
    printable,
    sorted_by_line,
)

# Identifier rules, matched with re.fullmatch (``$`` would accept a trailing newline).
REGISTRATION_ID = re.compile(r"[a-z0-9._:-]*[a-z0-9-]")
REGISTRATION_ID_RULE = (
    "DPS registration ID: lowercase a-z 0-9 - . _ :, ends alphanumeric or -, <= 64"
)
DEVICE_ID = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")
DEVICE_ID_RULE = "IoT Hub device ID: <= 128 of A-Z a-z 0-9 - . % _ * ? ! ( ) , : = @ $ '"
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BATCH_ID_RULE = "batch id: letters, digits, . _ -, starts alphanumeric, at most 64"

# Limits (docs/limits.md says why each is what it is).
MAX_DEVICES = 1_000_000
MAX_MANIFEST_BYTES = 16 * MIB  # YAML; longer device lists go in CSV
MAX_CSV_BYTES = 256 * MIB  # a million devices at 256 bytes each
MAX_CSV_RECORD_BYTES = 64 * KIB  # one CSV record (a device's ids, tags, desired properties)
MAX_CSV_LINES = 2 * MAX_DEVICES  # room for blank lines and quoted line breaks, bounds the time
MAX_GENERATORS = 1000
MAX_PRODUCT = 128
LIMIT_RULE = f"at most {MAX_DEVICES:,} devices per batch"

_DIGITS = "0123456789"
_UNIQUE = "unique within the batch"


@dataclass(frozen=True)
class Device:
    registration_id: str
    device_id: str
    tags: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # file:line it came from
    csr: Path | None = None  # custody device: the device's CSR file (else found in csr_dir)


@dataclass(frozen=True)
class Generator:
    prefix: str
    digits: int
    start: int
    count: int
    tags: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    order: int = 0  # position in the file

    def registration_ids(self) -> Iterator[str]:
        for n in range(self.start, self.start + self.count):
            yield f"{self.prefix}{n:0{self.digits}d}"


@dataclass(frozen=True)
class DeviceSource:
    """A file of explicitly listed devices (the YAML manifest's ``devices`` or a CSV), with
    the SHA-256 it had when it was validated."""

    kind: str  # "yaml" | "csv"
    path: Path
    sha256: str

    def devices(self) -> Iterator[Device]:
        """The devices again, checked again; a file that changed is refused."""
        check = _Unchanged(self.path)
        if self.kind == "yaml":
            data = read_input(self.path, limit=MAX_MANIFEST_BYTES, what="manifest")
            if hashlib.sha256(data).hexdigest() != self.sha256:
                raise _changed(self.path)
            text = decode(self.path, data, "manifest")
            yield from _yaml_devices(Document(self.path, text, stream="devices"), check)
            return
        digest = hashlib.sha256()
        yield from _csv_devices(self.path, check, _Budget(MAX_DEVICES), [digest])
        if digest.hexdigest() != self.sha256:
            raise _changed(self.path)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Devices are read lazily (explicit lists again from their files,
    generators expanded), so a million devices cost no memory until they are iterated, and
    then one at a time."""

    path: Path
    batch_id: str
    product: str
    key_profile: KeyProfile
    validity_days: int
    registration: RegistrationMode
    generators: tuple[Generator, ...]
    sha256: str
    count: int = 0
    sources: tuple[DeviceSource, ...] = ()
    lines: dict[str, int] = field(default_factory=dict, compare=False)
    csr_dir: Path | None = None  # custody device: <registration-id>.csr | .pem | .der
    csr_paths: int = 0  # devices that name their own CSR file

    @property
    def has_csrs(self) -> bool:
        """Whether the manifest supplies CSRs (custody device, docs/device-keys.md)."""
        return self.csr_dir is not None or self.csr_paths > 0

    def devices(self) -> Iterator[Device]:
        for source in self.sources:
            yield from source.devices()
        for gen in self.generators:
            for rid in gen.registration_ids():
                yield Device(rid, rid, gen.tags, gen.desired, gen.source)

    def __len__(self) -> int:
        return self.count

    def where(self, key: str) -> str:
        """``file:line`` of a top-level key (line 1 when it was defaulted)."""
        return f"{self.path}:{self.lines.get(key, 1)}"


_TOP = {
    "batch_id",
    "product",
    "key_profile",
    "validity_days",
    "registration",
    "devices",
    "generator",
    "devices_csv",
    "csr_dir",
}
_DEVICE = {"registration_id", "device_id", "tags", "desired", "csr"}
_GENERATOR = {"prefix", "digits", "start", "count", "tags", "desired"}


def load_manifest(path: Path, *, batch_id: str | None = None) -> Manifest:
    """Load a YAML or CSV manifest; raise :class:`ValidationFailed` listing every problem
    (:class:`InputError` for a file that cannot be read at all). A CSV manifest takes its
    batch id from ``batch_id`` or the file name, and defaults for the rest."""
    try:
        if path.suffix.lower() == ".csv":
            return _load_csv_manifest(path, batch_id)
        return _load_yaml_manifest(path, batch_id)
    except TooManyProblems as full:
        raise ValidationFailed(sorted_by_line(full.problems), stopped=True) from None


def _load_yaml_manifest(path: Path, batch_id: str | None) -> Manifest:
    data = read_input(path, limit=MAX_MANIFEST_BYTES, what="manifest")
    text = decode(path, data, "manifest")
    check = Checker(path)
    seen = _Seen()
    document = Document(path, text, stream="devices")
    explicit = sum(seen.add(device) for device in _yaml_devices(document, check))
    doc = document.doc
    assert doc is not None
    check.extend(document.problems)
    check.keys(doc, _TOP, set(), "")  # a missing batch_id is reported with the others
    generators = _yaml_generators(doc, check)
    digest = hashlib.sha256(data)
    sources = [DeviceSource("yaml", path, digest.hexdigest())] if _lists_devices(doc) else []
    total = explicit + sum(g.count for g in generators)
    over = total > MAX_DEVICES
    if over:
        check.add(doc.line_of("generator"), f"{total:,} devices", LIMIT_RULE)
    budget = _Budget(MAX_DEVICES - total)
    if "devices_csv" in doc and (csv_path := _csv_path(path, doc, check)) is not None:
        csv_check = Checker(csv_path)
        csv_digest = hashlib.sha256()
        if not over:
            where = f"{path}:{doc.line_of('devices_csv')}"
            try:
                rows = _csv_devices(csv_path, csv_check, budget, [digest, csv_digest], where)
                total += sum(seen.add(device) for device in rows)
            except InputError as exc:
                csv_check.append(exc.line())
            sources.append(DeviceSource("csv", csv_path, csv_digest.hexdigest()))
        check.extend(csv_check.problems)
    if not over and not budget.exceeded:
        _check_duplicates(sources, generators, seen, check, text)
    values = _top_values(doc, check, batch_id)
    values.csr_dir = _csr_dir(path, doc, check)
    values.csr_paths = seen.csrs
    return _finish(path, doc, check, values, generators, sources, total, digest.hexdigest())


def _load_csv_manifest(path: Path, batch_id: str | None) -> Manifest:
    check = Checker(path)
    seen = _Seen()
    digest = hashlib.sha256()
    budget = _Budget(MAX_DEVICES)
    # A file that cannot be opened at all raises InputError: one line, not a list.
    total = sum(seen.add(d) for d in _csv_devices(path, check, budget, [digest]))
    doc = empty_mapping(1)
    doc["batch_id"] = path.stem
    sources = [DeviceSource("csv", path, digest.hexdigest())]
    if not budget.exceeded:
        _check_duplicates(sources, [], seen, check, "")
    values = _top_values(doc, check, batch_id)
    values.csr_paths = seen.csrs
    return _finish(path, doc, check, values, [], sources, total, digest.hexdigest())


@dataclass
class _TopValues:
    batch_id: str
    product: str
    profile: KeyProfile
    validity: int
    mode: RegistrationMode
    csr_dir: Path | None = None
    csr_paths: int = 0


def _top_values(doc: Mapping, check: Checker, batch_id: str | None) -> _TopValues:
    if batch_id is not None:
        where = "--batch-id"
        value: Any = batch_id
    else:
        where = f"{check.path}:{doc.line_of('batch_id')}"
        value = doc.get("batch_id")
    if value is None or value == "":
        check.append(f"{where}: batch_id is missing or empty (the batch needs a directory name)")
        value = ""
    elif not isinstance(value, str) or not BATCH_ID.fullmatch(value):
        check.append(
            f"{where}: batch_id {shown(value)} is not a safe directory name ({BATCH_ID_RULE})"
        )
        value = ""
    product = check.typed(doc, "product", str, "")
    if len(product) > MAX_PRODUCT:
        check.add(
            doc.line_of("product"),
            f"product {shown(product)} is longer than {MAX_PRODUCT}",
            "product names are short",
        )
    profile_text = check.typed(doc, "key_profile", str, KeyProfile.EC_P256.value)
    try:
        profile = KeyProfile(profile_text)
    except ValueError:
        check.add(
            doc.line_of("key_profile"),
            f"unknown key profile {shown(profile_text)}",
            f"one of {', '.join(PROFILE_NAMES)}",
        )
        profile = KeyProfile.EC_P256
    validity = check.typed(doc, "validity_days", int, 365)
    if not 1 <= validity <= 36500:
        check.add(
            doc.line_of("validity_days"),
            f"validity_days {shown(validity)} is outside 1..36500",
            "validity",
        )
    mode_text = check.typed(doc, "registration", str, "none")
    try:
        mode = RegistrationMode(mode_text)
    except ValueError:
        check.add(
            doc.line_of("registration"),
            f"registration {shown(mode_text)} is not one of none, individual, group, hub",
            "registration modes",
        )
        mode = RegistrationMode.NONE
    return _TopValues(value, product, profile, validity, mode)


def _finish(
    path: Path,
    doc: Mapping,
    check: Checker,
    values: _TopValues,
    generators: list[Generator],
    sources: list[DeviceSource],
    total: int,
    sha256: str,
) -> Manifest:
    if total == 0 and not check:
        check.add(doc.line, "the manifest has no devices", "a batch has at least one device")
    if check:
        raise ValidationFailed(sorted_by_line(check.problems))
    return Manifest(
        path=path,
        batch_id=values.batch_id,
        product=values.product,
        key_profile=values.profile,
        validity_days=values.validity,
        registration=values.mode,
        generators=tuple(generators),
        sha256=sha256,
        count=total,
        sources=tuple(sources),
        lines=dict(doc.lines),
        csr_dir=values.csr_dir,
        csr_paths=values.csr_paths,
    )


def _lists_devices(doc: Mapping) -> bool:
    value = doc.get("devices")
    return (isinstance(value, Streamed) and value.count > 0) or (
        isinstance(value, list) and bool(value)
    )


def _csr_dir(path: Path, doc: Mapping, check: Checker) -> Path | None:
    """``csr_dir``: where devices without their own ``csr`` find theirs, relative to the
    manifest. Only its name is checked here; each file is opened when the CSRs are checked
    (batch/requests.py), with the limits of every input file."""
    name: str | None = check.typed(doc, "csr_dir", str, None)
    if name is None:
        return None
    if not name.strip():
        check.add(doc.line_of("csr_dir"), "csr_dir is empty", "paths name a directory")
        return None
    return path.parent / name


def _csr_file(value: Any, base: Path, check: Checker, line: int, subject: str) -> Path | None:
    """A device's ``csr`` (YAML key or CSV column): a file name relative to ``base``."""
    if not isinstance(value, str):
        check.add(line, f"csr must be a file name, not {shown(value)}", "schema", subject)
        return None
    if not value.strip():
        check.add(line, "csr is empty", "paths name a file", subject)
        return None
    if not printable(value):
        check.add(line, f"csr {shown(value)} holds a control character", "paths", subject)
        return None
    return base / value


def _csv_path(path: Path, doc: Mapping, check: Checker) -> Path | None:
    name: str | None = check.typed(doc, "devices_csv", str, None)
    if not name:
        if doc.get("devices_csv") == "":
            check.add(doc.line_of("devices_csv"), "devices_csv is empty", "schema")
        return None
    try:
        return (path.parent / name).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        check.add(doc.line_of("devices_csv"), f"devices_csv cannot be resolved: {exc}", "paths")
        return None


# ------------------------------------------------------------------------- identifiers
def valid_registration_id(rid: str) -> bool:
    return len(rid) <= 64 and REGISTRATION_ID.fullmatch(rid) is not None


def _check_registration_id(rid: Any, check: Checker, line: int, subject: str) -> bool:
    if not isinstance(rid, str) or not rid:
        check.add(line, "registration_id is missing or not a string", "schema", subject)
        return False
    if not valid_registration_id(rid):
        check.add(line, f"registration_id {shown(rid)} is invalid", REGISTRATION_ID_RULE, subject)
        return False
    return True


def _check_device_id(did: Any, check: Checker, line: int, subject: str) -> bool:
    if not isinstance(did, str) or not DEVICE_ID.fullmatch(did):
        check.add(line, f"device_id {shown(did)} is invalid", DEVICE_ID_RULE, subject)
        return False
    return True


def _twin(
    item: Mapping, check: Checker, subject: str
) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """Whether the item's tags and desired properties are JSON within the twin limits, and
    them."""
    ok = True
    sections: list[dict[str, Any]] = []
    for section in ("tags", "desired"):
        value = item.get(section)
        why = None if value is None else twin.problem(section, value)
        if why:
            check.add(item.line_of(section), why, twin.RULE, subject)
            ok = False
        sections.append(value if isinstance(value, dict) and not why else {})
    return ok, sections[0], sections[1]


def _subject(rid: Any, fallback: str) -> str:
    """Who a problem is about: the registration ID as written (escaped when printed), or
    where it is when there is none."""
    return rid if isinstance(rid, str) and rid and len(rid) <= 128 else fallback


# -------------------------------------------------------------------------------- YAML
def _yaml_devices(document: Document, check: Checker) -> Iterator[Device]:
    """The valid devices of a YAML manifest's ``devices`` list, streamed as parsed."""
    index = 0
    for item, line in document.items():
        device = _yaml_device(item, line, index, check)
        index += 1
        if device is not None:
            yield device
    doc = document.doc
    assert doc is not None
    value = doc.get("devices")
    if isinstance(value, list):  # an alias of a list: not streamed, already in memory
        for item in value:
            line = item.line if isinstance(item, Mapping) else doc.line_of("devices")
            device = _yaml_device(item, line, index, check)
            index += 1
            if device is not None:
                yield device
    elif value is not None and not isinstance(value, Streamed):
        check.add(doc.line_of("devices"), f"'devices' must be a list, not {shown(value)}", "schema")


def _yaml_device(item: Any, line: int, index: int, check: Checker) -> Device | None:
    if not isinstance(item, Mapping):
        check.add(line, f"devices[{index}] must be a mapping, not {shown(item)}", "schema")
        return None
    rid = item.get("registration_id")
    subject = _subject(rid, f"devices[{index}]")
    check.keys(item, _DEVICE, {"registration_id"}, "")
    ok = _check_registration_id(rid, check, item.line_of("registration_id"), subject)
    did = item.get("device_id", rid)
    ok = _check_device_id(did, check, item.line_of("device_id"), subject) and ok
    twin_ok, tags, desired = _twin(item, check, subject)
    csr = None
    if "csr" in item:
        csr = _csr_file(item["csr"], check.path.parent, check, item.line_of("csr"), subject)
        ok = csr is not None and ok
    if ok and twin_ok and isinstance(rid, str) and isinstance(did, str):
        return Device(rid, did, tags, desired, f"{check.path}:{item.line}", csr)
    return None


def _yaml_generators(doc: Mapping, check: Checker) -> list[Generator]:
    if "generator" not in doc or doc["generator"] is None:
        return []
    raw = doc["generator"]
    entries = raw if isinstance(raw, list) else [raw]
    if len(entries) > MAX_GENERATORS:
        check.add(
            doc.line_of("generator"),
            f"{len(entries):,} generators",
            f"at most {MAX_GENERATORS:,} generators; list devices explicitly or in CSV",
        )
        return []
    generators = []
    for order, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            check.add(
                doc.line_of("generator"),
                f"generator must be a mapping, not {shown(entry)}",
                "schema",
            )
            continue
        gen = _generator(entry, order, check)
        if gen is not None:
            generators.append(gen)
    return generators


def _generator(entry: Mapping, order: int, check: Checker) -> Generator | None:
    where = "generator"
    check.keys(entry, _GENERATOR, {"prefix", "count"}, "generator.")
    prefix = check.typed(entry, "prefix", str, "")
    digits = check.typed(entry, "digits", int, 6)
    start = check.typed(entry, "start", int, 1)
    count = check.typed(entry, "count", int, 0)
    if not 1 <= digits <= 18:
        check.add(entry.line_of("digits"), f"digits {shown(digits)} is outside 1..18", where, where)
        return None
    if count < 1 or start < 0:
        check.add(
            entry.line_of("count"),
            f"count {shown(count)} / start {shown(start)} must be positive",
            where,
            where,
        )
        return None
    last = start + count - 1
    if last >= 10**digits:
        check.add(
            entry.line_of("count"),
            f"counter {shown(last)} needs more than {digits} digits",
            "generator: the counter fits its zero padding",
            where,
        )
        return None
    first_id, last_id = f"{prefix}{start:0{digits}d}", f"{prefix}{last:0{digits}d}"
    line = entry.line_of("prefix")
    # The counter is digits only, so the first and last IDs stand for all of them.
    if not (
        _check_registration_id(first_id, check, line, _subject(first_id, where))
        and _check_registration_id(last_id, check, line, _subject(last_id, where))
    ):
        return None
    twin_ok, tags, desired = _twin(entry, check, where)
    if not twin_ok:
        return None
    return Generator(
        prefix, digits, start, count, tags, desired, f"{check.path}:{entry.line}", order
    )


# --------------------------------------------------------------------------------- CSV
class _CsvStop(Exception):
    """A CSV problem after which the rest of the file cannot be read reliably."""

    def __init__(self, line: int, what: str, rule: str) -> None:
        self.line = line
        self.what = what
        self.rule = rule


class _Lines:
    """Decoded lines of a CSV for :mod:`csv`, read in bounded pieces: a line or record over
    :data:`MAX_CSV_RECORD_BYTES`, bytes that are not UTF-8 or a UTF-16 file stop the read at
    the exact line."""

    def __init__(self, reader: Bounded, hashers: list[Any]) -> None:
        self.reader = reader
        self.hashers = hashers
        self.number = 0
        self.record = 0  # bytes of the record being read

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.reader.readline(MAX_CSV_RECORD_BYTES + 1)
        if not raw:
            raise StopIteration
        self.number += 1
        if self.number > MAX_CSV_LINES:
            raise _CsvStop(self.number, f"more than {MAX_CSV_LINES:,} lines", LIMIT_RULE)
        for hasher in self.hashers:
            hasher.update(raw)
        self.record += len(raw)
        if self.record > MAX_CSV_RECORD_BYTES:
            raise _CsvStop(
                self.number,
                f"a record longer than {size_text(MAX_CSV_RECORD_BYTES)}",
                "CSV records (a line ending other than LF or CRLF reads as one long line)",
            )
        if self.number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise _CsvStop(1, "the file is UTF-16 text", "CSV manifests are UTF-8 text")
        try:
            return raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _CsvStop(
                self.number, f"byte 0x{raw[exc.start]:02x} is not UTF-8", "CSV manifests are UTF-8"
            ) from exc


_COLUMNS_RULE = "columns: registration_id, device_id, csr, tag.<name>, desired.<name>, each once"


def _csv_header(header: list[str], check: Checker) -> bool:
    """Check the header row; False when it has no registration_id column (then the rows
    cannot be read as devices)."""
    names = [h.strip() for h in header]
    if "registration_id" not in names:
        # Not echoed: the file may not be a device CSV at all (/etc/passwd, a PIN file).
        check.add(
            1,
            "no registration_id column in the first row (this does not look like a device CSV)",
            _COLUMNS_RULE,
        )
        return False
    seen: set[str] = set()
    for name in names:
        if name in seen:
            check.add(1, f"column {shown(name)} appears more than once", _COLUMNS_RULE)
        seen.add(name)
        section, dot, key = name.partition(".")
        if name in ("registration_id", "device_id", "csr"):
            continue
        if section not in ("tag", "desired") or not dot:
            check.add(1, f"unknown column {shown(name)}", _COLUMNS_RULE)
        elif why := twin.key_problem(key):
            check.add(1, f"column {shown(name)}: {why}", twin.RULE)
    return True


class _Budget:
    """Devices a CSV may still add to the batch."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.exceeded = False


class _Layout:
    """Where each column of a CSV's header row is, worked out once for all rows."""

    def __init__(self, names: list[str]) -> None:
        self.width = len(names)
        self.rid = names.index("registration_id")
        self.did = names.index("device_id") if "device_id" in names else None
        self.csr = names.index("csr") if "csr" in names else None
        self.tags = [(i, n[4:]) for i, n in enumerate(names) if n.startswith("tag.")]
        self.desired = [(i, n[8:]) for i, n in enumerate(names) if n.startswith("desired.")]


def _csv_devices(
    path: Path, check: Checker, budget: _Budget, hashers: list[Any], where: str = ""
) -> Iterator[Device]:
    """The valid devices of a CSV, streamed; at most ``budget.left`` rows (one more is a
    problem at its line, and the read stops)."""
    handle = open_input(path, limit=MAX_CSV_BYTES, what="device CSV", where=where)
    lines = _Lines(Bounded(handle, path, limit=MAX_CSV_BYTES, what="device CSV", where=""), hashers)
    rows = csv.reader(lines)
    try:
        header = next(rows, None)
        lines.record = 0
        if not header:
            check.add(1, "no header row", "CSV manifests start with a header row")
            return
        if not _csv_header(header, check):
            return
        layout = _Layout([h.strip() for h in header])
        count = 0
        for row in rows:
            line = lines.number
            lines.record = 0
            if len(row) != layout.width:
                if any(cell.strip() for cell in row):
                    check.add(line, f"{len(row)} cells for {layout.width} columns", "CSV shape")
                continue
            if not any(row):
                continue
            count += 1
            if count > budget.left:
                budget.exceeded = True
                check.add(line, f"more than {MAX_DEVICES:,} devices", LIMIT_RULE)
                return
            device = _csv_device(row, layout, line, check)
            if device is not None:
                yield device
        for _ in lines:  # the hash covers the whole file
            pass
    except _CsvStop as stop:
        check.add(stop.line, stop.what, stop.rule)
    except csv.Error as exc:
        check.add(lines.number, f"not valid CSV: {exc}", "CSV syntax")
    finally:
        handle.close()


def _csv_device(row: list[str], layout: _Layout, line: int, check: Checker) -> Device | None:
    rid = row[layout.rid].strip()
    if not rid and not any(cell.strip() for cell in row):
        return None  # a row of blanks
    subject = _subject(rid, "(empty)")
    ok = _check_registration_id(rid, check, line, subject)
    did = (row[layout.did].strip() if layout.did is not None else "") or rid
    ok = _check_device_id(did, check, line, subject) and ok
    tags = {key: value for i, key in layout.tags if (value := row[i].strip())}
    desired = {key: value for i, key in layout.desired if (value := row[i].strip())}
    for section, values in (("tags", tags), ("desired", desired)):
        if values and (why := twin.strings_problem(section, values)):
            check.add(line, why, twin.RULE, subject)
            ok = False
    csr = None
    if layout.csr is not None and (cell := row[layout.csr].strip()):
        csr = _csr_file(cell, check.path.parent, check, line, subject)
        ok = csr is not None and ok
    if not ok:
        return None
    return Device(rid, did, tags, desired, f"{check.path}:{line}", csr)


# -------------------------------------------------------------------------- duplicates
class _Seen:
    """64-bit hashes of every explicit registration and device ID: 16 bytes a device, in 256
    arrays so they can be sorted in small pieces. Repeated hashes are the candidates a
    second pass confirms (or finds to be a rare collision)."""

    def __init__(self) -> None:
        self.rids = [array("q") for _ in range(256)]
        self.dids = [array("q") for _ in range(256)]
        self.csrs = 0  # devices naming their own CSR file

    def add(self, device: Device) -> int:
        self.csrs += device.csr is not None
        h = hash(device.registration_id)
        self.rids[h & 255].append(h)
        h = hash(device.device_id)
        self.dids[h & 255].append(h)
        return 1

    @staticmethod
    def repeated(buckets: list[array[int]]) -> set[int]:
        found: set[int] = set()
        for bucket in buckets:
            ordered = sorted(bucket)
            found.update(a for a, b in pairwise(ordered) if a == b)
        return found


class _Intervals:
    """Generators as intervals of numbers: every ID a generator makes is ``stem`` + a
    ``width``-digit number, where ``stem`` is the prefix without its trailing digits. Two
    generators can only clash if stem and width agree, and then exactly when their intervals
    overlap: a sort per group finds every clash, and a binary search places an explicit ID."""

    def __init__(self, generators: list[Generator]) -> None:
        groups: dict[tuple[str, int], list[tuple[int, int, Generator]]] = {}
        for gen in generators:
            stem = gen.prefix.rstrip(_DIGITS)
            head = gen.prefix[len(stem) :]
            low = int(head or "0") * 10**gen.digits + gen.start
            key = (stem, len(head) + gen.digits)
            groups.setdefault(key, []).append((low, low + gen.count - 1, gen))
        self.groups: dict[tuple[str, int], tuple[list[int], list[int], list[Generator]]] = {}
        self.clashes: list[tuple[Generator, Generator, str]] = []
        for (stem, width), entries in groups.items():
            entries.sort(key=lambda e: e[0])
            lows, reach, owner = [], [], []
            best_high, best = -1, entries[0][2]
            for low, high, gen in entries:
                if low <= best_high:
                    self.clashes.append((gen, best, f"{stem}{low:0{width}d}"))
                if high > best_high:
                    best_high, best = high, gen
                lows.append(low)
                reach.append(best_high)
                owner.append(best)
            self.groups[(stem, width)] = (lows, reach, owner)

    def owner(self, text: str) -> Generator | None:
        """The generator that also makes ``text``, if any."""
        stem = text.rstrip(_DIGITS)
        width = len(text) - len(stem)
        group = self.groups.get((stem, width)) if width else None
        if group is None:
            return None
        lows, reach, owner = group
        number = int(text[len(stem) :])
        i = bisect_right(lows, number) - 1
        return owner[i] if i >= 0 and reach[i] >= number else None


def _check_duplicates(
    sources: list[DeviceSource],
    generators: list[Generator],
    seen: _Seen,
    check: Checker,
    text: str,
) -> None:
    intervals = _Intervals(generators)
    for one, other, clash in intervals.clashes:
        later, first_made = (one, other) if one.order > other.order else (other, one)
        check.append(
            f"{later.source}: {clash}: also produced by the generator at {first_made.source} "
            f"({_UNIQUE})"
        )
    repeated = (_Seen.repeated(seen.rids), _Seen.repeated(seen.dids))
    if not (repeated[0] or repeated[1] or (generators and sources)):
        return
    first: tuple[dict[int, dict[str, str]], dict[int, dict[str, str]]] = ({}, {})
    for dev in _explicit_again(sources, text):
        owner = intervals.owner(dev.registration_id) or intervals.owner(dev.device_id)
        if owner is not None:
            check.append(
                f"{dev.source}: {dev.registration_id}: also produced by the generator at "
                f"{owner.source} ({_UNIQUE})"
            )
        for key, hashes, table, what in (
            (dev.registration_id, repeated[0], first[0], "registration_id"),
            (dev.device_id, repeated[1], first[1], "device_id"),
        ):
            h = hash(key)
            if h not in hashes:
                continue
            earlier = table.setdefault(h, {})
            if key in earlier:
                check.append(
                    f"{dev.source}: {dev.registration_id}: duplicate {what}, first at "
                    f"{earlier[key]} ({_UNIQUE})"
                )
                break  # one line per device is enough
            earlier[key] = dev.source


def _explicit_again(sources: list[DeviceSource], text: str) -> Iterator[Device]:
    """The explicit devices a second time, for the duplicate report (problems were reported
    by the first pass)."""
    for source in sources:
        quiet = Checker(source.path)
        if source.kind == "yaml":
            yield from _yaml_devices(Document(source.path, text, stream="devices"), quiet)
        else:
            yield from _csv_devices(source.path, quiet, _Budget(MAX_DEVICES), [])


# ------------------------------------------------------------------------------ re-reads
class _Unchanged(Checker):
    """Checks devices read again from a validated file: any problem means the file changed."""

    def append(self, problem: str) -> None:
        raise InputError(
            f"{problem}; the file changed after it was validated",
            rule="a manifest does not change during a run",
        )


def _changed(path: Path) -> InputError:
    return InputError(
        f"{path} changed after it was validated (its SHA-256 differs)",
        rule="a manifest does not change during a run",
    )
