"""Fixtures of the lifecycle tests: an emulator per test (fast assignment), the pkcs8
passphrase the device-side checks need."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import Emu, emulator_dir, start_emulator
from .support import PASSPHRASE


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emu]:
    data = emulator_dir(
        tmp_path,
        assign_seconds=0.1,
        retry_after=1,
        operations_per_minute=600000,
        registrations_per_minute=600000,
    )
    e = start_emulator(data)
    yield e
    if e.proc.poll() is None:
        e.stop()


@pytest.fixture
def passphrase(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PROVLINE_TEST_PASSPHRASE", PASSPHRASE)
    return PASSPHRASE
