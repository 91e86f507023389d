"""Read-only views of a batch: its state (``provline status``: journal counts, the seal, the
lock holder, void serials, the last run), the devices in given states (``provline status
--list``), and device checks of sampled bundles (``provline verify-device``).

Nothing here writes to the batch or takes its lock: the lock holder is read from the
kernel's lock table (``/proc/locks``), so a status taken while a run works never gets in its
way. ``audit verify`` is what proves the seal; status only says whether there is one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.station import Station
from ..errors import InputError
from ..layout import AUDIT_LOG, AUDIT_SEAL, LOCK, REPORT
from ..registration.device import DeviceCheck, device_check, sample
from ..registration.endpoints import resolve
from ..vocabulary import REWORK_STATES, DeviceState, SerialState
from .journal import Journal

STATUS_FORMAT = "provline.status/1"
LIST_FORMAT = "provline.status-list/1"
REWORK = "rework"  # failed, conflict, register_failed: the devices that need rework
ALL = "all"
LIST_COLUMNS = ("registration_id", "device_id", "state", "serial", "reason")


def status(batch_dir: Path) -> dict[str, Any]:
    """The batch's state, nested (docs/ci.md, ``provline.status/1``)."""
    journal = Journal.open(batch_dir, create=False)
    try:
        meta = journal.meta()
        counts = journal.counts()
        serials = journal.serial_counts()
        total = journal.total()
    finally:
        journal.close()
    return {
        "format": STATUS_FORMAT,
        "batch_id": meta.get("batch_id", "?"),
        "batch_dir": str(batch_dir),
        "station": meta.get("station"),
        "custody": meta.get("custody"),
        "registration": meta.get("registration"),
        "devices": {
            "total": total,
            "by_state": dict(sorted(counts.items())),
            "rework": sum(counts.get(s, 0) for s in REWORK_STATES),
        },
        "serials": {
            "by_state": dict(sorted(serials.items())),
            "void": serials.get(SerialState.VOID, 0),
            "released": serials.get(SerialState.RELEASED, 0),
        },
        "seal": seal_state(batch_dir),
        "lock": lock_holder(batch_dir),
        "last_run": last_run(batch_dir),
    }


def status_lines(data: dict[str, Any]) -> list[str]:
    """The status for a terminal."""
    devices, serials, seal, lock = data["devices"], data["serials"], data["seal"], data["lock"]
    last = data["last_run"]
    out = [
        f"batch      {data['batch_id']} ({data['batch_dir']})",
        f"devices    {devices['total']:,}  " + _pairs(devices["by_state"]),
        f"rework     {devices['rework']:,}"
        + (
            f" (`provline status {data['batch_dir']} --list {REWORK}` lists them)"
            if devices["rework"]
            else ""
        ),
        "serials    " + _pairs(serials["by_state"]),
        f"void       {serials['void']:,} serials to revoke (`provline ca crl`)"
        if serials["void"]
        else "void       0",
        f"seal       {seal['state']}" + (f": {seal['detail']}" if seal.get("detail") else ""),
        "lock       "
        + (
            f"held by pid {lock['pid']}" + (f" ({lock['command']})" if lock.get("command") else "")
            if lock["held"]
            else ("free" if lock["held"] is False else f"unknown ({lock.get('detail')})")
        ),
    ]
    if last is None:
        out.append("last run   none finished (no report.json)")
    else:
        out.append(
            f"last run   finished {last.get('finished')}, exit code {last.get('exit_code')}"
            + (", complete" if last.get("complete") else ", not complete")
            + (f", operator {last['operator']}" if last.get("operator") else "")
            + (f", aborted: {last['aborted']}" if last.get("aborted") else "")
        )
    return out


def _pairs(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}: {v:,}" for k, v in counts.items()) or "-"


def seal_state(batch_dir: Path) -> dict[str, Any]:
    """Whether the log ends with its seal and has a signature file (not verified here:
    ``provline audit verify`` does that). ``state``: sealed, unsealed (events after the
    last seal, or no signature), skipped (the station has no audit key), no_log."""
    log = batch_dir / AUDIT_LOG
    last = _last_record(log)
    if last is None:
        return {"state": "no_log", "detail": f"no {AUDIT_LOG}"}
    event = str(last.get("event"))
    base: dict[str, Any] = {"log_lines": last.get("seq"), "last_event": event}
    if event == "seal_skipped":
        return {**base, "state": "skipped", "detail": "the station has no audit key"}
    if event == "seal" and (batch_dir / AUDIT_SEAL).is_file():
        return {**base, "state": "sealed", "signed_at": last.get("time")}
    if event == "seal":
        return {**base, "state": "unsealed", "detail": f"no {AUDIT_SEAL}"}
    return {
        **base,
        "state": "unsealed",
        "detail": f"the log ends with {event} (a run is on, or was killed)",
    }


def _last_record(log: Path) -> dict[str, Any] | None:
    try:
        with log.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return None
            block = 1 << 16
            while True:
                start = max(0, size - block)
                handle.seek(start)
                data = handle.read(size - start)
                lines = data.rstrip(b"\n").split(b"\n")
                if len(lines) >= 2 or start == 0:
                    break
                block *= 2
    except OSError:
        return None
    try:
        record = json.loads(lines[-1])
    except ValueError:
        return {"event": "(a torn last line)", "seq": None}
    return record if isinstance(record, dict) else None


def lock_holder(batch_dir: Path, locks: Path = Path("/proc/locks")) -> dict[str, Any]:
    """Who holds the batch lock, from the kernel's table of file locks (the lock itself is
    never taken here). ``held`` is None where the table cannot be read."""
    try:
        st = os.stat(batch_dir / LOCK)
    except FileNotFoundError:
        return {"held": False}
    except OSError as exc:
        return {"held": None, "detail": exc.strerror}
    try:
        table = locks.read_text()
    except OSError as exc:
        return {"held": None, "detail": f"{locks}: {exc.strerror}"}
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (a blocked waiter has "->")
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields[:2]:
            continue
        pid, where = fields[4], fields[5]
        if where == wanted and pid.isdigit():
            return {"held": True, "pid": int(pid), "command": _command(int(pid))}
    return {"held": False}


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:300]


def last_run(batch_dir: Path) -> dict[str, Any] | None:
    """What report.json says of the last run that finished (None: no report)."""
    try:
        report = json.loads((batch_dir / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    return {
        key: report.get(key)
        for key in ("finished", "exit_code", "complete", "aborted", "resumed", "operator")
    } | {"this_run": report.get("this_run")}


# ---------------------------------------------------------------------------------- lists
def list_states(names: Iterable[str]) -> tuple[DeviceState, ...]:
    """Device states named on the command line: a state, ``rework`` (failed, conflict,
    register_failed) or ``all``; comma-separated or repeated."""
    wanted: list[DeviceState] = []
    for name in (n.strip() for text in names for n in text.split(",")):
        if not name:
            continue
        if name == REWORK:
            chosen: tuple[DeviceState, ...] = REWORK_STATES
        elif name == ALL:
            chosen = tuple(DeviceState)
        else:
            try:
                chosen = (DeviceState(name),)
            except ValueError:
                names_ = ", ".join([*(s.value for s in DeviceState), REWORK, ALL])
                raise InputError(
                    f"unknown state {name!r}", where="--list", rule=f"one of {names_}"
                ) from None
        wanted += [s for s in chosen if s not in wanted]
    if not wanted:
        raise InputError("no state given", where="--list", rule="a device state, rework or all")
    return tuple(wanted)


@dataclass(frozen=True)
class ListedDevice:
    registration_id: str
    device_id: str
    state: str
    serial: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return dict(zip(LIST_COLUMNS, self.row(), strict=True))

    def row(self) -> tuple[str, str, str, str, str]:
        return (self.registration_id, self.device_id, self.state, self.serial, self.reason)


def list_devices(batch_dir: Path, states: tuple[DeviceState, ...]) -> Iterator[ListedDevice]:
    """Every device in ``states``, in manifest order, streamed from the journal."""
    wanted = {s.value for s in states}
    journal = Journal.open(batch_dir, create=False)
    try:
        for rid, did, state, serial, detail in journal.inventory_rows():
            if state not in wanted:
                continue
            info = json.loads(detail or "{}")
            reason = info.get("reason") or info.get("registration", {}).get("reason", "")
            yield ListedDevice(rid, did, state, serial or "", str(reason or ""))
    finally:
        journal.close()


# -------------------------------------------------------------------------- device checks
def check_devices(
    batch_dir: Path,
    station: Station,
    count: int,
    only: list[str] | None = None,
    key_dir: Path | None = None,
) -> list[DeviceCheck]:
    """Device checks (README "Registration") of ``only``, or of ``count`` devices sampled
    evenly over the batch's bundled and registered devices."""
    journal = Journal.open(batch_dir, create=False)
    try:
        ids = only or sample(
            list(journal.registration_ids((DeviceState.REGISTERED, DeviceState.BUNDLED))), count
        )
    finally:
        journal.close()
    return device_check(
        batch_dir,
        resolve(station.dps),
        ids,
        station.custody.pkcs8_passphrase,
        station.hsm,
        key_dir,
    )
