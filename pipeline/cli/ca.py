"""``provline ca …``: the CA ceremonies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ca import ceremony
from ..config.station import load_station
from ..fixture import station as handover
from ..hsm.transport import oaep_text
from ..hsm.uri import Pkcs11Uri
from ..keyprofile import KeyProfile
from ..lifecycle.crl import publish_crl
from ..secret import SecretRef
from .app import (
    DEFAULT_MODULE,
    DEFAULT_PASSPHRASE,
    DEFAULT_PIN,
    ConfOpt,
    JsonOpt,
    ModuleOpt,
    OperatorOpt,
    PassphraseOpt,
    PinOpt,
    ProfileOpt,
    StationOpt,
    TokenOpt,
    ca_app,
    emit,
    hsm_defaults,
)

SubjectOpt = Annotated[str, typer.Option("--subject", help="RFC 4514 name, e.g. 'CN=Root,O=Acme'.")]
LabelOpt = Annotated[str, typer.Option("--label", help="Key label in the token.")]


def _print(created: ceremony.Created, key_name: str) -> None:
    rows = {**{name: str(path) for name, path in created.files.items()}, key_name: created.key}
    width = max(len(k) for k in rows)
    for name, value in rows.items():
        print(f"{name:<{width}}  {value}")


@ca_app.command("init-root")
def ca_init_root(
    out: Annotated[Path, typer.Option("--out", help="Directory for root.cert.pem.")],
    subject: SubjectOpt = "CN=provline Root CA",
    days: Annotated[int, typer.Option("--days", min=1)] = 7300,
    profile: ProfileOpt = KeyProfile.EC_P384,
    token: TokenOpt = "",
    label: LabelOpt = "root",
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file", help="Keep the root key in this encrypted PKCS#8 file instead of a token."
        ),
    ] = None,
    passphrase_source: PassphraseOpt = DEFAULT_PASSPHRASE,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the self-signed root CA; its key goes into a token (default) or a file."""
    created = ceremony.init_root(
        out,
        subject,
        days,
        profile,
        hsm_defaults(module, pin_source, softhsm2_conf),
        token=token,
        label=label,
        key_file=key_file,
        passphrase=SecretRef.parse(passphrase_source, where="--passphrase-source"),
    )
    _print(created, "root key")


@ca_app.command("init-intermediate")
def ca_init_intermediate(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for intermediate.cert.pem and chain.pem.")
    ],
    root_cert: Annotated[Path, typer.Option("--root-cert")],
    root_key: Annotated[str, typer.Option("--root-key", help="PKCS#11 URI or PKCS#8 file.")],
    token: TokenOpt,
    subject: SubjectOpt = "CN=provline Issuing CA",
    days: Annotated[int, typer.Option("--days", min=1)] = 1825,
    profile: ProfileOpt = KeyProfile.EC_P256,
    label: LabelOpt = "intermediate",
    passphrase_source: PassphraseOpt = DEFAULT_PASSPHRASE,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the issuing CA: key generated inside the station token (never extractable),
    certificate signed by the root key (pathlen 0)."""
    created = ceremony.init_intermediate(
        out,
        root_cert,
        root_key,
        token,
        subject,
        days,
        profile,
        label,
        SecretRef.parse(passphrase_source, where="--passphrase-source"),
        hsm_defaults(module, pin_source, softhsm2_conf),
    )
    _print(created, "intermediate key")


@ca_app.command("pop")
def ca_pop(
    code: Annotated[str, typer.Option("--code", help="Verification code shown by DPS/IoT Hub.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert")],
    ca_key: Annotated[str, typer.Option("--ca-key", help="PKCS#11 URI or PKCS#8 file.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the PoP certificate.")],
    passphrase_source: PassphraseOpt = DEFAULT_PASSPHRASE,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Proof of possession: a certificate whose CN is CODE, signed by the CA key."""
    path = ceremony.proof_of_possession(
        code,
        ca_cert,
        ca_key,
        out,
        SecretRef.parse(passphrase_source, where="--passphrase-source"),
        hsm_defaults(module, pin_source, softhsm2_conf),
    )
    print(f"verification certificate  {path}")


@ca_app.command("transport-key")
def ca_transport_key(
    token: TokenOpt,
    label: LabelOpt = "transport",
    never_extractable: Annotated[
        bool,
        typer.Option(
            "--never-extractable",
            help="A key that never leaves this token (no programming fixture can receive it).",
        ),
    ] = False,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create an AES-256 transport key (wrap/unwrap only). By default it is extractable only
    by wrapping under keys the security officer marked trusted (CKA_WRAP_WITH_TRUSTED), so
    `ca transport-handover` can give it to a programming fixture; make a new one per month or
    lot (docs/key-delivery.md). Refused, with nothing created, on a token without an RFC 5649
    wrap mechanism or without trusted wrapping."""
    uri, check = ceremony.transport_key(
        token,
        label,
        hsm_defaults(module, pin_source, softhsm2_conf),
        deliverable=not never_extractable,
    )
    print(f"transport key  {uri}")
    how = f"{check.method}, {check.mechanism}" if check.mechanism else check.method
    print(f"check value    {check.value} ({how})")
    print(
        "delivery       never extractable"
        if never_extractable
        else "delivery       extractable only by wrapping under trusted keys"
    )


LogDirOpt = Annotated[
    Path,
    typer.Option(
        "--log-dir",
        help="The station's ceremony log (a directory: audit.jsonl, sealed with the audit key).",
    ),
]
RequestOpt = Annotated[
    Path, typer.Option("--request", help="The fixture's request.pem (`provline fixture keypair`).")
]


@ca_app.command("trust-fixture")
def ca_trust_fixture(
    station: StationOpt,
    request: RequestOpt,
    fingerprint: Annotated[
        str,
        typer.Option(
            "--fingerprint",
            help="The unwrap key's SHA-256 the fixture printed, compared out of band.",
        ),
    ],
    log_dir: LogDirOpt,
    so_pin_source: Annotated[
        str,
        typer.Option("--so-pin-source", help="Security-officer PIN: env:NAME or file:PATH."),
    ] = "env:PROVLINE_SO_PIN",
) -> None:
    """Security officer: import a programming fixture's RSA public key into the station token
    as a trusted, wrap-only key (CKA_TRUSTED, set at creation by the SO only). The transport
    key can then be wrapped under it and under nothing untrusted (docs/key-delivery.md)."""
    trusted = handover.trust_fixture(
        load_station(station),
        request,
        fingerprint,
        SecretRef.parse(so_pin_source, where="--so-pin-source"),
        log_dir,
    )
    state = "imported as trusted" if trusted.created else "already trusted"
    print(f"fixture        {trusted.fixture}: {state}")
    print(f"trusted key    {trusted.label} (CKA_ID {trusted.key_id.hex().upper()})")
    print(f"fingerprint    {trusted.unwrap_key_sha256}")
    print(f"logged         {log_dir}")


@ca_app.command("transport-handover")
def ca_transport_handover(
    station: StationOpt,
    request: RequestOpt,
    out: Annotated[Path, typer.Option("--out", help="The handover file for the fixture (0600).")],
    log_dir: LogDirOpt,
    transport_key: Annotated[
        str | None,
        typer.Option(
            "--transport-key", help="URI of the key to hand over (default: the station's)."
        ),
    ] = None,
    oaep_hash: Annotated[
        str | None,
        typer.Option(
            "--oaep-hash",
            help="RSA-OAEP hash and MGF1 hash: sha256 (default, delivery.oaep_hash), sha384, "
            "sha512, or sha1 (SoftHSM2 2.6 offers only sha1).",
        ),
    ] = None,
) -> None:
    """Wrap the station's transport key with RSA-OAEP under a fixture's trusted key and
    certify the fixture's log key with the issuing CA; the handover file goes to the
    fixture (`provline fixture import-transport`). Logged in the ceremony log."""
    result = handover.hand_over(
        load_station(station),
        request,
        out,
        log_dir,
        transport_key=Pkcs11Uri.parse(transport_key) if transport_key else None,
        oaep_hash=oaep_hash,
    )
    print(f"handover       {out}  (to fixture {result.fixture})")
    print(f"transport key  {result.transport_label}: {result.check.method} {result.check.value}")
    print(f"wrapped with   {oaep_text(result.oaep_hash)}")
    print(f"log cert       {result.log_certificate.subject.rfc4514_string()}")
    print(f"logged         {log_dir}")


@ca_app.command("audit-key")
def ca_audit_key(
    out: Annotated[Path, typer.Option("--out", help="Directory for audit.cert.pem.")],
    issuer_cert: Annotated[Path, typer.Option("--issuer-cert")],
    issuer_key: Annotated[str, typer.Option("--issuer-key", help="PKCS#11 URI or PKCS#8 file.")],
    token: TokenOpt,
    subject: SubjectOpt = "CN=provline audit signer",
    days: Annotated[int, typer.Option("--days", min=1)] = 825,
    profile: ProfileOpt = KeyProfile.EC_P256,
    label: LabelOpt = "audit",
    passphrase_source: PassphraseOpt = DEFAULT_PASSPHRASE,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the station's audit-log signing key in the token, certified by a CA."""
    created = ceremony.audit_key(
        out,
        issuer_cert,
        issuer_key,
        token,
        subject,
        days,
        profile,
        label,
        SecretRef.parse(passphrase_source, where="--passphrase-source"),
        hsm_defaults(module, pin_source, softhsm2_conf),
    )
    _print(created, "audit key")


@ca_app.command("crl")
def ca_crl(
    station: StationOpt,
    batch_dirs: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="[BATCH_DIR]...", help="Record these batches (their void serials) first."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also copy the CRL here (PEM).")] = None,
    days: Annotated[
        int | None, typer.Option("--days", min=1, help="Days until nextUpdate (default: station).")
    ] = None,
    operator: OperatorOpt = None,
) -> None:
    """Sign the issuing CA's cumulative CRL in the HSM: every revoked, retired and void serial
    of the station inventory (docs/lifecycle.md). Void serials may have been signed before a
    crash; their bundles were never durable."""
    issued = publish_crl(load_station(station), batch_dirs or [], out, days, operator=operator)
    print(f"CRL number {issued.number} with {issued.entries} revoked serials: {issued.path}")
    if out is not None:
        print(f"copied to {out}")


@ca_app.command("show")
def ca_show(
    cert_path: Annotated[Path, typer.Argument(metavar="CERT")],
    token: Annotated[str, typer.Option("--token", help="Look for the key in this token.")] = "",
    as_json: JsonOpt = False,
    module: ModuleOpt = DEFAULT_MODULE,
    pin_source: PinOpt = DEFAULT_PIN,
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Subject, issuer, serial, validity, thumbprints and key location of a certificate."""
    emit(
        ceremony.describe(cert_path, token, hsm_defaults(module, pin_source, softhsm2_conf)),
        as_json,
        "ca-show",
    )
