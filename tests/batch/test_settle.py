"""Settling open intents from real files: whole bundles are recovered, torn or tampered ones
void, unmarked serials released; the log's tail tells which recovered ones it already has."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.audit.log import AuditLog
from pipeline.batch import ledger
from pipeline.batch.records import KeyReference
from pipeline.batch.settle import classify, complete_bundle, logged_issued
from pipeline.vocabulary import AuditEvent, Custody


def _bundle(batch: Path, rid: str, serial: str) -> dict[str, str]:
    """A bundle as a worker writes it: files, then device.json with their hashes."""
    directory = batch / rid
    directory.mkdir(parents=True)
    hashes = {}
    for name, data in (("device.cert.pem", f"cert {serial}"), ("device.key.wrapped", "blob")):
        (directory / name).write_text(data)
        hashes[name] = hashlib.sha256(data.encode()).hexdigest()
    info = {
        "registration_id": rid,
        "serial": serial,
        "sha1_thumbprint": "AA",
        "sha256_thumbprint": "BB",
        "public_key_sha256": "cc",
        "not_after": "2027-01-01T00:00:00+00:00",
        "key": {"custody": "wrapped", "file": "device.key.wrapped"},
        "files": hashes,
    }
    (directory / "device.json").write_text(json.dumps(info))
    return {**hashes, "device.json": hashlib.sha256(json.dumps(info).encode()).hexdigest()}


def test_whole_torn_and_unsigned_serials(tmp_path: Path) -> None:
    files = _bundle(tmp_path, "d1", "A1")  # whole
    _bundle(tmp_path, "d2", "A2")
    (tmp_path / "d2" / "device.key.wrapped").write_text("half a blob")  # torn
    _bundle(tmp_path, "d3", "A3")
    (tmp_path / "d3" / "device.json").unlink()  # signed, never finished
    writer = ledger.LedgerWriter(tmp_path)
    writer.mark(["A1", "A2", "A3", "A4"])  # A4: marked, never written; A5: never marked
    writer.close()
    dangling = [("d1", "A1"), ("d2", "A2"), ("d3", "A3"), ("d4", "A4"), ("d5", "A5")]
    out = classify(tmp_path, dangling, ledger_kept=True, key_present=lambda _: True)
    assert [(b.registration_id, b.serial, b.files) for b in out.recovered] == [("d1", "A1", files)]
    assert out.recovered[0].key == KeyReference(Custody.WRAPPED, file="device.key.wrapped")
    assert out.void == [("d2", "A2"), ("d3", "A3"), ("d4", "A4")]
    assert out.released == [("d5", "A5")]
    assert out.logged == set()


def test_without_a_ledger_every_open_serial_may_have_been_signed(tmp_path: Path) -> None:
    out = classify(tmp_path, [("d9", "B9")], ledger_kept=False, key_present=lambda _: True)
    assert out.void == [("d9", "B9")] and not out.released


def test_a_retained_key_missing_from_the_token_makes_the_bundle_void(tmp_path: Path) -> None:
    _bundle(tmp_path, "d1", "C1")
    ledger.LedgerWriter(tmp_path).mark(["C1"])
    out = classify(tmp_path, [("d1", "C1")], ledger_kept=True, key_present=lambda _: False)
    assert out.void == [("d1", "C1")] and not out.recovered


def test_the_log_tail_says_which_recovered_bundles_it_already_has(tmp_path: Path) -> None:
    files = _bundle(tmp_path, "d1", "E1")
    log = AuditLog(tmp_path / "audit.jsonl")
    log.extend([(AuditEvent.INTENT, f"x{n}", {"serial": f"F{n}"}) for n in range(5000)])
    log.extend(
        [(AuditEvent.INTENT, "d1", {"serial": "E1"}), (AuditEvent.INTENT, "d2", {"serial": "E2"})]
    )
    log.extend([(AuditEvent.ISSUED, "x1", {"serial": "F1", "files": {}})])
    log.append(AuditEvent.ISSUED, "d1", {"serial": "E1", "files": files})  # logged, not committed
    log.close()
    assert logged_issued(tmp_path / "audit.jsonl", {"E1", "E2"}) == {"E1": files}
    ledger.LedgerWriter(tmp_path).mark(["E1"])
    out = classify(tmp_path, [("d1", "E1")], ledger_kept=True, key_present=lambda _: True)
    assert [b.serial for b in out.recovered] == ["E1"] and out.logged == {"E1"}
    # the files must still be what the log recorded
    assert (
        complete_bundle(tmp_path / "d1", "d1", "E1", {**files, "device.cert.pem": "0" * 64}) is None
    )
