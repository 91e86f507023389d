"""``provline sign`` and ``provline lot open | close``: devices that make their own keys join
an open lot one at a time (custody device, docs/device-keys.md)."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from ..batch.orchestrator import RunResult
from ..batch.progress import Lines, Silent, for_terminal
from ..batch.report import summary
from ..batch.serve import answers_to, requests_from
from ..batch.sign import (
    LotSettings,
    Signed,
    SignRequest,
    close_lot,
    one_request,
    open_lot,
    read_lot,
    sign_session,
)
from ..ca.csr import MAX_CSR_BYTES, check_request
from ..config.station import load_station
from ..errors import InputError, Interrupted, ProvlineError, exit_code_of
from ..files import write_all
from ..keyprofile import KeyProfile
from ..registration.stage import RegisterOptions
from ..vocabulary import RegistrationMode
from .app import JsonOpt, OperatorOpt, StationOpt, app

lot_app = typer.Typer(
    help="Open lots: devices with their own keys join one at a time (provline sign).",
    no_args_is_help=True,
)
app.add_typer(lot_app, name="lot")

LotIdOpt = Annotated[str, typer.Option("--batch-id", help="The lot (its batch id).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress output.")]


@lot_app.command("open")
def lot_open_cmd(
    station: StationOpt,
    batch_id: LotIdOpt,
    product: Annotated[str, typer.Option("--product", help="Product name.")] = "",
    key_profile: Annotated[
        KeyProfile, typer.Option("--key-profile", help="The devices' key profile.")
    ] = KeyProfile.EC_P256,
    validity_days: Annotated[
        int, typer.Option("--validity-days", help="Leaf validity (capped by the issuer).")
    ] = 365,
    registration: Annotated[
        RegistrationMode,
        typer.Option("--registration", help="Registration when the lot closes."),
    ] = RegistrationMode.NONE,
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open a lot that devices join one at a time with their own CSR (custody device).
    Opening it again with the same settings does nothing."""
    settings = LotSettings(batch_id, product, key_profile, validity_days, registration)
    _print_run(open_lot(load_station(station), settings, Silent(), operator), as_json)


@lot_app.command("close")
def lot_close_cmd(
    station: StationOpt,
    batch_id: LotIdOpt,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=64, help="Worker processes.")
    ] = None,
    upload_ca: Annotated[
        bool, typer.Option("--upload-ca", help="Upload the issuing CA and prove possession.")
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite conflicting enrollments.")
    ] = False,
    operations_per_minute: Annotated[
        int | None, typer.Option("--operations-per-minute", min=1, help="Registration pace.")
    ] = None,
    quiet: QuietOpt = False,
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close a lot: no device joins it any more; devices a kill left without a certificate
    are issued from their recorded CSRs; the lot is registered (its --registration) and
    sealed. Run it again to retry a registration that failed."""
    st = load_station(station)
    options = RegisterOptions(
        replace=replace,
        upload_ca=upload_ca,
        operations_per_minute=operations_per_minute or st.dps.operations_per_minute,
        concurrency=st.dps.concurrency,
        bulk_size=st.dps.bulk_size,
    )
    progress = for_terminal(quiet, json_events=as_json)
    _print_run(
        close_lot(
            st, batch_id, progress=progress, workers=workers, register=options, operator=operator
        ),
        as_json,
    )


@app.command("sign")
def sign_cmd(
    station: StationOpt,
    batch_id: LotIdOpt,
    registration_id: Annotated[
        str | None,
        typer.Option("--registration-id", help="The device (default: the CSR's subject CN)."),
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Serve requests on stdin, one JSON object per line, answers on stdout "
            "(docs/device-keys.md) until stdin ends.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Answer as the serve protocol's JSON object.")
    ] = False,
    quiet: QuietOpt = False,
    operator: OperatorOpt = None,
) -> None:
    """Add one device to an open lot: its CSR (PEM or DER) on stdin, its full chain (PEM:
    leaf, issuing CA, root) on stdout. With --serve, many devices over one session."""
    st = load_station(station)
    if serve:
        if registration_id is not None:
            raise InputError("--registration-id is per request with --serve", rule="usage")
        progress = Silent() if quiet else Lines()
        try:
            result = sign_session(st, batch_id, requests_from(0), answers_to(1), progress, operator)
        except KeyboardInterrupt as exc:  # the session stopped cleanly; its report says so
            name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
            print(f"stopped by {name}: the lot stays open", file=sys.stderr)
            raise typer.Exit(exit_code_of(exc)) from exc
        raise typer.Exit(result.exit_code)
    request = SignRequest(_stdin_request(), registration_id)
    settings, _ = read_lot(st, batch_id)
    try:  # refused before the session starts: no trace in the lot
        check_request(request.csr, registration_id, settings.key_profile)
    except InputError as exc:
        exc.where = "stdin"
        raise
    answers: list[Signed | ProvlineError] = []

    def keep(_: SignRequest, outcome: Signed | ProvlineError) -> bool:
        answers.append(outcome)
        return True

    result = sign_session(st, batch_id, one_request(request), keep, Silent(), operator)
    outcome = answers[0]
    if as_json:
        print(json.dumps(outcome.to_json() if isinstance(outcome, Signed) else _error(outcome)))
    elif isinstance(outcome, Signed):
        write_all(1, outcome.chain_pem)
    if isinstance(outcome, ProvlineError):
        raise outcome
    raise typer.Exit(result.exit_code)


def _error(exc: ProvlineError) -> dict[str, object]:
    return {"ok": False, "exit_code": exc.exit_code, "error": exc.line()}


def _stdin_request() -> bytes:
    if sys.stdin.isatty():
        raise InputError("give the CSR on stdin (PEM or DER)", rule="usage")
    data = b""
    while len(data) <= MAX_CSR_BYTES and (chunk := os.read(0, 1 << 16)):
        data += chunk
    if len(data) > MAX_CSR_BYTES:
        raise InputError(
            f"stdin holds more than {MAX_CSR_BYTES:,} bytes",
            rule=f"a CSR is at most {MAX_CSR_BYTES // 1024} KiB",
        )
    return data


def _print_run(result: RunResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.report.to_json(), indent=2, sort_keys=True, default=str))
    else:
        print(summary(result.report), end="")
        print(f"output: {result.batch_dir}")
    raise typer.Exit(result.exit_code)
