"""Short and failed writes, made by the kernel: a process whose file-size limit
(RLIMIT_FSIZE) is reached gets a short write, then EFBIG, exactly where a full disk gives a
short write, then ENOSPC. The audit log and atomic writes must leave nothing torn behind."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.audit.log import GENESIS, AuditLog
from pipeline.vocabulary import AuditEvent

from ..support import ROOT

pytestmark = pytest.mark.integration


def _limited(code: str, limit: int) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process that cannot write past ``limit`` bytes of a file."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=cap,
        timeout=60,
    )


def _chain_ok(path: Path) -> int:
    prev, count = GENESIS, 0
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        record = json.loads(line)
        assert record["seq"] == number and record["prev"] == prev
        prev, count = hashlib.sha256(line).hexdigest(), number
    return count


def test_a_failed_flush_leaves_no_torn_line_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.extend([(AuditEvent.INTENT, f"d{n}", {"serial": f"{n:X}"}) for n in range(20)])
    log.close()
    before = path.read_bytes()
    result = _limited(
        f"""
        import json
        from pathlib import Path
        from pipeline.audit.log import AuditLog
        from pipeline.errors import StorageError
        log = AuditLog(Path({str(path)!r}))
        log.extend([("issued", f"d{{n}}", {{"pad": "x" * 400}}) for n in range(40)])
        try:
            log.flush()
        except StorageError as exc:
            print(json.dumps({{"error": exc.line(), "code": exc.exit_code, "seq": log.seq}}))
        log.append("aborted", data={{"reason": "disk full"}})  # fits: the chain goes on
        log.close()
        """,
        limit=len(before) + 5000,  # part of the 40 lines fits: the write is short
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["code"] == 7 and outcome["seq"] == 20
    assert outcome["error"].startswith(f"{path}: file too large")
    data = path.read_bytes()
    assert data.startswith(before) and data.endswith(b"\n")
    assert _chain_ok(path) == 21  # 20 before, then the abort line; none of the 40


def test_write_atomic_never_leaves_a_temp_file_or_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_bytes(b"the previous report\n")
    result = _limited(
        f"""
        from pathlib import Path
        from pipeline.errors import StorageError
        from pipeline.files import write_atomic
        try:
            write_atomic(Path({str(target)!r}), b"x" * 100_000, fsync=True)
        except StorageError as exc:
            print(exc.line())
        """,
        limit=4096,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{target}: file too large")
    assert target.read_bytes() == b"the previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
