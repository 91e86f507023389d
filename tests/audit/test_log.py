"""The audit log writer: the hash chain, torn tails, the encoding the chain covers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.audit.log import GENESIS, AuditLog
from pipeline.vocabulary import AuditEvent


def test_torn_tail_is_cut_and_the_chain_continues(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("batch_start", data={"batch_id": "t"})
    log.append("intent", "d1", {"serial": "AB"})
    log.close()
    with (tmp_path / "audit.jsonl").open("ab") as handle:
        handle.write(b'{"seq":3,"time":"2026')  # a kill in the middle of a write
    resumed = AuditLog(tmp_path / "audit.jsonl")
    assert resumed.torn_bytes == 21 and resumed.seq == 2
    resumed.append("resume")
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
    assert [r["seq"] for r in records] == [1, 2, 3]


def test_each_line_chains_to_the_one_before(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.extend([(AuditEvent.INTENT, f"d{n}", {"serial": f"{n:X}"}) for n in range(5)])
    log.close()
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        assert record["seq"] == number and record["prev"] == prev
        assert list(record) == ["seq", "time", "event", "registration_id", "data", "prev"]
        prev = hashlib.sha256(line).hexdigest()
    assert log.prev == prev


def test_nothing_reaches_the_file_before_flush(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(AuditEvent.BATCH_START, data={"batch_id": "t"})
    assert (tmp_path / "audit.jsonl").read_bytes() == b""
    log.flush(sync=False)
    assert (tmp_path / "audit.jsonl").read_bytes().count(b"\n") == 1
    log.close()
