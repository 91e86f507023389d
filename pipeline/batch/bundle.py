"""Per-device bundles, the output contract flashers, CI and auditors read (README "Output
contract"):

    <batch>/<registration-id>/device.cert.pem       leaf
    <batch>/<registration-id>/full-chain.cert.pem   leaf, issuing CA(s), root
    <batch>/<registration-id>/device.key.wrapped | device.key.pem | device.pfx
    <batch>/<registration-id>/device.json           ids, thumbprints, serial, key reference, hashes

A bundle is made in two steps: :func:`render_bundle` computes every byte (certificates in
PEM, hashes, ``device.json``) and touches no file; :meth:`BundleDirectory.store` writes them.
A worker renders and stores in its writer thread while its main thread keeps the HSM busy
(:mod:`.writer`).

**What is written, and why that is enough.** ``device.json`` is the completeness marker: it
is written last, and through a temporary name renamed into place, so a reader sees either no
``device.json`` or the whole of it. It records the SHA-256 of every other file of the
bundle. Those other files are written in place, with no temporary name and no rename:

* while a worker runs, they are complete before ``device.json`` appears (one thread writes
  them in order, and the page cache shows a reader every byte written before the rename);
* after a kill, a file may be cut short, but then ``device.json`` is absent: the bundle is
  incomplete whatever the other files hold, the serial is in the signing ledger (marked
  before signing), and the resume settles it ``void`` and removes its files
  (:mod:`.settle`); a torn file is never taken for a whole one;
* after a power cut, nothing of a chunk is known durable before its one filesystem sync, so
  any file (``device.json`` included) may be empty or stale. That is why settling does not
  trust presence: a bundle is recovered only when ``device.json`` parses, names the serial,
  and every file it lists has the SHA-256 it records (the journal records a chunk only after
  its sync, so it never claims a bundle that is not durable).

A temporary name per payload file would add a rename per file and protect nothing that the
hashes do not already protect. The number of files is the contract's; what the disk pays for
is mostly creating their inodes (docs/benchmarks.md). A write that fails removes what it
half wrote (a failed in-place file is unlinked), so a full disk leaves only whole files and
no ``device.json``.

A directory that already exists (a device issued again after a void or released serial, or
a renewal) loses its old ``device.json`` first, so an old marker never vouches for new files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from ..ca.certs import pem, public_key_sha256, thumbprints
from ..files import create_at, open_directory, replace_at, storage_errors
from ..layout import DEVICE_CERT, DEVICE_JSON, FULL_CHAIN
from ..serials import serial_hex
from .records import IssuedBundle, KeyReference

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BundleFile:
    name: str
    data: bytes
    private: bool = False


@dataclass(frozen=True)
class RenderedBundle:
    """Every byte of one device's bundle, and what the journal and audit log record of it."""

    registration_id: str
    files: tuple[BundleFile, ...]  # written in this order, before device.json
    device_json: bytes
    issued: IssuedBundle  # its ``files`` include device.json's hash


def render_bundle(
    *,
    batch_id: str,
    registration_id: str,
    device_id: str,
    cert: x509.Certificate,
    chain_pem: bytes,
    private_files: dict[str, bytes],
    key: KeyReference,
    extra: dict[str, Any],
    key_generated: bool = True,
) -> RenderedBundle:
    """The bundle's bytes; no file is touched."""
    leaf = pem(cert)
    files = [BundleFile(DEVICE_CERT, leaf), BundleFile(FULL_CHAIN, leaf + chain_pem)]
    files += [BundleFile(name, data, private=True) for name, data in private_files.items()]
    hashes = {f.name: hashlib.sha256(f.data).hexdigest() for f in files}
    issued = IssuedBundle(
        registration_id=registration_id,
        serial=serial_hex(cert.serial_number),
        thumbprints=thumbprints(cert),
        public_key_sha256=public_key_sha256(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
        key=key,
        files=hashes,
        key_generated=key_generated,
    )
    detail = issued.to_json()
    del detail["key_generated"]  # device.json describes the bundle, not how the run went
    document = {
        "format": FORMAT_VERSION,
        "batch_id": batch_id,
        "registration_id": registration_id,
        "device_id": device_id,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        **detail,
        **extra,
    }
    data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    return RenderedBundle(
        registration_id,
        tuple(files),
        data,
        replace(issued, files={**hashes, DEVICE_JSON: hashlib.sha256(data).hexdigest()}),
    )


class BundleDirectory:
    """A batch directory (or a renewal's) that bundles are stored in, held open: every name
    is resolved from its descriptor, one component at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with storage_errors(path):
            self._fd = open_directory(path)

    def store(self, bundle: RenderedBundle) -> None:
        """Write ``bundle`` (module docstring: payload files in place, device.json last and
        atomically). Durability is the caller's: one filesystem sync per chunk."""
        rid = bundle.registration_id
        where = self.path / rid
        try:
            with storage_errors(where):
                os.mkdir(rid, dir_fd=self._fd)
            fresh = True
        except FileExistsError:
            fresh = False
        fd = os.open(rid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._fd)
        try:
            if not fresh:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(DEVICE_JSON, dir_fd=fd)
            for file in bundle.files:
                create_at(fd, file.name, file.data, private=file.private, where=where)
            replace_at(fd, DEVICE_JSON, bundle.device_json, where=where)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BundleDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_bundle(batch_dir: Path, bundle: RenderedBundle) -> IssuedBundle:
    """Store one rendered bundle (for callers that make one at a time: renewals, open lots)
    and return what the journal and audit log record of it."""
    with BundleDirectory(batch_dir) as directory:
        directory.store(bundle)
    return bundle.issued
