"""``provline validate | plan | run | status | verify-device``: one production lot."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..batch.orchestrator import run_batch
from ..batch.plan import PlanResult, check_inputs, dry_run
from ..batch.progress import for_terminal
from ..batch.report import summary
from ..batch.status import (
    LIST_COLUMNS,
    check_devices,
    list_devices,
    status,
    status_lines,
)
from ..batch.status import list_states as parse_states
from ..ca.certs import load_cert
from ..config.manifest import load_manifest
from ..config.station import load_station
from ..errors import InputError, Interrupted, RegistrationError, exit_code_of
from ..fixture.formats import export_batch
from ..hsm.capabilities import format_report
from ..registration.device import DeviceCheck
from ..registration.precheck import SHOWN
from ..registration.stage import RegisterOptions
from ..vocabulary import DeviceState, RegistrationMode
from .app import (
    BatchIdOpt,
    JsonOpt,
    ManifestArg,
    OperatorOpt,
    StationOpt,
    app,
    json_format,
    print_error_json,
    print_json,
)


@app.command("validate")
def validate_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a manifest against a station config: reads input files only (no HSM, no journal,
    no network, no running emulator needed). `plan` checks the rest."""
    st = load_station(station)
    mf = load_manifest(manifest, batch_id=batch_id)
    check_inputs(mf, st, live=False)
    if as_json:
        print_json(
            "validate",
            {
                "valid": True,
                "manifest": str(manifest),
                "batch_id": mf.batch_id,
                "devices": len(mf),
                "key_profile": mf.key_profile.value,
                "registration": mf.registration.value,
            },
        )
        return
    print(
        f"{manifest}: {len(mf)} devices in batch {mf.batch_id}, profile {mf.key_profile}, "
        f"registration {mf.registration}: valid"
    )


@app.command("plan")
def plan_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
    as_json: JsonOpt = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Plan as `run --replace` would run.")
    ] = False,
    upload_ca: Annotated[
        bool, typer.Option("--upload-ca", help="Plan as `run --upload-ca` would run.")
    ] = False,
    operator: OperatorOpt = None,
    list_all: Annotated[
        bool,
        typer.Option("--all", help=f"List every conflict (default: the first {SHOWN})."),
    ] = False,
) -> None:
    """Dry run: the manifest against the journal, the token and DPS / IoT Hub (read-only).
    Exits with the code `run` would give first: 2 input, 3x HSM, 51 DPS would refuse, 5
    devices left in conflict by an earlier run, 0 when run would go through."""
    st = load_station(station)
    options = RegisterOptions(
        replace=replace,
        upload_ca=upload_ca,
        operations_per_minute=st.dps.operations_per_minute,
        concurrency=st.dps.concurrency,
        bulk_size=st.dps.bulk_size,
    )
    result = dry_run(
        load_manifest(manifest, batch_id=batch_id),
        st,
        options,
        operator=operator,
        limit=None if list_all else SHOWN,
    )
    if as_json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        for line in plan_lines(result, manifest, station):
            print(line)
    raise typer.Exit(result.exit_code)


@app.command("run")
def run_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, max=64, help="Worker processes (default: station)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print report.json to stdout; progress as JSON lines on stderr."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="Overwrite conflicting enrollments/groups (never by default)."
        ),
    ] = False,
    upload_ca: Annotated[
        bool,
        typer.Option(
            "--upload-ca", help="Upload the issuing CA and prove possession before registering."
        ),
    ] = False,
    operations_per_minute: Annotated[
        int | None,
        typer.Option(
            "--operations-per-minute", min=1, help="Registration pace (default: station)."
        ),
    ] = None,
    smoke: Annotated[
        int,
        typer.Option(
            "--smoke", min=0, help="After the run, device-check N sampled devices (pkcs8)."
        ),
    ] = 0,
    unreachable_deadline: Annotated[
        float,
        typer.Option(
            "--unreachable-deadline",
            min=1,
            help="Seconds DPS / IoT Hub may give no answer before registration gives up "
            "(the devices left end register_failed, exit 5).",
        ),
    ] = RegisterOptions.unreachable_deadline,
    operator: OperatorOpt = None,
) -> None:
    """Run a batch, or resume it if its batch directory already has a journal. Before the
    first certificate is signed it checks what `plan` checks and refuses the same way (51:
    DPS would refuse). SIGINT and SIGTERM stop it cleanly (report written, log sealed; exit
    130 / 143)."""
    st = load_station(station)
    mf = load_manifest(manifest, batch_id=batch_id)
    options = RegisterOptions(
        replace=replace,
        upload_ca=upload_ca,
        operations_per_minute=operations_per_minute or st.dps.operations_per_minute,
        concurrency=st.dps.concurrency,
        bulk_size=st.dps.bulk_size,
        unreachable_deadline=unreachable_deadline,
    )
    try:
        result = run_batch(
            mf,
            st,
            progress=for_terminal(quiet, json_events=as_json),
            workers=workers,
            register=options,
            operator=operator,
        )
    except KeyboardInterrupt as exc:  # the run stopped cleanly; its report says so
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        message = f"stopped by {name}: run the same command again to resume"
        print(message, file=sys.stderr)
        if as_json:
            print_error_json(exit_code_of(exc), "stopped", message)
        raise typer.Exit(exit_code_of(exc)) from exc
    if as_json:  # report.json itself (its "format" is provline.report/1)
        print(json.dumps(result.report.to_json(), indent=2, sort_keys=True, default=str))
    else:
        print(summary(result.report), end="")
        print(f"output: {result.batch_dir}")
    if smoke and result.exit_code == 0:
        _print_device_checks(check_devices(result.batch_dir, st, smoke), as_json=False)
    if st.delivery.exports and result.exit_code in (0, RegistrationError.exit_code):
        if st.audit is None:  # exports are made from a sealed batch only
            print("exports: skipped (the batch is not sealed: no audit section)", file=sys.stderr)
        else:
            root = load_cert(str(st.ca.root_cert))
            made = export_batch(result.batch_dir, st.delivery.exports, root)
            if not as_json:
                print(f"exports: {made.out} ({', '.join(f.value for f in made.formats)})")
    raise typer.Exit(result.exit_code)


@app.command("verify-device")
def verify_device_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A batch directory (pkcs8 or retain).")],
    station: StationOpt,
    count: Annotated[int, typer.Option("--count", min=1, help="Devices to sample.")] = 3,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device", help="Check this registration ID (repeatable) instead of sampling."
        ),
    ] = None,
    key_dir: Annotated[
        Path | None,
        typer.Option(
            "--key-dir",
            help="Custody device: keys you hold, <registration-id>.key.pem (unencrypted PEM).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Device-side check: register sampled devices with DPS over mTLS using their bundles,
    then send one telemetry message each to the assigned hub."""
    st = load_station(station)
    _print_device_checks(check_devices(batch_dir, st, count, device, key_dir), as_json)


def _print_device_checks(results: list[DeviceCheck], as_json: bool) -> None:
    if as_json:
        print_json("verify-device", {"devices": [r.to_json() for r in results]})
    else:
        for r in results:
            print(
                f"{r.registration_id}: {r.status}"
                + (
                    f" hub {r.assigned_hub} device {r.device_id} telemetry {r.telemetry or '-'}"
                    if r.assigned_hub
                    else ""
                )
                + (f" ({r.reason})" if r.reason else "")
            )
    if not all(r.ok for r in results):
        raise typer.Exit(RegistrationError.exit_code)


@app.command("status")
def status_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A batch directory (has journal.sqlite).")],
    as_json: JsonOpt = False,
    list_states: Annotated[
        list[str] | None,
        typer.Option(
            "--list",
            metavar="STATE",
            help="List every device in STATE (a device state, rework = failed, conflict and "
            "register_failed, or all); repeatable or comma-separated.",
        ),
    ] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="With --list: CSV.")] = False,
) -> None:
    """The batch's state, read-only: device and serial counts, the seal, who holds the lock,
    the last run; with --list, every device in the given states (text, --json, --csv)."""
    if list_states:
        states = parse_states(list_states)
        rows = list_devices(batch_dir, states)
        if as_csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(LIST_COLUMNS)
            writer.writerows(d.row() for d in rows)
        elif as_json:
            _stream_list_json(batch_dir, states, rows)
        else:
            count = 0
            for d in rows:
                count += 1
                print(f"{d.registration_id}  {d.state}  {d.serial or '-'}  {d.reason}".rstrip())
            print(f"{count:,} devices in {', '.join(s.value for s in states)}", file=sys.stderr)
        return
    if as_csv:
        raise InputError("--csv needs --list STATE", where="--csv", rule="CSV lists devices")
    data = status(batch_dir)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n".join(status_lines(data)))


def _stream_list_json(
    batch_dir: Path, states: tuple[DeviceState, ...], rows: Iterable[Any]
) -> None:
    """One JSON object, written device by device (a million-device list is never held)."""
    head = {"format": json_format("status-list"), "batch_dir": str(batch_dir)}
    head["states"] = [s.value for s in states]  # type: ignore[assignment]
    sys.stdout.write(json.dumps(head)[:-1] + ', "devices": [')
    count = 0
    for d in rows:
        sys.stdout.write((",\n  " if count else "\n  ") + json.dumps(d.to_json()))
        count += 1
    sys.stdout.write(f'\n], "count": {count}}}\n')


def plan_lines(result: PlanResult, manifest: Path, station: Path) -> list[str]:
    """``provline plan`` for a terminal."""
    data = result.to_json()
    out = list(format_report(data["hsm"]))
    state = "resumed" if result.resumed else "new"
    out.append(f"batch {result.batch_id}: {result.devices.total:,} devices ({state})")
    out.append(
        "journal: " + "  ".join(f"{k}: {v:,}" for k, v in sorted(result.devices.states.items()))
    )
    out.append(f"would issue: {result.devices.would_issue:,}")
    if result.operator:
        out.append(f"operator: {result.operator}")
    target = result.target
    if result.registration is not RegistrationMode.NONE:
        out.append(
            f"would register: {len(result.devices.candidates):,}"
            f" (already registered: {result.devices.registered:,})"
        )
    if target is not None:
        out.append(
            f"target: {target.mode} at {target.service_endpoint}"
            + (f" (ID scope {target.id_scope})" if target.id_scope else "")
            + (f", hub {target.hub}" if target.hub else "")
            + f": {target.calls} read-only calls"
        )
        out.append("lookups: " + "  ".join(f"{k}: {v:,}" for k, v in target.lookups.items()))
        if target.mode is not RegistrationMode.HUB:
            out.append(f"ca: {target.ca}" + (f" ({target.ca_detail})" if target.ca_detail else ""))
        if target.group:
            out.append(f"group: {target.group['id']}: {target.group['state']}")
        for c in target.conflicts:
            out.append(f"would conflict: {c.registration_id}: {c.reason}")
        left = target.conflicts_total - len(target.conflicts)
        if left > 0:
            out.append(
                f"... {left:,} more conflicts left out of {target.conflicts_total:,}: "
                f"`provline plan {manifest} --station {station} --all` lists every one"
            )
        for note in target.notes:
            out.append(f"note: {note}")
    known = result.devices
    for rid in known.known_conflicts:
        out.append(f"in conflict since an earlier run: {rid}")
    left = known.known_conflicts_total - len(known.known_conflicts)
    if left > 0:
        out.append(
            f"... {left:,} more in conflict: `provline status {result.batch_dir} --list "
            "conflict` lists every one"
        )
    for why in result.refusals():
        out.append(f"would refuse: {why}")
    out.append(
        f"exit code: {result.exit_code}"
        + (" (run would go through)" if result.exit_code == 0 else "")
    )
    return out
