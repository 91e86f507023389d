"""Plan's checks of a manifest against a station, its CA chain and its secrets."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pipeline.batch.plan import check_inputs
from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.errors import ValidationFailed

from ..support import CA, Hsm, provline, write_station

pytestmark = pytest.mark.integration


def test_plan_checks_against_station(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    station_path = write_station(
        tmp_path / "s.yaml",
        hsm_env,
        ca_env,
        custody="pkcs8",
        output=tmp_path / "out",
        extra="key_profiles: [ec-p256]\n",
    )
    monkeypatch.delenv("PROVLINE_TEST_PASSPHRASE", raising=False)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "batch_id: b1\nkey_profile: ec-p384\nvalidity_days: 9000\n"
        "registration: individual\ndevices: [{registration_id: d1}]\n"
    )
    with pytest.raises(ValidationFailed) as info:
        check_inputs(load_manifest(manifest), load_station(station_path))
    text = "\n".join(info.value.problems)
    assert "key_profile ec-p384 is not allowed by station" in text
    assert "after the issuer's notAfter" in text
    assert "PROVLINE_TEST_PASSPHRASE is not set (secrets present in the environment)" in text
    assert "registration individual needs station dps settings" in text
    assert len(info.value.problems) == 4
    # The same through the CLI: one line per problem, exit 2, nothing written.
    proc = provline(
        "validate",
        str(manifest),
        "--station",
        str(station_path),
        env={**hsm_env.env()},
        check=False,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 4
    assert not (tmp_path / "out").exists()


def test_validity_exactly_inside_the_issuer_passes(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = load_station(
        write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text("batch_id: b2\nvalidity_days: 30\ndevices: [{registration_id: d1}]\n")
    chain = check_inputs(load_manifest(manifest), station, now=dt.datetime.now(dt.UTC))
    assert chain.root.subject == chain.certs[-1].subject
