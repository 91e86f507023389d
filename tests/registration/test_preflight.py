"""The chain pre-flight on provline's own certificate profiles (software keys): RFC 5280
path validation refuses what DPS refuses, before any registration call."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline.ca.builders import Issuer, build_intermediate, build_leaf, build_root, random_serial
from pipeline.ca.certs import pem, thumbprints
from pipeline.layout import DEVICE_CERT, FULL_CHAIN
from pipeline.registration.preflight import check_chain, preflight
from pipeline.registration.target import Target


def _name(cn: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(f"CN={cn}")


@pytest.fixture(scope="module")
def pki() -> tuple[x509.Certificate, Issuer, x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = build_root(root_key, _name("Root"), 3650)
    inter_key = ec.generate_private_key(ec.SECP384R1())
    inter = build_intermediate(inter_key.public_key(), _name("Issuing"), root, root_key, 1000)
    issuer = Issuer(inter, inter_key, pem(inter) + pem(root))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = build_leaf(
        leaf_key.public_key(), "dev-001", issuer, serial=random_serial(), validity_days=30
    )
    return root, issuer, leaf, leaf_key


def test_a_good_chain_passes_and_names_what_dps_needs(
    pki: tuple[x509.Certificate, Issuer, x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    root, issuer, leaf, _ = pki
    chain = [leaf, issuer.cert, root]
    assert check_chain(chain, "dev-001", root) is None
    assert check_chain(chain, "dev-001", root, must_contain=issuer.cert) is None
    verified = {thumbprints(issuer.cert).sha1}
    assert check_chain(chain, "dev-001", root, issuer.cert, verified) is None
    problem = check_chain(chain, "dev-001", root, issuer.cert, set())
    assert problem and "proof of possession" in problem
    assert "registration ID" in (check_chain(chain, "dev-002", root) or "")
    assert "not first" in (check_chain([issuer.cert, root], "dev-001", root) or "")


def test_a_leaf_signing_a_leaf_is_refused_although_every_signature_verifies(
    pki: tuple[x509.Certificate, Issuer, x509.Certificate, ec.EllipticCurvePrivateKey],
    tmp_path: Path,
) -> None:
    root, issuer, leaf, leaf_key = pki
    # provline's own leaf builder, with the device's leaf as the "issuer"
    rogue = build_leaf(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        "dev-rogue",
        Issuer(leaf, leaf_key, pem(leaf)),
        serial=random_serial(),
        validity_days=10,
    )
    rogue.verify_directly_issued_by(leaf)
    chain = [rogue, leaf, issuer.cert, root]
    problem = check_chain(chain, "dev-rogue", root, verified={thumbprints(root).sha1})
    assert problem and "RFC 5280" in problem and "basicConstraints" in problem
    bundle = tmp_path / "dev-rogue"
    bundle.mkdir()
    (bundle / DEVICE_CERT).write_bytes(pem(rogue))
    (bundle / FULL_CHAIN).write_bytes(b"".join(pem(c) for c in chain))
    target = Target("dev-rogue", "dev-rogue", {}, {}, bundle)
    [line] = preflight([target], root, None, None)
    assert line.startswith(f"{bundle / FULL_CHAIN}: the chain does not validate")


def test_every_refused_bundle_is_counted(
    pki: tuple[x509.Certificate, Issuer, x509.Certificate, ec.EllipticCurvePrivateKey],
    tmp_path: Path,
) -> None:
    """The run's "(+N more)" is the true count: no problem is dropped after the first few."""
    root, issuer, leaf, _ = pki
    chain = b"".join(pem(c) for c in (leaf, issuer.cert, root))
    targets = []
    for n in range(30):  # the leaf's CN is dev-001: every other registration ID is refused
        bundle = tmp_path / f"dev-{n:03d}"
        bundle.mkdir()
        (bundle / DEVICE_CERT).write_bytes(pem(leaf))
        (bundle / FULL_CHAIN).write_bytes(chain)
        targets.append(Target(f"dev-{n:03d}", f"dev-{n:03d}", {}, {}, bundle))
    problems = preflight(targets, root, None, None)
    assert len(problems) == 29
    assert not any("dev-001/" in p for p in problems)
