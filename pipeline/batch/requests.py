"""The CSRs of a device-custody batch (docs/device-keys.md): where each device's request is,
every check before anything is signed, and the checked requests the journal keeps.

A device's request is its manifest ``csr`` (a YAML key or a CSV column, relative to that
file) or, failing that, ``<csr_dir>/<registration-id>.csr``, ``.pem`` or ``.der`` (exactly
one of them). Each file is opened with the rules of every input file (pipeline/inputfile.py:
a regular file, at most :data:`~pipeline.ca.csr.MAX_CSR_BYTES`, never a directory, device or
FIFO) and checked by :func:`pipeline.ca.csr.check_request`. Then the batch as a whole: no
public key twice in the batch, none that the station inventory knows from an earlier batch
or renewal, and, for a batch being resumed, every request the same as the one the journal
recorded when the batch was created.

:func:`request_problems` reports every problem at once (``provline validate``, ``plan`` and
``run`` through :func:`pipeline.batch.plan.check_inputs`), streaming: memory grows by 8
bytes a device. :func:`batch_requests` reads the requests again for the journal; a request
whose bytes were verified by :func:`request_problems` in this process is not verified a
second time (signature checks are the costly part of both passes).
"""

from __future__ import annotations

import os
import sqlite3
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from ..ca.csr import MAX_CSR_BYTES, CheckedRequest, check_request
from ..config.manifest import Device, Manifest
from ..config.station import Station
from ..errors import InputError, ValidationFailed
from ..inputfile import read_input
from ..layout import JOURNAL
from ..lifecycle.inventory import Inventory
from ..lifecycle.paths import inventory_path
from ..vocabulary import Custody

MAX_PROBLEMS = 1000  # reported; checking stops there (like every other input check)
SUFFIXES = (".csr", ".pem", ".der")  # how csr_dir names a device's request
UNIQUE_RULE = "one key per device: a cloned or reused device key is a manufacturing fault"
_INVENTORY_BATCH = 500  # keys looked up in the inventory per query


class _Stop(Exception):
    """The problem list is full."""


@dataclass
class _Problems:
    lines: list[str]

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= MAX_PROBLEMS:
            raise _Stop


def request_path(manifest: Manifest, device: Device) -> Path:
    """Where ``device``'s request is; InputError naming what was looked for if nowhere."""
    if device.csr is not None:
        return device.csr
    if manifest.csr_dir is None:
        raise InputError(
            "no CSR: the device has no csr and the manifest no csr_dir",
            rule="custody device: one CSR per device",
        )
    return find_request(manifest.csr_dir, device.registration_id)


def find_request(directory: Path, registration_id: str) -> Path:
    """``<directory>/<registration-id>.csr``, ``.pem`` or ``.der``: exactly one of them."""
    found = [
        path
        for suffix in SUFFIXES
        if os.path.lexists(path := directory / f"{registration_id}{suffix}")
    ]
    if not found:
        names = ", ".join(f"{registration_id}{s}" for s in SUFFIXES)
        raise InputError(
            f"no CSR in {directory} (looked for {names})",
            rule="custody device: one CSR per device",
        )
    if len(found) > 1:
        raise InputError(
            f"{len(found)} CSRs in {directory}: {', '.join(p.name for p in found)}",
            rule="one CSR per device, not one per suffix",
        )
    return found[0]


def read_request(manifest: Manifest, device: Device) -> tuple[Path, bytes]:
    """The path and bytes of ``device``'s request, read in bounded time and memory."""
    path = request_path(manifest, device)
    return path, read_input(path, limit=MAX_CSR_BYTES, what="CSR")


def _checked(
    manifest: Manifest, device: Device, *, trusted: bool = False
) -> tuple[Path | None, CheckedRequest]:
    """Read and check one device's request. Raises InputError whose line names the
    manifest line, the device and the file."""
    path: Path | None = None
    try:
        path, data = read_request(manifest, device)
        verified = _VERIFIED.holds if trusted else None
        checked = check_request(data, device.registration_id, manifest.key_profile, verified)
    except InputError as exc:
        shown = f"CSR {path}: " if path is not None and str(path) not in exc.what else ""
        raise InputError(
            f"{device.registration_id}: {shown}{exc.what}", where=device.source, rule=exc.rule
        ) from None
    if not trusted:
        _VERIFIED.add(checked.csr_sha256)
    return path, checked


def request_problems(manifest: Manifest, station: Station) -> list[str]:
    """Every CSR problem of the batch, one line each (``file:line: device: CSR path: what
    (rule)``); nothing for a batch of another custody that names no CSR."""
    device_custody = station.custody.policy is Custody.DEVICE
    if not device_custody:
        if not manifest.has_csrs:
            return []
        where = manifest.where("csr_dir") if manifest.csr_dir else str(manifest.path)
        return [
            f"{where}: the manifest gives CSRs but station {station.where('custody.policy')} "
            f"custody is {station.custody.policy} (CSRs are for custody device)"
        ]
    if len(manifest) == 0:
        return []  # an open lot (batch/sign.py): each device brings its CSR when it joins
    problems = _Problems([])
    if manifest.csr_dir is not None and not manifest.csr_dir.is_dir():
        what = "is not a directory" if manifest.csr_dir.exists() else "does not exist"
        problems.add(
            f"{manifest.where('csr_dir')}: csr_dir {manifest.csr_dir} {what} "
            "(csr_dir names a directory of <registration-id>.csr | .pem | .der)"
        )
        return problems.lines
    if not manifest.has_csrs:
        return [
            f"{manifest.path}: custody device (station {station.where('custody.policy')}) "
            "needs a CSR per device: csr_dir, devices[].csr or a csr column (custody device)"
        ]
    try:
        _check_all(manifest, station, problems)
    except _Stop:
        problems.lines.append(f"... checking stopped after {MAX_PROBLEMS} problems")
    return problems.lines


def _check_all(manifest: Manifest, station: Station, problems: _Problems) -> None:
    keys = array("q")  # per device, in manifest order: 8 bytes of its key's SHA-256 (0: none)
    earlier = _Earlier(station, manifest)
    recorded = _Recorded(station.output / manifest.batch_id)
    try:
        for device in manifest.devices():
            try:
                path, checked = _checked(manifest, device)
            except InputError as exc:
                keys.append(0)
                problems.add(exc.line())
                continue
            keys.append(_prefix(checked.public_key_sha256))
            was = recorded.csr_sha256(device.registration_id)
            if was is not None and was != checked.csr_sha256:
                problems.add(
                    f"{device.source}: {device.registration_id}: CSR {path} differs from the "
                    f"one batch {manifest.batch_id} was started with (a resumed batch keeps "
                    "its inputs)"
                )
            for line in earlier.add(device, path, checked.public_key_sha256):
                problems.add(line)
        for line in earlier.flush():
            problems.add(line)
    finally:
        earlier.close()
        recorded.close()
    _duplicates(manifest, keys, problems)


def _prefix(hex_digest: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_digest[:16]), "big", signed=True) or 1


def _duplicates(manifest: Manifest, keys: array[int], problems: _Problems) -> None:
    """Devices whose keys share the 8-byte prefix are read again and compared in full."""
    ordered = sorted(k for k in keys if k)
    repeated = {a for a, b in pairwise(ordered) if a == b}
    if not repeated:
        return
    first: dict[str, str] = {}
    for ordinal, device in enumerate(manifest.devices()):
        if keys[ordinal] not in repeated:
            continue
        try:
            path, checked = _checked(manifest, device, trusted=True)
        except InputError as exc:  # changed since the first pass
            problems.add(exc.line())
            continue
        owner = first.setdefault(checked.public_key_sha256, f"{device.registration_id}")
        if owner != device.registration_id:
            problems.add(
                f"{device.source}: {device.registration_id}: CSR {path}: its key is also the "
                f"key of {owner} in this batch ({UNIQUE_RULE})"
            )


class _Earlier:
    """Looks up keys in the station inventory (certificates of earlier batches and
    renewals), a few hundred at a time."""

    def __init__(self, station: Station, manifest: Manifest) -> None:
        path = inventory_path(station)
        self._inventory = Inventory.open(path) if path.is_file() else None
        self._batch = manifest.batch_id
        self._pending: list[tuple[Device, Path | None, str]] = []

    def add(self, device: Device, path: Path | None, key: str) -> list[str]:
        if self._inventory is None:
            return []
        self._pending.append((device, path, key))
        return self.flush() if len(self._pending) >= _INVENTORY_BATCH else []

    def flush(self) -> list[str]:
        if self._inventory is None or not self._pending:
            return []
        seen = self._inventory.keys_seen(
            (key for _, _, key in self._pending), except_batch=self._batch
        )
        lines = [
            f"{device.source}: {device.registration_id}: CSR {path}: its key was certified "
            f"for {seen[key][0]} in {seen[key][1]} ({UNIQUE_RULE})"
            for device, path, key in self._pending
            if key in seen
        ]
        self._pending.clear()
        return lines

    def close(self) -> None:
        if self._inventory is not None:
            self._inventory.close()


class _Recorded:
    """The requests a batch being resumed recorded when it was created (read-only)."""

    def __init__(self, batch_dir: Path) -> None:
        path = batch_dir / JOURNAL
        self._db: sqlite3.Connection | None = None
        if path.is_file():
            try:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                self._db.execute("SELECT 1 FROM requests LIMIT 1")
            except sqlite3.Error:
                self.close()  # no requests recorded (another custody, or an older batch)

    def csr_sha256(self, registration_id: str) -> str | None:
        if self._db is None:
            return None
        row = self._db.execute(
            "SELECT csr_sha256 FROM requests WHERE registration_id = ?", (registration_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def batch_requests(manifest: Manifest) -> Iterator[CheckedRequest]:
    """The batch's requests in manifest order, read and checked again for the journal (the
    files are read twice; a signature verified by :func:`request_problems` in this process
    is not verified again). Raises ValidationFailed if a request no longer passes (its file
    changed since it was checked)."""
    for device in manifest.devices():
        try:
            yield _checked(manifest, device, trusted=True)[1]
        except InputError as exc:
            raise ValidationFailed(
                [f"{exc.line()}; the CSR changed after it was checked"]
            ) from None


class _DigestSet:
    """The requests this process has verified, by 8 bytes of their SHA-256 (a second
    preimage of 64 bits is out of reach, and a changed file has another digest), kept
    compact: a million requests take 8 MB."""

    LIMIT = 4_000_000

    def __init__(self) -> None:
        self._items = array("q")
        self._sorted = 0  # items[:_sorted] are sorted; the rest were appended since

    def add(self, hex_digest: str) -> None:
        if len(self._items) < self.LIMIT:
            self._items.append(_prefix(hex_digest))

    def holds(self, hex_digest: str) -> bool:
        if self._sorted != len(self._items):
            self._items = array("q", sorted(self._items))
            self._sorted = len(self._items)
        key = _prefix(hex_digest)
        i = bisect_left(self._items, key)
        return i < len(self._items) and self._items[i] == key


_VERIFIED = _DigestSet()
