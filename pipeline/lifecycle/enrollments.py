"""Changing DPS individual enrollments after the factory: disable one, create a disabled one
that blocks a device of an enrollment group, put a renewal into the secondary slot, promote
it to primary.

A change is a function of the current enrollment (None when there is none) that returns the
new body, None when the enrollment already is as wanted, or a reason to leave it alone. The
current enrollments are read with their etags (:meth:`Services.enrollments`), the changes
written in bulk operations of 10 (``create`` for new ones, ``updateIfMatchETag`` for the
rest: an enrollment changed meanwhile is read again and changed again, one at a time). So
disabling 10,000 enrollments takes about 1,000 bulk calls plus the reads.

DPS answers an enrollment with the certificates' ``info`` only, never the certificates, so a
body is rebuilt with the PEM of every certificate it keeps: provline knows the PEM of every
certificate it issued (the inventory names its bundle), and leaves alone an enrollment that
holds one it did not issue (README "Never touch what is not yours").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..registration.service import ServiceError, short_reason
from .inventory import Inventory
from .service import Services, chunks

READ_ONLY = ("registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag")
SLOTS = ("primary", "secondary")
Change = Callable[[dict[str, Any] | None], "dict[str, Any] | str | None"]


@dataclass(frozen=True)
class Outcome:
    registration_id: str
    how: str  # created | updated | already | failed
    reason: str = ""
    registration: dict[str, Any] | None = None  # the enrollment's registrationState, if any

    @property
    def failed(self) -> bool:
        return self.how == "failed"


def slot_thumbprints(enrollment: dict[str, Any] | None) -> dict[str, str]:
    """slot -> SHA-256 thumbprint (upper case) of an enrollment's client certificates."""
    certs = ((enrollment or {}).get("attestation") or {}).get("x509", {}).get(
        "clientCertificates"
    ) or {}
    out = {}
    for slot in SLOTS:
        thumb = ((certs.get(slot) or {}).get("info") or {}).get("sha256Thumbprint")
        if thumb:
            out[slot] = str(thumb).upper()
    return out


def body(
    rid: str,
    current: dict[str, Any] | None,
    pems: dict[str, str],
    status: str,
) -> dict[str, Any]:
    """The enrollment ``rid`` with client certificates ``pems`` (slot -> PEM) and
    ``provisioningStatus`` ``status``; every writable field of ``current`` is kept."""
    out = {k: v for k, v in (current or {}).items() if k not in READ_ONLY}
    out["registrationId"] = rid
    out["provisioningStatus"] = status
    out["attestation"] = {
        "type": "x509",
        "x509": {"clientCertificates": {slot: {"certificate": pem} for slot, pem in pems.items()}},
    }
    return out


class Pems:
    """PEMs of certificates provline issued, by SHA-256 thumbprint (from their bundles)."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory

    def get(self, sha256: str) -> str | None:
        record = self._inventory.by_thumbprint(sha256)
        if record is None or record.cert_path is None:
            return None
        try:
            return Path(record.cert_path).read_text()
        except OSError:
            return None


async def apply(
    svc: Services,
    changes: dict[str, Change],
    done: Callable[[list[Outcome]], None],
) -> None:
    """Apply ``changes`` (registration id -> change); ``done`` is called with the outcomes of
    each bulk call as it finishes (the caller logs and commits them)."""
    current = await svc.enrollments(changes)
    creates: list[tuple[str, dict[str, Any]]] = []
    updates: list[tuple[str, dict[str, Any]]] = []
    settled: list[Outcome] = []
    for rid in sorted(changes):
        existing = current[rid]
        wanted = changes[rid](existing)
        state = (existing or {}).get("registrationState")
        if wanted is None:
            settled.append(Outcome(rid, "already", registration=state))
        elif isinstance(wanted, str):
            settled.append(Outcome(rid, "failed", wanted, registration=state))
        elif existing is None:
            creates.append((rid, wanted))
        else:
            updates.append((rid, {**wanted, "etag": existing["etag"]}))
    for part in chunks(settled, 100):
        done(part)
    registration = {rid: (current[rid] or {}).get("registrationState") for rid in changes}

    async def write(job: tuple[str, list[tuple[str, dict[str, Any]]]]) -> None:
        mode, items = job
        try:
            result = await svc.call(
                lambda: svc.dps.bulk("enrollments", mode, [b for _, b in items])
            )
        except (ServiceError, httpx.HTTPError, OSError) as exc:
            done([Outcome(rid, "failed", short_reason(exc), registration[rid]) for rid, _ in items])
            return
        errors = {str(e.get("registrationId", "")).lower(): e for e in result.get("errors", [])}
        outcomes = []
        for rid, _ in items:
            error = errors.get(rid)
            if error is None:
                how = "created" if mode == "create" else "updated"
                outcomes.append(Outcome(rid, how, registration=registration[rid]))
            elif error.get("errorCode") in (409201, 412201, 404201):
                outcomes.append(await _one(svc, rid, changes[rid]))  # changed meanwhile
            else:
                reason = f"{error.get('errorCode')} {error.get('errorStatus', '')}".strip()
                outcomes.append(Outcome(rid, "failed", reason, registration[rid]))
        done(outcomes)

    jobs = [("create", c) for c in chunks(creates)] + [
        ("updateIfMatchETag", c) for c in chunks(updates)
    ]
    await svc.each(jobs, write)


async def _one(svc: Services, rid: str, change: Change) -> Outcome:
    """Read the enrollment again and change it with one PUT (If-Match its etag)."""
    try:
        existing = await svc.call(lambda: svc.dps.get("enrollments", rid))
        state = (existing or {}).get("registrationState")
        wanted = change(existing)
        if wanted is None:
            return Outcome(rid, "already", registration=state)
        if isinstance(wanted, str):
            return Outcome(rid, "failed", wanted, registration=state)
        etag = existing["etag"] if existing else None
        await svc.call(lambda: svc.dps.put("enrollments", rid, wanted, etag=etag))
        return Outcome(rid, "updated" if existing else "created", registration=state)
    except (ServiceError, httpx.HTTPError, OSError) as exc:
        return Outcome(rid, "failed", short_reason(exc))
