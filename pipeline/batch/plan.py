"""Plan before side effects: every check that can fail is made here, before the first HSM
object or file is created and before the first certificate is signed (README "Crash safety
and resume"), and the dry run behind ``provline plan``.

Three layers, each a superset of the one before, in the order ``run`` makes them:

1. :func:`check_inputs` (``provline validate``): the manifest against the station, the CA
   chain, secrets, registration settings and the output directory. Reads input files only:
   no HSM, no journal, no network, and (``live=False``) no running emulator.
2. The HSM: token, PIN, keys, mechanisms, room (:mod:`.capability`), and the batch journal:
   a resumed batch keeps its manifest and station (:func:`check_journal`).
3. The registration target (:func:`require_registration`, :mod:`pipeline.registration.
   precheck`): every reason DPS or IoT Hub would refuse the devices, read-only.

``provline plan`` (:func:`dry_run`) makes all three and reports what ``run`` would do and
why it would refuse, with the exit code ``run`` would give first.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ca.builders import Issuer, signing_hash, utcnow
from ..ca.certs import load_cert, load_certs
from ..ca.chain import Chain, load_chain
from ..config.manifest import Manifest
from ..config.station import Station, station_secret_problems
from ..errors import (
    InputError,
    MechanismUnsupported,
    ProvlineError,
    RegistrationError,
    RegistrationRefused,
    ValidationFailed,
    escape,
    shown,
)
from ..inputfile import MIB, read_input
from ..layout import LOCK
from ..registration import precheck
from ..registration.endpoints import ConnectionString, resolve
from ..registration.precheck import Candidate, Precheck
from ..registration.stage import RegisterOptions
from ..vocabulary import Custody, DeviceState, RegistrationMode
from .capability import station_report
from .journal import Journal
from .requests import request_problems
from .signing import find_transport_key, open_station_keys

PLAN_FORMAT = "provline.plan/1"
MAX_OPERATOR = 128  # characters of an operator name


def check_inputs(
    manifest: Manifest, station: Station, now: dt.datetime | None = None, *, live: bool = True
) -> Chain:
    """Every check that needs no HSM and no journal. Raises :class:`ValidationFailed` with
    every problem found, each naming its file and line. Whatever passes here must not fail
    later for the same input (``provline validate`` and ``run`` agree). ``live=False``
    (``provline validate``): a station that reads its endpoints from an emulator
    (``dps.emulator_dir``) is not refused because that emulator is not running now."""
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
        problems += _registration_problems(manifest, station, live)
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


def _registration_problems(manifest: Manifest, station: Station, live: bool) -> list[str]:
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
    emulator_down = (
        dps.emulator_dir is not None and not (dps.emulator_dir / "emulator.json").exists()
    )
    if emulator_down and not live:  # plan and run need it running; validate does not
        return _explicit_dps_problems(station)
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


def _explicit_dps_problems(station: Station) -> list[str]:
    """The dps settings given in the station file itself (validate, emulator not running)."""
    dps, problems = station.dps, []
    if dps.tls_ca_file is not None:
        try:
            load_certs(dps.tls_ca_file, where=f"{station.where('dps.tls_ca_file')}: dps")
        except InputError as exc:
            problems.append(exc.line())
    for key, ref in (
        ("dps.connection_string", dps.connection_string),
        ("dps.hub_connection_string", dps.hub_connection_string),
    ):
        if ref is None:
            continue
        if issue := ref.problem():
            problems.append(
                f"{station.where(key)}: {key}: {issue} (secrets present in the environment)"
            )
            continue
        try:
            cs = ConnectionString.parse(ref.read(), key)
        except InputError as exc:
            problems.append(f"{station.where(key)}: {exc.line()}")
            continue
        if not _base64(cs.key):
            problems.append(
                f"{station.where(key)}: {key}: its SharedAccessKey is not base64 "
                "(connection strings as the Azure portal shows them)"
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


# ------------------------------------------------------------------------------ operator
def check_operator(station: Station, operator: str | None) -> str | None:
    """Who runs the batch (``--operator`` or ``PROVLINE_OPERATOR``), recorded in the audit
    log of every run; required when the station says ``audit.require_operator: true``."""
    name = (operator or "").strip() or None
    if name is None:
        if station.audit is not None and station.audit.require_operator:
            raise InputError(
                "this station requires the operator's name: give --operator NAME or set "
                "PROVLINE_OPERATOR",
                where=f"{station.where('audit.require_operator')}: audit.require_operator",
                rule="every run names its operator",
            )
        return None
    if len(name) > MAX_OPERATOR or not name.isprintable():
        raise InputError(
            f"operator {shown(escape(name))} is not a printable name of at most "
            f"{MAX_OPERATOR} characters",
            where="--operator",
            rule="operator names",
        )
    return name


# ------------------------------------------------------------------------------- journal
def journal_meta(manifest: Manifest, station: Station) -> dict[str, str]:
    """What a batch keeps for its life: a resumed batch must match every value."""
    return {
        "batch_id": manifest.batch_id,
        "manifest_sha256": manifest.sha256,
        "station": station.name,
        "custody": station.custody.policy.value,
        "key_profile": manifest.key_profile.value,
        "validity_days": str(manifest.validity_days),
        "registration": manifest.registration.value,
    }


def check_journal(journal: Journal, manifest: Manifest, station: Station) -> bool:
    """A resumed batch must be the same batch: same manifest, station, custody, profile
    (exit 2 naming each difference). Returns False for a batch whose plan was never
    completed (it has issued nothing and is planned afresh). Closes ``journal``."""
    try:
        recorded = journal.meta()
        complete = journal.planned()
    finally:
        journal.close()
    if not complete:
        return False
    wanted = journal_meta(manifest, station)
    problems = [
        f"{manifest.path}: {key} is {wanted[key]!r} but batch {manifest.batch_id} was started "
        f"with {recorded.get(key)!r} (a resumed batch keeps its inputs)"
        for key in wanted
        if recorded.get(key) != wanted[key]
    ]
    if problems:
        raise ValidationFailed(problems)
    return True


def _started(manifest: Manifest, station: Station) -> bool:
    """Whether the batch exists with a whole plan (checked to be this batch)."""
    batch_dir = station.output / manifest.batch_id
    return Journal.exists(batch_dir) and check_journal(
        Journal.open(batch_dir, create=False), manifest, station
    )


# -------------------------------------------------------------------------- registration
_TO_ISSUE = (DeviceState.PLANNED, DeviceState.INTENT, DeviceState.FAILED)
_TO_REGISTER = (DeviceState.BUNDLED, DeviceState.REGISTER_FAILED)


@dataclass
class Devices:
    """The batch's devices as the next run sees them (from the journal, or the manifest for
    a new batch)."""

    total: int = 0
    states: dict[str, int] = field(default_factory=dict)  # "new" for a batch not started
    would_issue: int = 0
    candidates: list[Candidate] = field(default_factory=list)  # devices the run registers
    registered: int = 0
    known_conflicts: list[str] = field(default_factory=list)  # the first SHOWN
    known_conflicts_total: int = 0


def batch_devices(
    manifest: Manifest, station: Station, started: bool, replace: bool, limit: int | None
) -> Devices:
    """One pass over the batch's devices, streamed from the journal (read-only) or the
    manifest: what a run would issue and which devices it would register."""
    out = Devices()
    registering = manifest.registration is not RegistrationMode.NONE
    for rid, did, state, sha256 in _rows(manifest, station, started):
        out.total += 1
        out.states[state] = out.states.get(state, 0) + 1
        if state in ("new", *_TO_ISSUE):
            out.would_issue += 1
        if not registering:
            continue
        if state == DeviceState.REGISTERED:
            out.registered += 1
        elif state == DeviceState.CONFLICT and not replace:
            out.known_conflicts_total += 1
            if limit is None or len(out.known_conflicts) < limit:
                out.known_conflicts.append(rid)
        else:
            issued = state in (*_TO_REGISTER, DeviceState.CONFLICT)
            out.candidates.append(Candidate(rid, did, sha256 if issued else None))
    return out


def _rows(
    manifest: Manifest, station: Station, started: bool
) -> Iterator[tuple[str, str, str, str | None]]:
    """(registration id, device id, state, SHA-256 of the leaf) per device."""
    if not started:
        for device in manifest.devices():
            yield device.registration_id, device.device_id, "new", None
        return
    journal = Journal.open(station.output / manifest.batch_id, create=False)
    try:
        for rid, did, state, _, detail in journal.inventory_rows():
            info = json.loads(detail or "{}")
            yield rid, did, state, info.get("sha256_thumbprint")
    finally:
        journal.close()


def registration_check(
    manifest: Manifest,
    station: Station,
    chain: Chain,
    issuer: Issuer,
    options: RegisterOptions,
    devices: Devices,
    limit: int | None = precheck.SHOWN,
) -> Precheck | None:
    """The registration target checked for the devices the run registers (None: nothing to
    register, no call made)."""
    if manifest.registration is RegistrationMode.NONE or not devices.candidates:
        return None
    return precheck.check(
        manifest.registration,
        resolve(station.dps),
        options,
        issuer,
        list(chain.certs),
        devices.candidates,
        limit=limit,
    )


def require_registration(
    manifest: Manifest,
    station: Station,
    chain: Chain,
    issuer: Issuer,
    options: RegisterOptions,
) -> Precheck | None:
    """What ``run`` calls before its first side effect: raises
    :class:`~pipeline.errors.RegistrationRefused` (exit 51) when DPS or IoT Hub would refuse
    devices this run issues or registers; returns what was found (the audit log records
    the target) or None when the run registers nothing."""
    if manifest.registration is RegistrationMode.NONE:
        return None
    devices = batch_devices(
        manifest, station, _started(manifest, station), options.replace, limit=0
    )
    found = registration_check(
        manifest, station, chain, issuer, options, devices, limit=precheck.REFUSAL_LISTED
    )
    if found is not None and not found.ok:
        raise found.refusal()
    return found


# ------------------------------------------------------------------------------ dry run
@dataclass
class PlanResult:
    """What ``provline plan`` shows: what ``run`` would do, and why it would refuse."""

    batch_id: str
    batch_dir: Path
    resumed: bool
    devices: Devices
    registration: RegistrationMode
    operator: str | None
    hsm: dict[str, Any]
    target: Precheck | None
    replace: bool

    @property
    def exit_code(self) -> int:
        """The code ``run`` would exit with first: the token (34), the registration target
        (51), then devices an earlier run left in conflict (5)."""
        if not self.hsm["ok"]:
            return MechanismUnsupported.exit_code
        if self.target is not None and not self.target.ok:
            return RegistrationRefused.exit_code
        if self.devices.known_conflicts_total:
            return RegistrationError.exit_code
        return 0

    def refusals(self) -> list[str]:
        out = []
        if not self.hsm["ok"]:
            out.append("the token lacks what the batch needs (see MISSING in the table)")
        if self.target is not None:
            out += self.target.refusals
        if self.devices.known_conflicts_total:
            out.append(
                f"{self.devices.known_conflicts_total:,} devices are in conflict since an "
                "earlier run: run leaves them alone and exits 5 (--replace overwrites them; "
                f"`provline status {self.batch_dir} --list conflict` lists them)"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        d = self.devices
        data: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "batch_id": self.batch_id,
            "batch_dir": str(self.batch_dir),
            "resumed": self.resumed,
            "devices": d.total,
            "journal": d.states,
            "would_issue": d.would_issue,
            "registration": self.registration.value,
            "operator": self.operator,
            "hsm": self.hsm,
        }
        if self.registration is not RegistrationMode.NONE:
            data["would_register"] = len(d.candidates)
            data["already_registered"] = d.registered
            data["known_conflicts"] = {
                "total": d.known_conflicts_total,
                "listed": d.known_conflicts,
                "left_out": d.known_conflicts_total - len(d.known_conflicts),
            }
            data["target"] = self.target.to_json() if self.target is not None else None
        data["refusals"] = self.refusals()
        data["exit_code"] = self.exit_code
        return data


def dry_run(
    manifest: Manifest,
    station: Station,
    options: RegisterOptions | None = None,
    *,
    operator: str | None = None,
    limit: int | None = precheck.SHOWN,
) -> PlanResult:
    """What ``provline run`` would do, with no side effect: the same input, operator, token,
    key, capability and journal checks, which raise as ``run`` raises; then the devices
    against the journal and the registration target (read-only calls). ``limit``:
    conflicts listed (None: all)."""
    options = options or RegisterOptions(
        operations_per_minute=station.dps.operations_per_minute,
        concurrency=station.dps.concurrency,
        bulk_size=station.dps.bulk_size,
    )
    chain = check_inputs(manifest, station)
    operator = check_operator(station, operator)
    keys = open_station_keys(station)
    report = station_report(station, manifest, keys.token)
    if not report.missing:
        find_transport_key(station, keys.token)
    started = _started(manifest, station)
    devices = batch_devices(manifest, station, started, options.replace, limit)
    target = registration_check(manifest, station, chain, keys.issuer, options, devices, limit)
    return PlanResult(
        manifest.batch_id,
        station.output / manifest.batch_id,
        started,
        devices,
        manifest.registration,
        operator,
        report.to_json(),
        target,
        options.replace,
    )
