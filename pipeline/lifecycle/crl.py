"""Certificate revocation lists signed by the HSM-held issuing key (RFC 5280 section 5)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ..batch.journal import Journal
from ..batch.signing import open_signer
from ..ca.builders import build_crl
from ..ca.chain import load_chain
from ..config.station import Station
from ..files import write_atomic


def void_crl(batch_dirs: list[Path], station: Station, out: Path, days: int = 30) -> int:
    """Revoke every void serial of ``batch_dirs`` (serials that may have been signed before a
    crash, whose bundles were never durable) in a CRL written to ``out`` (PEM). Returns the
    number of serials revoked."""
    issuer = load_chain(station).issuer
    serials: set[int] = set()
    for batch_dir in batch_dirs:
        journal = Journal.open(batch_dir, create=False)
        try:
            serials |= {int(v["serial"], 16) for v in journal.voids()}
        finally:
            journal.close()
    crl = build_crl(issuer, open_signer(station, station.ca.issuer_key), sorted(serials), days=days)
    write_atomic(out, crl.public_bytes(serialization.Encoding.PEM), fsync=True)
    return len(serials)
