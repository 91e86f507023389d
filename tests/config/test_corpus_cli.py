"""The hostile-input corpus (tests/config/corpus.py) through the command line, against the
session's real SoftHSM2 token and CA.

Every refused case runs ``provline validate``, ``plan`` and ``run``: all three must refuse it
the same way (exit code, one printable ``error:`` line per problem naming file and line,
nothing secret), within a memory cap and a time limit, and leave no trace: the case directory
(where the station's output would go) is unchanged, no object appeared in the token, and the
socket the station names as DPS was never connected to. Cases the HSM refuses pass validate
and plan (neither opens the HSM) and fail ``run`` with the HSM exit code, naming the station
file. Accepted cases must pass all three, and ``run`` must finish the batch.

Commands run in processes forked from one that imported the CLI once (tests/support.py
``ForkedCli``): the same entry point as ``python -m pipeline.cli`` at a fraction of the
start-up cost. The bombs and the million-device manifest also run as fresh
``python -m pipeline.cli`` processes under an RLIMIT_AS cap.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..support import CA, MODULE, PROVLINE, ROOT, ForkedCli, Hsm, provline
from .corpus import (
    ACCEPTED,
    CASES,
    CONNECTION_STRING,
    REFUSED,
    Case,
    Setting,
    check_problems,
    materialize,
    snapshot,
)

pytestmark = pytest.mark.integration

MEMORY_MB = 256  # address space a command may add to what the loaded CLI already maps
TIMEOUT = 60  # seconds; the slowest case (1,000,001 CSV rows) takes a few


@dataclass
class Line:
    """What the corpus runs against: the forked CLI, the real CA and token, and a socket
    standing in for DPS that must never see a connection."""

    cli: ForkedCli
    setting: Setting
    tokens: Path
    dps: socket.socket
    env: dict[str, str]

    def connections(self) -> int:
        made = 0
        while True:
            try:
                conn, _ = self.dps.accept()
            except BlockingIOError:
                return made
            conn.close()
            made += 1


@pytest.fixture(scope="module")
def line(hsm_env: Hsm, ca_env: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    dps = socket.socket()
    dps.bind(("127.0.0.1", 0))
    dps.listen(64)
    dps.setblocking(False)
    cli = ForkedCli(tmp_path_factory.mktemp("forked-cli"))
    conf = hsm_env.conf.read_text()
    tokens = Path(conf.split("directories.tokendir = ", 1)[1].split("\n", 1)[0].strip())
    setting = Setting(
        module=MODULE,
        token=hsm_env.token,
        conf=str(hsm_env.conf),
        chain=ca_env.chain,
        root=ca_env.root,
        audit=ca_env.audit_cert,
        pin_text=hsm_env.pin_file.read_text(),
        port=dps.getsockname()[1],
    )
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(hsm_env.conf),
        "PROVLINE_CORPUS_CS": CONNECTION_STRING,
    }
    env.pop("PROVLINE_PIN", None)  # the station's pin file is the only PIN source
    yield Line(cli, setting, tokens, dps, env)
    cli.close()
    dps.close()


def _token_objects(tokens: Path) -> set[str]:
    return {str(p.relative_to(tokens)) for p in tokens.rglob("*.object")}


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_refused(case: Case, line: Line, tmp_path: Path) -> None:
    case_dir = tmp_path / "case"
    station, manifest = materialize(case, case_dir, line.setting)
    before, objects = snapshot(case_dir), _token_objects(line.tokens)
    # plan reads inputs exactly as validate does; a slow case runs it once less.
    for command in ("validate", "run") if case.slow else ("validate", "plan", "run"):
        result = line.cli.run(
            command,
            str(manifest),
            "--station",
            str(station),
            *case.args,
            env=line.env,
            cwd=case_dir,
            memory_mb=MEMORY_MB,
            timeout=TIMEOUT,
        )
        assert not result.timed_out, f"{command} ran longer than {TIMEOUT} s"
        if case.stage == "hsm" and command == "validate":
            assert result.returncode == 0, result.stderr  # validate never opens the HSM
            continue
        assert result.returncode == case.code, f"{command}: {result.stderr}"
        check_problems(case, case_dir, result.stderr, result.stdout)
        assert result.stdout == "", result.stdout
    assert snapshot(case_dir) == before, "a refused input left something behind"
    assert _token_objects(line.tokens) == objects, "a refused input left an HSM object"
    assert line.connections() == 0, "a refused input opened a connection"


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.id)
def test_accepted(case: Case, line: Line, tmp_path: Path) -> None:
    """What validate accepts, plan and run accept too, and run finishes the batch."""
    case_dir = tmp_path / "case"
    station, manifest = materialize(case, case_dir, line.setting)
    args = (str(manifest), "--station", str(station), *case.args)
    valid = line.cli.run("validate", *args, env=line.env, cwd=case_dir, memory_mb=MEMORY_MB)
    assert (valid.returncode, valid.stderr) == (0, ""), valid.stderr
    assert f": {case.devices} devices in batch" in valid.stdout
    planned = line.cli.run("plan", *args, "--json", env=line.env, cwd=case_dir)
    assert planned.returncode == 0, planned.stderr
    assert f'"would_issue": {case.devices}' in planned.stdout
    if case.run:
        ran = provline("run", *args, "--quiet", "--workers", "1", env=line.env, check=False)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        batch = next((case_dir / "out").iterdir())
        status = json.loads(provline("status", str(batch), "--json", env=line.env).stdout)
        assert status["devices"]["by_state"] == {"bundled": case.devices}
    assert line.connections() == 0


# Cases that would take gigabytes or minutes if a limit were missing: also run as a fresh
# `python -m pipeline.cli validate` under an absolute address-space cap.
BOMBS = [
    "alias-bomb-in-tags",
    "alias-bomb-as-device-list",
    "alias-bomb-wide-not-deep",
    "flow-nesting-unclosed-100000",
    "block-nesting-100",
    "manifest-over-16-mib",
    "two-billion-generated",
    "csv-field-over-the-csv-module-limit",
    "station-alias-bomb",
    "csv-dev-zero",
    "pin-file-dev-zero",
    "csr-dev-zero",
    "csr-over-16-kib",
]
FRESH_CAP = 512 * 1024 * 1024  # address space for a whole fresh CLI process (~70 MB idle)


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (FRESH_CAP, FRESH_CAP))


def _fresh(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """A fresh ``python -m pipeline.cli`` under the cap: exit code, stdout, stderr."""
    proc = subprocess.run(
        [*PROVLINE, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        preexec_fn=_capped,
        timeout=TIMEOUT,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", [c for c in CASES if c.id in BOMBS], ids=lambda c: c.id)
def test_bomb_in_a_fresh_process_under_a_memory_cap(case: Case, line: Line, tmp_path: Path) -> None:
    case_dir = tmp_path / "case"
    station, manifest = materialize(case, case_dir, line.setting)
    code, out, err = _fresh(
        ["validate", str(manifest), "--station", str(station)], line.env, case_dir
    )
    assert code == case.code, err
    check_problems(case, case_dir, err, out)


def _peak_rss_kb(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run a fresh CLI under the cap and return (peak RSS KiB, stdout, stderr) of that one
    process, read with wait4 (RUSAGE_CHILDREN would mix in every earlier child)."""
    proc = subprocess.Popen(
        [*PROVLINE, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_capped,
    )
    assert proc.stdout and proc.stderr
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err.decode()
    return usage.ru_maxrss, out.decode(), err.decode()


def test_a_million_devices_validate_in_flat_memory(line: Line, tmp_path: Path) -> None:
    """A 1,000,000-row CSV manifest validates under the 512 MiB cap, and its peak memory is
    within a few tens of MB of a 1,000-row one: devices are streamed, 16 bytes each kept."""
    station = tmp_path / "station.yaml"
    station.write_text(
        f"""\
station: corpus
hsm: {{module: {MODULE}, token: {line.setting.token}, pin: file:{tmp_path / "pin"}}}
ca:
  chain: {line.setting.chain}
  issuer_key: pkcs11:token={line.setting.token};object=intermediate;type=private
  root_cert: {line.setting.root}
custody: {{policy: retain}}
output: {tmp_path / "out"}
"""
    )
    (tmp_path / "pin").write_text(line.setting.pin_text)
    (tmp_path / "pin").chmod(0o600)
    peaks = {}
    for count in (1_000, 1_000_000):
        path = tmp_path / f"lot-{count}.csv"
        with path.open("w") as handle:
            handle.write("registration_id,tag.line\n")
            handle.writelines(f"m-{i:07d},A\n" for i in range(count))
        peak, out, _ = _peak_rss_kb(
            ["validate", str(path), "--station", str(station)], line.env, tmp_path
        )
        assert f"{count} devices in batch lot-{count}" in out
        peaks[count] = peak
    growth_mb = (peaks[1_000_000] - peaks[1_000]) / 1024
    assert growth_mb < 48, f"peak RSS grew {growth_mb:.0f} MB from 1,000 to 1,000,000 devices"
    assert not (tmp_path / "out").exists()


def test_the_forked_cli_answers_like_a_fresh_one(line: Line, tmp_path: Path) -> None:
    """The forked runner is only a faster start: the same case gives the same exit code and
    the same lines as a fresh ``python -m pipeline.cli``."""
    for case in [c for c in REFUSED if c.id in ("rid-terminal-escape", "pin-inline-string")]:
        case_dir = tmp_path / case.id
        station, manifest = materialize(case, case_dir, line.setting)
        args = ["validate", str(manifest), "--station", str(station)]
        forked = line.cli.run(*args, env=line.env, cwd=case_dir)
        code, out, err = _fresh(args, line.env, case_dir)
        assert (forked.returncode, forked.stdout, forked.stderr) == (code, out, err)
