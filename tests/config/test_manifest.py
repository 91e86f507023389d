"""Manifests (YAML, CSV) and station configs: every rule, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.station import load_station
from pipeline.errors import ValidationFailed
from pipeline.vocabulary import Custody, RegistrationMode

from ..support import ROOT


def test_demo_manifest_and_example_csv() -> None:
    demo = load_manifest(ROOT / "manifests" / "demo.yaml")
    devices = list(demo.devices())
    assert len(demo) == len(devices) == 53
    assert devices[0].registration_id == "demo-gateway-001"
    assert devices[0].desired == {"telemetryIntervalSeconds": 30}
    assert devices[1].device_id == "demo-gateway-002"  # defaults to the registration id
    assert devices[3].registration_id == "demo-sensor-000001"
    assert devices[-1].registration_id == "demo-sensor-000050"
    assert devices[-1].tags == {"line": "A", "product": "sensor"}
    csv = load_manifest(ROOT / "manifests" / "example.csv")
    rows = list(csv.devices())
    assert csv.batch_id == "example" and len(rows) == 4
    assert rows[2].device_id == "example-000003"
    assert rows[3].device_id == "example-gw-4" and rows[3].tags == {"line": "B"}
    assert rows[0].desired == {"telemetryIntervalSeconds": "30"}


def test_every_problem_is_reported_with_file_line_device_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """\
batch_id: lot-1
key_profile: ec-p521
registration: sometimes
colour: blue
generator:
  prefix: dev-
  digits: 2
  start: 95
  count: 10
devices:
  - registration_id: Upper-Case
  - registration_id: ends-with-dot.
  - registration_id: dev-96
  - registration_id: twice
  - registration_id: twice
  - registration_id: "%s"
  - registration_id: ok-1
    device_id: "bad device id with spaces"
    serial: 5
"""
        % ("x" * 65)
    )
    with pytest.raises(ValidationFailed) as info:
        load_manifest(path)
    problems = info.value.problems
    text = "\n".join(problems)
    expected = [
        f"{path}:2: unknown key profile 'ec-p521'",
        f"{path}:3: registration 'sometimes' is not one of",
        f"{path}:4: unknown key 'colour' (schema)",
        f"{path}:9: generator: counter 104 needs more than 2 digits",
        f"{path}:11: Upper-Case: registration_id 'Upper-Case' is invalid (DPS registration ID",
        f"{path}:12: ends-with-dot.: registration_id",
        f"{path}:15: twice: duplicate registration_id, first at {path}:14",
        f"{path}:16: {'x' * 65}: registration_id",
        f"{path}:18: ok-1: device_id 'bad device id with spaces' is invalid (IoT Hub device ID",
        f"{path}:19: unknown key 'serial' (schema)",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, text)
    assert len(problems) == len(expected)


def test_generator_and_explicit_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("""\
batch_id: lot-2
generator:
  - {prefix: node-, digits: 3, start: 1, count: 20}
  - {prefix: node-0, digits: 2, start: 15, count: 3}
devices:
  - registration_id: node-007
""")
    with pytest.raises(ValidationFailed) as info:
        load_manifest(path)
    text = "\n".join(info.value.problems)
    assert "node-015: also produced by the generator" in text
    assert f"{path}:6: node-007: also produced by the generator at {path}:3" in text


def test_csv_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("registration_id,device_id,colour\nok-1,,x\nBAD,,x\nok-1,,y\n")
    with pytest.raises(ValidationFailed) as info:
        load_manifest(path)
    text = "\n".join(info.value.problems)
    assert f"{path}:1: unknown column 'colour'" in text
    assert f"{path}:3: BAD: registration_id 'BAD' is invalid" in text
    assert f"{path}:4: ok-1: duplicate registration_id, first at {path}:2" in text


def test_large_generator_is_lazy(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("batch_id: big\ngenerator: {prefix: big-, digits: 7, count: 1000000}\n")
    manifest = load_manifest(path)
    assert len(manifest) == 1_000_000
    assert next(iter(manifest.devices())).registration_id == "big-0000001"
    assert manifest.registration is RegistrationMode.NONE


def test_demo_station_loads() -> None:
    station = load_station(ROOT / "stations" / "demo.yaml")
    assert station.name == "demo-station-01"
    assert (station.workers, station.chunk_size) == (2, 256)
    assert station.custody.policy is Custody.WRAPPED
    assert station.hsm.token == "demo-station"
    assert station.ca.chain == (ROOT / "demo" / "ca" / "chain.pem").resolve()
    assert station.custody.transport_key and station.custody.transport_key.object == "transport"


def test_station_problems_all_at_once(tmp_path: Path) -> None:
    path = tmp_path / "station.yaml"
    path.write_text("""\
station: s1
hsm:
  token: t
  pin: 1234
  slot: 0
ca:
  chain: chain.pem
  issuer_key: not-a-uri
  root_cert: root.pem
custody:
  policy: lenient
output: out
workers: 0
""")
    with pytest.raises(ValidationFailed) as info:
        load_station(path)
    text = "\n".join(info.value.problems)
    for fragment in (
        f"{path}:4: 'pin' must be str",
        f"{path}:5: unknown key hsm.'slot'",
        f"{path}:8: 'not-a-uri' is not a PKCS#11 URI",
        f"{path}:11: custody.policy 'lenient' is not one of",
        f"{path}:13: workers 0 is outside 1..64",
    ):
        assert fragment in text, text
