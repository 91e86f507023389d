"""The pure parts of stopping well: errors that cross process boundaries whole, one mapping
to exit codes, the crash-point spec, stop signals noted and raised at a safe point, the
signing ledger, and what the report says about a stopped run."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest

from pipeline import crashpoint
from pipeline.batch import ledger
from pipeline.batch.report import Report, summary
from pipeline.batch.signals import StopSignals
from pipeline.errors import (
    HsmError,
    InputError,
    Interrupted,
    PinError,
    ProvlineError,
    StorageError,
    ValidationFailed,
    exit_code_of,
)
from pipeline.stats import StageStats


@pytest.mark.parametrize(
    "error",
    [
        StorageError("no space left on device", where="/out/b/audit.jsonl", rule="free space"),
        PinError("wrong PIN for token 't'", rule="user PIN"),
        HsmError("cannot open token 't': GeneralError"),
        ValidationFailed(["s.yaml: hsm.pin: secret file /p does not exist (rule)", "second"]),
    ],
)
def test_errors_cross_a_process_boundary_whole(error: ProvlineError) -> None:
    """A worker raises these to the orchestrator: the line and the exit code survive."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.line() == error.line() and copy.exit_code == error.exit_code
    assert str(copy) == str(error)


def test_one_mapping_from_how_a_run_ended_to_its_exit_code() -> None:
    assert exit_code_of(StorageError("x")) == 7
    assert exit_code_of(PinError("x")) == 32
    assert exit_code_of(InputError("x")) == 2
    assert exit_code_of(Interrupted("SIGTERM", 143)) == 143
    assert exit_code_of(KeyboardInterrupt()) == 130
    assert exit_code_of(RuntimeError("bug")) == 1


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("", None),
        ("commit.intents:3", ("commit.intents", 3, signal.SIGKILL)),
        ("audit.flush:1:kill", ("audit.flush", 1, signal.SIGKILL)),
        ("issue.start:1:stop", ("issue.start", 1, signal.SIGSTOP)),
    ],
)
def test_crash_point_spec(
    monkeypatch: pytest.MonkeyPatch, spec: str, parsed: tuple[str, int, signal.Signals] | None
) -> None:
    monkeypatch.setenv(crashpoint.ENV, spec)
    assert crashpoint._parse() == parsed


@pytest.mark.parametrize("spec", ["commit.intents", "x:y", "a:1:explode"])
def test_a_bad_crash_point_spec_is_refused(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(crashpoint.ENV, spec)
    with pytest.raises(ValueError, match=crashpoint.ENV):
        crashpoint._parse()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_is_noted_and_raised_at_the_next_check(
    sig: signal.Signals, code: int
) -> None:
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        stop.check()  # nothing yet
        os.kill(os.getpid(), sig)  # handled at once (main thread): only noted
        assert stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        with pytest.raises(Interrupted) as info:
            stop.check()
    assert info.value.signal_name == sig.name and info.value.exit_code == code
    assert signal.getsignal(sig) is before  # handlers restored


def test_signals_while_workers_start_are_held_not_lost() -> None:
    with StopSignals() as stop, stop.deferred():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # what children inherit
        os.kill(os.getpid(), signal.SIGTERM)  # blocked: the kernel keeps it pending
        with pytest.raises(Interrupted) as info:
            stop.check()
    assert info.value.signal_name == "SIGTERM"


def test_the_ledger_lists_what_may_have_been_signed(tmp_path: Path) -> None:
    writer = ledger.LedgerWriter(tmp_path)
    writer.mark(["0A1B", "FF00"])
    writer.mark(iter(["1234"]))
    writer.close()
    assert ledger.marked(tmp_path, {"0A1B", "1234", "ABCD"}) == {"0A1B", "1234"}
    with (tmp_path / ".signing.ledger").open("ab") as handle:
        handle.write(b"AB")  # a torn window (it was never synced: nothing was signed)
    assert ledger.marked(tmp_path, {"ABCD", "AB0"}) == set()
    ledger.clear(tmp_path)
    assert ledger.marked(tmp_path, {"0A1B"}) == set()
    assert ledger.marked(tmp_path / "none", {"0A1B"}) == set()


def _report(**changes: object) -> Report:
    fields: dict[str, object] = {
        "batch_id": "b",
        "product": "p",
        "manifest": "m.yaml",
        "manifest_sha256": "00",
        "station": "s",
        "custody": "wrapped",
        "key_profile": "ec-p256",
        "finished": "2026-01-01T00:00:00+00:00",
        "resumed": True,
        "devices": 10,
        "counts": {"bundled": 4, "planned": 6},
        "serials": {"issued": 4, "void": 2, "released": 6},
        "this_run": {},
        "stages": {"seal": StageStats(sealed=True)},
    }
    fields.update(changes)
    return Report(**fields)  # type: ignore[arg-type]


def test_the_summary_tells_void_from_released_and_shows_cleanup() -> None:
    text = summary(
        _report(
            void_serials=[{"registration_id": "d1", "serial": "AA", "reason": "r"}] * 2,
            orphans_removed=[{"object": "public", "label": "x-1", "why": "no private half"}],
            aborted="stopped by SIGTERM",
            exit_code=143,
        )
    )
    assert "void serials to revoke: 2" in text
    assert "released reservations: 6 (never reached a signer: nothing to revoke)" in text
    assert "token cleanup: 1 orphaned key objects removed" in text
    assert "removed public key x-1: no private half" in text
    assert "aborted: stopped by SIGTERM" in text and "exit code: 143" in text
