"""Registration against the emulator on loopback: how close the stage runs to the DPS quota,
and enrollments per second with no quota."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from common import OUT, PROVLINE, ROOT, run, size


def measure(ca_dir: Path) -> dict[str, object]:
    """The registration stage against the emulator: quota efficiency and raw speed."""
    from pipeline.registration.stage import RegisterOptions

    results: dict[str, object] = {}
    for name, quota in (("quota", 1000), ("free", 10_000_000)):
        data = OUT / f"emu-{name}"
        data.mkdir()
        (data / "config.json").write_text(
            json.dumps({"operations_per_minute": quota, "registrations_per_minute": quota})
        )
        proc = subprocess.Popen(
            [*PROVLINE, "emulator", "serve", "--data-dir", str(data)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                if (data / "emulator.json").exists():
                    break
                time.sleep(0.05)
            dps = f"dps:\n  emulator_dir: {data}\n"
            options = RegisterOptions(
                operations_per_minute=quota, concurrency=8, bulk_size=10, upload_ca=True
            )
            out = run(
                "wrapped",
                ca_dir,
                f"reg{name}",
                size(2_000, 300) if name == "quota" else size(5_000, 500),
                dps=dps,
                registration="individual",
                register=options,
            )["register"]
        finally:
            proc.terminate()
            proc.wait()
        if name == "quota":
            minimum = math.ceil(size(2_000, 300) / 10) * 60 / quota  # bulk calls x the quota's pace
            results["dps_quota_seconds"] = round(out["seconds"], 2)
            results["dps_quota_minimum_seconds"] = round(minimum, 2)
            results["dps_quota_efficiency"] = round(out["seconds"] / minimum, 3)
        else:
            results["dps_enrollments_per_s"] = round(out["devices_per_s"], 1)
    return results
