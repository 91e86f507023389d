"""A 1,000,000-device wrapped lot, end to end: throughput and memory at the size a large
production lot reaches (skipped with ``BENCH_QUICK=1``).

The batch runs in a fresh process so that its peak RSS is its own, not that of whatever the
benchmark process measured before. It needs room: the bundles of a million devices are five
million inodes and, on a 4 KiB-block filesystem, about 17 GB with the journal and log; when
the disk under bench-out/ has less than :data:`BYTES_PER_DEVICE` and :data:`INODES_PER_DEVICE`
per device free (a margin over that), the lot is not started and the result says why. Its
files are removed as soon as it is measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import OUT, QUICK, ROOT

COUNT = 1_000_000
BYTES_PER_DEVICE = 24 * 1024  # four files of one block each, the directory's block, the log
INODES_PER_DEVICE = 6  # the directory, four files, and slack


def room(count: int) -> str:
    """Why ``count`` devices would not fit under bench-out/, or "" when they would."""
    st = os.statvfs(OUT)
    free_bytes, free_inodes = st.f_bavail * st.f_frsize, st.f_favail
    need_bytes, need_inodes = count * BYTES_PER_DEVICE, count * INODES_PER_DEVICE
    if free_bytes < need_bytes or free_inodes < need_inodes:
        return (
            f"needs {need_bytes / 1e9:.0f} GB and {need_inodes:,} inodes free under {OUT}; "
            f"{free_bytes / 1e9:.0f} GB and {free_inodes:,} inodes are"
        )
    return ""


def measure(ca_dir: Path) -> dict[str, object]:
    if QUICK:
        return {"wrapped_1m_skipped": "BENCH_QUICK=1"}
    why = room(COUNT)
    if why:
        print(f"wrapped custody, {COUNT:,} devices: skipped ({why})", flush=True)
        return {"wrapped_1m_skipped": why}
    print(f"wrapped custody, {COUNT:,} devices (fresh process) ...", flush=True)
    done = subprocess.run(
        [sys.executable, __file__, str(ca_dir), str(COUNT)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    lot = json.loads(done.stdout.splitlines()[-1])
    shutil.rmtree(lot.pop("batch_dir"), ignore_errors=True)
    return {
        "wrapped_1m_devices_per_s": round(lot["devices_per_s"], 1),
        "wrapped_1m_peak_rss_mb": lot["peak_rss_mb"],
        "wrapped_1m_detail": {
            "wall_seconds": round(lot["wall_seconds"], 1),
            "worker_seconds": lot["worker_seconds"],
        },
    }


def _child(ca_dir: Path, count: int) -> None:
    from common import peak_rss_mb, run

    lot = run("wrapped", ca_dir, f"wrapped{count // 1000}k", count)
    print(json.dumps({**lot, "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]))
