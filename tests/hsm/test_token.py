"""pipeline.hsm against a real SoftHSM2 token."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from pipeline import hsm
from pipeline.errors import InputError, KeyNotFound, MechanismUnsupported
from pipeline.hsm import errormap
from pipeline.keyprofile import KeyProfile
from pipeline.secret import SecretRef

from ..support import CA, MODULE, Hsm, make_hsm, provline

pytestmark = pytest.mark.integration


def _token(h: Hsm) -> hsm.Token:
    return hsm.open_token(MODULE, h.token, SecretRef("file", str(h.pin_file)), str(h.conf))


def test_one_session_per_token_per_process(hsm_env: Hsm) -> None:
    assert _token(hsm_env) is _token(hsm_env)


def test_intermediate_key_is_sensitive_and_never_extractable(hsm_env: Hsm, ca_env: CA) -> None:
    token = _token(hsm_env)
    key = token.find(ObjectClass.PRIVATE_KEY, label="intermediate")
    attrs = token.attributes(
        key,
        [Attribute.SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.EXTRACTABLE, Attribute.TOKEN],
    )
    assert attrs == {
        "SENSITIVE": True,
        "NEVER_EXTRACTABLE": True,
        "EXTRACTABLE": False,
        "TOKEN": True,
    }
    listing = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            MODULE,
            "--token-label",
            hsm_env.token,
            "--login",
            "--pin",
            "env:PROVLINE_PIN",
            "--list-objects",
            "--type",
            "privkey",
        ],
        capture_output=True,
        text=True,
        env=hsm_env.env(),
        check=True,
        timeout=60,
    ).stdout
    block = listing.split("label:      intermediate")[1].split("Object;")[0]
    assert "sensitive" in block and "never extractable" in block
    assert key.id == hsm.key_id_for(token.signer(label="intermediate").public_key())


@pytest.mark.parametrize("profile", list(KeyProfile))
def test_token_signer_works_with_every_cryptography_builder(
    hsm_env: Hsm, profile: KeyProfile
) -> None:
    token = _token(hsm_env)
    signer = token.generate_named_keypair(profile, f"builder-{profile}", [], "test")
    public = signer.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsm-signed")])
    now = dt.datetime.now(dt.UTC)
    algo = profile.hash()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(signer, algo)
    )
    cert.verify_directly_issued_by(cert)
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(signer, algo)
    assert csr.is_signature_valid
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .sign(signer, algo)
    )
    assert crl.is_signature_valid(public)
    p7 = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(b"audit log")
        .add_signer(cert, signer, algo)
        .sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
        )
    )
    assert p7[:1] == b"\x30"
    # a direct signature verifies with the exported public key
    sig = (
        signer.sign(b"challenge", ec.ECDSA(algo))
        if profile.is_ec
        else signer.sign(b"challenge", padding.PKCS1v15(), algo)
    )
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, b"challenge", ec.ECDSA(algo))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(sig, b"challenge", padding.PKCS1v15(), algo)
    with pytest.raises(NotImplementedError):
        signer.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_wrapped_session_key_unwraps_to_the_matching_private_key(hsm_env: Hsm) -> None:
    token = _token(hsm_env)
    # Test-only: an extractable AES key whose value the test can read to unwrap.
    kek = token.session.generate_key(
        KeyType.AES,
        256,
        label="hsm-test-kek",
        store=False,
        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    public_obj, private_obj = token.generate_keypair(
        KeyProfile.EC_P256, persistent=False, wrappable=True
    )
    assert token.attributes(private_obj, [Attribute.SENSITIVE, Attribute.TOKEN]) == {
        "SENSITIVE": True,
        "TOKEN": False,
    }
    blob = token.wrap(kek, private_obj, Mechanism.AES_KEY_WRAP_PAD)
    pkcs8 = aes_key_unwrap_with_padding(bytes(kek[Attribute.VALUE]), blob)
    length = (
        2 + pkcs8[1]
        if pkcs8[1] < 0x80
        else 2 + (pkcs8[1] & 0x7F) + int.from_bytes(pkcs8[2 : 2 + (pkcs8[1] & 0x7F)], "big")
    )
    key = serialization.load_der_private_key(pkcs8[:length], None)
    assert key.public_key() == hsm.public_key_of(public_obj)


def test_taken_label_and_missing_key_and_mechanism(hsm_env: Hsm, ca_env: CA) -> None:
    token = _token(hsm_env)
    with pytest.raises(InputError):
        token.generate_named_keypair(KeyProfile.EC_P256, "intermediate", [], "test")
    with pytest.raises(KeyNotFound) as missing:
        token.signer(label="no-such-key")
    assert missing.value.exit_code == 33
    key = token.find(ObjectClass.PRIVATE_KEY, label="intermediate")
    with pytest.raises(MechanismUnsupported) as mech:
        errormap.call(key.sign, b"x" * 32, mechanism=Mechanism.ECDSA_SHA256)
    assert mech.value.exit_code == 34


def test_check_value_names_the_transport_key(hsm_env: Hsm, ca_env: CA) -> None:
    token = _token(hsm_env)
    key = token.find(ObjectClass.SECRET_KEY, label="transport")
    assert len(hsm.check_value(key)) == 6
    attrs = token.attributes(
        key,
        [
            Attribute.EXTRACTABLE,
            Attribute.WRAP_WITH_TRUSTED,
            Attribute.SENSITIVE,
            Attribute.WRAP,
            Attribute.ENCRYPT,
            Attribute.MODIFIABLE,
        ],
    )
    # deliverable (the default): extractable only by wrapping under trusted keys
    assert attrs == {
        "EXTRACTABLE": True,
        "WRAP_WITH_TRUSTED": True,
        "SENSITIVE": True,
        "WRAP": True,
        "ENCRYPT": False,
        "MODIFIABLE": False,
    }


def test_hsm_failures_give_one_line_and_distinct_exit_codes(tmp_path, ca_env: CA) -> None:
    h = make_hsm(tmp_path / "fresh", token="fresh-station", root_token="fresh-root")
    env = h.env()
    cert = str(ca_env.intermediate)

    def show(*extra: str, env_: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return provline("ca", "show", cert, *extra, env=env_, check=False)

    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-the-pin\n")
    wrong.chmod(0o600)  # a secret file others can read is refused before the token sees it
    cases = {
        "module": show("--token", h.token, "--module", "/nonexistent/libpkcs11.so"),
        "token": show("--token", "no-such-token", "--pin-source", f"file:{h.pin_file}"),
        "pin": show("--token", h.token, "--pin-source", f"file:{wrong}"),
        "key": provline(
            "ca",
            "pop",
            "--code",
            "ABC",
            "--ca-cert",
            cert,
            "--ca-key",
            f"pkcs11:token={h.token};object=missing;type=private",
            "--out",
            str(tmp_path / "pop.pem"),
            "--pin-source",
            f"file:{h.pin_file}",
            env=env,
            check=False,
        ),
    }
    codes = {name: proc.returncode for name, proc in cases.items()}
    assert codes == {"module": 30, "token": 31, "pin": 32, "key": 33}
    for name, proc in cases.items():
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert "not-the-pin" not in cases["pin"].stderr
    # A wrong PIN is tried once, not retried into a lockout: the right PIN still works.
    assert show("--token", h.token, "--pin-source", f"file:{h.pin_file}").returncode == 0
    assert not (tmp_path / "pop.pem").exists()
