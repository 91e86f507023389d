"""The issuing CA's chain as a station names it (``ca.chain``, ``ca.root_cert``), checked."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from cryptography import x509

from ..config.station import Station
from ..errors import InputError
from .certs import is_ca, load_cert, load_certs, pem, signed_by


@dataclass(frozen=True)
class Chain:
    """The issuing CA's chain as the station names it: issuer first, root last."""

    certs: tuple[x509.Certificate, ...]

    @property
    def issuer(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[-1]

    def pem(self) -> bytes:
        return b"".join(pem(c) for c in self.certs)


def load_chain(station: Station) -> Chain:
    """Load ``ca.chain`` and check it: each certificate is a CA issued by the next, and it ends
    at ``ca.root_cert``."""
    where = f"{station.where('ca.chain')}: ca.chain"
    certs = load_certs(str(station.ca.chain), where=where)
    root_where = f"{station.where('ca.root_cert')}: ca.root_cert"
    root = load_cert(str(station.ca.root_cert), where=root_where)
    for cert in certs:
        if not is_ca(cert):
            raise InputError(
                f"{cert.subject.rfc4514_string()} is not a CA",
                where=where,
                rule="chain holds CA certificates",
            )
    for child, parent in pairwise(certs):
        if not signed_by(child, parent):
            raise InputError(
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}",
                where=where,
                rule="chain order: issuer first, root last",
            )
    if certs[-1] != root:
        raise InputError(
            "the chain does not end at ca.root_cert",
            where=where,
            rule="chain order: issuer first, root last",
        )
    return Chain(tuple(certs))
