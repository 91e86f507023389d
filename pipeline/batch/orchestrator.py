"""The batch orchestrator: plan → keys/issue/bundle (worker processes) → register → seal.

Ordering rules that make a kill at any line safe to resume:

* Every check runs before the first side effect (:func:`_plan`).
* A new batch is created whole (journal, settings and plan under a temporary name, then
  renamed into place): a kill while creating leaves no batch or a complete one.
* A chunk's serials are committed to the journal as intents, then logged to the audit log
  (synced), and only then handed to a worker; the worker marks each serial in the signing
  ledger (synced) before it signs it (:mod:`.ledger`). The audit log never holds an intent
  the journal lacks, and nothing is signed that neither knows.
* A worker syncs the chunk's bundles before it reports them. Every other event is logged
  (synced) *before* the journal commits it: results, voids, released reservations,
  registration outcomes. An orphaned token object is logged before it is destroyed. So the
  journal never knows more than the audit log, and every serial the journal closes is
  closed in the log too.
* Open intents (a kill, or a stop) are settled (:mod:`.settle`): a bundle that is whole on
  disk is synced and recorded as issued; any other serial the ledger lists may have been
  signed and becomes ``void`` (listed for revocation); one it does not list never reached a
  signer and is ``released``. Void and released devices are issued again with new serials.

A run stops cleanly on SIGINT/SIGTERM, on an HSM error, and when the disk fills (it keeps a
small preallocated reserve for its last words): workers finish the device in hand, what they
did is recorded, open intents are settled, the run is logged as aborted, the log sealed, the
report written and the lock released.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pkcs11 import ObjectClass

from .. import __version__, hsm
from ..audit.log import AuditLog, Event
from ..ca.builders import Issuer, random_serial
from ..ca.certs import common_name, load_cert, require_key_matches, thumbprints
from ..ca.chain import Chain
from ..config.manifest import Manifest
from ..config.station import Station
from ..crashpoint import crash_point
from ..errors import (
    CAError,
    InputError,
    Interrupted,
    KeyNotFound,
    ProvlineError,
    ValidationFailed,
    exit_code_of,
)
from ..files import SpaceReserve, is_storage_error, sync_filesystem
from ..layout import (
    AUDIT_LOG,
    DEVICE_CERT,
    DEVICE_JSON,
    FULL_CHAIN,
    LOCK,
    PKCS8_KEY,
    PKCS12,
    SPACE_RESERVE,
    TEMP_SUFFIX,
    WRAPPED_KEY,
)
from ..lifecycle.inventory import record_batch
from ..registration.endpoints import Endpoints, resolve
from ..registration.precheck import CaProof, CaState, Precheck, upload_and_prove
from ..registration.stage import RegisterOptions, Stage, run_stage
from ..registration.target import RegistrationOutcome, load_targets
from ..serials import serial_hex
from ..stats import StageStats
from ..vocabulary import REGISTRATION_EVENTS, AuditEvent, Custody, DeviceState, RegistrationMode
from . import ledger
from .capability import require_station_capabilities
from .custody import remove_orphans, warn_pkcs8
from .journal import Journal, RequestRow
from .plan import check_inputs, check_journal, check_operator, journal_meta, require_registration
from .progress import ProgressSink, Silent
from .records import IssuedBundle, KeyReference, PendingDevice
from .report import Report, build_report, report_event, write_report
from .requests import batch_requests
from .settle import Settlement, classify, on_disk
from .signals import StopSignals
from .signing import find_transport_key, open_signer, open_station_keys
from .worker import ChunkItem, ChunkResult, IssueJob, init_worker, issue_chunk

WORKER_CHUNKS = 100  # chunks a worker process issues before it is replaced
VOID_REASON = "no durable bundle when the previous run stopped"
RELEASED_REASON = "reserved but never reached a signer (nothing to revoke)"
LEDGER_META = ("signing_ledger", "1")  # the batch's runs mark serials before signing them
SPACE_RESERVE_BYTES = 8 << 20  # room for the abort events, the seal and the report
WIND_DOWN_SECONDS = 60.0  # how long a stopping run waits for workers to finish in hand
POLL_SECONDS = 0.25  # how often a waiting orchestrator checks for a stop signal
BUNDLE_FILES = (DEVICE_JSON, DEVICE_CERT, FULL_CHAIN, WRAPPED_KEY, PKCS8_KEY, PKCS12)


@dataclass
class RunResult:
    batch_dir: Path
    report: Report

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


@dataclass
class _Context:
    manifest: Manifest
    station: Station
    chain: Chain
    batch_dir: Path
    token: hsm.Token
    issuer: Issuer
    audit_signer: hsm.HsmSigner | None
    registration: Precheck | None = None  # the registration target, checked before issuing
    operator: str | None = None

    def run_facts(self) -> dict[str, Any]:
        """Who runs this run and against which registration target (batch_start, resume)."""
        facts: dict[str, Any] = {"operator": self.operator}
        if self.registration is not None:
            facts["registration"] = self.registration.facts()
        return facts


@dataclass
class _Run:
    """One run's moving parts, handed from step to step."""

    ctx: _Context
    journal: Journal
    audit: AuditLog
    progress: ProgressSink
    stop: StopSignals
    reserve: SpaceReserve
    totals: dict[str, int] = field(
        default_factory=lambda: {
            "issued": 0,
            "failed": 0,
            "recovered": 0,
            "voided": 0,
            "released": 0,
        }
    )
    orphans: list[dict[str, str]] = field(default_factory=list)


def run_batch(
    manifest: Manifest,
    station: Station,
    *,
    progress: ProgressSink | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    register: RegisterOptions | None = None,
    operator: str | None = None,
    issue: IssueStage | None = None,
    registration: bool = True,
) -> RunResult:
    """Run (or resume) the batch ``manifest`` on ``station``. Raises a ProvlineError for bad
    input, and :class:`~pipeline.errors.RegistrationRefused` when DPS / IoT Hub would refuse
    the devices, before any side effect; returns the report otherwise. A run that stops
    early (signal, HSM or disk failure) still writes its report, then raises the reason (its
    exit code is the report's). ``operator`` is recorded in the audit log.

    ``issue`` replaces the worker pool as the issue stage (a session of an open batch that
    devices join one at a time, batch/sign.py); ``registration`` False skips the
    registration stage (such a batch registers when it is closed)."""
    progress = progress or Silent()
    clock = time.monotonic()
    options = register or _register_defaults(station)
    ctx = _plan(manifest, station, options, operator)
    with StopSignals() as stop:
        journal, resumed = _open_batch(ctx)
        checked = ctx.registration  # the pre-issue check's DPS / IoT Hub calls
        stages: dict[str, StageStats] = {
            "plan": StageStats(
                seconds=time.monotonic() - clock,
                calls=checked.calls if checked is not None else None,
                retries=checked.retries if checked is not None else None,
            )
        }
        reserve = SpaceReserve(ctx.batch_dir / SPACE_RESERVE, SPACE_RESERVE_BYTES)
        run: _Run | None = None
        failure: BaseException | None = None
        try:
            reserve.take()
            run = _Run(ctx, journal, AuditLog(ctx.batch_dir / AUDIT_LOG), progress, stop, reserve)
            _start_events(run, resumed)
            if ctx.registration is not None and ctx.registration.ca is CaState.WILL_UPLOAD:
                proof = _prove_ca(run, options)  # before the first certificate is signed
                plan = stages["plan"]
                plan.calls = (plan.calls or 0) + proof.calls
                plan.retries = (plan.retries or 0) + proof.retries
                options = replace(options, upload_ca=False)
            if station.custody.policy is Custody.PKCS8:
                warn_pkcs8()
            stop.check()
            if issue is not None:
                stages["issue"] = issue(run)
            else:
                stages["issue"] = _issue(
                    run, workers or station.workers, chunk_size or station.chunk_size
                )
            if registration and manifest.registration is not RegistrationMode.NONE:
                stop.check()
                stages["register"] = _register(run, options, stages)
        except BaseException as exc:
            failure = exc
            if is_storage_error(exc):
                reserve.release()
            if run is not None:
                _log_abort(run, exc)
        report, late = _finish(ctx, journal, run, progress, stages, resumed, failure)
    if failure is not None:
        raise failure
    if late is not None:
        raise late
    return RunResult(ctx.batch_dir, report)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ProvlineError):
        return exc.line()
    if isinstance(exc, Interrupted):
        return f"stopped by {exc.signal_name}"
    if isinstance(exc, KeyboardInterrupt):
        return "stopped by SIGINT"
    return f"{type(exc).__name__}: {exc}"


def _log_abort(run: _Run, exc: BaseException) -> None:
    try:
        run.audit.append(AuditEvent.ABORTED, data={"reason": _reason(exc)})
        run.audit.flush()
    except ProvlineError as late:
        run.progress.log(f"could not log the abort: {late.line()}")


def _finish(
    ctx: _Context,
    journal: Journal,
    run: _Run | None,
    progress: ProgressSink,
    stages: dict[str, StageStats],
    resumed: bool,
    failure: BaseException | None,
) -> tuple[Report, ProvlineError | None]:
    """End events, report, seal, lock: each step is tried whatever failed before it, and the
    lock is released whatever happens. The report is written and its SHA-256 logged before
    the seal, so the seal covers what the auditor reads (README "Audit"). Returns the
    report and the first error of these steps (the run's exit code when it had none)."""
    try:
        late = _end_run(journal, run, progress) if run is not None else None
        sealing = run is not None and late is None and ctx.audit_signer is not None
        report = _report(ctx, journal, run, stages, resumed, failure, late, sealing)
        logged = False
        try:
            files = write_report(ctx.batch_dir, report)
            if run is not None and late is None:
                run.audit.append(AuditEvent.REPORT, data=report_event(report, files))
                run.audit.flush()
                logged = True
        except ProvlineError as exc:
            late = late or exc
            progress.log(f"report not written or not logged: {exc.line()}")
        if run is not None:
            unsealed = _seal_run(ctx, run, progress, stages)
            if unsealed is not None and logged:  # the report claimed a seal: say the truth
                late = late or unsealed
                report = _report(ctx, journal, run, stages, resumed, failure, late, False)
                try:
                    write_report(ctx.batch_dir, report)
                except ProvlineError as exc:
                    progress.log(f"report not written: {exc.line()}")
            late = late or unsealed
        record_batch(ctx.station, ctx.batch_dir, journal, progress.log)  # station inventory
    finally:
        if run is not None:
            run.reserve.release()
        journal.close()
        progress.close()
    return report, late


def _end_run(journal: Journal, run: _Run, progress: ProgressSink) -> ProvlineError | None:
    """The run_end event, durable; returns why it could not be logged, if so."""
    try:
        run.audit.append(
            AuditEvent.RUN_END,
            data={"devices": journal.counts(), "serials": journal.serial_counts(), **run.totals},
        )
        run.audit.flush()
    except ProvlineError as exc:
        progress.log(f"run end not logged: {exc.line()}")
        return exc
    return None


def _report(
    ctx: _Context,
    journal: Journal,
    run: _Run | None,
    stages: dict[str, StageStats],
    resumed: bool,
    failure: BaseException | None,
    late: ProvlineError | None,
    sealing: bool,
) -> Report:
    cause = failure or late
    if run is not None:
        stages["audit"] = StageStats(seconds=run.audit.seconds)
    stages["seal"] = StageStats(sealed=sealing)
    return build_report(
        ctx.manifest,
        ctx.station,
        journal,
        stages,
        resumed=resumed,
        this_run=run.totals if run is not None else {},
        aborted=_reason(failure) if failure is not None else None,
        exit_code=exit_code_of(cause) if cause is not None else None,
        orphans_removed=run.orphans if run is not None else [],
        operator=ctx.operator,
        registration=ctx.registration.facts() if ctx.registration is not None else None,
    )


def _seal_run(
    ctx: _Context, run: _Run, progress: ProgressSink, stages: dict[str, StageStats]
) -> ProvlineError | None:
    """The seal (or seal_skipped), then the log is closed; returns why the log could not be
    sealed, if so. The report already says how long the run spent logging."""
    late: ProvlineError | None = None
    try:
        _seal(ctx, run.audit, progress)
    except ProvlineError as exc:
        late = exc
        progress.log(f"audit log not sealed: {exc.line()}")
    try:
        run.audit.close()
    except ProvlineError as exc:
        late = late or exc
    return late


def _prove_ca(run: _Run, options: RegisterOptions) -> CaProof:
    """``--upload-ca``: upload the issuing CA and prove possession of its HSM-held key before
    the first certificate is signed; both steps are logged."""
    endpoints = resolve(run.ctx.station.dps)
    proof = upload_and_prove(endpoints, options, run.ctx.issuer)
    common = {
        "name": proof.name,
        "sha1_thumbprint": proof.sha1,
        "service_endpoint": endpoints.service,
    }
    run.audit.extend(
        [
            (
                AuditEvent.CA_UPLOADED,
                None,
                {**common, "subject": proof.subject, "sha256_thumbprint": proof.sha256},
            ),
            (
                AuditEvent.CA_VERIFIED,
                None,
                {
                    **common,
                    "method": "proof_of_possession" if proof.proven else "verified_on_upload",
                },
            ),
        ]
    )
    run.audit.flush()
    if run.ctx.registration is not None:  # the report says what holds now
        run.ctx.registration.ca = CaState.VERIFIED
        run.ctx.registration.ca_detail = f"{proof.subject}: uploaded and proven by this run"
    run.progress.log(
        f"CA {proof.subject} uploaded to {endpoints.service} and verified by proof of "
        "possession (the key stayed in the HSM)"
    )
    return proof


# ---------------------------------------------------------------------------------- plan
def _plan(
    manifest: Manifest, station: Station, register: RegisterOptions, operator: str | None
) -> _Context:
    """Every check before the first side effect: inputs, operator, HSM, issuer, keys,
    journal, and last the registration target (read-only calls)."""
    chain = check_inputs(manifest, station)
    operator = check_operator(station, operator)
    batch_dir = station.output / manifest.batch_id
    keys = open_station_keys(station)  # raises if the issuer key does not match the chain
    require_station_capabilities(keys.token, station, manifest)  # mechanisms, room: docs/hsm.md
    find_transport_key(station, keys.token)
    audit_signer = None
    if station.audit is not None:
        audit_signer = open_signer(station, station.audit.key)
        require_key_matches(
            audit_signer,
            load_cert(str(station.audit.cert)),
            "the audit key",
            CAError,
            where=str(station.path),
        )
    started = Journal.exists(batch_dir) and check_journal(
        Journal.open(batch_dir, create=False), manifest, station
    )
    if not started:  # a new batch (or one whose creation never finished: nothing issued)
        if not Journal.exists(batch_dir) and any(p.name != LOCK for p in _entries(batch_dir)):
            raise InputError(
                f"{batch_dir} exists, is not empty and has no journal",
                rule="a new batch starts in an empty directory",
            )
        if station.custody.policy is Custody.RETAIN:
            _check_no_labels_taken(keys.token, manifest)
    registration = require_registration(manifest, station, chain, keys.issuer, register)
    return _Context(
        manifest,
        station,
        chain,
        batch_dir,
        keys.token,
        keys.issuer,
        audit_signer,
        registration,
        operator,
    )


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def _check_no_labels_taken(token: hsm.Token, manifest: Manifest) -> None:
    taken = {o.label for o in token.objects(ObjectClass.PRIVATE_KEY) if o.label}
    clashes = [d.registration_id for d in manifest.devices() if d.registration_id in taken]
    if clashes:
        raise ValidationFailed(
            [
                f"{manifest.path}: {rid}: token {token.label} already holds a key labelled {rid} "
                "(retain keys are labelled with a registration ID no other batch uses)"
                for rid in clashes[:20]
            ]
            + ([f"... and {len(clashes) - 20} more"] if len(clashes) > 20 else [])
        )


def _open_batch(ctx: _Context) -> tuple[Journal, bool]:
    """The first side effect: create the batch whole, or reopen it (taking its lock).
    Returns the journal and whether the batch is resumed."""
    meta = journal_meta(ctx.manifest, ctx.station)
    devices = (
        (d.registration_id, d.device_id, {"tags": d.tags, "desired": d.desired})
        for d in ctx.manifest.devices()
    )
    requests: Iterable[RequestRow] = ()
    if ctx.station.custody.policy is Custody.DEVICE:
        requests = (
            (r.registration_id, r.der, r.csr_sha256, r.public_key_sha256)
            for r in batch_requests(ctx.manifest)
        )
    if Journal.exists(ctx.batch_dir):
        journal = Journal.open(ctx.batch_dir, create=True)
        if journal.planned():
            return journal, True
        # An older provline was killed while creating this batch: nothing was issued yet.
        journal.replan({**meta, LEDGER_META[0]: LEDGER_META[1]}, devices, requests)
        return journal, False
    journal = Journal.create_batch(
        ctx.batch_dir, {**meta, LEDGER_META[0]: LEDGER_META[1]}, devices, requests
    )
    return journal, False


def _start_events(run: _Run, resumed: bool) -> None:
    ctx, journal, audit = run.ctx, run.journal, run.audit
    if audit.seq == 0:
        fingerprints = {common_name(c): thumbprints(c).sha256 for c in ctx.chain.certs}
        audit.append(
            AuditEvent.BATCH_START,
            data={
                "batch_id": ctx.manifest.batch_id,
                "product": ctx.manifest.product,
                "manifest": ctx.manifest.path.name,
                "manifest_sha256": ctx.manifest.sha256,
                "station": ctx.station.name,
                "tool": f"provline {__version__}",
                "custody": ctx.station.custody.policy.value,
                "key_profile": ctx.manifest.key_profile.value,
                "devices": journal.total(),
                "ca_sha256": fingerprints,
                "host": os.uname().nodename,
                **ctx.run_facts(),
            },
        )
    if audit.torn_bytes:
        audit.append(AuditEvent.TORN_TAIL_REMOVED, data={"bytes": audit.torn_bytes})
    if resumed:
        settlement = _classify(run)
        audit.append(
            AuditEvent.RESUME,
            data={
                "devices": journal.counts(),
                "recovered": len(settlement.recovered),
                "voided": len(settlement.void),
                "released": len(settlement.released),
                "retrying_failed": journal.counts().get(DeviceState.FAILED, 0),
                "station": ctx.station.name,
                "tool": f"provline {__version__}",
                "host": os.uname().nodename,
                **ctx.run_facts(),
            },
        )
        _settle(run, settlement)
        audit.flush()
        journal.retry_failed()
        if journal.meta().get(LEDGER_META[0]) != LEDGER_META[1]:
            journal.set_meta(dict([LEDGER_META]))  # from now on, before the first intent
    audit.flush()
    if ctx.station.custody.policy is Custody.RETAIN:
        _remove_orphans(run)


def _remove_orphans(run: _Run) -> None:
    def logged(removed: dict[str, str]) -> None:  # durably logged before it is destroyed
        run.audit.append(AuditEvent.ORPHAN_REMOVED, data=removed)
        run.audit.flush()
        crash_point("logged.orphan")
        run.orphans.append(removed)
        run.progress.log(
            f"token cleanup: removed orphaned {removed['object']} key "
            f"{removed['label'] or '(no label)'} ({removed['why']})"
        )

    sweep = remove_orphans(
        run.ctx.token, run.journal.attempted_registration_ids(), before_destroy=logged
    )
    for kept in sweep.kept:  # debris provline cannot prove it made: reported, never touched
        run.audit.append(AuditEvent.ORPHAN_KEPT, data=kept)
    run.audit.flush()
    if sweep.kept:
        run.progress.log(
            f"token cleanup: left {len(sweep.kept)} key objects alone that provline did not "
            "make (listed in the audit log as orphan_kept)"
        )


# -------------------------------------------------------------------------------- settle
def _classify(run: _Run) -> Settlement:
    """How each open intent ends (:mod:`.settle`)."""
    token = run.ctx.token

    def key_present(reference: KeyReference) -> bool:
        if reference.custody is not Custody.RETAIN or reference.uri is None:
            return True
        uri = hsm.Pkcs11Uri.parse(reference.uri)
        try:
            token.find(ObjectClass.PRIVATE_KEY, label=uri.object, key_id=uri.id)
        except KeyNotFound:
            return False
        return True

    return classify(
        run.ctx.batch_dir,
        run.journal.dangling(),
        ledger_kept=run.journal.meta().get(LEDGER_META[0]) == LEDGER_META[1],
        key_present=key_present,
    )


def _discard_bundle(directory: Path, serial: str) -> None:
    """Remove the files a void serial left in its device directory (the device is issued
    again), so no one flashes a certificate that is to be revoked: device.json first, so a
    half-removed bundle is never taken for a complete one."""
    if not on_disk(directory, serial):
        return
    for name in BUNDLE_FILES:
        for path in (directory / name, directory / f".{name}{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)


def _settle(run: _Run, settlement: Settlement) -> None:
    """Close open intents: recovered bundles synced first; everything logged (synced), then
    committed; then the ledger is cleared (nothing is open any more, and no worker runs)."""
    if settlement:
        if settlement.recovered:
            sync_filesystem(run.ctx.batch_dir)
        custody = run.ctx.station.custody.policy
        run.audit.extend(
            [
                (AuditEvent.ISSUED, b.registration_id, _recovered_data(b, custody))
                for b in settlement.recovered
                if b.serial not in settlement.logged
            ]
            + [
                (AuditEvent.VOID, rid, {"serial": serial, "reason": "no durable bundle"})
                for rid, serial in settlement.void
            ]
            + [
                (AuditEvent.RELEASED, rid, {"serial": serial, "reason": "never reached a signer"})
                for rid, serial in settlement.released
            ]
        )
        run.audit.flush()
        crash_point("logged.settle")
        for rid, serial in settlement.void:
            _discard_bundle(run.ctx.batch_dir / rid, serial)
        run.journal.settle(
            settlement.void,
            settlement.released,
            VOID_REASON,
            RELEASED_REASON,
            recovered=settlement.recovered,
        )
        run.totals["recovered"] += len(settlement.recovered)
        run.totals["voided"] += len(settlement.void)
        run.totals["released"] += len(settlement.released)
    if settlement.recovered:
        run.progress.log(
            f"{len(settlement.recovered)} bundles a stopped run finished but never recorded "
            "are whole: recorded as issued"
        )
    if settlement.void:
        run.progress.log(
            f"{len(settlement.void)} serials may have been signed but have no complete bundle: "
            "void (listed in report.json for revocation); their devices are issued again"
        )
    if settlement.released:
        run.progress.log(
            f"{len(settlement.released)} reserved serials never reached a signer: released "
            "(nothing to revoke); their devices are issued again"
        )
    ledger.clear(run.ctx.batch_dir)


def _recovered_data(bundle: IssuedBundle, custody: Custody) -> dict[str, Any]:
    data = {**bundle.audit_data(), "recovered": True}
    if custody is Custody.RETAIN:
        del data["key_generated"]  # a retained key may have been made by an earlier run
    return data


# --------------------------------------------------------------------------------- issue
def _issue(run: _Run, workers: int, chunk_size: int) -> StageStats:
    journal, progress = run.journal, run.progress
    todo = journal.counts().get(DeviceState.PLANNED, 0)
    progress.start("issue", todo)
    started = time.monotonic()
    busy: dict[str, float] = {}  # worker seconds per step, as the workers report them
    if todo:
        crash_point("issue.start")
        _run_pool(run, workers, chunk_size, busy)
    progress.finish("issue")
    seconds = time.monotonic() - started
    done = run.totals["issued"] + run.totals["failed"]
    return StageStats(
        seconds=seconds,
        devices=done,
        workers=workers,
        devices_per_s=StageStats.rate(done, seconds),
        worker_seconds=busy,
    )


def _run_pool(run: _Run, workers: int, chunk_size: int, busy: dict[str, float]) -> None:
    with run.stop.deferred():  # workers start with SIGINT/SIGTERM ignored
        _hand_out(run, workers, chunk_size, busy)
    _settle(run, Settlement())  # nothing is open: clears the ledger


def _hand_out(run: _Run, workers: int, chunk_size: int, busy: dict[str, float]) -> None:
    """Hand chunks to ``workers`` processes, at most one waiting beyond those in work: a
    serial is reserved shortly before a signer takes it."""
    ctx = run.ctx
    spawn = multiprocessing.get_context("spawn")
    stop_workers = spawn.Event()
    job = IssueJob(
        str(ctx.station.path),
        str(ctx.batch_dir),
        ctx.manifest.batch_id,
        ctx.manifest.key_profile.value,
        ctx.manifest.validity_days,
        orchestrator_pid=os.getpid(),
    )
    # SoftHSM2 + python-pkcs11 keep ~0.4 KB per generated-and-destroyed session key
    # (measured); recycling workers keeps memory flat however large the batch.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=spawn,
        initializer=init_worker,
        initargs=(job, stop_workers),
        max_tasks_per_child=WORKER_CHUNKS,
    )
    inflight: dict[Future[ChunkResult], list[ChunkItem]] = {}
    chunks = run.journal.pending(chunk_size)

    def hand_one() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            items = _reserve(run, chunk)
            inflight[pool.submit(issue_chunk, items)] = items

    try:
        for _ in range(workers + 1):
            hand_one()
        while inflight:
            done, _ = wait(inflight, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                run.stop.check()
                hand_one()  # the next chunk first: a free worker never waits for bookkeeping
                _collect(run, inflight, future, busy)
            run.stop.check()
    except BaseException as exc:
        _wind_down(run, pool, inflight, stop_workers, busy, exc)
        raise
    pool.shutdown(wait=True)


def _reserve(run: _Run, chunk: list[PendingDevice]) -> list[ChunkItem]:
    """Journal (commit), then log (sync) the chunk's serials as intents."""
    items = [
        ChunkItem(d.registration_id, d.device_id, serial_hex(random_serial()), d.extra, d.retry)
        for d in chunk
    ]
    run.journal.record_intents([(i.registration_id, i.serial) for i in items])
    run.audit.extend([(AuditEvent.INTENT, i.registration_id, {"serial": i.serial}) for i in items])
    run.audit.flush()
    return items


def _collect(
    run: _Run,
    inflight: dict[Future[ChunkResult], list[ChunkItem]],
    future: Future[ChunkResult],
    busy: dict[str, float],
) -> None:
    """Log (sync), then commit, one chunk's outcome. The chunk leaves ``inflight`` once it is
    logged: if the log cannot be written it can be tried again; if the commit fails after
    the log, its open intents are settled as void (the log already says issued)."""
    try:
        result = future.result()
    except BrokenProcessPool as exc:
        raise ProvlineError(
            "a worker process died unexpectedly (killed, or out of memory)",
            rule="run the same command again to resume",
        ) from exc
    log_results(run, result)
    crash_point("logged.results")
    del inflight[future]
    commit_results(run, result)
    for key, value in result.seconds.items():
        busy[key] = busy.get(key, 0.0) + value


def log_results(run: _Run, result: ChunkResult) -> None:
    """Log (sync) the outcome of issued devices: one event per device, its key, its
    certificate and its durable bundle (or why it failed, and its serial's end)."""
    events: list[Event] = [
        (AuditEvent.ISSUED, item.registration_id, item.audit_data()) for item in result.issued
    ]
    for failed in result.not_issued:
        detail = {"serial": failed.serial, "reason": failed.reason}
        events.append(
            (
                AuditEvent.VOID if failed.signed else AuditEvent.UNUSED,
                failed.registration_id,
                detail,
            )
        )
        events.append((AuditEvent.FAILED, failed.registration_id, detail))
    events += [
        (AuditEvent.RELEASED, rid, {"serial": serial, "reason": "never reached a signer"})
        for rid, serial in result.unstarted
    ]
    run.audit.extend(events)
    run.audit.flush()


def commit_results(run: _Run, result: ChunkResult) -> None:
    """Commit what :func:`log_results` logged, and count it."""
    run.journal.record_results(result.issued, result.not_issued, result.unstarted, RELEASED_REASON)
    run.totals["issued"] += len(result.issued)
    run.totals["failed"] += len(result.not_issued)
    run.totals["released"] += len(result.unstarted)
    run.progress.advance("issue", len(result.issued) + len(result.not_issued))


def _wind_down(
    run: _Run,
    pool: ProcessPoolExecutor,
    inflight: dict[Future[ChunkResult], list[ChunkItem]],
    stop_workers: Any,
    busy: dict[str, float],
    cause: BaseException,
) -> None:
    """Stop the issue stage cleanly after ``cause``: workers finish the device in hand and
    report; chunks not yet started are cancelled; what finished is recorded and every open
    intent settled. Whatever cannot be recorded now (the disk is still full) stays open in
    the journal and the next run settles it."""
    run.progress.log(f"stopping: {_reason(cause)}; finishing the devices in hand")
    stop_workers.set()
    for future in inflight:
        future.cancel()
    running = [f for f in inflight if not f.cancelled()]
    _, stuck = wait(running, timeout=WIND_DOWN_SECONDS)
    if stuck:  # a worker hangs (in the HSM): kill it; the ledger settles its serials
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)
    if is_storage_error(cause):
        run.reserve.release()
    try:
        for future in list(inflight):
            if future.done() and not future.cancelled() and future.exception() is None:
                _collect(run, inflight, future, busy)
        _settle(run, _classify(run))
    except ProvlineError as exc:
        run.progress.log(f"could not record the stopped chunks ({exc.line()}); the next run will")


# ------------------------------------------------------------------------------ register
def _register_defaults(station: Station) -> RegisterOptions:
    return RegisterOptions(
        operations_per_minute=station.dps.operations_per_minute,
        concurrency=station.dps.concurrency,
        bulk_size=station.dps.bulk_size,
    )


def _register(run: _Run, options: RegisterOptions, stages: dict[str, StageStats]) -> StageStats:
    ctx, journal, audit, progress = run.ctx, run.journal, run.audit, run.progress
    crash_point("register.start")
    targets = load_targets(ctx.batch_dir, journal.registration_targets(options.replace))
    progress.start("register", len(targets))
    if not targets:
        progress.finish("register")
        return StageStats(seconds=0.0, devices=0)
    refresh = None
    if ctx.station.dps.emulator_dir is not None:
        config = ctx.station.dps

        def refresh() -> Endpoints:  # an emulator restarted on new ports is picked up
            return resolve(config)

    stage = Stage(
        ctx.manifest.registration,
        resolve(ctx.station.dps),
        options,
        ctx.issuer,
        ctx.chain.root,
        refresh=refresh,
        on_retry=lambda retries, error: progress.retrying("register", retries, error),
        should_stop=run.stop.requested,
    )

    def record(outcomes: list[RegistrationOutcome]) -> None:
        audit.extend(
            [(REGISTRATION_EVENTS[o.state], o.registration_id, o.detail()) for o in outcomes]
        )
        audit.flush()
        crash_point("logged.registration")
        journal.record_registration(outcomes)
        progress.advance("register", len(outcomes))

    stats = asyncio.run(run_stage(stage, targets, record))
    stages["register"] = stats
    run.stop.check()  # the stage returns early when a stop was asked for
    if stage.gave_up:
        progress.log(f"register: {stage.gave_up}")
    progress.finish("register")
    return stats


# -------------------------------------------------------------------- other issue stages
Run = _Run  # what an issue stage works with: context, journal, audit log, stop signals
IssueStage = Callable[[_Run], StageStats]


def settle_now(run: _Run) -> None:
    """Settle every open intent (:mod:`.settle`): for an issue stage that stops with a
    device in hand, before the run is sealed."""
    _settle(run, _classify(run))


# ---------------------------------------------------------------------------------- seal
def _seal(ctx: _Context, audit: AuditLog, progress: ProgressSink) -> bool:
    """Seal the log; raises the reason when it cannot (the run then does not exit 0)."""
    if ctx.audit_signer is None or ctx.station.audit is None:
        audit.append(AuditEvent.SEAL_SKIPPED, data={"reason": "the station has no audit key"})
        audit.flush()
        progress.log("audit log not sealed: the station config has no audit section")
        return False
    cert = load_cert(str(ctx.station.audit.cert))
    audit.sign_off(ctx.audit_signer, cert, list(ctx.chain.certs))
    return True
