"""Fixtures of the device-key tests: an emulator per test that needs one (fast assignment,
no quota)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import UNTHROTTLED, Emu, start_fast_emulator


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emu]:
    """The emulator with no quota: these tests measure nothing about pacing."""
    e = start_fast_emulator(tmp_path, **UNTHROTTLED)
    yield e
    if e.proc.poll() is None:
        e.stop()
