"""One device at a time into an open lot (`provline lot open`, `provline sign [--serve]`,
`provline lot close`): 500 devices through the serve protocol with a kill in the middle,
the one-shot command, refusals, a stop, and a long session that must not grow."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ..support import CA, PROVLINE, ROOT, Hsm, provline, serial_states
from .support import check_bundle, crypto_csr, device_station, openssl_verify, software_key

pytestmark = pytest.mark.integration


class Serve:
    """`provline sign --serve` driven as a fixture script drives it: one request, wait for
    its answer, the next."""

    def __init__(self, station: Path, lot: str, h: Hsm, crash_at: str | None = None) -> None:
        env = {k: v for k, v in h.env().items() if k != "PROVLINE_CRASH_AT"}
        if crash_at:
            env["PROVLINE_CRASH_AT"] = crash_at
        self.proc = subprocess.Popen(
            [*PROVLINE, "sign", "--serve", "--quiet", "--station", str(station), "--batch-id", lot],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any] | None:
        """The next answer, or None when the process died without one."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        try:
            self.send(request)
        except BrokenPipeError:
            return None
        return self.answer()

    def end(self) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=120)
        return code, self.proc.stderr.read().decode()


def _open(station: Path, lot: str, h: Hsm, *args: str) -> None:
    provline("lot", "open", "--station", str(station), "--batch-id", lot, *args, env=h.env())


def _verify(batch: Path, c: CA) -> None:
    done = provline("audit", "verify", str(batch), "--root", str(c.root), check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("kill", ["sign.marked:251", "logged.results:251", "external"], ids=str)
def test_500_devices_one_at_a_time_killed_once(
    own_tokens: tuple[Hsm, CA], tmp_path: Path, kill: str
) -> None:
    """A kill right after the serial reached the ledger (void: the device is signed again
    when the lot closes), after ``issued`` was logged (the bundle is whole: recovered, and
    the device asking again gets the same chain), or from outside while a request is in
    flight. The lot closes complete and its log verifies."""
    hsm_env, ca_env = own_tokens
    station = device_station(tmp_path, hsm_env, ca_env)
    lot = "modem-lot"
    _open(station, lot, hsm_env, "--product", "modem-x")
    csrs = {f"m-{n:03d}": crypto_csr(software_key("ec-p256"), f"m-{n:03d}") for n in range(500)}
    rids = list(csrs)
    chains: dict[str, str] = {}
    external = kill.startswith("external")
    serve = Serve(station, lot, hsm_env, None if external else kill)
    killed_at = None
    for index, rid in enumerate(rids):
        if external and index == 250:  # SIGKILL while this device's request is in flight
            serve.send({"csr": csrs[rid].decode(), "id": rid})
            time.sleep(0.002 * (os.getpid() % 5))
            serve.proc.kill()
            assert serve.proc.wait() == -signal.SIGKILL
            killed_at = rid
            serve = Serve(station, lot, hsm_env)  # the fixture asks again: signed once
        answer = serve.ask({"csr": csrs[rid].decode(), "id": rid})
        if answer is None:  # the crash point killed it in the middle of this device
            assert serve.proc.wait() == -signal.SIGKILL, serve.end()
            killed_at = rid
            serve = Serve(station, lot, hsm_env)
            if kill.startswith("sign.marked"):
                continue  # this fixture gives up on the device; the lot closes without it
            answer = serve.ask({"csr": csrs[rid].decode(), "id": rid})
            assert answer is not None
            assert answer["existing"] is True  # recovered: the same certificate, not a new one
        assert answer["ok"] and answer["id"] == rid and answer["registration_id"] == rid, answer
        chains[rid] = answer["chain"]
    assert killed_at == "m-250"
    code, stderr = serve.end()
    assert code == 0 and "Traceback" not in stderr, stderr

    done = provline(
        "lot",
        "close",
        "--station",
        str(station),
        "--batch-id",
        lot,
        "--quiet",
        "--json",
        env=hsm_env.env(),
    )
    report = json.loads(done.stdout)
    assert report["counts"] == {"bundled": 500} and report["complete"], report
    batch = tmp_path / "out" / lot
    for rid in rids:
        check_bundle(batch, rid, csrs[rid])
        if rid in chains:
            assert (batch / rid / "full-chain.cert.pem").read_text() == chains[rid]
    db = sqlite3.connect(batch / "journal.sqlite")
    issued = dict(
        db.execute(
            "SELECT registration_id, COUNT(*) FROM serials WHERE state = 'issued' "
            "GROUP BY registration_id"
        )
    )
    db.close()
    assert issued == dict.fromkeys(rids, 1)
    states = serial_states(batch)
    assert set(states.values()) <= {"issued", "void", "released"}
    if kill.startswith("sign.marked"):
        assert sorted(v["serial"] for v in report["void_serials"]) == [
            s for s, st in states.items() if st == "void"
        ]
        assert (
            len(report["void_serials"]) == 1
            and report["void_serials"][0]["registration_id"] == "m-250"
        )
    openssl_verify(ca_env, [batch / rid / "device.cert.pem" for rid in rids])
    _verify(batch, ca_env)


def _sign(
    station: Path, lot: str, h: Hsm, data: bytes, *args: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*PROVLINE, "sign", "--station", str(station), "--batch-id", lot, *args],
        input=data,
        capture_output=True,
        env=h.env(),
        cwd=ROOT,
        timeout=120,
    )


def test_one_shot_sign_and_what_it_refuses(hsm_env: Hsm, ca_env: CA, tmp_path: Path) -> None:
    station = device_station(tmp_path, hsm_env, ca_env)
    _open(station, "lot-1", hsm_env, "--key-profile", "ec-p384", "--validity-days", "30")
    key = software_key("ec-p384")
    first = _sign(station, "lot-1", hsm_env, crypto_csr(key, "o-1"))
    assert first.returncode == 0, first.stderr
    leaf = x509.load_pem_x509_certificates(first.stdout)[0]
    assert leaf.subject.rfc4514_string() == "CN=o-1"
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30
    # the same request again (a fixture that lost the answer): the same chain, no new serial
    again = _sign(station, "lot-1", hsm_env, crypto_csr(key, "o-1", der=True))
    assert again.returncode == 0 and again.stdout == first.stdout
    # no CN: the registration ID comes with the request
    other = _sign(
        station,
        "lot-1",
        hsm_env,
        crypto_csr(software_key("ec-p384"), None, der=True),
        "--registration-id",
        "o-2",
        "--json",
    )
    assert other.returncode == 0 and json.loads(other.stdout)["registration_id"] == "o-2"
    log = tmp_path / "out" / "lot-1" / "audit.jsonl"
    lines = log.read_bytes()
    for data, args, says in [
        (
            crypto_csr(software_key("ec-p256"), "o-3"),
            (),
            "stdin: its key is EC secp256r1, the batch's key profile is ec-p384",
        ),
        (b"garbage", (), "stdin: not PEM and not DER"),
        (crypto_csr(software_key("ec-p384"), None), (), "no subject CN and no registration ID"),
        (
            crypto_csr(software_key("ec-p384"), "o-1"),
            ("--registration-id", "o-9"),
            "CN 'o-1' is not the registration ID o-9",
        ),
    ]:
        done = _sign(station, "lot-1", hsm_env, data, *args)
        assert done.returncode == 2 and done.stdout == b"", done.stderr
        assert says in done.stderr.decode(), done.stderr
    assert log.read_bytes() == lines  # refused before the session: no trace in the lot
    for data, says in [
        (
            crypto_csr(software_key("ec-p384"), "o-1"),
            "o-1 has a certificate in lot lot-1 for another key",
        ),
        (crypto_csr(key, "o-4"), "o-4: its key is the key of o-1 in this batch"),
    ]:
        done = _sign(station, "lot-1", hsm_env, data)
        assert done.returncode == 2 and done.stdout == b"" and says in done.stderr.decode(), (
            done.stderr
        )
    # settings are the lot's: opening it again differently is refused
    done = provline(
        "lot",
        "open",
        "--station",
        str(station),
        "--batch-id",
        "lot-1",
        env=hsm_env.env(),
        check=False,
    )
    assert (
        done.returncode == 2
        and "key_profile is 'ec-p256' but batch lot-1 was started with 'ec-p384'" in done.stderr
    )
    provline(
        "lot",
        "close",
        "--station",
        str(station),
        "--batch-id",
        "lot-1",
        "--quiet",
        env=hsm_env.env(),
    )
    _verify(tmp_path / "out" / "lot-1", ca_env)
    # a later lot refuses a key an earlier lot certified; a closed lot takes no device
    _open(station, "lot-2", hsm_env, "--key-profile", "ec-p384")
    done = _sign(station, "lot-2", hsm_env, crypto_csr(key, "o-5"))
    assert done.returncode == 2 and "its key was certified for o-1 in lot-1" in done.stderr.decode()
    done = _sign(station, "lot-1", hsm_env, crypto_csr(software_key("ec-p384"), "o-6"))
    assert done.returncode == 2 and "lot lot-1 is closed" in done.stderr.decode()
    # a batch made from a manifest is not a lot; a station of another custody opens none
    done = _sign(station, "nope", hsm_env, crypto_csr(software_key("ec-p384"), "o-7"))
    assert done.returncode == 2 and "has no open lot" in done.stderr.decode()
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text(station.read_text().replace("policy: device", "policy: wrapped"))
    done = provline(
        "lot",
        "open",
        "--station",
        str(wrapped),
        "--batch-id",
        "lot-3",
        env=hsm_env.env(),
        check=False,
    )
    assert done.returncode == 2 and "custody is wrapped" in done.stderr


def test_two_lines_see_each_others_keys_while_their_sessions_run(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """A session records each device in the station inventory as it is signed: a lot open on
    another line refuses a cloned key at once, not only after the first session ends."""
    station = device_station(tmp_path, hsm_env, ca_env)
    _open(station, "line-a", hsm_env)
    _open(station, "line-b", hsm_env)
    key = software_key("ec-p256")
    serve = Serve(station, "line-a", hsm_env)
    answer = serve.ask({"csr": crypto_csr(key, "a-1").decode()})
    assert answer is not None and answer["ok"], answer
    done = _sign(station, "line-b", hsm_env, crypto_csr(key, "b-1"))
    assert serve.proc.poll() is None  # line a's session is still running
    assert (
        done.returncode == 2 and "its key was certified for a-1 in line-a" in done.stderr.decode()
    )
    fresh = _sign(station, "line-b", hsm_env, crypto_csr(software_key("ec-p256"), "b-2"))
    assert fresh.returncode == 0, fresh.stderr
    answer = serve.ask({"csr": crypto_csr(software_key("ec-p256"), "a-2").decode()})
    assert answer is not None and answer["ok"], answer
    code, stderr = serve.end()
    assert code == 0 and "inventory not updated" not in stderr, stderr
    found = provline("find", "a-1", "--station", str(station), "--json", env=hsm_env.env())
    assert "line-a" in found.stdout
    for lot in ("line-a", "line-b"):
        _verify(tmp_path / "out" / lot, ca_env)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_long_session_stays_flat_and_stops_cleanly(
    hsm_env: Hsm, ca_env: CA, tmp_path: Path
) -> None:
    """1,200 devices through one session: memory and open descriptors stay flat (a fixture
    script drives it for hours); SIGTERM while idle stops it cleanly (exit 143, sealed)."""
    station = device_station(tmp_path, hsm_env, ca_env)
    _open(station, "long", hsm_env)
    serve = Serve(station, "long", hsm_env)
    samples: list[tuple[int, int]] = []
    for n in range(1200):
        answer = serve.ask({"csr": crypto_csr(software_key("ec-p256"), f"l-{n:04d}").decode()})
        assert answer is not None and answer["ok"], answer
        if n in (299, 1199):
            samples.append((_rss_kb(serve.proc.pid), len(os.listdir(f"/proc/{serve.proc.pid}/fd"))))
    (rss_early, fds_early), (rss_late, fds_late) = samples
    assert fds_late == fds_early, samples
    assert rss_late - rss_early < 6 * 1024, samples  # KiB: 900 more devices, no growth to speak of
    time.sleep(0.5)
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=30) == 143
    report = json.loads((tmp_path / "out" / "long" / "report.json").read_text())
    assert report["aborted"] == "stopped by SIGTERM" and report["counts"] == {"bundled": 1200}
    _verify(tmp_path / "out" / "long", ca_env)
