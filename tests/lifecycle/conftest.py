"""Fixtures of the lifecycle tests: an emulator per test (fast assignment), the pkcs8
passphrase the device-side checks need."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import UNTHROTTLED, Emu, start_fast_emulator
from .support import PASSPHRASE


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emu]:
    """The emulator with no quota: these tests measure nothing about pacing."""
    e = start_fast_emulator(tmp_path, **UNTHROTTLED)
    yield e
    if e.proc.poll() is None:
        e.stop()


@pytest.fixture
def passphrase(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PROVLINE_TEST_PASSPHRASE", PASSPHRASE)
    return PASSPHRASE
