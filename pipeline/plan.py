"""Plan before side effects: every check that can fail is made here, before the first HSM
object or file is created (design.md "Plan before side effects")."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509

from . import ca
from .errors import InputError, ProvlineError, ValidationFailed
from .manifest import Manifest, RegistrationMode
from .station import Custody, Station, station_secret_problems


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
        return b"".join(ca.pem(c) for c in self.certs)


def load_chain(station: Station) -> Chain:
    """Load ``ca.chain`` and check it: each certificate is a CA issued by the next, and it ends
    at ``ca.root_cert``."""
    where = f"{station.path}: ca.chain"
    certs = ca.load_certs(str(station.ca.chain), where=where)
    root = ca.load_cert(str(station.ca.root_cert), where=f"{station.path}: ca.root_cert")
    for cert in certs:
        if not ca.is_ca(cert):
            raise InputError(f"{cert.subject.rfc4514_string()} is not a CA", where=where,
                             rule="chain holds CA certificates")
    for child, parent in pairwise(certs):
        if not ca.signed_by(child, parent):
            raise InputError(f"{child.subject.rfc4514_string()} is not issued by "
                             f"{parent.subject.rfc4514_string()}", where=where,
                             rule="chain order: issuer first, root last")
    if certs[-1] != root:
        raise InputError("the chain does not end at ca.root_cert", where=where,
                         rule="chain order: issuer first, root last")
    return Chain(tuple(certs))


def check_inputs(manifest: Manifest, station: Station,
                 now: dt.datetime | None = None) -> Chain:
    """Every check that needs no HSM and no journal. Raises :class:`ValidationFailed` with
    every problem found."""
    problems: list[str] = []
    where = f"{manifest.path}"
    if manifest.key_profile not in station.key_profiles:
        problems.append(f"{where}: key_profile {manifest.key_profile} is not allowed by station "
                        f"{station.path} (station key_profiles)")
    chain = None
    try:
        chain = load_chain(station)
    except InputError as exc:
        problems.append(exc.line())
    if chain is not None:
        now = now or ca.utcnow()
        issuer = chain.issuer
        end = now + dt.timedelta(days=manifest.validity_days)
        if end > issuer.not_valid_after_utc:
            problems.append(
                f"{where}: validity_days {manifest.validity_days} ends {end:%Y-%m-%d}, after the "
                f"issuer's notAfter {issuer.not_valid_after_utc:%Y-%m-%d} (validity within the "
                "issuer)")
        if now < issuer.not_valid_before_utc:
            problems.append(f"{station.path}: ca.chain: the issuer is not valid before "
                            f"{issuer.not_valid_before_utc:%Y-%m-%d} (issuer currently valid)")
        try:
            ca.signing_hash(issuer.public_key())  # type: ignore[arg-type]
        except ProvlineError as exc:
            problems.append(f"{station.path}: ca.chain: {exc.what} ({exc.rule})")
    problems += station_secret_problems(station)
    if station.custody.policy is Custody.WRAPPED and station.custody.transport_key is None:
        problems.append(f"{station.path}: wrapped custody needs custody.transport_key (schema)")
    if manifest.registration is not RegistrationMode.NONE:
        dps = station.dps
        if dps.emulator_dir is None and (
            dps.service_endpoint is None or dps.connection_string is None
        ):
            problems.append(f"{where}: registration {manifest.registration} needs station dps "
                            "settings: emulator_dir, or service_endpoint + connection_string "
                            "(registration target configured)")
        else:
            from .dps import resolve

            try:
                endpoints = resolve(dps)
            except InputError as exc:
                problems.append(f"{station.path}: dps: {exc.line()}")
            else:
                if manifest.registration is RegistrationMode.HUB and endpoints.hub_cs is None:
                    problems.append(f"{station.path}: registration hub needs "
                                    "dps.hub_connection_string (registration target configured)")
    if station.audit is not None and not station.audit.cert.is_file():
        problems.append(f"{station.path}: audit.cert {station.audit.cert} does not exist "
                        "(input files exist)")
    if not _writable(station.output):
        problems.append(f"{station.path}: output {station.output} is not writable "
                        "(output directory writable)")
    if problems:
        raise ValidationFailed(problems)
    assert chain is not None
    return chain


def _writable(directory: Path) -> bool:
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def dry_run(manifest: Manifest, station: Station) -> dict[str, Any]:
    """What `provline run` would do, with no side effect: the manifest against the journal
    (if the batch exists) and against DPS / IoT Hub (read-only calls)."""
    import asyncio
    import json as _json

    from .journal import Journal

    check_inputs(manifest, station)
    batch_dir = station.output / manifest.batch_id
    states: dict[str, str] = {}
    thumbs: dict[str, str] = {}
    if Journal.exists(batch_dir):
        journal = Journal.open(batch_dir, create=False)
        for rid, state, detail in journal.device_rows():
            states[rid] = state
            info = _json.loads(detail or "{}")
            if info.get("sha256_thumbprint"):
                thumbs[rid] = info["sha256_thumbprint"]
        journal.close()
    devices = [d.registration_id for d in manifest.devices()]
    journal_view: dict[str, int] = {}
    for rid in devices:
        key = states.get(rid, "new")
        journal_view[key] = journal_view.get(key, 0) + 1
    result: dict[str, Any] = {
        "batch_id": manifest.batch_id, "devices": len(devices), "journal": journal_view,
        "would_issue": sum(1 for r in devices if states.get(r, "planned") in
                           ("planned", "intent", "failed")),
        "registration": manifest.registration.value,
    }
    if manifest.registration is RegistrationMode.INDIVIDUAL:
        from .dps import DpsService, attested_thumbprint, resolve

        async def enrolled() -> dict[str, str]:
            svc = DpsService(resolve(station.dps))
            try:
                return {e["registrationId"]: attested_thumbprint(e, "clientCertificates")
                        for e in await svc.query("enrollments", page_size=1000)}
            finally:
                await svc.aclose()

        existing = asyncio.run(enrolled())
        dps_view = {"missing": 0, "enrolled_same_certificate": 0,
                    "enrolled_other_certificate": 0, "enrolled_not_issued_yet": 0}
        conflicts = []
        for rid in devices:
            if rid not in existing:
                dps_view["missing"] += 1
            elif rid not in thumbs:
                dps_view["enrolled_not_issued_yet"] += 1
                conflicts.append(rid)
            elif existing[rid] == thumbs[rid].upper():
                dps_view["enrolled_same_certificate"] += 1
            else:
                dps_view["enrolled_other_certificate"] += 1
                conflicts.append(rid)
        result["dps"] = dps_view
        result["would_conflict"] = conflicts[:100]
        result["would_register"] = dps_view["missing"]
    return result
