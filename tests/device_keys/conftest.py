"""Fixtures of the device-key tests: an emulator per test that needs one (fast assignment,
no quota)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import Emu, free_ports, start_emulator


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emu]:
    data = tmp_path / "emu"
    data.mkdir()
    port, service, hub = free_ports(3)
    (data / "config.json").write_text(
        json.dumps(
            {
                "port": port,
                "service_port": service,
                "hub_port": hub,
                "assign_seconds": 0.1,
                "retry_after": 1,
                "operations_per_minute": 600000,
                "registrations_per_minute": 600000,
            }
        )
    )
    e = start_emulator(data)
    yield e
    if e.proc.poll() is None:
        e.stop()
