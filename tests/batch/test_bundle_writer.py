"""Bundles as the worker's writer thread stores them, on real files: every file with its mode,
``device.json`` last and naming every hash, an old marker never vouching for new files, a
device that fails alone, and a disk failure that stops the writer with nothing torn."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import ca
from pipeline.batch.bundle import BundleDirectory, RenderedBundle, render_bundle
from pipeline.batch.records import KeyReference
from pipeline.batch.settle import complete_bundle
from pipeline.batch.writer import BundleWriter, WriteJob
from pipeline.errors import StorageError
from pipeline.keyprofile import KeyProfile
from pipeline.layout import DEVICE_CERT, DEVICE_JSON, FULL_CHAIN, WRAPPED_KEY
from pipeline.vocabulary import Custody

from ..support import ROOT

_KEY = KeyProfile.EC_P256.generate_software_key()
_ROOT = ca.build_root(_KEY, ca.parse_name("CN=Writer Test Root"), 30)
_ISSUER = ca.Issuer(_ROOT, _KEY, ca.pem(_ROOT))
_REFERENCE = KeyReference(Custody.WRAPPED, file=WRAPPED_KEY, format="test")


def _bundle(rid: str, serial: int, blob: bytes = b"wrapped key") -> RenderedBundle:
    public = KeyProfile.EC_P256.generate_software_key().public_key()
    cert = ca.build_leaf(public, rid, _ISSUER, serial=serial, validity_days=30)
    return render_bundle(
        batch_id="b1",
        registration_id=rid,
        device_id=rid,
        cert=cert,
        chain_pem=_ISSUER.chain_pem,
        private_files={WRAPPED_KEY: blob},
        key=_REFERENCE,
        extra={},
    )


def _job(index: int, bundle: RenderedBundle) -> WriteJob:
    return WriteJob(index, bundle.registration_id, bundle.issued.serial, lambda: bundle)


def test_a_stored_bundle_is_whole_with_modes_and_no_temporary_file(tmp_path: Path) -> None:
    bundle = _bundle("dev-1", 0xA1)
    with BundleDirectory(tmp_path) as directory:
        directory.store(bundle)
    where = tmp_path / "dev-1"
    assert sorted(p.name for p in where.iterdir()) == sorted(
        [DEVICE_CERT, FULL_CHAIN, WRAPPED_KEY, DEVICE_JSON]
    )
    assert (where / WRAPPED_KEY).stat().st_mode & 0o777 == 0o600
    assert (where / DEVICE_CERT).stat().st_mode & 0o777 == 0o644
    info = json.loads((where / DEVICE_JSON).read_bytes())
    assert info["serial"] == "A1" and set(info["files"]) == {DEVICE_CERT, FULL_CHAIN, WRAPPED_KEY}
    for name, digest in bundle.issued.files.items():
        assert hashlib.sha256((where / name).read_bytes()).hexdigest() == digest
    assert complete_bundle(where, "dev-1", "A1", bundle.issued.files) == bundle.issued


def test_storing_again_replaces_the_old_bundle_and_its_marker(tmp_path: Path) -> None:
    with BundleDirectory(tmp_path) as directory:
        directory.store(_bundle("dev-1", 0xA1, b"old key"))
        new = _bundle("dev-1", 0xB2, b"new key")
        directory.store(new)
    where = tmp_path / "dev-1"
    assert (where / WRAPPED_KEY).read_bytes() == b"new key"
    assert complete_bundle(where, "dev-1", "A1", None) is None
    assert complete_bundle(where, "dev-1", "B2", new.issued.files) == new.issued


def test_the_writer_reports_in_chunk_order_and_a_failing_device_alone(tmp_path: Path) -> None:
    bundles = [_bundle(f"dev-{n}", 0x100 + n) for n in range(6)]

    def broken() -> RenderedBundle:
        raise ValueError("cannot render")

    with BundleDirectory(tmp_path) as directory:
        writer = BundleWriter(directory, depth=2)  # the signer waits on a full queue
        for index, bundle in enumerate(bundles):
            if index == 3:
                writer.put(WriteJob(index, bundle.registration_id, bundle.issued.serial, broken))
            else:
                writer.put(_job(index, bundle))
        writer.finish()
    assert [i for i, _ in writer.outcome.issued] == [0, 1, 2, 4, 5]
    assert [b.serial for _, b in writer.outcome.issued] == ["0100", "0101", "0102", "0104", "0105"]
    [(index, failed)] = writer.outcome.not_issued
    assert index == 3 and failed.signed and "cannot render" in failed.reason
    assert not (tmp_path / "dev-3").exists()
    assert all((tmp_path / f"dev-{n}" / DEVICE_JSON).is_file() for n in (0, 1, 2, 4, 5))


@pytest.mark.integration
def test_a_full_disk_stops_the_writer_with_no_torn_file_and_no_marker(tmp_path: Path) -> None:
    """The kernel cuts the third bundle's key file short (RLIMIT_FSIZE: a short write, then
    EFBIG, where a full disk gives ENOSPC): the writer stops, ``finish`` raises the storage
    error, the third bundle has only whole files and no device.json, later ones nothing."""
    script = f"""
        import json
        from pathlib import Path
        from pipeline.batch.bundle import BundleDirectory
        from pipeline.batch.writer import BundleWriter
        from pipeline.errors import StorageError
        from tests.batch.test_bundle_writer import _bundle, _job
        blobs = [b"k" * 100, b"k" * 100, b"k" * 200_000, b"k" * 100]
        with BundleDirectory(Path({str(tmp_path)!r})) as directory:
            writer = BundleWriter(directory)
            for n, blob in enumerate(blobs):
                writer.put(_job(n, _bundle(f"dev-{{n}}", 0x200 + n, blob)))
            try:
                writer.finish()
            except StorageError as exc:
                issued = [i for i, _ in writer.outcome.issued]
                print(json.dumps({{"error": exc.line(), "code": exc.exit_code, "issued": issued}}))
        """

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=cap,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["code"] == StorageError.exit_code and outcome["issued"] == [0, 1]
    assert "file too large" in outcome["error"] and WRAPPED_KEY in outcome["error"]
    assert sorted(p.name for p in (tmp_path / "dev-2").iterdir()) == [DEVICE_CERT, FULL_CHAIN]
    assert not (tmp_path / "dev-3").exists()
