"""Per-stage statistics, as ``report.json`` → ``stages`` shows them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class StageStats:
    """How long a stage took and what it did. Fields a stage does not measure stay None and
    are left out of the JSON."""

    seconds: float = 0.0
    devices: int | None = None
    devices_per_s: float | None = None
    workers: int | None = None
    worker_seconds: dict[str, float] | None = None  # issue: summed per worker step
    calls: int | None = None  # register: API calls made
    retries: int | None = None
    sealed: bool | None = None  # seal

    @staticmethod
    def rate(devices: int, seconds: float) -> float:
        return devices / seconds if seconds > 0 and devices else 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
