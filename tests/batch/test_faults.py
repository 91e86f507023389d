"""Real faults at exact points of a run: the PIN file removed and the token directory moved
while workers start, SIGTERM and SIGINT, an endpoint that refuses connections, an emulator
restarted on other ports, a full disk (a small tmpfs). Each ends with one line, its exit
code (the same in report.json), a log that verifies, and a clean resume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from pkcs11 import ObjectClass

from pipeline import hsm
from pipeline.batch.journal import Journal
from pipeline.secret import SecretRef
from pipeline.serials import serial_hex

from ..support import (
    CA,
    MODULE,
    Emu,
    Hsm,
    audit_events,
    emulator_dir,
    free_ports,
    group_gone,
    make_ca,
    make_hsm,
    provline,
    serial_states,
    start_emulator,
    start_run,
    wait_stopped,
    write_manifest,
    write_station,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_hsm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Hsm, CA]:
    """Tokens of this module's own, so moving their directory disturbs no other test."""
    base = tmp_path_factory.mktemp("fault-hsm")
    h = make_hsm(base, token="fault-station", root_token="fault-root")
    return h, make_ca(h, base / "ca")


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _verify(batch: Path, c: CA) -> subprocess.CompletedProcess[str]:
    return provline("audit", "verify", str(batch), "--root", str(c.root), "--json", check=False)


def _resume_completes(
    manifest: Path, station: Path, env: dict[str, str], batch: Path, c: CA
) -> None:
    proc = provline("run", str(manifest), "--station", str(station), "--json", env=env)
    report = json.loads(proc.stdout)
    assert set(report["counts"]) == {"bundled"} and report["exit_code"] == 0
    assert _verify(batch, c).returncode == 0


# ------------------------------------------------------------------- worker start-up (3)
def test_pin_file_removed_before_workers_start(own_hsm: tuple[Hsm, CA], tmp_path: Path) -> None:
    h, c = own_hsm
    station = write_station(tmp_path / "s.yaml", h, c, output=tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.yaml", "no-pin", "np-", 30)
    run = start_run(
        manifest, station, env=h.env(), logs=tmp_path / "logs", crash_at="issue.start:1:stop"
    )
    wait_stopped(run)
    env = h.env()
    away = h.pin_file.with_name("pin.away")
    h.pin_file.rename(away)
    try:
        os.kill(run.proc.pid, signal.SIGCONT)
        code = run.wait()
        # the orchestrator, told the same at its start, says the same line
        again = provline("run", str(manifest), "--station", str(station), env=env, check=False)
    finally:
        away.rename(h.pin_file)
    assert code == 2, run.stderr
    lines = _errors(run.stderr)
    assert lines == [
        f"error: {station}:5: hsm.pin: secret file {h.pin_file} does not exist "
        "(secrets present in the environment)"  # line 5 of write_station's file: hsm.pin
    ]
    assert again.returncode == 2 and _errors(again.stderr) == lines
    batch = tmp_path / "out" / "no-pin"
    report = json.loads((batch / "report.json").read_text())
    assert report["exit_code"] == code and "does not exist" in report["aborted"]
    # nothing reached a signer: the reserved serials were released, and the log verifies
    assert set(serial_states(batch).values()) == {"released"}
    assert _verify(batch, c).returncode == 0
    _resume_completes(manifest, station, h.env(), batch, c)


def _move_tokens(h: Hsm) -> tuple[Path, Path]:
    tokens = h.dir / "tokens"
    return tokens, tokens.with_name("tokens.away")


def test_token_directory_moved_before_workers_start(
    own_hsm: tuple[Hsm, CA], tmp_path: Path
) -> None:
    h, c = own_hsm
    station = write_station(tmp_path / "s.yaml", h, c, output=tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.yaml", "no-token", "nt-", 30)
    run = start_run(
        manifest, station, env=h.env(), logs=tmp_path / "logs", crash_at="issue.start:1:stop"
    )
    wait_stopped(run)
    tokens, away = _move_tokens(h)
    tokens.rename(away)
    try:
        os.kill(run.proc.pid, signal.SIGCONT)
        code = run.wait()
        again = provline("run", str(manifest), "--station", str(station), env=h.env(), check=False)
    finally:
        away.rename(tokens)
    assert code // 10 == 3 or code == 3, run.stderr  # the HSM family of exit codes
    lines = _errors(run.stderr)
    assert len(lines) == 1, run.stderr
    assert again.returncode == code and _errors(again.stderr) == lines  # as the orchestrator says
    batch = tmp_path / "out" / "no-token"
    report = json.loads((batch / "report.json").read_text())
    assert report["exit_code"] == code
    assert "intent" not in serial_states(batch).values()
    _resume_completes(manifest, station, h.env(), batch, c)


def test_a_token_back_within_the_retries_is_a_transient_error(
    own_hsm: tuple[Hsm, CA], tmp_path: Path
) -> None:
    """SoftHSM2 fails C_Initialize while the token directory is away; the workers retry
    their start-up (bounded) and carry on once it is back."""
    h, c = own_hsm
    station = write_station(tmp_path / "s.yaml", h, c, output=tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.yaml", "flaky-token", "ft-", 30)
    run = start_run(
        manifest, station, env=h.env(), logs=tmp_path / "logs", crash_at="issue.start:1:stop"
    )
    wait_stopped(run)
    tokens, away = _move_tokens(h)
    tokens.rename(away)
    try:
        os.kill(run.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while "retrying (1/" not in run.stderr and time.monotonic() < deadline:
            time.sleep(0.05)  # a worker started, failed, and said it will try again
    finally:
        away.rename(tokens)
    assert run.wait() == 0, run.stderr
    assert "cannot load PKCS#11 module" in run.stderr and "retrying (1/4)" in run.stderr
    batch = tmp_path / "out" / "flaky-token"
    assert json.loads((batch / "report.json").read_text())["counts"] == {"bundled": 30}
    assert _verify(batch, c).returncode == 0


# --------------------------------------------------------------------------- signals (5)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """Sent to the whole process group, as systemd, CI runners and a terminal do."""
    station = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out", chunk_size=16
    )
    manifest = write_manifest(tmp_path / "m.yaml", f"sig-{sig.name}", f"sg{code}-", 600)
    batch = tmp_path / "out" / f"sig-{sig.name}"
    run = start_run(
        manifest,
        station,
        env=hsm_env.env(),
        logs=tmp_path / "logs",
        crash_at="commit.results:2:stop",
    )
    wait_stopped(run)
    os.killpg(run.proc.pid, sig)
    os.killpg(run.proc.pid, signal.SIGCONT)
    assert run.wait() == code, run.stderr
    assert group_gone(run.proc.pid)
    assert not _errors(run.stderr)
    assert f"stopped by {sig.name}: run the same command again to resume" in run.stderr
    report = json.loads((batch / "report.json").read_text())
    assert report["exit_code"] == code and report["aborted"] == f"stopped by {sig.name}"
    assert 0 < report["counts"].get("bundled", 0) < 600
    assert "aborted" in (batch / "report.txt").read_text()
    events = [e["event"] for e in audit_events(batch)]
    assert events[-4:] == ["aborted", "run_end", "report", "seal"]
    states = serial_states(batch)
    assert "intent" not in states.values() and "void" not in states.values()  # nothing lost
    assert _verify(batch, ca_env).returncode == 0  # an aborted run's log verifies
    Journal.open(batch, create=True).close()  # the lock was released
    _resume_completes(manifest, station, hsm_env.env(), batch, ca_env)


# ------------------------------------------------------------------ unreachable DPS (4)
def test_an_endpoint_that_refuses_connections_before_issuing(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """DPS unreachable at the pre-issue check: bounded retries, then the run refuses (51)
    with the last error, and nothing is signed."""
    port = free_ports(1)[0]  # nothing listens there
    env = {
        **hsm_env.env(),
        "PROVLINE_TEST_DPS": "HostName=dead.example;SharedAccessKeyName=provisioningserviceowner;"
        "SharedAccessKey=ZGVhZGRlYWRkZWFkZGVhZA==",
    }
    station = write_station(
        tmp_path / "s.yaml",
        hsm_env,
        ca_env,
        output=tmp_path / "out",
        extra=f"dps:\n  service_endpoint: https://127.0.0.1:{port}\n"
        "  connection_string: env:PROVLINE_TEST_DPS\n",
    )
    manifest = write_manifest(tmp_path / "m.yaml", "dead-dps", "dd-", 25, "individual")
    started = time.monotonic()
    run = start_run(
        manifest, station, "--json", "--unreachable-deadline", "4", env=env, logs=tmp_path / "l"
    )
    assert run.wait() == 51, run.stderr
    assert time.monotonic() - started < 60
    [line] = _errors(run.stderr)
    assert "unreachable for 4 s" in line and "nothing was signed" in line, line
    assert "ConnectError" in line and "Connection refused" in line, line
    assert not (tmp_path / "out" / "dead-dps").exists()


def test_an_endpoint_that_goes_away_after_issuing(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    """DPS answers the pre-issue check, then stops answering before registration: bounded
    retries shown as they happen, every device register_failed with the reason (exit 5),
    and the sealed log verifies."""
    emu = start_emulator(emulator_dir(tmp_path))
    station = write_station(
        tmp_path / "s.yaml",
        hsm_env,
        ca_env,
        output=tmp_path / "out",
        extra=f"dps:\n  emulator_dir: {emu.dir}\n  operations_per_minute: 6000\n",
    )
    manifest = write_manifest(tmp_path / "m.yaml", "gone-dps", "gd-", 25, "individual")
    run = start_run(
        manifest,
        station,
        "--json",
        "--upload-ca",
        "--unreachable-deadline",
        "4",
        env=hsm_env.env(),
        logs=tmp_path / "l",
        crash_at="register.start:1:stop",
    )
    try:
        wait_stopped(run)
    finally:
        emu.stop()
    os.kill(run.proc.pid, signal.SIGCONT)
    assert run.wait() == 5, run.stderr
    report = json.loads(run.stdout)
    assert report["exit_code"] == 5 and report["counts"] == {"register_failed": 25}
    for failure in report["failures"]:
        assert "unreachable for 4 s" in failure["reason"], failure
        assert "ConnectError" in failure["reason"], failure
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    retries = [e for e in events if e["event"] == "retry"]
    assert retries and retries[-1]["retries"] >= 2 and retries[-1]["stage"] == "register"
    assert "ConnectError" in retries[-1]["last_error"]
    assert _errors(run.stderr) == []
    assert _verify(tmp_path / "out" / "gone-dps", ca_env).returncode == 0


def test_an_emulator_restarted_on_other_ports_is_picked_up(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    data = tmp_path / "emu"
    data.mkdir()

    def configure() -> None:
        port, service, hub = free_ports(3)
        (data / "config.json").write_text(
            json.dumps({"port": port, "service_port": service, "hub_port": hub})
        )

    configure()
    emu: Emu = start_emulator(data)
    station = write_station(
        tmp_path / "s.yaml",
        hsm_env,
        ca_env,
        output=tmp_path / "out",
        extra=f"dps:\n  emulator_dir: {data}\n  operations_per_minute: 6000\n",
    )
    manifest = write_manifest(tmp_path / "m.yaml", "moved-dps", "md-", 20, "individual")
    run = start_run(
        manifest,
        station,
        "--upload-ca",
        env=hsm_env.env(),
        logs=tmp_path / "logs",
        crash_at="register.start:1:stop",
    )
    try:
        wait_stopped(run)
        old = json.loads((data / "emulator.json").read_text())["dps_service_endpoint"]
        emu.stop()
        os.kill(run.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while "retry" not in run.stderr and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "retry" in run.stderr, run.stderr  # it noticed, and says so
        configure()
        emu = start_emulator(data)
        assert emu.info["dps_service_endpoint"] != old
        assert run.wait(timeout=120) == 0, run.stderr
    finally:
        if emu.proc.poll() is None:
            emu.stop()
    report = json.loads((tmp_path / "out" / "moved-dps" / "report.json").read_text())
    assert report["counts"] == {"registered": 20}


def test_sigterm_while_registering_stops_cleanly(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    data = emulator_dir(tmp_path)
    emu = start_emulator(data)
    try:
        station = write_station(
            tmp_path / "s.yaml",
            hsm_env,
            ca_env,
            output=tmp_path / "out",
            extra=f"dps:\n  emulator_dir: {data}\n  operations_per_minute: 120\n",
        )
        manifest = write_manifest(tmp_path / "m.yaml", "term-dps", "td-", 60, "individual")
        batch = tmp_path / "out" / "term-dps"
        run = start_run(
            manifest,
            station,
            "--upload-ca",
            env=hsm_env.env(),
            logs=tmp_path / "logs",
            crash_at="logged.registration:1:stop",
        )
        wait_stopped(run)
        os.killpg(run.proc.pid, signal.SIGTERM)
        os.killpg(run.proc.pid, signal.SIGCONT)
        assert run.wait(timeout=60) == 143, run.stderr
        assert not _errors(run.stderr)
        report = json.loads((batch / "report.json").read_text())
        assert report["exit_code"] == 143 and report["aborted"] == "stopped by SIGTERM"
        assert "register_failed" not in report["counts"]  # nothing half-done was recorded
        assert 0 < report["counts"].get("bundled", 0) < 60
        assert _verify(batch, ca_env).returncode == 0
        again = provline(
            "run", str(manifest), "--station", str(station), "--json", env=hsm_env.env()
        )
        assert json.loads(again.stdout)["counts"] == {"registered": 60}
    finally:
        emu.stop()


# ----------------------------------------------------------------------- disk full (6)
@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_the_run_cleanly_and_it_resumes(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    with _tmpfs(tmp_path / "small", "12m") as out:
        station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=out, chunk_size=32)
        manifest = write_manifest(tmp_path / "m.yaml", "full", "fu-", 1500)
        batch = out / "full"
        run = start_run(manifest, station, env=hsm_env.env(), logs=tmp_path / "logs")
        code = run.wait()
        assert code == 7, run.stderr
        lines = _errors(run.stderr)
        assert len(lines) == 1 and "no space left on device" in lines[0], run.stderr
        assert str(batch) in lines[0]  # names the path
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        report = json.loads((batch / "report.json").read_text())
        assert report["exit_code"] == 7 and "no space left" in report["aborted"]
        db = sqlite3.connect(batch / "journal.sqlite")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        db.close()
        assert (batch / "audit.jsonl").read_bytes().endswith(b"\n")  # no torn line
        assert 0 < report["counts"].get("bundled", 0) < 1500
        assert _verify(batch, ca_env).returncode == 0
        # free space, run the same command again
        subprocess.run(["mount", "-o", "remount,size=128m", str(out)], check=True)
        _resume_completes(manifest, station, hsm_env.env(), batch, ca_env)
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_too_little_space_to_start_is_one_line(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "tiny", "2m") as out:
        station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=out)
        manifest = write_manifest(tmp_path / "m.yaml", "tiny", "ti-", 10)
        proc = provline(
            "run", str(manifest), "--station", str(station), env=hsm_env.env(), check=False
        )
        assert proc.returncode == 7, proc.stderr
        assert len(_errors(proc.stderr)) == 1 and "MiB free to start" in proc.stderr


# ------------------------------------------------------------- released vs void (7)
def test_recovered_void_and_released_serials_are_told_apart(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """One worker, chunks of 10. The run is stopped just after it reserved chunk 3 (not yet
    handed over); meanwhile the worker finishes chunks 1 and 2, whose results are never
    recorded; one of their bundles is torn (as a power cut could leave it); then the run is
    killed. On resume the 19 whole bundles are recovered, the torn one's serial is void
    (revoke), chunk 3's are released (nothing to revoke): in the journal, the log and the
    report, and the CRL holds exactly the void one."""
    station = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out", workers=1, chunk_size=10
    )
    manifest = write_manifest(tmp_path / "m.yaml", "told-apart", "ta-", 30)
    batch = tmp_path / "out" / "told-apart"
    run = start_run(
        manifest,
        station,
        env=hsm_env.env(),
        logs=tmp_path / "logs",
        crash_at="commit.intents:3:stop",
    )
    wait_stopped(run)
    done = [batch / f"ta-{n:05d}" / "device.json" for n in range(1, 21)]
    deadline = time.monotonic() + 60
    while not all(p.exists() for p in done) and time.monotonic() < deadline:
        time.sleep(0.02)  # the worker finishes chunks 1 and 2 while the orchestrator is stopped
    torn = json.loads(done[14].read_text())["serial"]
    done[14].unlink()  # ta-00015's bundle never got its device.json
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait()
    assert group_gone(run.proc.pid)
    proc = provline("run", str(manifest), "--station", str(station), "--json", env=hsm_env.env())
    report = json.loads(proc.stdout)
    assert report["serials"] == {"issued": 30, "void": 1, "released": 10}
    assert report["void_serials"] == [
        {
            "registration_id": "ta-00015",
            "serial": torn,
            "reason": "no durable bundle when the previous run stopped",
        }
    ]
    assert report["this_run"]["recovered"] == 19 and report["this_run"]["issued"] == 11
    text = (batch / "report.txt").read_text()
    assert "recovered: 19 bundles" in text
    assert "released reservations: 10 (never reached a signer" in text
    db = sqlite3.connect(batch / "journal.sqlite")
    reasons = dict(db.execute("SELECT state, reason FROM serials WHERE state != 'issued'"))
    db.close()
    assert reasons == {
        "void": "no durable bundle when the previous run stopped",
        "released": "reserved but never reached a signer (nothing to revoke)",
    }
    events = audit_events(batch)
    assert sum(e["event"] == "void" for e in events) == 1
    assert sum(e["event"] == "released" for e in events) == 10
    assert sum(e["event"] == "issued" and bool(e["data"].get("recovered")) for e in events) == 19
    assert _verify(batch, ca_env).returncode == 0
    crl = tmp_path / "void.crl.pem"
    provline(
        "ca", "crl", str(batch), "--station", str(station), "--out", str(crl), env=hsm_env.env()
    )
    revoked = [serial_hex(r.serial_number) for r in x509.load_pem_x509_crl(crl.read_bytes())]
    assert revoked == [torn]


# ------------------------------------------------------- a half-created batch (2)
def test_batches_an_older_provline_left_half_created_resume(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """The two states a kill while creating a batch used to leave: only the lock file, and
    a journal whose settings were never committed. Both are taken as new."""
    station = write_station(tmp_path / "s.yaml", hsm_env, ca_env, output=tmp_path / "out")
    only_lock = tmp_path / "out" / "only-lock"
    only_lock.mkdir(parents=True)
    (only_lock / ".lock").touch()
    no_meta = tmp_path / "out" / "no-meta"
    no_meta.mkdir()
    Journal.open(no_meta, create=True).close()  # tables, no settings, no plan
    for batch in (only_lock, no_meta):
        manifest = write_manifest(tmp_path / f"{batch.name}.yaml", batch.name, "hc-", 5)
        proc = provline(
            "run", str(manifest), "--station", str(station), "--json", env=hsm_env.env()
        )
        assert json.loads(proc.stdout)["counts"] == {"bundled": 5}
        assert _verify(batch, ca_env).returncode == 0
        shutil.rmtree(batch)  # the next batch reuses the registration IDs


# ------------------------------------------------------------ orphan removal (8)
def test_orphan_removal_is_logged_first_and_shown(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    """A half-made key of a device this batch attempted (what a kill inside
    C_GenerateKeyPair leaves) is logged before it is destroyed, and shown on the console and
    in both reports."""
    token = hsm.open_token(
        MODULE, hsm_env.token, SecretRef("file", str(hsm_env.pin_file)), str(hsm_env.conf)
    )
    station = write_station(
        tmp_path / "s.yaml", hsm_env, ca_env, custody="retain", output=tmp_path / "out"
    )
    manifest = write_manifest(tmp_path / "m.yaml", "orphans-shown", "os-", 3)
    batch = tmp_path / "out" / "orphans-shown"
    first = start_run(manifest, station, env=hsm_env.env(), logs=tmp_path / "logs")
    assert first.wait() == 0, first.stderr
    # os-00002 as a kill leaves it: an open intent, no complete bundle, only its public half
    rid = "os-00002"
    db = sqlite3.connect(batch / "journal.sqlite")
    (serial,) = db.execute(
        "SELECT serial FROM devices WHERE registration_id = ?", (rid,)
    ).fetchone()
    db.execute("UPDATE devices SET state = 'intent' WHERE registration_id = ?", (rid,))
    db.execute("UPDATE serials SET state = 'intent' WHERE serial = ?", (serial,))
    db.commit()
    db.close()
    (batch / rid / "device.json").unlink()
    token.find(ObjectClass.PRIVATE_KEY, label=rid).destroy()
    killed = start_run(
        manifest, station, env=hsm_env.env(), logs=tmp_path / "logs", crash_at="logged.orphan:1"
    )
    assert killed.wait() == -signal.SIGKILL  # logged, not yet destroyed
    assert any(e["event"] == "orphan_removed" for e in audit_events(batch))
    run = start_run(manifest, station, env=hsm_env.env(), logs=tmp_path / "logs")
    assert run.wait() == 0, run.stderr
    shown = f"token cleanup: removed orphaned public key {rid} (no private half)"
    assert shown in run.stderr
    report = json.loads((batch / "report.json").read_text())
    assert {"object": "public", "label": rid, "why": "no private half"} in report["orphans_removed"]
    text = (batch / "report.txt").read_text()
    assert "orphaned key objects removed" in text and rid in text
    labels = [o.label for o in token.objects(ObjectClass.PUBLIC_KEY)]
    assert labels.count(rid) == 1  # the new key's public half, the orphan is gone
    assert _verify(batch, ca_env).returncode == 0
