"""``provline hsm …``: token set-up (SoftHSM2) and the capability check of a station's token."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..batch.capability import station_report
from ..config.manifest import load_manifest
from ..config.station import load_station
from ..errors import MechanismUnsupported
from ..hsm.softhsm import init_token
from ..secret import SecretRef
from .app import DEFAULT_PIN, JsonOpt, PinOpt, StationOpt, hsm_app, print_json


@hsm_app.command("init")
def hsm_init(
    directory: Annotated[Path, typer.Argument(help="Directory for the SoftHSM2 config + tokens.")],
    label: Annotated[str, typer.Option("--label", help="Token label.")],
    pin_source: PinOpt = DEFAULT_PIN,
    so_pin_source: Annotated[
        str, typer.Option("--so-pin-source", help="Security-officer PIN: env:NAME or file:PATH.")
    ] = "env:PROVLINE_SO_PIN",
) -> None:
    """Create a SoftHSM2 token under DIRECTORY (never the system token directory). Other
    HSMs are initialised with their vendor's tools (docs/hsm.md)."""
    pin = SecretRef.parse(pin_source, where="--pin-source").read(where="--pin-source")
    so_pin = SecretRef.parse(so_pin_source, where="--so-pin-source").read(where="--so-pin-source")
    conf = init_token(directory, label, so_pin=so_pin, user_pin=pin)
    print(f"token {label!r} initialised")
    print(f"export SOFTHSM2_CONF={conf}")


@hsm_app.command("check")
def hsm_check(
    station: StationOpt,
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="Check for this manifest's key profile and size only."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """What each configured function needs from the station's token (key generation per
    profile, signing, key wrap, transport key identification, room for retained keys) against
    what the token offers. Exit 34 when something needed is missing. Creates nothing."""
    st = load_station(station)
    mf = load_manifest(manifest) if manifest else None
    report = station_report(st, mf)
    if as_json:
        print_json("hsm-check", report.to_json())
    else:
        for line in report.lines():
            print(line)
    if report.missing:
        raise typer.Exit(MechanismUnsupported.exit_code)
