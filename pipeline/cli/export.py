"""``provline export``: flasher and MES formats from a sealed batch (docs/key-delivery.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ca.certs import load_cert
from ..config.station import load_station
from ..fixture.formats import export_batch
from ..vocabulary import ExportFormat
from .app import JsonOpt, app, emit


@app.command("export")
def export_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A sealed batch directory.")],
    formats: Annotated[
        list[ExportFormat] | None,
        typer.Option("--format", help="Format to make (repeatable; default: the station's)."),
    ] = None,
    station: Annotated[
        Path | None,
        typer.Option("--station", help="Station config: its delivery.exports and ca.root_cert."),
    ] = None,
    root: Annotated[
        Path | None, typer.Option("--root", help="Trusted root for the audit check.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify the batch offline, then write certificates and chains in PEM and DER, the TLS
    chain without the root, a C header per device, per-device archives and a batch index
    (CSV, JSON) under BATCH_DIR/EXPORTS/. The audit log does not cover EXPORTS/: `provline
    audit verify` passes before and after."""
    st = load_station(station) if station else None
    chosen = list(formats or (st.delivery.exports if st else ()) or ExportFormat)
    anchor_path = root or (st.ca.root_cert if st else None)
    anchor = load_cert(str(anchor_path), where="--root") if anchor_path else None
    summary = export_batch(batch_dir, chosen, anchor)
    emit(summary.as_dict(), as_json, "export")
