"""The CI contract: with --json every command prints one JSON object whose ``format`` names
its shape, errors included (with the exit code inside); ``validate`` needs no running
emulator; the make targets say the real exit code and `make help` lists them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ..support import CA, ROOT, Hsm, provline, write_station

pytestmark = pytest.mark.integration


def _one_object(stdout: str) -> dict[str, object]:
    document = json.loads(stdout)  # raises unless stdout is exactly one JSON document
    assert isinstance(document, dict)
    return document


def test_errors_are_json_with_the_exit_code_inside(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    usage = provline("status", "--json", check=False)  # no batch directory given
    assert usage.returncode == 2
    error = _one_object(usage.stdout)
    assert error["format"] == "provline.error/1" and error["exit_code"] == 2
    assert error["error"]["kind"] == "usage"  # type: ignore[index]
    assert "Missing argument" in error["error"]["message"]  # type: ignore[index]

    manifest = tmp_path / "m.yaml"
    manifest.write_text("batch_id: b\nkey_profile: ec-p999\ndevices: [{registration_id: d-1}]\n")
    bad = provline("plan", str(manifest), "--station", str(station), "--json", check=False)
    assert bad.returncode == 2
    error = _one_object(bad.stdout)
    assert error["exit_code"] == 2
    detail = error["error"]
    assert isinstance(detail, dict) and detail["kind"] == "input"
    assert detail["type"] == "ValidationFailed" and detail["problems"]
    assert all(line.startswith("error: ") for line in bad.stderr.splitlines())

    missing = provline("audit", "verify", str(tmp_path / "nothing"), "--json", check=False)
    assert missing.returncode == 6
    assert _one_object(missing.stdout)["error"]["kind"] == "audit"  # type: ignore[index]

    wrong_pin = hsm_env.env() | {"PROVLINE_PIN": "not-the-pin"}
    other = write_station(tmp_path / "env-pin.yaml", hsm_env, ca_env, output=tmp_path / "out")
    other.write_text(
        other.read_text().replace(f"pin: file:{hsm_env.pin_file}", "pin: env:PROVLINE_PIN")
    )
    manifest.write_text("batch_id: b\ndevices: [{registration_id: d-1}]\n")
    pin = provline(
        "plan", str(manifest), "--station", str(other), "--json", env=wrong_pin, check=False
    )
    assert pin.returncode == 32
    error = _one_object(pin.stdout)
    assert error["error"]["kind"] == "hsm_pin"  # type: ignore[index]
    assert "not-the-pin" not in pin.stdout + pin.stderr


def test_success_documents_name_their_format(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    manifest = tmp_path / "m.yaml"
    manifest.write_text("batch_id: f\ndevices: [{registration_id: d-1}, {registration_id: d-2}]\n")
    args = (str(manifest), "--station", str(station), "--json")
    formats = {
        "validate": _one_object(provline("validate", *args, env=hsm_env.env()).stdout),
        "plan": _one_object(provline("plan", *args, env=hsm_env.env()).stdout),
        "run": _one_object(provline("run", *args, env=hsm_env.env()).stdout),
        "status": _one_object(provline("status", str(tmp_path / "out" / "f"), "--json").stdout),
        "hsm check": _one_object(
            provline("hsm", "check", "--station", str(station), "--json", env=hsm_env.env()).stdout
        ),
    }
    assert {k: v["format"] for k, v in formats.items()} == {
        "validate": "provline.validate/1",
        "plan": "provline.plan/1",
        "run": "provline.report/1",
        "status": "provline.status/1",
        "hsm check": "provline.hsm-check/1",
    }
    assert formats["validate"]["devices"] == 2 and formats["plan"]["exit_code"] == 0
    assert formats["run"]["exit_code"] == 0 and formats["run"]["failures_total"] == 0
    status = formats["status"]
    assert status["devices"] == {"total": 2, "by_state": {"bundled": 2}, "rework": 0}


def test_validate_needs_no_running_emulator(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    """validate reads input files only; plan and run need the emulator the station names."""
    emulator = tmp_path / "emulator"
    emulator.mkdir()
    station = write_station(
        tmp_path / "s.yaml",
        hsm_env,
        ca_env,
        output=tmp_path / "out",
        extra=f"dps:\n  emulator_dir: {emulator}\n",
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "batch_id: e\nregistration: individual\ndevices: [{registration_id: d-1}]\n"
    )
    before = sorted(p.name for p in tmp_path.rglob("*"))
    valid = provline("validate", str(manifest), "--station", str(station), env=hsm_env.env())
    assert valid.returncode == 0 and valid.stdout.endswith("registration individual: valid\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # touched no file
    plan = provline(
        "plan", str(manifest), "--station", str(station), env=hsm_env.env(), check=False
    )
    assert plan.returncode == 2 and "is the emulator running?" in plan.stderr
    # a connection string given in the station is still checked without the emulator
    (tmp_path / "cs").write_text("HostName=x;SharedAccessKeyName=y;SharedAccessKey=not base64!\n")
    (tmp_path / "cs").chmod(0o600)
    station.write_text(station.read_text() + f"  connection_string: file:{tmp_path / 'cs'}\n")
    refused = provline(
        "validate", str(manifest), "--station", str(station), env=hsm_env.env(), check=False
    )
    assert refused.returncode == 2 and "its SharedAccessKey is not base64" in refused.stderr


def _make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        timeout=300,
    )


def test_make_help_lists_every_target() -> None:
    helped = _make("help")
    assert helped.returncode == 0
    phony = re.search(r"^\.PHONY: (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert phony is not None
    for target in phony.group(1).split():
        assert re.search(rf"^  make {re.escape(target)} +\S", helped.stdout, re.M), target


def test_make_targets_give_ci_the_real_exit_code(tmp_path: Path) -> None:
    code_file = tmp_path / "code"
    failed = _make("audit-verify", f"BATCH={tmp_path / 'missing'}", f"EXIT_FILE={code_file}")
    assert failed.returncode == 2  # what make does with any failure
    assert code_file.read_text().strip() == "6"
    assert "make audit-verify: exit code 6" in failed.stderr
    usage = _make("audit-verify", f"EXIT_FILE={code_file}")
    assert usage.returncode == 2 and code_file.read_text().strip() == "2"


def test_make_demo_fails_when_any_step_fails() -> None:
    """Every step of the demo runs under `set -eo pipefail`, and nothing pipes a check into
    a command that would hide its failure."""
    recipe = _make("-n", "demo", "DEMO_BATCH=dry").stdout
    demo = recipe[recipe.index("rm -rf demo/emulator") :]
    assert "set -eo pipefail;" in recipe
    assert "| head" not in demo and "| tail" not in demo
    assert "audit verify" in demo and "--root" in demo
