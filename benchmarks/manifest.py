"""Manifest validation at the device limit: a 1,000,000-device CSV (BENCH_QUICK: 100,000)
checked the way ``provline validate`` checks it (station, manifest, manifest against
station), in a fresh process so its peak RSS is its own. The streamed checks keep memory
flat: the figure to watch is peak minus baseline (docs/limits.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import OUT, ROOT, size, station

# Runs in the child: the baseline is the RSS after the imports, before the manifest.
_CHILD = """
import json, resource, sys, time
from pathlib import Path
from pipeline.batch.plan import check_inputs
from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
st = load_station(Path(sys.argv[2]))
mf = load_manifest(Path(sys.argv[1]))
check_inputs(mf, st)
seconds = time.monotonic() - started
print(json.dumps({"seconds": seconds, "devices": len(mf), "baseline_kb": baseline}))
"""


def _write_csv(path: Path, count: int) -> None:
    with path.open("w") as handle:
        handle.write("registration_id,tag.line,desired.interval\n")
        handle.writelines(f"lot-{i:07d},A,30\n" for i in range(count))


def measure(ca_dir: Path) -> dict[str, object]:
    count = size(1_000_000, 100_000)
    path = OUT / "manifest-1m.csv"
    print(f"manifest validation, {count:,} devices ...", flush=True)
    _write_csv(path, count)
    csv_mb = round(path.stat().st_size / 2**20, 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(station("wrapped", ca_dir))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out
    child = json.loads(out)
    assert child["devices"] == count
    path.unlink()
    return {
        "manifest_devices": count,
        "manifest_1m_validate_seconds": round(child["seconds"], 2),
        "manifest_1m_validate_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "manifest_1m_validate_baseline_rss_mb": round(child["baseline_kb"] / 1024, 1),
        "manifest_csv_mb": csv_mb,
    }
