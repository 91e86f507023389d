"""Plan before side effects: every check that can fail is made here, before the first HSM
object or file is created (README "Crash safety and resume"), and the dry run behind
``provline plan``."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from ..ca.builders import signing_hash, utcnow
from ..ca.certs import load_cert, load_certs
from ..ca.chain import Chain, load_chain
from ..config.manifest import Manifest
from ..config.station import Station, station_secret_problems
from ..errors import InputError, ProvlineError, ValidationFailed, shown
from ..inputfile import MIB, read_input
from ..layout import LOCK
from ..registration.endpoints import resolve
from ..registration.service import enrolled_thumbprints
from ..vocabulary import Custody, DeviceState, RegistrationMode
from .capability import station_report
from .journal import Journal
from .requests import request_problems
from .signing import find_transport_key, open_station_keys


def check_inputs(manifest: Manifest, station: Station, now: dt.datetime | None = None) -> Chain:
    """Every check that needs no HSM and no journal. Raises :class:`ValidationFailed` with
    every problem found, each naming its file and line. Whatever passes here must not fail
    later for the same input (``provline validate`` and ``run`` agree)."""
    problems: list[str] = []
    if manifest.key_profile not in station.key_profiles:
        problems.append(
            f"{manifest.where('key_profile')}: key_profile {manifest.key_profile} is not allowed "
            f"by station {station.where('key_profiles')} (station key_profiles)"
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
                f"{manifest.where('validity_days')}: validity_days {manifest.validity_days} ends "
                f"{end:%Y-%m-%d}, after the issuer's notAfter "
                f"{issuer.not_valid_after_utc:%Y-%m-%d} ({station.where('ca.chain')}) "
                "(validity within the issuer)"
            )
        if now < issuer.not_valid_before_utc:
            problems.append(
                f"{station.where('ca.chain')}: ca.chain: the issuer is not valid before "
                f"{issuer.not_valid_before_utc:%Y-%m-%d} (issuer currently valid)"
            )
        try:
            signing_hash(issuer.public_key())  # type: ignore[arg-type]
        except ProvlineError as exc:
            problems.append(f"{station.where('ca.chain')}: ca.chain: {exc.what} ({exc.rule})")
    problems += station_secret_problems(station)
    if station.custody.policy is Custody.WRAPPED and station.custody.transport_key is None:
        problems.append(
            f"{station.where('custody')}: wrapped custody needs custody.transport_key (schema)"
        )
    if manifest.registration is not RegistrationMode.NONE:
        problems += _registration_problems(manifest, station)
    if station.audit is not None:
        try:
            load_cert(station.audit.cert, where=f"{station.where('audit.cert')}: audit.cert")
        except InputError as exc:
            problems.append(exc.line())
    if why := _output_problem(station.output, manifest.batch_id):
        problems.append(f"{station.where('output')}: output {why} (output directory writable)")
    problems += request_problems(manifest, station)  # custody device: every CSR, all at once
    if problems:
        raise ValidationFailed(problems)
    assert chain is not None
    return chain


def _registration_problems(manifest: Manifest, station: Station) -> list[str]:
    """The DPS settings a registering manifest needs, read now (emulator.json, connection
    strings, the TLS trust file) so that registration cannot fail on them after issuance."""
    dps = station.dps
    where = station.where("dps")
    if dps.emulator_dir is None and (dps.service_endpoint is None or dps.connection_string is None):
        return [
            f"{manifest.where('registration')}: registration {manifest.registration} needs "
            f"station dps settings ({where}): emulator_dir, or service_endpoint + "
            "connection_string (registration target configured)"
        ]
    if dps.emulator_dir is not None:
        try:
            read_input(
                dps.emulator_dir / "emulator.json",
                limit=MIB,
                what="emulator file",
                where=f"{station.where('dps.emulator_dir')}: dps.emulator_dir",
            )
        except InputError as exc:
            if "does not exist" not in exc.what:  # resolve() says what to do about that
                return [exc.line()]
    try:
        endpoints = resolve(dps)
    except InputError as exc:
        return [f"{where}: dps: {exc.line()}"]
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        return [f"{where}: dps: cannot read the registration settings: {exc} (dps settings)"]
    problems = []
    if endpoints.tls_ca_file is not None:
        try:
            load_certs(endpoints.tls_ca_file, where=f"{station.where('dps.tls_ca_file')}: dps")
        except InputError as exc:
            problems.append(exc.line())
    for key, cs in (
        ("dps.connection_string", endpoints.service_cs),
        ("dps.hub_connection_string", endpoints.hub_cs),
    ):
        if cs is not None and not _base64(cs.key):
            problems.append(
                f"{station.where(key)}: {key}: its SharedAccessKey is not base64 "
                "(connection strings as the Azure portal shows them)"
            )
    if manifest.registration is RegistrationMode.HUB and endpoints.hub_cs is None:
        problems.append(
            f"{where}: registration hub needs dps.hub_connection_string "
            "(registration target configured)"
        )
    return problems


def _base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        return False
    return True


def _output_problem(output: Path, batch_id: str) -> str | None:
    """Why ``output/batch_id`` could not be created or used, or None. Read-only: walks up to
    the first existing ancestor, which must be a writable directory, and checks the names
    still to be created."""
    batch_dir = output / batch_id
    try:
        if os.path.lexists(batch_dir):
            if not batch_dir.is_dir():
                return f"{output}: {batch_dir} exists and is not a directory"
            if not os.access(batch_dir, os.W_OK | os.X_OK):
                return f"{output}: {batch_dir} is not writable"
            if not Journal.exists(batch_dir):
                with os.scandir(batch_dir) as entries:
                    # only a lock: a run an older provline killed while creating the batch
                    if any(entry.name != LOCK for entry in entries):
                        return (
                            f"{output}: {batch_dir} exists, is not empty and has no journal "
                            "(a new batch starts in an empty directory)"
                        )
            return None
        probe = batch_dir
        while not os.path.lexists(probe):
            if len(os.fsencode(probe.name)) > 255:
                return f"{output}: the name {shown(probe.name)} is longer than 255 bytes"
            if probe.parent == probe:
                return f"{output} has no existing parent directory"
            probe = probe.parent
        if not probe.is_dir():
            return f"{output}: {probe} is not a directory"
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"{output}: {probe} is not writable"
        if len(os.fsencode(str(batch_dir))) >= 4000:
            return f"{output}: the batch directory's path is too long"
    except (OSError, ValueError) as exc:
        return f"{output} cannot be checked: {exc}"
    return None


def dry_run(manifest: Manifest, station: Station) -> dict[str, Any]:
    """What `provline run` would do, with no side effect: the manifest against the journal
    (if the batch exists) and against DPS / IoT Hub (read-only calls)."""
    check_inputs(manifest, station)
    # The same token, key and capability checks as `run`, read-only: the same refusals.
    keys = open_station_keys(station)
    report = station_report(station, manifest, keys.token)
    if not report.missing:
        find_transport_key(station, keys.token)
    hsm_report = report.to_json()
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
    # One pass over the devices, streamed: a million-device manifest is never held.
    existing = (
        enrolled_thumbprints(resolve(station.dps))
        if manifest.registration is RegistrationMode.INDIVIDUAL
        else None
    )
    to_issue = (DeviceState.PLANNED, DeviceState.INTENT, DeviceState.FAILED)
    journal_view: dict[str, int] = {}
    dps_view = {
        "missing": 0,
        "enrolled_same_certificate": 0,
        "enrolled_other_certificate": 0,
        "enrolled_not_issued_yet": 0,
    }
    conflicts: list[str] = []
    total = would_issue = 0
    for device in manifest.devices():
        rid = device.registration_id
        total += 1
        key = states.get(rid, "new")
        journal_view[key] = journal_view.get(key, 0) + 1
        would_issue += states.get(rid, DeviceState.PLANNED) in to_issue
        if existing is None:
            continue
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
    result: dict[str, Any] = {
        "batch_id": manifest.batch_id,
        "devices": total,
        "journal": journal_view,
        "would_issue": would_issue,
        "registration": manifest.registration.value,
        "hsm": hsm_report,
    }
    if existing is not None:
        result["dps"] = dps_view
        result["would_conflict"] = conflicts[:100]
        result["would_register"] = dps_view["missing"]
    return result
