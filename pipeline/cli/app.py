"""The typer application, its command groups, the option types commands share, and the JSON
edge: every JSON document a command prints is one object whose ``format`` field names its
shape and version (``provline.<kind>/<version>``, docs/ci.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import __version__, hsm
from ..ca.keys import HsmDefaults
from ..errors import ProvlineError
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
audit_app = typer.Typer(
    help="The auditor's view: verify a signed audit log offline, show a batch's history.",
    no_args_is_help=True,
)
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
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (errors too): one object, docs/ci.md.")
]
OperatorOpt = Annotated[
    str | None,
    typer.Option(
        "--operator",
        envvar="PROVLINE_OPERATOR",
        help="Who runs it, recorded in the audit log (required by audit.require_operator).",
    ),
]
FORMAT_VERSION = 1  # of every JSON shape below; a change that breaks a reader bumps it

DEFAULT_PIN = "env:PROVLINE_PIN"
DEFAULT_PASSPHRASE = "env:PROVLINE_ROOT_PASSPHRASE"
DEFAULT_MODULE = hsm.DEFAULT_MODULE


def hsm_defaults(module: str, pin_source: str, softhsm2_conf: str | None) -> HsmDefaults:
    return HsmDefaults(
        module=module,
        pin=SecretRef.parse(pin_source, where="--pin-source"),
        softhsm2_conf=softhsm2_conf,
    )


def json_format(kind: str) -> str:
    """The ``format`` value of a JSON document of ``kind`` (docs/ci.md)."""
    return f"provline.{kind}/{FORMAT_VERSION}"


def print_json(kind: str, data: Mapping[str, Any] | Sequence[Any], key: str = "items") -> None:
    """One JSON object on stdout, ``format`` first; a list goes under ``key``."""
    body = dict(data) if isinstance(data, Mapping) else {key: list(data)}
    body.pop("format", None)
    print(json.dumps({"format": json_format(kind), **body}, indent=2, default=str))


# What each exit code means, as the error object names it (README "Exit codes").
ERROR_KINDS = {
    1: "unexpected",
    2: "input",
    3: "hsm",
    30: "hsm_module",
    31: "hsm_token_not_found",
    32: "hsm_pin",
    33: "hsm_key_not_found",
    34: "hsm_mechanism",
    4: "issuance",
    5: "registration",
    51: "registration_refused",
    6: "audit",
    61: "audit_unanchored",
    7: "storage",
    8: "delivery_refused",
    130: "stopped",
    143: "stopped",
}


def print_error_json(
    exit_code: int,
    kind: str | None,
    message: str,
    *,
    error: ProvlineError | None = None,
    problems: Sequence[str] = (),
) -> None:
    """The error object (``provline.error/1``) on stdout: one object, the exit code inside,
    whatever went wrong (docs/ci.md)."""
    detail: dict[str, Any] = {
        "kind": kind or ERROR_KINDS.get(exit_code, "error"),
        "type": type(error).__name__ if error is not None else None,
        "message": message,
        "where": error.where if error is not None else "",
        "what": error.what if error is not None else message,
        "rule": error.rule if error is not None else "",
        "problems": list(problems),
    }
    print(
        json.dumps(
            {"format": json_format("error"), "exit_code": exit_code, "error": detail}, indent=2
        )
    )


def wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for JSON (``--json`` before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def emit(data: dict[str, object], as_json: bool, kind: str = "record") -> None:
    """A record as JSON (``format`` ``provline.<kind>/1``), or as aligned ``key  value``
    lines."""
    if as_json:
        print_json(kind, data)
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
