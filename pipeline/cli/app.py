"""The typer application, its command groups, and the option types commands share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__, hsm
from ..ca.keys import HsmDefaults
from ..keyprofile import KeyProfile
from ..secret import SecretRef

app = typer.Typer(
    help="Factory-line provisioning: HSM-held device keys and CA, full-chain bundles, "
    "DPS pre-registration, signed audit logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
hsm_app = typer.Typer(
    help="PKCS#11 tokens: set up a SoftHSM2 token, check what a station needs.",
    no_args_is_help=True,
)
ca_app = typer.Typer(
    help="The CA hierarchy: root, intermediate, PoP, transport and audit keys; fixture trust "
    "and the transport-key handover.",
    no_args_is_help=True,
)
audit_app = typer.Typer(help="Verify a batch's signed audit log offline.", no_args_is_help=True)
emulator_app = typer.Typer(
    help="The local DPS + IoT Hub emulator (demo, tests, CI).", no_args_is_help=True
)
app.add_typer(hsm_app, name="hsm")
app.add_typer(ca_app, name="ca")
app.add_typer(audit_app, name="audit")
app.add_typer(emulator_app, name="emulator")

# Options shared by every command that opens a token. Secrets are named by source only.
ModuleOpt = Annotated[
    str, typer.Option("--module", envvar="PROVLINE_PKCS11_MODULE", help="PKCS#11 module path.")
]
PinOpt = Annotated[
    str,
    typer.Option(
        "--pin-source", help="Where the token user PIN comes from: env:NAME or file:PATH."
    ),
]
ConfOpt = Annotated[
    str | None,
    typer.Option("--softhsm2-conf", envvar="SOFTHSM2_CONF", help="SoftHSM2 config (tests, demo)."),
]
TokenOpt = Annotated[
    str, typer.Option("--token", envvar="PROVLINE_TOKEN", help="Token label (never a slot number).")
]
ProfileOpt = Annotated[KeyProfile, typer.Option("--profile", help="Key algorithm.")]
PassphraseOpt = Annotated[
    str,
    typer.Option(
        "--passphrase-source", help="Passphrase of a PKCS#8 key file: env:NAME or file:PATH."
    ),
]
ManifestArg = Annotated[Path, typer.Argument(help="Manifest (YAML or CSV).")]
StationOpt = Annotated[Path, typer.Option("--station", help="Station config (YAML).")]
BatchIdOpt = Annotated[str | None, typer.Option("--batch-id", help="Override the batch id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]

DEFAULT_PIN = "env:PROVLINE_PIN"
DEFAULT_PASSPHRASE = "env:PROVLINE_ROOT_PASSPHRASE"
DEFAULT_MODULE = hsm.DEFAULT_MODULE


def hsm_defaults(module: str, pin_source: str, softhsm2_conf: str | None) -> HsmDefaults:
    return HsmDefaults(
        module=module,
        pin=SecretRef.parse(pin_source, where="--pin-source"),
        softhsm2_conf=softhsm2_conf,
    )


def emit(data: dict[str, object], as_json: bool) -> None:
    """A record as JSON, or as aligned ``key  value`` lines."""
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        print(f"provline {__version__}")
        raise typer.Exit()
