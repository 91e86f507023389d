"""The batch orchestrator: plan → keys/issue/bundle (worker processes) → register → seal.

Ordering rules that make a kill at any line safe to resume:

* Every check runs before the first side effect (:func:`_plan`).
* A chunk's serials are committed to the journal as intents, then logged to the audit log
  (synced), and only then handed to a worker to sign: the audit log never holds an intent the
  journal lacks, and nothing is signed that neither knows.
* A worker syncs the chunk's bundles before it reports them; the orchestrator logs the
  results (synced) before it commits them to the journal: the journal never claims a bundle
  the audit log lacks.
* On resume, intents without a durable bundle are voided (listed for revocation) and their
  devices issued again with new serials.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pkcs11 import ObjectClass

from .. import __version__, hsm
from ..audit.log import AuditLog, Event
from ..ca.builders import Issuer, random_serial
from ..ca.certs import common_name, load_cert, require_key_matches, thumbprints
from ..ca.chain import Chain
from ..config.manifest import Manifest
from ..config.station import Station
from ..errors import CAError, InputError, ProvlineError, ValidationFailed
from ..layout import AUDIT_LOG
from ..lifecycle.inventory import record_batch
from ..registration.endpoints import resolve
from ..registration.stage import RegisterOptions, Stage, run_stage
from ..registration.target import RegistrationOutcome, load_targets
from ..stats import StageStats
from ..vocabulary import REGISTRATION_EVENTS, AuditEvent, Custody, DeviceState, RegistrationMode
from .capability import require_station_capabilities
from .custody import remove_orphans, warn_pkcs8
from .journal import Journal
from .plan import check_inputs
from .progress import ProgressSink, Silent
from .report import Report, build_report, write_report
from .signing import find_transport_key, open_signer, open_station_keys
from .worker import ChunkItem, ChunkResult, IssueJob, init_worker, issue_chunk

WORKER_CHUNKS = 100  # chunks a worker process issues before it is replaced
VOID_REASON = "no durable bundle when the previous run stopped"


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


def run_batch(
    manifest: Manifest,
    station: Station,
    *,
    progress: ProgressSink | None = None,
    workers: int | None = None,
    chunk_size: int | None = None,
    register: RegisterOptions | None = None,
) -> RunResult:
    """Run (or resume) the batch ``manifest`` on ``station``. Raises a ProvlineError for bad
    input before any side effect; returns the report otherwise."""
    progress = progress or Silent()
    clock = time.monotonic()
    ctx = _plan(manifest, station)
    journal, resumed = _open_journal(ctx)
    stages: dict[str, StageStats] = {"plan": StageStats(seconds=time.monotonic() - clock)}
    audit = AuditLog(ctx.batch_dir / AUDIT_LOG)
    totals = {"issued": 0, "failed": 0}
    aborted: str | None = None
    try:
        _start_events(ctx, journal, audit, resumed, progress)
        if station.custody.policy is Custody.PKCS8:
            warn_pkcs8()
        stages["issue"] = _issue(
            ctx,
            journal,
            audit,
            progress,
            totals,
            workers or station.workers,
            chunk_size or station.chunk_size,
        )
        if manifest.registration is not RegistrationMode.NONE:
            stages["register"] = _register(
                ctx, journal, audit, progress, register or _register_defaults(station)
            )
    except BaseException as exc:
        aborted = exc.line() if isinstance(exc, ProvlineError) else f"{type(exc).__name__}: {exc}"
        audit.append(AuditEvent.ABORTED, data={"reason": aborted})
        raise
    finally:
        audit.append(
            AuditEvent.RUN_END,
            data={"devices": journal.counts(), "serials": journal.serial_counts(), **totals},
        )
        clock = time.monotonic()
        sealed = _seal(ctx, audit, progress)
        stages["seal"] = StageStats(seconds=time.monotonic() - clock, sealed=sealed)
        audit.close()
        stages["audit"] = StageStats(seconds=audit.seconds)
        report = build_report(
            ctx.manifest,
            ctx.station,
            journal,
            stages,
            resumed=resumed,
            this_run=totals,
            aborted=aborted,
        )
        write_report(ctx.batch_dir, report)
        record_batch(ctx.station, ctx.batch_dir, journal, progress.log)  # station inventory
        journal.close()
        progress.close()
    return RunResult(ctx.batch_dir, report)


# ---------------------------------------------------------------------------------- plan
def _plan(manifest: Manifest, station: Station) -> _Context:
    """Every check before the first side effect: inputs, HSM, issuer, keys, journal."""
    chain = check_inputs(manifest, station)
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
    if Journal.exists(batch_dir):
        _check_journal(Journal.open(batch_dir, create=False), manifest, station)
    else:
        if batch_dir.exists() and any(batch_dir.iterdir()):
            raise InputError(
                f"{batch_dir} exists, is not empty and has no journal",
                rule="a new batch starts in an empty directory",
            )
        if station.custody.policy is Custody.RETAIN:
            _check_no_labels_taken(keys.token, manifest)
    return _Context(manifest, station, chain, batch_dir, keys.token, keys.issuer, audit_signer)


def _journal_meta(manifest: Manifest, station: Station) -> dict[str, str]:
    return {
        "batch_id": manifest.batch_id,
        "manifest_sha256": manifest.sha256,
        "station": station.name,
        "custody": station.custody.policy.value,
        "key_profile": manifest.key_profile.value,
        "validity_days": str(manifest.validity_days),
        "registration": manifest.registration.value,
    }


def _check_journal(journal: Journal, manifest: Manifest, station: Station) -> None:
    """A resumed batch must be the same batch: same manifest, station, custody, profile."""
    recorded = journal.meta()
    journal.close()
    wanted = _journal_meta(manifest, station)
    problems = [
        f"{manifest.path}: {key} is {wanted[key]!r} but batch {manifest.batch_id} was started "
        f"with {recorded.get(key)!r} (a resumed batch keeps its inputs)"
        for key in wanted
        if recorded.get(key) != wanted[key]
    ]
    if problems:
        raise ValidationFailed(problems)


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


def _open_journal(ctx: _Context) -> tuple[Journal, bool]:
    """The first side effect: create (or reopen) the batch directory and its journal."""
    resumed = Journal.exists(ctx.batch_dir)
    ctx.batch_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal.open(ctx.batch_dir, create=True)
    if journal.meta().get("planned") != "complete":
        journal.discard_plan()  # a crash while planning: nothing was issued yet
        journal.set_meta(_journal_meta(ctx.manifest, ctx.station))
        journal.plan(
            (d.registration_id, d.device_id, {"tags": d.tags, "desired": d.desired})
            for d in ctx.manifest.devices()
        )
    return journal, resumed


def _start_events(
    ctx: _Context, journal: Journal, audit: AuditLog, resumed: bool, progress: ProgressSink
) -> None:
    fingerprints = {common_name(c): thumbprints(c).sha256 for c in ctx.chain.certs}
    if audit.torn_bytes:
        audit.append(AuditEvent.TORN_TAIL_REMOVED, data={"bytes": audit.torn_bytes})
    if not resumed or audit.seq == 0:
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
            },
        )
    if resumed:
        voided = journal.void_dangling(VOID_REASON)
        retried = journal.retry_failed()
        audit.append(
            AuditEvent.RESUME,
            data={"devices": journal.counts(), "voided": len(voided), "retrying_failed": retried},
        )
        for rid, serial in voided:
            audit.append(AuditEvent.VOID, rid, {"serial": serial, "reason": "no durable bundle"})
        if voided:
            progress.log(
                f"resume: {len(voided)} serials without a durable bundle voided "
                "(listed in report.json for revocation)"
            )
    if ctx.station.custody.policy is Custody.RETAIN:
        sweep = remove_orphans(ctx.token, journal.attempted_registration_ids())
        for removed in sweep.removed:
            audit.append(AuditEvent.ORPHAN_REMOVED, data=removed)
        for kept in sweep.kept:
            audit.append(AuditEvent.ORPHAN_KEPT, data=kept)
    audit.flush()


# --------------------------------------------------------------------------------- issue
def _issue(
    ctx: _Context,
    journal: Journal,
    audit: AuditLog,
    progress: ProgressSink,
    totals: dict[str, int],
    workers: int,
    chunk_size: int,
) -> StageStats:
    todo = journal.counts().get(DeviceState.PLANNED, 0)
    progress.start("issue", todo)
    started = time.monotonic()
    busy: dict[str, float] = {}  # worker seconds per step, as the workers report them
    job = IssueJob(
        str(ctx.station.path),
        str(ctx.batch_dir),
        ctx.manifest.batch_id,
        ctx.manifest.key_profile.value,
        ctx.manifest.validity_days,
    )

    def collect(future: Future[ChunkResult]) -> None:
        result = future.result()
        # One event per device: its key, its certificate and its durable bundle.
        events: list[Event] = [
            (AuditEvent.ISSUED, item.registration_id, item.audit_data()) for item in result.issued
        ]
        for failed in result.not_issued:
            events.append(
                (
                    AuditEvent.VOID if failed.signed else AuditEvent.UNUSED,
                    failed.registration_id,
                    {"serial": failed.serial, "reason": failed.reason},
                )
            )
            events.append(
                (
                    AuditEvent.FAILED,
                    failed.registration_id,
                    {"serial": failed.serial, "reason": failed.reason},
                )
            )
        audit.extend(events)
        audit.flush()
        journal.record_results(result.issued, result.not_issued)
        for key, value in result.seconds.items():
            busy[key] = busy.get(key, 0.0) + value
        totals["issued"] += len(result.issued)
        totals["failed"] += len(result.not_issued)
        progress.advance("issue", len(result.issued) + len(result.not_issued))

    if todo:
        spawn = multiprocessing.get_context("spawn")
        # SoftHSM2 + python-pkcs11 keep ~0.4 KB per generated-and-destroyed session key
        # (measured); recycling workers keeps memory flat however large the batch.
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=spawn,
            initializer=init_worker,
            initargs=(job,),
            max_tasks_per_child=WORKER_CHUNKS,
        ) as pool:
            inflight: deque[Future[ChunkResult]] = deque()
            for chunk in journal.pending(chunk_size):
                items = [
                    ChunkItem(
                        d.registration_id,
                        d.device_id,
                        format(random_serial(), "X"),
                        d.extra,
                        d.retry,
                    )
                    for d in chunk
                ]
                journal.record_intents([(i.registration_id, i.serial) for i in items])
                audit.extend(
                    [(AuditEvent.INTENT, i.registration_id, {"serial": i.serial}) for i in items]
                )
                audit.flush()
                inflight.append(pool.submit(issue_chunk, items))
                while len(inflight) >= 2 * workers:
                    collect(inflight.popleft())
            while inflight:
                collect(inflight.popleft())
    progress.finish("issue")
    seconds = time.monotonic() - started
    done = totals["issued"] + totals["failed"]
    return StageStats(
        seconds=seconds,
        devices=done,
        workers=workers,
        devices_per_s=StageStats.rate(done, seconds),
        worker_seconds=busy,
    )


# ------------------------------------------------------------------------------ register
def _register_defaults(station: Station) -> RegisterOptions:
    return RegisterOptions(
        operations_per_minute=station.dps.operations_per_minute,
        concurrency=station.dps.concurrency,
        bulk_size=station.dps.bulk_size,
    )


def _register(
    ctx: _Context,
    journal: Journal,
    audit: AuditLog,
    progress: ProgressSink,
    options: RegisterOptions,
) -> StageStats:
    targets = load_targets(ctx.batch_dir, journal.registration_targets(options.replace))
    progress.start("register", len(targets))
    if not targets:
        progress.finish("register")
        return StageStats(seconds=0.0, devices=0)
    stage = Stage(
        ctx.manifest.registration, resolve(ctx.station.dps), options, ctx.issuer, ctx.chain.root
    )

    def record(outcomes: list[RegistrationOutcome]) -> None:
        audit.extend(
            [(REGISTRATION_EVENTS[o.state], o.registration_id, o.detail()) for o in outcomes]
        )
        audit.flush()
        journal.record_registration(outcomes)
        progress.advance("register", len(outcomes))

    stats = asyncio.run(run_stage(stage, targets, record))
    progress.finish("register")
    return stats


# ---------------------------------------------------------------------------------- seal
def _seal(ctx: _Context, audit: AuditLog, progress: ProgressSink) -> bool:
    if ctx.audit_signer is None or ctx.station.audit is None:
        audit.append(AuditEvent.SEAL_SKIPPED, data={"reason": "the station has no audit key"})
        audit.flush()
        progress.log("audit log not sealed: the station config has no audit section")
        return False
    cert = load_cert(str(ctx.station.audit.cert))
    audit.append(
        AuditEvent.SEAL,
        data={"signer": cert.subject.rfc4514_string(), "signer_sha256": thumbprints(cert).sha256},
    )
    try:
        audit.seal(ctx.audit_signer, cert, list(ctx.chain.certs))
    except ProvlineError as exc:  # e.g. the token went away; the log itself is synced
        progress.log(f"audit log not sealed: {exc.line()}")
        return False
    return True
