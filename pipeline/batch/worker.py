"""The issue stage, run in worker processes: for each device of a chunk make its key (per
custody), sign its leaf with the HSM-held intermediate, write its bundle; then make the chunk
durable with one filesystem sync.

Workers are spawned processes, each with its own PKCS#11 login (python-pkcs11 + SoftHSM2 are
not thread-safe, and login state is per process). The orchestrator journals every serial as
an intent before it hands a chunk over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ..ca.builders import Issuer, build_leaf
from ..config.station import load_station
from ..errors import HsmError
from ..files import sync_filesystem
from ..keyprofile import KeyProfile
from ..vocabulary import Custody
from .bundle import write_bundle
from .custody import KeyMaker, key_maker
from .records import IssuedBundle, NotIssued
from .signing import open_station_keys


@dataclass(frozen=True)
class IssueJob:
    """Everything a worker needs, picklable: secrets are re-read from their sources."""

    station_path: str
    batch_dir: str
    batch_id: str
    key_profile: str
    validity_days: int


@dataclass(frozen=True)
class ChunkItem:
    registration_id: str
    device_id: str
    serial: str  # hex
    extra: dict[str, Any]
    retry: bool = False


@dataclass
class ChunkResult:
    issued: list[IssuedBundle] = field(default_factory=list)
    not_issued: list[NotIssued] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per worker step, summed


@dataclass
class _Worker:
    job: IssueJob
    batch_dir: Path
    issuer: Issuer
    chain: list[x509.Certificate]
    keys: KeyMaker


_worker: _Worker | None = None


def init_worker(job: IssueJob) -> None:
    """Process initialiser: log in once, find the issuer key, prepare the key maker."""
    global _worker
    station = load_station(Path(job.station_path))
    keys = open_station_keys(station)
    passphrase = None
    if station.custody.policy is Custody.PKCS8 and station.custody.pkcs8_passphrase:
        passphrase = station.custody.pkcs8_passphrase.read()
    _worker = _Worker(
        job=job,
        batch_dir=Path(job.batch_dir),
        issuer=keys.issuer,
        chain=list(keys.chain.certs),
        keys=key_maker(station.custody, keys.token, KeyProfile(job.key_profile), passphrase),
    )


def issue_chunk(items: list[ChunkItem]) -> ChunkResult:
    assert _worker is not None, "init_worker was not called"
    w = _worker
    result = ChunkResult(seconds={"keys": 0.0, "issue": 0.0, "bundle": 0.0, "sync": 0.0})
    clock = time.perf_counter
    for item in items:
        signed = False
        try:
            t0 = clock()
            key = w.keys.make(item.registration_id, item.retry)
            t1 = clock()
            cert = build_leaf(
                key.public,
                item.registration_id,
                w.issuer,
                serial=int(item.serial, 16),
                validity_days=w.job.validity_days,
            )
            signed = True
            t2 = clock()
            files = dict(key.files)
            if key.with_certificate is not None:
                files.update(key.with_certificate(cert, w.chain))
            issued = write_bundle(
                w.batch_dir,
                batch_id=w.job.batch_id,
                registration_id=item.registration_id,
                device_id=item.device_id,
                cert=cert,
                chain_pem=w.issuer.chain_pem,
                private_files=files,
                key=key.reference,
                extra=item.extra,
                key_generated=key.generated,
            )
            t3 = clock()
        except HsmError:
            raise  # the token is unusable: stop the batch, resume voids this chunk
        except Exception as exc:  # one device failed; the rest of the chunk goes on
            result.not_issued.append(
                NotIssued(item.registration_id, item.serial, signed, f"{type(exc).__name__}: {exc}")
            )
            continue
        result.seconds["keys"] += t1 - t0
        result.seconds["issue"] += t2 - t1
        result.seconds["bundle"] += t3 - t2
        result.issued.append(issued)
    t4 = clock()
    sync_filesystem(w.batch_dir)
    result.seconds["sync"] += clock() - t4
    return result
