"""CA ceremonies: the steps an operator runs once per station (``provline ca …``).

Each function checks everything it can before it creates a key (arguments, files, and the
mechanisms the token must offer), so a bad argument or an unsuitable token leaves the token as
it was; a failure after the key exists destroys it again (``Token.undo_on_failure``). None
overwrites a CA certificate or key file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from pkcs11 import ObjectClass

from .. import hsm
from ..errors import InputError
from ..files import write_atomic
from ..hsm.capabilities import TRANSPORT_KEYGEN, Need, wrap_need
from ..hsm.transport import TransportKeyCheck
from ..hsm.transport import identify as identify_transport_key
from ..keyprofile import KeyProfile
from ..secret import SecretRef
from ..serials import serial_hex
from . import builders
from .certs import is_ca, load_cert, pem, require_key_matches, thumbprints
from .keys import HsmDefaults, load_signing_key, save_encrypted_pkcs8

ROOT_CERT = "root.cert.pem"
INTERMEDIATE_CERT = "intermediate.cert.pem"
CHAIN = "chain.pem"
AUDIT_CERT = "audit.cert.pem"


@dataclass(frozen=True)
class Created:
    """What a ceremony made: certificate files and where the key lives (a URI or a path)."""

    files: dict[str, Path]
    key: str


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise InputError(f"{path} already exists", rule="never overwrite a CA")
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write {path}: {probe} is not a writable directory",
            rule="output directory writable",
        )


def _write(files: dict[Path, bytes]) -> None:
    """Write the ceremony's certificates; a failure (disk full...) is one line, and inside
    ``undo_on_failure`` it also takes the new key away again."""
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, fsync=True)
    except OSError as exc:
        raise InputError(
            f"cannot write {path}: {exc.strerror or exc}", rule="output directory writable"
        ) from exc


def init_root(
    out: Path,
    subject: str,
    days: int,
    profile: KeyProfile,
    defaults: HsmDefaults,
    *,
    token: str = "",
    label: str = "root",
    key_file: Path | None = None,
    passphrase: SecretRef | None = None,
) -> Created:
    """The self-signed root: its key in a token (default) or in an encrypted PKCS#8 file."""
    name = builders.parse_name(subject)
    cert_path = out / ROOT_CERT
    _refuse_existing(cert_path)
    if key_file is None:
        if not token:
            raise InputError("give --token (root key in a token) or --key-file", rule="usage")
        t = defaults.open(token)
        with t.undo_on_failure() as created:
            signer = t.generate_named_keypair(profile, label, created, f"root CA key ({profile})")
            cert = builders.build_root(signer, name, days)
            _write({cert_path: pem(cert)})
        location = str(hsm.Pkcs11Uri(token=token, object=label, type="private"))
        return Created({"root certificate": cert_path}, location)
    if key_file.exists():
        raise InputError(f"{key_file} already exists", rule="never overwrite a CA key")
    if passphrase is None:
        raise InputError(f"{key_file} needs a passphrase source", rule="--passphrase-source")
    secret = passphrase.read(where="--passphrase-source")
    key = profile.generate_software_key()
    cert = builders.build_root(key, name, days)
    out.mkdir(parents=True, exist_ok=True)
    save_encrypted_pkcs8(key, key_file, secret)
    location = str(key_file.resolve())
    write_atomic(cert_path, pem(cert), fsync=True)
    return Created({"root certificate": cert_path}, location)


def init_intermediate(
    out: Path,
    root_cert: Path,
    root_key: str,
    token: str,
    subject: str,
    days: int,
    profile: KeyProfile,
    label: str,
    passphrase: SecretRef,
    defaults: HsmDefaults,
) -> Created:
    """The issuing CA: key generated inside the station token (never extractable), certificate
    signed by the root key (pathLenConstraint 0)."""
    root = load_cert(str(root_cert), where="--root-cert")
    root_signer, _ = load_signing_key(root_key, defaults, passphrase)
    require_key_matches(root_signer, root, "--root-key")
    name = builders.parse_name(subject)
    cert_path, chain_path = out / INTERMEDIATE_CERT, out / CHAIN
    _refuse_existing(cert_path)
    # Check the validity before creating the key, so a bad --days leaves nothing behind.
    builders.not_after_within(root, builders.utcnow(), days, "the intermediate")
    t = defaults.open(token)
    with t.undo_on_failure() as created:
        signer = t.generate_named_keypair(profile, label, created, f"issuing CA key ({profile})")
        cert = builders.build_intermediate(signer.public_key(), name, root, root_signer, days)
        _write({cert_path: pem(cert), chain_path: pem(cert) + pem(root)})
    return Created(
        {"intermediate certificate": cert_path, "chain (issuer → root)": chain_path},
        str(hsm.Pkcs11Uri(token=token, object=label, type="private")),
    )


def proof_of_possession(
    code: str, ca_cert: Path, ca_key: str, out: Path, passphrase: SecretRef, defaults: HsmDefaults
) -> Path:
    """The verification certificate DPS asks for: CN = CODE, signed by the CA key
    (Microsoft Learn, "How to verify X.509 CA certificates with your Device Provisioning
    Service")."""
    cert = load_cert(str(ca_cert), where="--ca-cert")
    signer, _ = load_signing_key(ca_key, defaults, passphrase)
    require_key_matches(signer, cert, "--ca-key")
    write_atomic(out, pem(builders.build_pop(code, cert, signer)))
    return out


def transport_key(
    token: str, label: str, defaults: HsmDefaults, *, deliverable: bool = True
) -> tuple[str, TransportKeyCheck]:
    """The station's AES-256 transport key (wrap/unwrap only): its URI and how bundles identify
    it (CKA_CHECK_VALUE, or the wrap check where the token has none). ``deliverable`` (the
    default) makes it extractable only by wrapping under keys the token's security officer
    trusts, so `provline ca transport-handover` can give it to a programming fixture
    (docs/key-delivery.md); otherwise it never leaves the token. Refuses a token that cannot
    generate it, restrict it to trusted wrapping, or wrap device keys with RFC 5649, before
    creating anything (or, for a refused attribute, with nothing left)."""
    t = defaults.open(token)
    _, wrap = t.require(
        [
            Need("generate the transport key", "custody wrapped", (TRANSPORT_KEYGEN,)),
            wrap_need("custody wrapped"),
        ]
    )
    assert wrap is not None
    t.require_free_label(ObjectClass.SECRET_KEY, label)
    with t.undo_on_failure() as created:
        key = t.generate_transport_key(label, created, deliverable=deliverable)
        check = identify_transport_key(t.session, key, wrap.mechanism)
    return str(hsm.Pkcs11Uri(token=token, object=label, type="secret-key")), check


def audit_key(
    out: Path,
    issuer_cert: Path,
    issuer_key: str,
    token: str,
    subject: str,
    days: int,
    profile: KeyProfile,
    label: str,
    passphrase: SecretRef,
    defaults: HsmDefaults,
) -> Created:
    """The station's audit-log signing key in the token, certified by a CA."""
    issuer = load_cert(str(issuer_cert), where="--issuer-cert")
    issuer_signer, _ = load_signing_key(issuer_key, defaults, passphrase)
    require_key_matches(issuer_signer, issuer, "--issuer-key")
    name = builders.parse_name(subject)
    days = min(days, max(1, (issuer.not_valid_after_utc - builders.utcnow()).days))
    _refuse_existing(out / AUDIT_CERT)
    t = defaults.open(token)
    with t.undo_on_failure() as created:
        signer = t.generate_named_keypair(profile, label, created, f"audit key ({profile})")
        cert = builders.build_audit_signer(signer.public_key(), name, issuer, issuer_signer, days)
        _write({out / AUDIT_CERT: pem(cert)})
    return Created(
        {"audit certificate": out / AUDIT_CERT},
        str(hsm.Pkcs11Uri(token=token, object=label, type="private")),
    )


def describe(cert_path: Path, token: str, defaults: HsmDefaults) -> dict[str, object]:
    """Subject, issuer, serial, validity, thumbprints, and (with a token) the key's URI."""
    cert = load_cert(str(cert_path))
    prints = thumbprints(cert)
    info: dict[str, object] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": serial_hex(cert.serial_number),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ca": is_ca(cert),
        "sha1_thumbprint": prints.sha1,
        "sha256_thumbprint": prints.sha256,
        "key": "(not looked up: give --token)",
    }
    if token:
        info["key"] = _key_uri(defaults.open(token), cert)
    return info


def _key_uri(token: hsm.Token, cert: x509.Certificate) -> str:
    key_id = hsm.key_id_for(cert.public_key())  # type: ignore[arg-type]
    found = [o for o in token.objects(ObjectClass.PRIVATE_KEY) if o.id == key_id]
    if not found:
        return f"no private key with this certificate's key id in {token.label}"
    return str(hsm.Pkcs11Uri(token=token.label, object=found[0].label, id=key_id, type="private"))
