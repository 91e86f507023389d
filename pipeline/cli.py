"""provline: the command line. A thin layer: parse options, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import __version__, ca, hsm
from .errors import InputError, ProvlineError, RegistrationError
from .files import write_atomic
from .keyprofile import KeyProfile
from .keys import HsmDefaults, load_signing_key, save_encrypted_pkcs8
from .secret import SecretRef

if TYPE_CHECKING:
    from .station import Station

app = typer.Typer(
    help="Factory-line provisioning: HSM-held device keys and CA, full-chain bundles, "
    "DPS pre-registration, signed audit logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
hsm_app = typer.Typer(help="Set up PKCS#11 tokens.", no_args_is_help=True)
ca_app = typer.Typer(help="The CA hierarchy: root, intermediate, PoP, transport and audit keys.",
                     no_args_is_help=True)
audit_app = typer.Typer(help="Verify a batch's signed audit log offline.", no_args_is_help=True)
emulator_app = typer.Typer(help="The local DPS + IoT Hub emulator (demo, tests, CI).",
                           no_args_is_help=True)
app.add_typer(hsm_app, name="hsm")
app.add_typer(ca_app, name="ca")
app.add_typer(audit_app, name="audit")
app.add_typer(emulator_app, name="emulator")

# Options shared by every command that opens a token. Secrets are named by source only.
ModuleOpt = Annotated[str, typer.Option(
    "--module", envvar="PROVLINE_PKCS11_MODULE", help="PKCS#11 module path.")]
PinOpt = Annotated[str, typer.Option(
    "--pin-source", help="Where the token user PIN comes from: env:NAME or file:PATH.")]
ConfOpt = Annotated[str | None, typer.Option(
    "--softhsm2-conf", envvar="SOFTHSM2_CONF", help="SoftHSM2 config (tests, demo).")]
TokenOpt = Annotated[str, typer.Option("--token", envvar="PROVLINE_TOKEN",
                                       help="Token label (never a slot number).")]
ProfileOpt = Annotated[KeyProfile, typer.Option("--profile", help="Key algorithm.")]
ManifestArg = Annotated[Path, typer.Argument(help="Manifest (YAML or CSV).")]
StationOpt = Annotated[Path, typer.Option("--station", help="Station config (YAML).")]
BatchIdOpt = Annotated[str | None, typer.Option("--batch-id", help="Override the batch id.")]


def _defaults(module: str, pin_source: str, softhsm2_conf: str | None) -> HsmDefaults:
    return HsmDefaults(module=module, pin=SecretRef.parse(pin_source, where="--pin-source"),
                       softhsm2_conf=softhsm2_conf)


def _token(token: str, d: HsmDefaults) -> hsm.Token:
    return hsm.open_token(d.module, token, d.pin, d.softhsm2_conf)


def _emit(data: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False
          ) -> None:
    if version:
        print(f"provline {__version__}")
        raise typer.Exit()


# ------------------------------------------------------------------------------------- hsm
@hsm_app.command("init")
def hsm_init(
    directory: Annotated[Path, typer.Argument(help="Directory for the SoftHSM2 config + tokens.")],
    label: Annotated[str, typer.Option("--label", help="Token label.")],
    pin_source: PinOpt = "env:PROVLINE_PIN",
    so_pin_source: Annotated[str, typer.Option("--so-pin-source",
                                               help="Security-officer PIN: env:NAME or file:PATH."
                                               )] = "env:PROVLINE_SO_PIN",
) -> None:
    """Create a SoftHSM2 token under DIRECTORY (never the system token directory)."""
    from .softhsm import init_token

    pin = SecretRef.parse(pin_source, where="--pin-source").read(where="--pin-source")
    so_pin = SecretRef.parse(so_pin_source, where="--so-pin-source").read(where="--so-pin-source")
    conf = init_token(directory, label, so_pin=so_pin, user_pin=pin)
    print(f"token {label!r} initialised")
    print(f"export SOFTHSM2_CONF={conf}")


# -------------------------------------------------------------------------------------- ca
@ca_app.command("init-root")
def ca_init_root(
    out: Annotated[Path, typer.Option("--out", help="Directory for root.cert.pem.")],
    subject: Annotated[str, typer.Option("--subject")] = "CN=provline Root CA",
    days: Annotated[int, typer.Option("--days", min=1)] = 7300,
    profile: ProfileOpt = KeyProfile.EC_P384,
    token: TokenOpt = "",
    label: Annotated[str, typer.Option("--label", help="Key label in the token.")] = "root",
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Keep the root key in this encrypted PKCS#8 file instead of a token."
    )] = None,
    passphrase_source: Annotated[str, typer.Option(
        "--passphrase-source", help="Passphrase for --key-file: env:NAME or file:PATH."
    )] = "env:PROVLINE_ROOT_PASSPHRASE",
    module: ModuleOpt = hsm.DEFAULT_MODULE,
    pin_source: PinOpt = "env:PROVLINE_PIN",
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the self-signed root CA; its key goes into a token (default) or a file."""
    name = ca.parse_name(subject)
    cert_path = out / "root.cert.pem"
    if cert_path.exists():
        raise InputError(f"{cert_path} already exists", rule="never overwrite a CA")
    if key_file is None:
        if not token:
            raise InputError("give --token (root key in a token) or --key-file", rule="usage")
        signer = _token(token, _defaults(module, pin_source, softhsm2_conf)) \
            .generate_named_keypair(profile, label)
        location = str(hsm.Pkcs11Uri(token=token, object=label, type="private"))
        cert = ca.build_root(signer, name, days)
    else:
        if key_file.exists():
            raise InputError(f"{key_file} already exists", rule="never overwrite a CA key")
        passphrase = SecretRef.parse(passphrase_source).read(where="--passphrase-source")
        key = profile.generate_software_key()
        cert = ca.build_root(key, name, days)
        out.mkdir(parents=True, exist_ok=True)
        save_encrypted_pkcs8(key, key_file, passphrase)
        location = str(key_file.resolve())
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(cert_path, ca.pem(cert), fsync=True)
    print(f"root certificate  {cert_path}")
    print(f"root key          {location}")


@ca_app.command("init-intermediate")
def ca_init_intermediate(
    out: Annotated[Path, typer.Option(
        "--out", help="Directory for intermediate.cert.pem and chain.pem.")],
    root_cert: Annotated[Path, typer.Option("--root-cert")],
    root_key: Annotated[str, typer.Option("--root-key", help="PKCS#11 URI or PKCS#8 file.")],
    token: TokenOpt,
    subject: Annotated[str, typer.Option("--subject")] = "CN=provline Issuing CA",
    days: Annotated[int, typer.Option("--days", min=1)] = 1825,
    profile: ProfileOpt = KeyProfile.EC_P256,
    label: Annotated[str, typer.Option("--label")] = "intermediate",
    passphrase_source: Annotated[str, typer.Option("--passphrase-source")] =
        "env:PROVLINE_ROOT_PASSPHRASE",
    module: ModuleOpt = hsm.DEFAULT_MODULE,
    pin_source: PinOpt = "env:PROVLINE_PIN",
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the issuing CA: key generated inside the station token (never extractable),
    certificate signed by the root key (pathlen 0)."""
    d = _defaults(module, pin_source, softhsm2_conf)
    root = ca.load_cert(str(root_cert), where="--root-cert")
    root_signer, _ = load_signing_key(root_key, d, SecretRef.parse(passphrase_source))
    if root_signer.public_key() != root.public_key():
        raise InputError("--root-key does not match --root-cert", rule="issuer key matches")
    name = ca.parse_name(subject)
    cert_path, chain_path = out / "intermediate.cert.pem", out / "chain.pem"
    if cert_path.exists():
        raise InputError(f"{cert_path} already exists", rule="never overwrite a CA")
    # Check the validity before creating the key, so a bad --days leaves nothing behind.
    ca._not_after_within(root, ca.utcnow(), days, "the intermediate")
    signer = _token(token, d).generate_named_keypair(profile, label)
    cert = ca.build_intermediate(signer.public_key(), name, root, root_signer, days)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(cert_path, ca.pem(cert), fsync=True)
    write_atomic(chain_path, ca.pem(cert) + ca.pem(root), fsync=True)
    print(f"intermediate certificate  {cert_path}")
    print(f"chain (issuer → root)     {chain_path}")
    print(f"intermediate key          {hsm.Pkcs11Uri(token=token, object=label, type='private')}")


@ca_app.command("pop")
def ca_pop(
    code: Annotated[str, typer.Option("--code", help="Verification code shown by DPS/IoT Hub.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert")],
    ca_key: Annotated[str, typer.Option("--ca-key", help="PKCS#11 URI or PKCS#8 file.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the PoP certificate.")],
    passphrase_source: Annotated[str, typer.Option("--passphrase-source")] =
        "env:PROVLINE_ROOT_PASSPHRASE",
    module: ModuleOpt = hsm.DEFAULT_MODULE,
    pin_source: PinOpt = "env:PROVLINE_PIN",
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Proof of possession: a certificate whose CN is CODE, signed by the CA key."""
    d = _defaults(module, pin_source, softhsm2_conf)
    cert = ca.load_cert(str(ca_cert), where="--ca-cert")
    signer, _ = load_signing_key(ca_key, d, SecretRef.parse(passphrase_source))
    if signer.public_key() != cert.public_key():
        raise InputError("--ca-key does not match --ca-cert", rule="issuer key matches")
    write_atomic(out, ca.pem(ca.build_pop(code, cert, signer)))
    print(f"verification certificate  {out}")


@ca_app.command("transport-key")
def ca_transport_key(
    token: TokenOpt,
    label: Annotated[str, typer.Option("--label")] = "transport",
    module: ModuleOpt = hsm.DEFAULT_MODULE,
    pin_source: PinOpt = "env:PROVLINE_PIN",
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the station's AES-256 transport key (wrap/unwrap only, never extractable)."""
    t = _token(token, _defaults(module, pin_source, softhsm2_conf))
    if list(t.session.get_objects({hsm.Attribute.CLASS: hsm.ObjectClass.SECRET_KEY,
                                   hsm.Attribute.LABEL: label})):
        raise InputError(f"token {token} already holds a secret key labelled {label!r}",
                         rule="key labels are unique in a token")
    key = t.generate_transport_key(label)
    print(f"transport key  {hsm.Pkcs11Uri(token=token, object=label, type='secret-key')}")
    print(f"check value    {hsm.check_value(key)}")


@ca_app.command("audit-key")
def ca_audit_key(
    out: Annotated[Path, typer.Option("--out", help="Directory for audit.cert.pem.")],
    issuer_cert: Annotated[Path, typer.Option("--issuer-cert")],
    issuer_key: Annotated[str, typer.Option("--issuer-key", help="PKCS#11 URI or PKCS#8 file.")],
    token: TokenOpt,
    subject: Annotated[str, typer.Option("--subject")] = "CN=provline audit signer",
    days: Annotated[int, typer.Option("--days", min=1)] = 825,
    profile: ProfileOpt = KeyProfile.EC_P256,
    label: Annotated[str, typer.Option("--label")] = "audit",
    passphrase_source: Annotated[str, typer.Option("--passphrase-source")] =
        "env:PROVLINE_ROOT_PASSPHRASE",
    module: ModuleOpt = hsm.DEFAULT_MODULE,
    pin_source: PinOpt = "env:PROVLINE_PIN",
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Create the station's audit-log signing key in the token, certified by a CA."""
    d = _defaults(module, pin_source, softhsm2_conf)
    issuer = ca.load_cert(str(issuer_cert), where="--issuer-cert")
    issuer_signer, _ = load_signing_key(issuer_key, d, SecretRef.parse(passphrase_source))
    if issuer_signer.public_key() != issuer.public_key():
        raise InputError("--issuer-key does not match --issuer-cert", rule="issuer key matches")
    name = ca.parse_name(subject)
    days = min(days, max(1, (issuer.not_valid_after_utc - ca.utcnow()).days))
    signer = _token(token, d).generate_named_keypair(profile, label)
    cert = ca.build_audit_signer(signer.public_key(), name, issuer, issuer_signer, days)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "audit.cert.pem", ca.pem(cert), fsync=True)
    print(f"audit certificate  {out / 'audit.cert.pem'}")
    print(f"audit key          {hsm.Pkcs11Uri(token=token, object=label, type='private')}")


@ca_app.command("crl")
def ca_crl(
    batch_dirs: Annotated[list[Path], typer.Argument(metavar="BATCH_DIR...",
                                                     help="Batches whose void serials to revoke.")],
    station: StationOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the CRL (PEM).")],
    days: Annotated[int, typer.Option("--days", min=1, help="Days until nextUpdate.")] = 30,
) -> None:
    """Revoke every void serial of the given batches: a CRL signed by the HSM-held issuing key.
    (Void serials may have been signed before a crash; their bundles were never durable.)"""
    from cryptography.hazmat.primitives import serialization

    from .journal import Journal
    from .plan import load_chain
    from .station import load_station

    st = load_station(station)
    issuer_cert = load_chain(st).issuer
    serials: list[int] = []
    for batch_dir in batch_dirs:
        journal = Journal.open(batch_dir, create=False)
        serials += [int(v["serial"], 16) for v in journal.voids()]
        journal.close()
    _, signer = hsm.resolve_signer(st.ca.issuer_key, module_path=st.hsm.module,
                                   pin=st.hsm.pin, softhsm2_conf=st.hsm.softhsm2_conf)
    crl = ca.build_crl(issuer_cert, signer, sorted(set(serials)), days=days)
    write_atomic(out, crl.public_bytes(serialization.Encoding.PEM), fsync=True)
    print(f"CRL with {len(set(serials))} revoked serials: {out}")


@ca_app.command("show")
def ca_show(
    cert_path: Annotated[Path, typer.Argument(metavar="CERT")],
    token: Annotated[str, typer.Option("--token", help="Look for the key in this token.")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    module: ModuleOpt = hsm.DEFAULT_MODULE,
    pin_source: PinOpt = "env:PROVLINE_PIN",
    softhsm2_conf: ConfOpt = None,
) -> None:
    """Subject, issuer, serial, validity, thumbprints and key location of a certificate."""
    cert = ca.load_cert(str(cert_path))
    prints = ca.thumbprints(cert)
    info: dict[str, object] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "X"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ca": ca.is_ca(cert),
        "sha1_thumbprint": prints["sha1"],
        "sha256_thumbprint": prints["sha256"],
        "key": "(not looked up: give --token)",
    }
    if token:
        t = _token(token, _defaults(module, pin_source, softhsm2_conf))
        key_id = hsm.key_id_for(cert.public_key())  # type: ignore[arg-type]
        found = [o for o in t.objects(hsm.ObjectClass.PRIVATE_KEY) if o.id == key_id]
        info["key"] = (str(hsm.Pkcs11Uri(token=token, object=found[0].label, id=key_id,
                                          type="private")) if found
                       else f"no private key with this certificate's key id in {token}")
    _emit(info, as_json)


# --------------------------------------------------------------------------------- plan/run
@app.command("validate")
def validate_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
) -> None:
    """Check a manifest against a station config without touching the HSM or any file."""
    from .manifest import load_manifest
    from .plan import check_inputs
    from .station import load_station

    st = load_station(station)
    mf = load_manifest(manifest, batch_id=batch_id)
    check_inputs(mf, st)
    print(f"{manifest}: {len(mf)} devices in batch {mf.batch_id}, profile {mf.key_profile}, "
          f"registration {mf.registration}: valid")


@app.command("plan")
def plan_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dry run: diff the manifest against the batch journal and DPS; change nothing."""
    from .manifest import load_manifest
    from .plan import dry_run
    from .station import load_station

    result = dry_run(load_manifest(manifest, batch_id=batch_id), load_station(station))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"batch {result['batch_id']}: {result['devices']} devices")
    print("journal: " + "  ".join(f"{k}: {v}" for k, v in sorted(result["journal"].items())))
    print(f"would issue: {result['would_issue']}")
    if "dps" in result:
        print("dps: " + "  ".join(f"{k}: {v}" for k, v in result["dps"].items()))
        print(f"would register: {result['would_register']}")
        for rid in result["would_conflict"]:
            print(f"would conflict: {rid}")


@app.command("run")
def run_cmd(
    manifest: ManifestArg,
    station: StationOpt,
    batch_id: BatchIdOpt = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, max=64,
                                                help="Worker processes (default: station).")]
        = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Overwrite conflicting enrollments/groups (never by default).")]
        = False,
    upload_ca: Annotated[bool, typer.Option(
        "--upload-ca", help="Upload the issuing CA and prove possession before registering.")]
        = False,
    operations_per_minute: Annotated[int | None, typer.Option(
        "--operations-per-minute", min=1, help="Registration pace (default: station).")]
        = None,
    smoke: Annotated[int, typer.Option(
        "--smoke", min=0, help="After the run, device-check N sampled devices (pkcs8).")] = 0,
) -> None:
    """Run a batch, or resume it if its batch directory already has a journal."""
    from .manifest import load_manifest
    from .progress import for_terminal
    from .register import RegisterOptions
    from .report import summary
    from .run import run_batch
    from .station import load_station

    st = load_station(station)
    mf = load_manifest(manifest, batch_id=batch_id)
    options = RegisterOptions(
        replace=replace, upload_ca=upload_ca,
        operations_per_minute=operations_per_minute or st.dps.operations_per_minute,
        concurrency=st.dps.concurrency, bulk_size=st.dps.bulk_size)
    result = run_batch(mf, st, progress=for_terminal(quiet or as_json), workers=workers,
                       register=options)
    if as_json:
        print(json.dumps(result.report, indent=2, sort_keys=True, default=str))
    else:
        print(summary(result.report), end="")
        print(f"output: {result.batch_dir}")
    if smoke and result.exit_code == 0:
        _device_checks(result.batch_dir, st, smoke, None, as_json=False)
    raise typer.Exit(result.exit_code)


@app.command("verify-device")
def verify_device_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A batch directory (pkcs8 custody).")],
    station: StationOpt,
    count: Annotated[int, typer.Option("--count", min=1, help="Devices to sample.")] = 3,
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="Check this registration ID (repeatable) instead of sampling.")]
        = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Device-side check (seed 004): register sampled devices with DPS over mTLS using their
    bundles, then send one telemetry message each to the assigned hub."""
    from .station import load_station

    _device_checks(batch_dir, load_station(station), count, device, as_json)


def _device_checks(batch_dir: Path, st: Station, count: int, only: list[str] | None,
                   as_json: bool) -> None:
    from .dps import resolve
    from .journal import Journal
    from .register import device_check, sample

    journal = Journal.open(batch_dir, create=False)
    ids = only or sample(list(journal.registration_ids(("registered", "bundled"))), count)
    journal.close()
    _print_device_checks(device_check(batch_dir, resolve(st.dps), ids,
                                      st.custody.pkcs8_passphrase, st.hsm), as_json)


def _print_device_checks(results: list[dict[str, object]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['registration_id']}: {r['status']}"
                  + (f" hub {r['assigned_hub']} device {r['device_id']} telemetry "
                     f"{r.get('telemetry', '-')}" if r.get("assigned_hub") else "")
                  + (f" ({r['reason']})" if r.get("reason") else ""))
    if any(r.get("status") != "assigned" or r.get("telemetry") != "sent" for r in results):
        raise typer.Exit(RegistrationError.exit_code)


@app.command("status")
def status_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A batch directory (has journal.sqlite).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Counts per state of a batch, from its journal (read-only)."""
    from .journal import Journal

    journal = Journal.open(batch_dir, create=False)
    meta = journal.meta()
    info: dict[str, object] = {
        "batch_id": meta.get("batch_id", "?"),
        "devices": journal.total(),
        **{f"devices.{k}": v for k, v in sorted(journal.counts().items())},
        **{f"serials.{k}": v for k, v in sorted(journal.serial_counts().items())},
    }
    journal.close()
    _emit(info, as_json)


@audit_app.command("verify")
def audit_verify_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A batch directory.")],
    root: Annotated[Path | None, typer.Option(
        "--root", help="Trusted root certificate (default: the root the log names).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check the signature, the signer chain, the hash chain, every bundle file, every serial
    and report.json, offline. Exit 6 naming the first bad line or file."""
    from .auditverify import verify_batch

    anchor = ca.load_cert(str(root), where="--root") if root else None
    summary = verify_batch(batch_dir, anchor)
    if as_json:
        print(json.dumps({"verified": True, "trust_anchor": str(root) if root else "from log",
                          **summary.as_dict()}, indent=2))
        return
    print(f"batch {summary.batch_id} (station {summary.station}): audit log VERIFIED")
    print(f"signer      {summary.signer}")
    print(f"time span   {summary.first_time} .. {summary.last_time} ({summary.lines} lines)")
    print("trust       " + (str(root) if root else "root named by the log (give --root)"))
    for name, fingerprint in summary.ca_sha256.items():
        print(f"CA          {name}  sha256 {fingerprint}")
    print("devices     " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.devices.items())))
    print("serials     " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.serials.items())))
    print(f"files       {summary.files_checked} bundle files match their logged hashes")
    for failure in summary.failures:
        print(f"{failure['state']:<11} {failure['registration_id']}: {failure['reason']}")
    for void in summary.voids:
        print(f"void        {void['registration_id']} serial {void['serial']} (revoke)")


@emulator_app.command("serve")
def emulator_serve(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="State, keys, TLS, emulator.json.")],
    port: Annotated[int | None, typer.Option("--port", help="DPS device endpoint; 0 = free.")]
        = None,
    service_port: Annotated[int | None, typer.Option("--service-port")] = None,
    hub_port: Annotated[int | None, typer.Option("--hub-port")] = None,
    id_scope: Annotated[str | None, typer.Option("--id-scope")] = None,
    operations_per_minute: Annotated[int | None, typer.Option("--operations-per-minute")]
        = None,
    registrations_per_minute: Annotated[int | None, typer.Option(
        "--registrations-per-minute")] = None,
    assign_seconds: Annotated[float | None, typer.Option(
        "--assign-seconds", help="How long a registration stays 'assigning'.")] = None,
    error_rate: Annotated[float | None, typer.Option(
        "--error-rate", help="Probability of an injected 500/503.")] = None,
    drop_rate: Annotated[float | None, typer.Option(
        "--drop-rate", help="Probability of dropping the connection.")] = None,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms")] = None,
) -> None:
    """Run the emulator in the foreground until SIGINT/SIGTERM. Settings also come from
    DATA_DIR/config.json; faults can be changed live in DATA_DIR/faults.json."""
    from .emulator import serve_forever

    overrides = {"port": port, "service_port": service_port, "hub_port": hub_port,
                 "id_scope": id_scope, "operations_per_minute": operations_per_minute,
                 "registrations_per_minute": registrations_per_minute,
                 "assign_seconds": assign_seconds, "error_rate": error_rate,
                 "drop_rate": drop_rate, "latency_ms": latency_ms}
    try:
        serve_forever(data_dir, overrides)
    except ValueError as exc:
        raise InputError(str(exc), where=str(data_dir / "config.json"),
                         rule="emulator settings") from exc


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line each."""
    try:
        app()
    except ProvlineError as exc:
        for line in exc.line().splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
