"""``provline find | revoke | renew | expiring | reconcile | inventory …``: a device identity's
life after its batch is sealed (docs/lifecycle.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config.station import load_station
from ..errors import InputError, RegistrationError
from ..lifecycle import queries
from ..lifecycle.crl import REASONS, parse_reason
from ..lifecycle.promote import promote
from ..lifecycle.rebuild import rebuild, sync
from ..lifecycle.reconcile import reconcile
from ..lifecycle.renew import renew
from ..lifecycle.revoke import revoke
from ..lifecycle.targets import Targets
from .app import JsonOpt, OperatorOpt, StationOpt, app, print_json

inventory_app = typer.Typer(
    help="The station inventory: every certificate the station issued.", no_args_is_help=True
)
app.add_typer(inventory_app, name="inventory")

DeviceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--device", help="Registration ID, serial or thumbprint (repeatable).", show_default=False
    ),
]
ListOpt = Annotated[
    list[Path] | None,
    typer.Option("--list", help="File of registration IDs / serials, one a line (repeatable)."),
]
BatchOpt = Annotated[
    list[str] | None, typer.Option("--batch", help="Every device of this batch (repeatable).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Resume the unfinished operation of this kind.")
]
PaceOpt = Annotated[
    int | None,
    typer.Option(
        "--operations-per-minute", min=1, help="DPS / IoT Hub pace (default: the station's)."
    ),
]


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _targets(
    device: list[str] | None, lists: list[Path] | None, batch: list[str] | None
) -> Targets:
    return Targets(tuple(device or ()), tuple(batch or ()), tuple(lists or ()))


@app.command("find")
def find_cmd(
    query: Annotated[str, typer.Argument(help="Serial, registration ID, SHA-1 or SHA-256.")],
    station: StationOpt,
    as_json: JsonOpt = False,
) -> None:
    """Which batch, which station, which state: every certificate matching QUERY (exit 2 when
    none does)."""
    found = queries.find(load_station(station), query)
    if not found:
        raise InputError(f"{query}: not in the station inventory", rule="provline find")
    if as_json:
        print_json("find", [f.to_json() for f in found], key="certificates")
    for f in [] if as_json else found:
        c, d = f.certificate, f.device
        print(
            f"{c.registration_id}  serial {c.serial}  {c.status}"
            + (f" ({c.reason} {c.revoked_at})" if c.reason else "")
            + f"  batch {c.batch_id}  station {c.station}  not after {c.not_after or '-'}"
        )
        print(f"  sha1 {c.sha1 or '-'}  sha256 {c.sha256 or '-'}  custody {c.custody or '-'}")
        if d is not None:
            print(
                f"  device {d.device_id}: {d.state}, {d.mode} registration ({d.registration})"
                + (f", DPS {d.dps}" if d.dps else "")
                + (f", IoT Hub {d.hub}" if d.hub else "")
            )


@app.command("revoke")
def revoke_cmd(
    station: StationOpt,
    reason: Annotated[
        str, typer.Option("--reason", help=f"RFC 5280 reason: {', '.join(REASONS)}.")
    ] = "unspecified",
    device: DeviceOpt = None,
    lists: ListOpt = None,
    batch: BatchOpt = None,
    resume: ResumeOpt = False,
    pace: PaceOpt = None,
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke devices: CRL signed in the HSM, DPS enrollment disabled (or a disabled one
    blocking a group device), IoT Hub identity disabled. Journaled: run it again to resume."""
    result = revoke(
        load_station(station),
        _targets(device, lists, batch),
        parse_reason(reason),
        resume=resume,
        operations_per_minute=pace,
        operator=operator,
        note=_note,
    )
    if as_json:
        print_json("revoke", result.to_json())
    else:
        print(f"revoke {result.operation or '-'}: {result.state}, {result.devices} devices")
        if result.already:
            print(f"already revoked and shut out: {len(result.already)}")
        if result.crl:
            print(
                f"CRL number {result.crl.number}, {result.crl.entries} serials: {result.crl.path}"
            )
        print("DPS: " + _counts(result.dps) + "   IoT Hub: " + _counts(result.hub))
        for failure in result.failures[:SHOWN]:
            print(
                f"failed {failure['registration_id']}: DPS {failure['dps']}; hub {failure['hub']}"
            )
        _more(len(result.failures))
    raise typer.Exit(result.exit_code)


@app.command("renew")
def renew_cmd(
    station: StationOpt,
    device: DeviceOpt = None,
    lists: ListOpt = None,
    batch: BatchOpt = None,
    promote_: Annotated[
        bool,
        typer.Option(
            "--promote", help="Make staged renewals primary and retire the old certificates."
        ),
    ] = False,
    validity_days: Annotated[
        int | None, typer.Option("--validity-days", min=1, help="Default: the old certificate's.")
    ] = None,
    resume: ResumeOpt = False,
    pace: PaceOpt = None,
    csr_dir: Annotated[
        Path | None,
        typer.Option(
            "--csr-dir",
            help="Custody device: the devices' new CSRs, <registration-id>.csr | .pem | .der.",
        ),
    ] = None,
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """New certificates (same CN, new serial, new key) with the old ones still valid; an
    individual enrollment gets the new one as secondary. --promote finishes the roll."""
    st, targets = load_station(station), _targets(device, lists, batch)
    if promote_:
        result = promote(
            st,
            targets,
            resume=resume,
            operations_per_minute=pace,
            operator=operator,
            note=_note,
        )
    else:
        result = renew(
            st,
            targets,
            validity_days=validity_days,
            resume=resume,
            operations_per_minute=pace,
            operator=operator,
            note=_note,
            csr_dir=csr_dir,
        )
    if as_json:
        print_json(result.kind, result.to_json())
    else:
        print(f"{result.kind} {result.operation}: {result.state}, {result.devices} devices")
        if result.kind == "renew":
            print(f"issued {result.issued}, void {result.voided}, enrolled {result.enrolled}")
            print(f"bundles: {result.directory}")
        else:
            print(f"promoted {result.enrolled}")
            if result.crl:
                print(f"CRL number {result.crl.number}: {result.crl.path}")
        for failure in result.failures[:SHOWN]:
            print(f"failed {failure['registration_id']}: {failure['reason']}")
        _more(len(result.failures))
    raise typer.Exit(result.exit_code)


@app.command("expiring")
def expiring_cmd(
    station: StationOpt,
    within: Annotated[str, typer.Option("--within", help="e.g. 90d, 12w.")] = "90d",
    as_json: JsonOpt = False,
) -> None:
    """Active certificates that expire within the given time (what needs renewal)."""
    rows = queries.expiring(load_station(station), queries.parse_duration(within))
    if as_json:
        print_json("expiring", rows, key="certificates")
        return
    for row in rows:
        staged = "  (renewal staged)" if row["renewal_staged"] else ""
        print(f"{row['not_after']}  {row['registration_id']}  batch {row['batch_id']}{staged}")
    print(f"{len(rows)} certificates expire within {within}")


@app.command("reconcile")
def reconcile_cmd(
    station: StationOpt,
    fix: Annotated[
        bool, typer.Option("--fix", help="Repair what provline owns; report the rest.")
    ] = False,
    pace: PaceOpt = None,
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare the inventory with DPS (enrollments, groups, registrations) and IoT Hub; list
    drift. Exit 5 while drift remains."""
    report = reconcile(
        load_station(station),
        fix=fix,
        operations_per_minute=pace,
        operator=operator,
        note=_note,
    )
    if as_json:
        print_json("reconcile", report.to_json())
    else:
        print(report.table(), end="")
    raise typer.Exit(RegistrationError.exit_code if report.remaining else 0)


@inventory_app.command("rebuild")
def inventory_rebuild_cmd(
    station: StationOpt,
    root: Annotated[
        Path | None, typer.Option("--root", help="Trusted root (default: the station's).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make the inventory again from the sealed batch directories under the station's output
    and the lifecycle log, each only after it verifies (exit 6 otherwise)."""
    _emit(rebuild(load_station(station), root, note=_note), as_json, "inventory-rebuild")


@inventory_app.command("sync")
def inventory_sync_cmd(
    batch_dirs: Annotated[list[Path], typer.Argument(metavar="BATCH_DIR...")],
    station: StationOpt,
    as_json: JsonOpt = False,
) -> None:
    """Record batches from their journals (what `provline run` does when it ends)."""
    _emit(sync(load_station(station), batch_dirs), as_json, "inventory-sync")


@inventory_app.command("show")
def inventory_show_cmd(station: StationOpt, as_json: JsonOpt = False) -> None:
    """Counts per state, the CRLs, an unfinished operation."""
    _emit(queries.show(load_station(station)), as_json, "inventory-show")


def _emit(data: dict[str, Any], as_json: bool, kind: str) -> None:
    if as_json:
        print_json(kind, data)
        return
    for key, value in data.items():
        text = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        print(f"{key:<22}  {text}")


def _counts(counts: dict[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


SHOWN = 20  # failures printed one by one; --json lists every one


def _more(total: int) -> None:
    if total > SHOWN:
        print(f"... and {total - SHOWN} more of {total} (--json lists every one)")
