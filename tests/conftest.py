"""Session fixtures: the tools the integration tests drive, SoftHSM2 tokens in a temporary
directory with their own SOFTHSM2_CONF, and a CA hierarchy made through the CLI.

SoftHSM2 reads SOFTHSM2_CONF once per process (at C_Initialize), so the in-process tests share
one session-wide token directory; tests that need a different one run provline as a
subprocess.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import (
    CA,
    Emu,
    Hsm,
    Ock,
    make_ca,
    make_hsm,
    ock_unavailable,
    start_fast_emulator,
    start_opencryptoki,
)


@pytest.fixture(scope="session")
def _tools() -> None:
    for tool in ("softhsm2-util", "pkcs11-tool", "openssl", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make setup` (it installs softhsm2, opensc)")


@pytest.fixture(scope="session")
def hsm_env(_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    """The session's SoftHSM2 tokens; this process's SOFTHSM2_CONF points at them."""
    h = make_hsm(tmp_path_factory.mktemp("softhsm"))
    os.environ["SOFTHSM2_CONF"] = str(h.conf)
    os.environ["PROVLINE_PIN"] = h.pin_file.read_text().strip()
    return h


@pytest.fixture(scope="session")
def ca_env(hsm_env: Hsm, tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(hsm_env, tmp_path_factory.mktemp("ca"))


@pytest.fixture
def own_tokens(_tools: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Hsm, CA]:
    """Tokens and a CA of this test's own, for tests that SIGKILL provline while it works.
    SoftHSM2 rewrites its token file in place (truncate, then write) when a session logs
    in, so a kill at that instant can leave the token unreadable (docs/hsm.md): then only
    this test's tokens are lost. Open them only in subprocesses (one SoftHSM2 config per
    process: the session's)."""
    base = tmp_path_factory.mktemp("own-hsm")
    h = make_hsm(base, token="own-station", root_token="own-root")
    return h, make_ca(h, base / "ca")


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emu]:
    """An emulator of this test's own: free ports, quick assignment, the default quotas."""
    e = start_fast_emulator(tmp_path)
    yield e
    if e.proc.poll() is None:
        e.stop()


@pytest.fixture(scope="session")
def ock_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ock]:
    """openCryptoki's software token, its own pkcsslotd in a private mount namespace; stopped
    at the end of the session."""
    reason = ock_unavailable()
    if reason:
        pytest.skip(reason)
    ock = start_opencryptoki(tmp_path_factory.mktemp("opencryptoki"))
    yield ock
    ock.stop()
