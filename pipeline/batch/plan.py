"""Plan before side effects: every check that can fail is made here, before the first HSM
object or file is created (README "Crash safety and resume"), and the dry run behind
``provline plan``."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from ..ca.builders import signing_hash, utcnow
from ..ca.chain import Chain, load_chain
from ..config.manifest import Manifest
from ..config.station import Station, station_secret_problems
from ..errors import InputError, ProvlineError, ValidationFailed
from ..registration.endpoints import resolve
from ..registration.service import enrolled_thumbprints
from ..vocabulary import Custody, DeviceState, RegistrationMode
from .capability import station_report
from .journal import Journal


def check_inputs(manifest: Manifest, station: Station, now: dt.datetime | None = None) -> Chain:
    """Every check that needs no HSM and no journal. Raises :class:`ValidationFailed` with
    every problem found."""
    problems: list[str] = []
    where = f"{manifest.path}"
    if manifest.key_profile not in station.key_profiles:
        problems.append(
            f"{where}: key_profile {manifest.key_profile} is not allowed by station "
            f"{station.path} (station key_profiles)"
        )
    chain = None
    try:
        chain = load_chain(station)
    except InputError as exc:
        problems.append(exc.line())
    if chain is not None:
        now = now or utcnow()
        issuer = chain.issuer
        end = now + dt.timedelta(days=manifest.validity_days)
        if end > issuer.not_valid_after_utc:
            problems.append(
                f"{where}: validity_days {manifest.validity_days} ends {end:%Y-%m-%d}, after the "
                f"issuer's notAfter {issuer.not_valid_after_utc:%Y-%m-%d} (validity within the "
                "issuer)"
            )
        if now < issuer.not_valid_before_utc:
            problems.append(
                f"{station.path}: ca.chain: the issuer is not valid before "
                f"{issuer.not_valid_before_utc:%Y-%m-%d} (issuer currently valid)"
            )
        try:
            signing_hash(issuer.public_key())  # type: ignore[arg-type]
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
            problems.append(
                f"{where}: registration {manifest.registration} needs station dps "
                "settings: emulator_dir, or service_endpoint + connection_string "
                "(registration target configured)"
            )
        else:
            try:
                endpoints = resolve(dps)
            except InputError as exc:
                problems.append(f"{station.path}: dps: {exc.line()}")
            else:
                if manifest.registration is RegistrationMode.HUB and endpoints.hub_cs is None:
                    problems.append(
                        f"{station.path}: registration hub needs "
                        "dps.hub_connection_string (registration target configured)"
                    )
    if station.audit is not None and not station.audit.cert.is_file():
        problems.append(
            f"{station.path}: audit.cert {station.audit.cert} does not exist (input files exist)"
        )
    if not _writable(station.output):
        problems.append(
            f"{station.path}: output {station.output} is not writable (output directory writable)"
        )
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
    check_inputs(manifest, station)
    hsm_report = station_report(station, manifest).to_json()  # the capability table, read-only
    batch_dir = station.output / manifest.batch_id
    states: dict[str, str] = {}
    thumbs: dict[str, str] = {}
    if Journal.exists(batch_dir):
        journal = Journal.open(batch_dir, create=False)
        for rid, state, detail in journal.device_rows():
            states[rid] = state
            info = json.loads(detail or "{}")
            if info.get("sha256_thumbprint"):
                thumbs[rid] = info["sha256_thumbprint"]
        journal.close()
    devices = [d.registration_id for d in manifest.devices()]
    journal_view: dict[str, int] = {}
    for rid in devices:
        key = states.get(rid, "new")
        journal_view[key] = journal_view.get(key, 0) + 1
    to_issue = (DeviceState.PLANNED, DeviceState.INTENT, DeviceState.FAILED)
    result: dict[str, Any] = {
        "batch_id": manifest.batch_id,
        "devices": len(devices),
        "journal": journal_view,
        "would_issue": sum(1 for r in devices if states.get(r, DeviceState.PLANNED) in to_issue),
        "registration": manifest.registration.value,
        "hsm": hsm_report,
    }
    if manifest.registration is RegistrationMode.INDIVIDUAL:
        existing = enrolled_thumbprints(resolve(station.dps))
        dps_view = {
            "missing": 0,
            "enrolled_same_certificate": 0,
            "enrolled_other_certificate": 0,
            "enrolled_not_issued_yet": 0,
        }
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
