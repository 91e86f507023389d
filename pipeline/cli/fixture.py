"""``provline fixture …``: the programming fixture's side of key delivery
(docs/key-delivery.md): its key pair, the import of a handed-over transport key, and the
delivery of device keys to the flasher or into its own token."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..ca.certs import load_cert
from ..fixture import ceremony
from ..fixture.deliver import deliver
from ..fixture.sinks import Destination, KeyForm
from .app import (
    DEFAULT_MODULE,
    DEFAULT_PIN,
    ConfOpt,
    JsonOpt,
    ModuleOpt,
    PinOpt,
    app,
    emit,
    hsm_defaults,
    json_format,
)

fixture_app = typer.Typer(
    help="Programming fixture: its key pair, transport keys from the station, device keys "
    "for the flasher (docs/key-delivery.md).",
    no_args_is_help=True,
)
app.add_typer(fixture_app, name="fixture")

DirOpt = Annotated[
    Path,
    typer.Option(
        "--dir",
        envvar="PROVLINE_FIXTURE_DIR",
        help="The fixture's directory (fixture.json, its log).",
    ),
]


@fixture_app.command("keypair")
def fixture_keypair(
    directory: DirOpt,
    name: Annotated[str, typer.Option("--name", help="The fixture's name (a-z 0-9 . _ -).")],
    token: Annotated[
        str, typer.Option("--token", envvar="PROVLINE_TOKEN", help="The fixture's token label.")
    ],
    rsa_bits: Annotated[int, typer.Option("--rsa-bits", help="Unwrap key size.")] = 3072,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Make, in the fixture's token, an RSA key pair whose private half can only unwrap and an
    EC key that signs the fixture log; write DIR/request.pem for the station. Read the
    fingerprint to the station's security officer over another channel."""
    made = ceremony.keypair(
        directory, name, token, hsm_defaults(module, pin_source, softhsm2_conf), rsa_bits
    )
    print(f"fixture        {made.info.name} (token {made.info.token})")
    print(f"request        {made.request}  (take it to the station)")
    print(f"unwrap key     {made.info.unwrap.label}, {made.info.unwrap.algorithm}")
    print(f"fingerprint    {made.info.unwrap.sha256}  (compare out of band)")
    log = made.info.log
    print(f"log key        {log.label}, {log.algorithm}, SHA-256 {log.sha256}")


@fixture_app.command("import-transport")
def fixture_import_transport(
    directory: DirOpt,
    handover: Annotated[Path, typer.Option("--handover", help="The station's handover file.")],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root", help="The station's root certificate (checked against the handover)."
        ),
    ] = None,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Unwrap a handed-over transport key into the fixture's token (unwrap only, never
    extractable), check it against the check value bundles name it by, keep it beside older
    ones, and seal the fixture log with the certificate the station issued."""
    anchor = load_cert(str(root), where="--root") if root else None
    result = ceremony.import_transport(
        directory, handover, hsm_defaults(module, pin_source, softhsm2_conf), anchor
    )
    record = result.record
    state = "already held" if result.already else f"imported (verified by {record.verified_by})"
    print(f"transport key  {record.check.value} ({record.check.method}) {state}")
    print(f"station        {record.station} ({record.station_label}), RSA-OAEP {record.oaep_hash}")


@fixture_app.command("show")
def fixture_show(directory: DirOpt, as_json: JsonOpt = False) -> None:
    """The fixture's keys and every transport key it holds (reads files only)."""
    emit(ceremony.describe(directory), as_json, "fixture-show")


@fixture_app.command("deliver")
def fixture_deliver(
    targets: Annotated[
        list[Path],
        typer.Argument(
            metavar="BATCH_OR_BUNDLE...", help="Batch directories or bundle directories."
        ),
    ],
    directory: DirOpt,
    keep_in_token: Annotated[
        bool,
        typer.Option(
            "--keep-in-token",
            help="Keep each key in the fixture's token (label = registration ID) for a fixture "
            "that injects from the HSM; nothing is handed out.",
        ),
    ] = False,
    form: Annotated[
        KeyForm, typer.Option("--format", help="PKCS#8 encoding for the flasher.")
    ] = KeyForm.PEM,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="- (stdout, default), fd:N (an open descriptor), or file:PATH (created 0600, "
            "never overwritten). Never a terminal or a redirected file.",
        ),
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option("--device", help="Only this registration ID (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Unwrap each device key in the fixture's token, check it against its certificate (a
    challenge signed in the token, verified with the certificate), and keep it there or hand
    it to the flasher as PKCS#8. Every bundle is checked before any key is unwrapped; every
    delivery is logged before the key leaves. Exit 7, one line per bundle, on a refusal."""
    destination = Destination.parse(to) if to is not None else None
    summary = deliver(
        directory,
        targets,
        hsm_defaults(module, pin_source, softhsm2_conf),
        keep_in_token=keep_in_token,
        form=form,
        destination=destination,
        devices=device,
    )
    data = summary.as_dict()
    # Keys may be on stdout: the summary then goes to stderr.
    out = sys.stderr if summary.destination == "stdout" else sys.stdout
    if as_json:
        print(json.dumps({"format": json_format("fixture-deliver"), **data}, indent=2), file=out)
        return
    where = "kept in the token" if keep_in_token else f"{data['form']} to {data['to']}"
    print(
        f"fixture {data['fixture']}: {data['delivered']} keys delivered ({where}) "
        f"in {data['seconds']} s, {data['per_s']}/s"
        + (
            f"; {data['already_in_token']} already in the token" if data["already_in_token"] else ""
        ),
        file=out,
    )
