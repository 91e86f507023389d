"""`plan` is the pre-flight and `run` refuses before it signs: for each reason DPS or IoT Hub
would refuse a batch, `plan` exits 51 saying why and `run` exits 51 the same way with no
certificate issued (no batch directory, no token object, nothing uploaded). Against the
emulator over real HTTPS; every command is the CLI as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..support import (
    CA,
    Emu,
    Hsm,
    audit_events,
    enrol_elsewhere,
    group_id,
    provline,
    start_fast_emulator,
    start_run,
    verify_ca,
    write_station,
)

pytestmark = pytest.mark.integration


def _station(tmp: Path, h: Hsm, c: CA, e: Emu, custody: str = "wrapped") -> Path:
    return write_station(
        tmp / "s.yaml",
        h,
        c,
        custody=custody,
        output=tmp / "out",
        extra=f"dps:\n  emulator_dir: {e.dir}\n  operations_per_minute: 60000\n",
    )


def _manifest(tmp: Path, batch: str, prefix: str, count: int, mode: str) -> Path:
    path = tmp / f"{batch}.yaml"
    path.write_text(
        f"batch_id: {batch}\nregistration: {mode}\n"
        f"generator: {{prefix: {prefix}, digits: 4, count: {count}}}\n"
    )
    return path


def _token_objects(h: Hsm) -> set[str]:
    conf = h.conf.read_text()
    tokens = Path(conf.split("directories.tokendir = ", 1)[1].split("\n", 1)[0].strip())
    return {str(p.relative_to(tokens)) for p in tokens.rglob("*.object")}


def _certificates(e: Emu) -> list[dict[str, object]]:
    with e.service() as svc:
        return list(svc.get("/certificates").json()["value"])


class Pair:
    """`plan` and `run` of one manifest on one station, with the same arguments."""

    def __init__(self, manifest: Path, station: Path, h: Hsm) -> None:
        self.args = (str(manifest), "--station", str(station))
        self.h = h

    def plan(self, *extra: str):  # type: ignore[no-untyped-def]
        return provline("plan", *self.args, *extra, env=self.h.env(), check=False)

    def run(self, *extra: str):  # type: ignore[no-untyped-def]
        return provline("run", *self.args, "--quiet", *extra, env=self.h.env(), check=False)


def _refused_before_signing(proc, out: Path, h: Hsm, objects: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 51, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert not out.exists(), "a refused run created its batch"
    assert _token_objects(h) == objects, "a refused run left a token object"


def test_registration_ids_enrolled_by_someone_else(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    """130 of 150 registration IDs are enrolled with other certificates: plan lists the first
    100 and says how many more and how to list them; run refuses, signing nothing; --replace
    overwrites them."""
    enrol_elsewhere(emu, [f"cx-{n:04d}" for n in range(1, 131)])
    station = _station(tmp_path, hsm_env, ca_env, emu)
    pair = Pair(_manifest(tmp_path, "taken", "cx-", 150, "individual"), station, hsm_env)
    objects = _token_objects(hsm_env)

    plan = pair.plan("--upload-ca")
    assert plan.returncode == 51, plan.stderr
    conflicts = [line for line in plan.stdout.splitlines() if line.startswith("would conflict:")]
    assert len(conflicts) == 100
    assert conflicts[0].startswith("would conflict: cx-0001: already enrolled in DPS (sha256 ")
    assert "... 30 more conflicts left out of 130: `provline plan" in plan.stdout
    assert "--all` lists every one" in plan.stdout
    assert "would refuse: 130 of 150 registration IDs are already enrolled" in plan.stdout
    everything = json.loads(pair.plan("--upload-ca", "--json", "--all").stdout)
    listed = everything["target"]["conflicts"]
    assert listed["total"] == 130 and listed["left_out"] == 0 and len(listed["listed"]) == 130
    assert everything["target"]["lookups"] == {
        "missing": 20,
        "same_certificate": 0,
        "other_certificate": 0,
        "not_issued_yet": 130,
    }

    run = pair.run("--upload-ca")
    _refused_before_signing(run, tmp_path / "out", hsm_env, objects)
    lines = run.stderr.splitlines()
    assert lines[0].startswith("error: 130 of 150 registration IDs are already enrolled")
    assert "error: ... and 110 more conflicts (`provline plan --all` lists them)" in lines
    assert _certificates(emu) == []  # not even the CA was uploaded

    replaced = pair.run("--upload-ca", "--replace", "--json")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["counts"] == {"registered": 150}


def test_a_ca_dps_has_not_verified(hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path) -> None:
    """Group mode needs a CA verified by proof of possession exactly as individual mode does;
    --upload-ca uploads and proves it before the first certificate is signed."""
    station = _station(tmp_path, hsm_env, ca_env, emu)
    pair = Pair(_manifest(tmp_path, "unproven", "up-", 4, "group"), station, hsm_env)
    objects = _token_objects(hsm_env)
    plan = pair.plan()
    assert plan.returncode == 51, plan.stderr
    assert "is verified by proof of possession on DPS" in plan.stdout
    assert "ca: unverified (none of Test Issuing CA (sha1 " in plan.stdout
    run = pair.run()
    _refused_before_signing(run, tmp_path / "out", hsm_env, objects)
    assert "run with --upload-ca, or verify the issuing CA" in run.stderr

    planned = json.loads(pair.plan("--upload-ca", "--json").stdout)
    assert planned["exit_code"] == 0 and planned["target"]["ca"] == "will_upload"
    assert planned["target"]["group"] == {"id": group_id(ca_env.intermediate), "state": "absent"}
    ran = pair.run("--upload-ca", "--operator", "ci-runner")
    assert ran.returncode == 0, ran.stderr
    events = audit_events(tmp_path / "out" / "unproven")
    names = [str(e["event"]) for e in events]
    assert names.index("ca_uploaded") < names.index("ca_verified") < names.index("intent")
    uploaded = events[names.index("ca_uploaded")]["data"]
    assert isinstance(uploaded, dict) and uploaded["service_endpoint"].startswith("https://")
    start = events[0]["data"]
    assert isinstance(start, dict) and start["operator"] == "ci-runner"
    assert start["registration"]["ca"] == "will_upload"
    assert start["registration"]["id_scope"] == emu.info["id_scope"]
    [record] = _certificates(emu)
    assert record["properties"]["isVerified"] is True  # type: ignore[index]


def test_group_conflicts(hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path) -> None:
    """A group of the same name with another signing certificate, and an individual
    enrollment (which DPS matches before any group) for one of the group's devices."""
    verify_ca(emu, ca_env.intermediate, ca_env.issuer_key_uri, hsm_env, tmp_path, "issuing")
    station = _station(tmp_path, hsm_env, ca_env, emu)
    pair = Pair(_manifest(tmp_path, "grouped", "gx-", 5, "group"), station, hsm_env)
    objects = _token_objects(hsm_env)
    gid = group_id(ca_env.intermediate)
    other = (emu.dir / "server-ca.pem").read_text()
    with emu.service() as svc:
        made = svc.put(
            f"/enrollmentGroups/{gid}",
            json={
                "enrollmentGroupId": gid,
                "attestation": {
                    "type": "x509",
                    "x509": {"signingCertificates": {"primary": {"certificate": other}}},
                },
            },
        )
        assert made.status_code == 200, made.text
    plan = pair.plan()
    assert plan.returncode == 51
    assert f"enrollment group {gid} exists in DPS" in plan.stdout
    assert "with another signing certificate" in plan.stdout
    _refused_before_signing(pair.run(), tmp_path / "out", hsm_env, objects)
    assert json.loads(pair.plan("--replace", "--json").stdout)["exit_code"] == 0

    enrol_elsewhere(emu, ["gx-0004"])
    shadowed = pair.plan("--replace", "--json")
    assert shadowed.returncode == 51
    [conflict] = json.loads(shadowed.stdout)["target"]["conflicts"]["listed"]
    assert conflict["registration_id"] == "gx-0004"
    assert "DPS matches that before any group" in conflict["reason"]
    run = pair.run("--replace")
    _refused_before_signing(run, tmp_path / "out", hsm_env, objects)
    assert "gx-0004: an individual enrollment (enabled" in run.stderr


def test_iot_hub_identities_of_another_kind(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", emu.info["tls_ca_file"])
    from azure.iot.hub import IoTHubRegistryManager

    manager = IoTHubRegistryManager.from_connection_string(emu.info["hub_connection_string"])
    key = "c2VjcmV0LWtleS1vZi1zb21lb25lLWVsc2UtMDEyMzQ1Njc="
    manager.create_device_with_sas("hx-0002", key, key, "enabled")
    station = _station(tmp_path, hsm_env, ca_env, emu)
    pair = Pair(_manifest(tmp_path, "hubbed", "hx-", 3, "hub"), station, hsm_env)
    objects = _token_objects(hsm_env)
    plan = pair.plan("--json")
    assert plan.returncode == 51
    target = json.loads(plan.stdout)["target"]
    assert target["lookups"] == {
        "missing": 2,
        "certificate_authority": 0,
        "other": 1,
        "not_issued_yet": 0,
    }
    assert target["conflicts"]["listed"] == [
        {
            "registration_id": "hx-0002",
            "reason": "IoT Hub identity hx-0002 exists with sas authentication",
        }
    ]
    run = pair.run()
    _refused_before_signing(run, tmp_path / "out", hsm_env, objects)
    assert "device IDs already have IoT Hub identities" in run.stderr
    manager.delete_device("hx-0002")
    assert pair.run().returncode == 0


def test_upload_ca_where_the_certificate_api_is_azure_resource_manager(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """Azure's DPS service endpoint has no certificate API: --upload-ca is refused with what
    the operator does instead; without it plan cannot check and says so."""
    emu = start_fast_emulator(tmp_path, certificate_api=False)
    try:
        station = _station(tmp_path, hsm_env, ca_env, emu)
        pair = Pair(_manifest(tmp_path, "arm", "arm-", 2, "individual"), station, hsm_env)
        objects = _token_objects(hsm_env)
        plan = pair.plan("--upload-ca")
        assert plan.returncode == 51
        for fragment in (
            "serves no CA certificate API",
            "Azure Resource Manager",
            "Microsoft Entra ID",
            "How to verify X.509 CA certificates with your Device Provisioning Service",
            "`provline ca pop`",
            'README "Verifying the issuing CA with DPS"',
            "then run without --upload-ca",
        ):
            assert fragment in plan.stdout, fragment
        _refused_before_signing(pair.run("--upload-ca"), tmp_path / "out", hsm_env, objects)
        unknown = json.loads(pair.plan("--json").stdout)
        assert unknown["exit_code"] == 0 and unknown["target"]["ca"] == "unknown"
        assert any("cannot check here" in note for note in unknown["target"]["notes"])
    finally:
        emu.stop()


def test_a_manifest_that_no_longer_matches_its_batch(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    manifest = _manifest(tmp_path, "lot", "mm-", 2, "none")
    assert provline("run", str(manifest), "--station", str(station), env=hsm_env.env())
    issued = sorted(p.name for p in (tmp_path / "out" / "lot").iterdir() if p.is_dir())
    manifest.write_text(manifest.read_text().replace("count: 2", "count: 3"))
    pair = Pair(manifest, station, hsm_env)
    plan, run = pair.plan(), pair.run()
    assert plan.returncode == run.returncode == 2
    assert "would issue" not in plan.stdout
    assert plan.stderr == run.stderr
    assert "manifest_sha256 is" in plan.stderr and "a resumed batch keeps its inputs" in plan.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "lot").iterdir() if p.is_dir()) == issued


def test_a_conflict_that_appears_after_issuance(
    hsm_env: Hsm, ca_env: CA, emu: Emu, tmp_path: Path
) -> None:
    """Devices issued by a run killed before it registered; meanwhile someone enrols one of
    them with another certificate: plan and the resumed run refuse before registering any."""
    verify_ca(emu, ca_env.intermediate, ca_env.issuer_key_uri, hsm_env, tmp_path, "issuing")
    station = _station(tmp_path, hsm_env, ca_env, emu)
    manifest = _manifest(tmp_path, "raced", "rc-", 6, "individual")
    killed = start_run(
        manifest, station, env=hsm_env.env(), logs=tmp_path / "logs", crash_at="register.start:1"
    )
    assert killed.wait() == -9
    enrol_elsewhere(emu, ["rc-0005"])
    batch = tmp_path / "out" / "raced"
    lines = len(audit_events(batch))
    pair = Pair(manifest, station, hsm_env)
    plan = json.loads(pair.plan("--json").stdout)
    assert plan["exit_code"] == 51 and plan["would_issue"] == 0 and plan["would_register"] == 6
    assert plan["target"]["lookups"]["other_certificate"] == 1
    run = pair.run()
    assert run.returncode == 51
    assert "rc-0005: enrolled in DPS with another certificate" in run.stderr
    assert len(audit_events(batch)) == lines  # refused before the run began: nothing logged
    with emu.service() as svc:
        found = svc.post("/enrollments/query", json={"query": "SELECT *"}).json()
        assert [e["registrationId"] for e in found] == ["rc-0005"]
    assert pair.run("--replace").returncode == 0


def test_the_operator_a_station_requires(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    text = station.read_text()
    line = f"  cert: {ca_env.audit_cert}\n"
    assert line in text
    station.write_text(text.replace(line, line + "  require_operator: true\n"))
    pair = Pair(_manifest(tmp_path, "who", "wh-", 2, "none"), station, hsm_env)
    env = {k: v for k, v in hsm_env.env().items() if k != "PROVLINE_OPERATOR"}
    for command in ("plan", "run"):
        proc = provline(command, *pair.args, env=env, check=False)
        assert proc.returncode == 2
        assert "this station requires the operator's name" in proc.stderr
        assert "audit.require_operator" in proc.stderr
    assert not (tmp_path / "out").exists()
    ran = provline("run", *pair.args, env={**env, "PROVLINE_OPERATOR": "Ana Lima"})
    assert ran.returncode == 0
    start = audit_events(tmp_path / "out" / "who")[0]["data"]
    assert isinstance(start, dict) and start["operator"] == "Ana Lima"
    bad = provline("run", *pair.args, "--operator", "x\x1b[2J", env=env, check=False)
    assert bad.returncode == 2 and "\x1b" not in bad.stderr and "\\x1b[2J" in bad.stderr
