"""The hostile-input corpus (tests/config/corpus.py) through the library, in-process: what
``provline validate`` does (load the station, load the manifest, check one against the
other) on a CA made in software, so no HSM and no subprocess. Each case is its own test;
test_corpus_cli.py runs the same cases through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.batch.plan import check_inputs
from pipeline.ca.builders import build_intermediate, build_root, parse_name
from pipeline.ca.certs import pem
from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.errors import ProvlineError
from pipeline.keyprofile import KeyProfile

from .corpus import (
    CASES,
    CONNECTION_STRING,
    Case,
    Setting,
    batch_id_argument,
    check_problems,
    materialize,
    snapshot,
)


@pytest.fixture(scope="module")
def software_ca(tmp_path_factory: pytest.TempPathFactory) -> Setting:
    """A root and an issuing CA made with cryptography: enough for every check validate
    makes (the chain, the issuer's validity, the audit certificate)."""
    base = tmp_path_factory.mktemp("software-ca")
    root_key = KeyProfile.EC_P256.generate_software_key()
    root = build_root(root_key, parse_name("CN=Corpus Root"), 3650)
    issuer_key = KeyProfile.EC_P256.generate_software_key()
    issuer = build_intermediate(
        issuer_key.public_key(), parse_name("CN=Corpus Issuing CA"), root, root_key, 1825
    )
    (base / "chain.pem").write_bytes(pem(issuer) + pem(root))
    (base / "root.pem").write_bytes(pem(root))
    return Setting(
        module="/usr/lib/softhsm/libsofthsm2.so",
        token="corpus-token",
        conf=str(base / "softhsm2.conf"),
        chain=base / "chain.pem",
        root=base / "root.pem",
        audit=base / "root.pem",
        pin_text="123456\n",
        port=9,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case(
    case: Case, software_ca: Setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.slow:
        pytest.skip("a large generated input: the CLI layer runs it (test_corpus_cli.py)")
    monkeypatch.setenv("PROVLINE_CORPUS_CS", CONNECTION_STRING)
    case_dir = tmp_path / "case"
    station_path, manifest_path = materialize(case, case_dir, software_ca)
    before = snapshot(case_dir)
    try:
        station = load_station(station_path)
        manifest = load_manifest(manifest_path, batch_id=batch_id_argument(case))
        check_inputs(manifest, station)
    except ProvlineError as exc:
        assert not case.accepted and case.stage == "validate", exc.line()
        assert exc.exit_code == case.code
        check_problems(case, case_dir, "".join(f"error: {x}\n" for x in exc.line().splitlines()))
        assert snapshot(case_dir) == before
        return
    # Accepted, or left to the HSM (validate never opens it).
    assert case.accepted or case.stage == "hsm", case.id
    devices = list(manifest.devices())
    assert len(devices) == len(manifest)
    if case.accepted:
        assert len(manifest) == case.devices
        assert len({d.registration_id for d in devices}) == case.devices
        for d in devices:  # what the journal stores: JSON, and the same after a round trip
            extra = {"tags": d.tags, "desired": d.desired}
            assert json.loads(json.dumps(extra, sort_keys=True)) == extra
    assert snapshot(case_dir) == before


def test_corpus_size_and_names() -> None:
    """The corpus is what the issue asks for: well over a hundred hostile inputs, each named
    once, and each refused one says where its problem is."""
    refused = [c for c in CASES if not c.accepted]
    assert len(refused) >= 150
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.where for c in refused)
