"""``provline validate | plan | run | status | verify-device``: one production lot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..batch.orchestrator import run_batch
from ..batch.plan import check_inputs, dry_run
from ..batch.progress import for_terminal
from ..batch.report import summary
from ..batch.status import check_devices, status
from ..ca.certs import load_cert
from ..config.manifest import load_manifest
from ..config.station import load_station
from ..errors import Interrupted, MechanismUnsupported, RegistrationError, exit_code_of
from ..fixture.formats import export_batch
from ..hsm.capabilities import format_report
from ..registration.device import DeviceCheck
from ..registration.stage import RegisterOptions
from .app import BatchIdOpt, JsonOpt, ManifestArg, StationOpt, app, emit


@app.command("validate")
def validate_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
) -> None:
    """Check a manifest against a station config without touching the HSM or any file."""
    st = load_station(station)
    mf = load_manifest(manifest, batch_id=batch_id)
    check_inputs(mf, st)
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
) -> None:
    """Dry run: diff the manifest against the batch journal and DPS; change nothing."""
    result = dry_run(load_manifest(manifest, batch_id=batch_id), load_station(station))
    if as_json:
        print(json.dumps(result, indent=2))
        if not result["hsm"]["ok"]:
            raise typer.Exit(MechanismUnsupported.exit_code)
        return
    for line in format_report(result["hsm"]):
        print(line)
    print(f"batch {result['batch_id']}: {result['devices']} devices")
    print("journal: " + "  ".join(f"{k}: {v}" for k, v in sorted(result["journal"].items())))
    print(f"would issue: {result['would_issue']}")
    if "dps" in result:
        print("dps: " + "  ".join(f"{k}: {v}" for k, v in result["dps"].items()))
        print(f"would register: {result['would_register']}")
        for rid in result["would_conflict"]:
            print(f"would conflict: {rid}")
    if not result["hsm"]["ok"]:
        print("would refuse: the token lacks what the batch needs (see MISSING above)")
        raise typer.Exit(MechanismUnsupported.exit_code)


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
) -> None:
    """Run a batch, or resume it if its batch directory already has a journal. SIGINT and
    SIGTERM stop it cleanly (report written, log sealed; exit 130 / 143)."""
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
        )
    except KeyboardInterrupt as exc:  # the run stopped cleanly; its report says so
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        print(f"stopped by {name}: run the same command again to resume", file=sys.stderr)
        raise typer.Exit(exit_code_of(exc)) from exc
    if as_json:
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
        print(json.dumps([r.to_json() for r in results], indent=2))
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
) -> None:
    """Counts per state of a batch, from its journal (read-only)."""
    emit(status(batch_dir), as_json)
