"""Devices join an open batch one at a time (custody ``device``, docs/device-keys.md): the
modem flow, where each device makes its key and CSR on the programming fixture and the
station signs it there and then.

An *open lot* is a batch created without devices (:func:`open_lot`): its settings (key
profile, validity, registration mode, product) stand where a manifest's would, and the
journal records it as open. Devices join it in *sessions* (:func:`sign_session`): each
session is a run of the batch (pipeline.batch.orchestrator.run_batch) whose issue stage
serves requests instead of handing chunks to workers, so everything a run guarantees holds
per device:

1. the request is checked (pipeline.ca.csr; the key must be new to this batch and to the
   station inventory) before anything is recorded: a refused request changes nothing;
2. the device, its request and its serial are committed to the journal as an intent, then
   the intent is logged (synced), then the serial is marked in the signing ledger (synced);
3. the leaf is signed by the HSM-held issuing key and the bundle written and synced;
4. ``issued`` is logged (synced), then committed; the certificate is recorded in the
   station inventory (a lot open on another line refuses its key from now on); only then
   is the chain answered.

A kill anywhere is settled by the next session, like a resumed run: a whole bundle is
recovered, a serial that may have been signed is voided, one that never reached a signer is
released. A device asked for again gets its existing chain (same key) or is refused (another
key); one whose serial was voided or released is signed anew. A session ends at the end of
its requests: run_end and the seal are logged, the report written, the station inventory
updated. :func:`close_lot` closes the lot for good: devices a kill left without a
certificate are issued from the CSRs the journal kept, the lot is registered with DPS / IoT
Hub as a batch is, and sealed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

from ..ca.builders import build_leaf, random_serial
from ..ca.csr import check_request
from ..config.manifest import (
    BATCH_ID,
    BATCH_ID_RULE,
    MAX_PRODUCT,
    REGISTRATION_ID_RULE,
    Manifest,
    valid_registration_id,
)
from ..config.station import Station
from ..crashpoint import crash_point
from ..errors import (
    CAError,
    HsmError,
    InputError,
    ProvlineError,
    StorageError,
    ValidationFailed,
    shown,
)
from ..files import is_storage_error, storage_error, sync_filesystem
from ..keyprofile import KeyProfile
from ..layout import FULL_CHAIN
from ..lifecycle.inventory import Inventory, batch_issuer
from ..registration.stage import RegisterOptions
from ..serials import serial_hex
from ..stats import StageStats
from ..vocabulary import AuditEvent, Custody, RegistrationMode
from . import ledger
from .bundle import render_bundle, write_bundle
from .custody import device_key
from .journal import Journal
from .ledger import LedgerWriter
from .orchestrator import Run, RunResult, commit_results, log_results, run_batch, settle_now
from .progress import ProgressSink
from .records import IssuedBundle, NotIssued
from .worker import ChunkResult

LOT_META = "lot"  # journal meta: the lot's settings and state, JSON
NO_TWIN: dict[str, Any] = {"tags": {}, "desired": {}}
MAX_VALIDITY_DAYS = 36500


class LotState(StrEnum):
    OPEN = "open"  # devices may join
    CLOSED = "closed"  # `provline lot close` ran: no device joins any more


@dataclass(frozen=True)
class LotSettings:
    """What a manifest says of a batch, for a lot whose devices are not known in advance."""

    batch_id: str
    product: str = ""
    key_profile: KeyProfile = KeyProfile.EC_P256
    validity_days: int = 365
    registration: RegistrationMode = RegistrationMode.NONE

    def problems(self, station: Station) -> list[str]:
        problems = []
        if not BATCH_ID.fullmatch(self.batch_id):
            problems.append(f"--batch-id {shown(self.batch_id)}: not a batch id ({BATCH_ID_RULE})")
        if len(self.product) > MAX_PRODUCT:
            problems.append(f"--product is longer than {MAX_PRODUCT} (product names are short)")
        if not 1 <= self.validity_days <= MAX_VALIDITY_DAYS:
            problems.append(f"--validity-days {self.validity_days} is outside 1..36500 (validity)")
        if station.custody.policy is not Custody.DEVICE:
            problems.append(
                f"{station.where('custody.policy')}: custody is {station.custody.policy}: "
                "devices join a lot with their own CSR only in custody device "
                "(docs/device-keys.md)"
            )
        return problems

    def sha256(self) -> str:
        """Stands for the manifest's SHA-256: a session with other settings is refused."""
        text = json.dumps({"open_lot": 1, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, StrEnum) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LotSettings:
        return cls(
            batch_id=str(data["batch_id"]),
            product=str(data.get("product", "")),
            key_profile=KeyProfile(data["key_profile"]),
            validity_days=int(data["validity_days"]),
            registration=RegistrationMode(data["registration"]),
        )

    def manifest(self) -> Manifest:
        """The lot as the orchestrator reads a manifest: no device is listed in advance."""
        return Manifest(
            path=Path(f"open lot {self.batch_id}"),
            batch_id=self.batch_id,
            product=self.product,
            key_profile=self.key_profile,
            validity_days=self.validity_days,
            registration=self.registration,
            generators=(),
            sha256=self.sha256(),
        )


def _lot_meta(settings: LotSettings, state: LotState) -> dict[str, str]:
    return {LOT_META: json.dumps({"state": state.value, **settings.to_json()}, sort_keys=True)}


def read_lot(station: Station, batch_id: str) -> tuple[LotSettings, LotState]:
    """The settings and state of the open lot ``batch_id`` (read-only, no lock)."""
    batch_dir = station.output / batch_id
    if not BATCH_ID.fullmatch(batch_id):
        raise InputError(f"--batch-id {shown(batch_id)}: not a batch id", rule=BATCH_ID_RULE)
    if not Journal.exists(batch_dir):
        raise InputError(f"{batch_dir} has no open lot", rule="open it first: provline lot open")
    journal = Journal.open(batch_dir, create=False)
    try:
        meta = journal.meta()
    finally:
        journal.close()
    return _parse_lot(meta, batch_dir)


def _parse_lot(meta: dict[str, str], batch_dir: Path) -> tuple[LotSettings, LotState]:
    try:
        data = json.loads(meta[LOT_META])
        settings = LotSettings.from_json(data)
        state = LotState(data["state"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(
            f"{batch_dir} is a batch made from a manifest, not an open lot",
            rule="devices join lots opened with provline lot open",
        ) from exc
    if meta.get("manifest_sha256") != settings.sha256():
        raise InputError(f"{batch_dir}: the lot settings do not match its journal", rule="lots")
    return settings, state


# ------------------------------------------------------------------------------ the lot
def open_lot(
    station: Station,
    settings: LotSettings,
    progress: ProgressSink | None = None,
    operator: str | None = None,
) -> RunResult:
    """Create the open lot (or find it open already, with the same settings): its journal
    without devices, its log started and sealed, its report. Refused, before any side
    effect, for a station whose custody is not ``device`` and for settings the station
    cannot serve (the checks of `provline run`)."""
    problems = settings.problems(station)
    if problems:
        raise ValidationFailed(problems)
    batch_dir = station.output / settings.batch_id
    if Journal.exists(batch_dir):
        _, state = read_lot(station, settings.batch_id)
        if state is LotState.CLOSED:
            raise InputError(f"lot {settings.batch_id} is closed", rule="a closed lot stays closed")

    def mark_open(run: Run) -> StageStats:
        if LOT_META not in run.journal.meta():
            run.journal.set_meta(_lot_meta(settings, LotState.OPEN))
        return StageStats(seconds=0.0, devices=0)

    return run_batch(
        settings.manifest(),
        station,
        progress=progress,
        operator=operator,
        issue=mark_open,
        registration=False,
    )


def close_lot(
    station: Station,
    batch_id: str,
    *,
    progress: ProgressSink | None = None,
    workers: int | None = None,
    register: RegisterOptions | None = None,
    operator: str | None = None,
) -> RunResult:
    """Close the lot: from now on no device joins it. Devices a kill left without a
    certificate (their serial voided or released) are issued from the CSRs the journal
    kept, the lot is registered as its settings say, the log sealed, the report written.
    Run it again to retry a registration that failed."""
    settings, state = read_lot(station, batch_id)
    if state is LotState.OPEN:
        journal = Journal.open(station.output / batch_id, create=True)  # the batch lock
        try:
            journal.set_meta(_lot_meta(settings, LotState.CLOSED))
        finally:
            journal.close()
    return run_batch(
        settings.manifest(),
        station,
        progress=progress,
        workers=workers,
        register=register,
        operator=operator,
    )


# ------------------------------------------------------------------------------ sessions
@dataclass(frozen=True)
class SignRequest:
    """One device's request: its CSR (PEM or DER), and its registration ID when the CSR's
    CN does not say it. ``tag`` is the caller's, echoed in the answer."""

    csr: bytes
    registration_id: str | None = None
    tag: Any = None
    error: InputError | None = None  # why the caller's input is not a request (protocol)


@dataclass(frozen=True)
class Signed:
    """The answer to a request: the device's full chain (leaf, issuing CA, root, PEM)."""

    registration_id: str
    serial: str
    sha256_thumbprint: str
    chain_pem: bytes
    existing: bool = False  # the device was signed before: the same chain again
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "registration_id": self.registration_id,
            "serial": self.serial,
            "sha256_thumbprint": self.sha256_thumbprint,
            "existing": self.existing,
            "chain": self.chain_pem.decode(),
        }


# A request source is handed a "should I stop?" callable and yields requests until its
# input ends (or it should stop). An answer callback returns False when the caller is gone.
RequestSource = Callable[[Callable[[], bool]], Iterable[SignRequest]]
Answer = Callable[[SignRequest, Signed | ProvlineError], bool]


class DeviceFailed(CAError):
    """Signing one device failed after its serial was reserved (recorded, the session goes
    on)."""


def sign_session(
    station: Station,
    batch_id: str,
    requests: RequestSource,
    answer: Answer,
    progress: ProgressSink | None = None,
    operator: str | None = None,
) -> RunResult:
    """Serve ``requests`` into the open lot ``batch_id``, answering each in order. Refused
    requests (exit code 2 in their answer) change nothing; a device whose signing fails is
    recorded as failed (4) and the session goes on; an HSM or storage failure is answered
    (``fatal``), the device in hand settled, and the session stops as a run stops."""
    settings, state = read_lot(station, batch_id)
    if state is LotState.CLOSED:
        raise InputError(f"lot {batch_id} is closed", rule="no device joins a closed lot")
    stage = _SessionStage(settings, requests, answer)
    return run_batch(
        settings.manifest(),
        station,
        progress=progress,
        operator=operator,
        issue=stage,
        registration=False,
    )


@dataclass
class _SessionStage:
    settings: LotSettings
    requests: RequestSource
    answer: Answer
    done: int = 0

    def __call__(self, run: Run) -> StageStats:
        _, state = _parse_lot(run.journal.meta(), run.ctx.batch_dir)
        if state is LotState.CLOSED:  # closed after this session looked, before it locked
            raise InputError(f"lot {self.settings.batch_id} is closed", rule="closed lots")
        run.progress.start("issue", 0)
        started = time.monotonic()
        signer = _Signer(run, self.settings)
        try:
            for request in self.requests(run.stop.requested):
                if not self._serve(signer, request):
                    break  # the caller is gone: end the session
        finally:
            signer.close()
        run.progress.finish("issue")
        seconds = time.monotonic() - started
        run.stop.check()
        return StageStats(
            seconds=seconds, devices=self.done, devices_per_s=StageStats.rate(self.done, seconds)
        )

    def _serve(self, signer: _Signer, request: SignRequest) -> bool:
        outcome: Signed | ProvlineError
        try:
            outcome = signed = signer.sign(request)
            self.done += not signed.existing
        except (InputError, DeviceFailed) as exc:  # nothing changed, or recorded as failed
            outcome = exc
        except ProvlineError as exc:  # the token or the disk failed: settle, then stop
            self.answer(request, exc)
            signer.settle()
            raise
        except BaseException:
            signer.settle()
            raise
        return self.answer(request, outcome)


class _Signer:
    """Signs one device after another into the session's run."""

    def __init__(self, run: Run, settings: LotSettings) -> None:
        self.run = run
        self.settings = settings
        self.batch_dir = run.ctx.batch_dir
        self.ledger = LedgerWriter(self.batch_dir)
        self.inventory = Inventory.of(run.ctx.station)
        self.issuer: str | None = None  # the issuer's key id, as the inventory records it
        self.open_intent = False

    def close(self) -> None:
        self.ledger.close()
        self.inventory.close()
        if not self.open_intent:
            ledger.clear(self.batch_dir)  # nothing is open: no serial in it matters any more

    def settle(self) -> None:
        if self.open_intent:
            settle_now(self.run)
            self.open_intent = False

    def sign(self, request: SignRequest) -> Signed:
        started = time.perf_counter()
        if request.error is not None:
            raise request.error
        rid = request.registration_id
        if rid is not None and not valid_registration_id(rid):
            raise InputError(f"registration_id {shown(rid)} is invalid", rule=REGISTRATION_ID_RULE)
        checked = check_request(request.csr, rid, self.settings.key_profile)
        rid = checked.registration_id
        journal = self.run.journal
        known = journal.device_state(rid)
        if known is not None and known[0].has_bundle:
            return self._existing(rid, checked.public_key_sha256, known[1])
        owner = journal.key_owner(checked.public_key_sha256)
        if owner is not None and owner != rid:
            raise InputError(
                f"{rid}: its key is the key of {owner} in this batch",
                rule="one key per device: a cloned or reused device key is a manufacturing fault",
            )
        seen = self.inventory.keys_seen(
            [checked.public_key_sha256], except_batch=self.settings.batch_id
        )
        if seen:
            other, batch = seen[checked.public_key_sha256]
            raise InputError(
                f"{rid}: its key was certified for {other} in {batch}",
                rule="one key per device: a cloned or reused device key is a manufacturing fault",
            )
        row = (rid, checked.der, checked.csr_sha256, checked.public_key_sha256)
        serial = serial_hex(random_serial())
        journal.join(rid, rid, NO_TWIN, row, serial)
        self.open_intent = True
        self.run.audit.append(AuditEvent.INTENT, rid, {"serial": serial})
        self.run.audit.flush()
        self.ledger.mark([serial])
        crash_point("sign.marked")
        bundle = self._issue(rid, row, serial)
        result = ChunkResult(issued=[bundle])
        log_results(self.run, result)
        crash_point("logged.results")
        commit_results(self.run, result)
        self.open_intent = False
        self._record(rid, serial)
        chain = (self.batch_dir / rid / FULL_CHAIN).read_bytes()
        return Signed(
            rid,
            serial,
            bundle.thumbprints.sha256,
            chain,
            seconds=time.perf_counter() - started,
        )

    def _record(self, rid: str, serial: str) -> None:
        """The device's certificate goes into the station inventory at once, so a lot open
        on another line of this station refuses its key from now on, not only after this
        session ends. A failure here never fails the device: the end of the session
        (record_batch) and `provline inventory sync` catch up."""
        journal, station = self.run.journal, self.run.ctx.station
        try:
            known = journal.device_state(rid)
            if known is None:
                return
            if self.issuer is None:
                self.issuer = batch_issuer(station, self.batch_dir, journal)
            self.inventory.add_batch(
                station.name,
                self.batch_dir,
                journal.meta(),
                [(rid, rid, known[0].value, serial, known[1])],
                (),
                self.issuer,
            )
        except (sqlite3.Error, OSError, ValueError, InputError) as exc:
            self.run.progress.log(
                f"{rid}: station inventory not updated yet ({type(exc).__name__}: {exc}); "
                "the end of the session records it"
            )

    def _issue(self, rid: str, row: tuple[str, bytes, str, str], serial: str) -> IssuedBundle:
        """Sign and write one bundle, durably; a failure of this device alone is recorded
        (its serial void if it may have been signed) and raised as DeviceFailed."""
        key = device_key(row, self.settings.key_profile)
        issuer = self.run.ctx.issuer
        signed = False
        try:
            cert = build_leaf(
                key.public,
                rid,
                issuer,
                serial=int(serial, 16),
                validity_days=self.settings.validity_days,
            )
            signed = True
            bundle = write_bundle(
                self.batch_dir,
                render_bundle(
                    batch_id=self.settings.batch_id,
                    registration_id=rid,
                    device_id=rid,
                    cert=cert,
                    chain_pem=issuer.chain_pem,
                    private_files={},
                    key=key.reference,
                    extra=NO_TWIN,
                    key_generated=False,
                ),
            )
            sync_filesystem(self.batch_dir)
        except (HsmError, StorageError):
            raise
        except OSError as exc:
            if is_storage_error(exc):
                raise storage_error(exc, exc.filename or self.batch_dir) from exc
            self._failed(rid, serial, signed, exc)
        except Exception as exc:  # this device failed; the session goes on
            self._failed(rid, serial, signed, exc)
        return bundle

    def _failed(self, rid: str, serial: str, signed: bool, exc: Exception) -> NoReturn:
        reason = f"{type(exc).__name__}: {exc}"
        result = ChunkResult(not_issued=[NotIssued(rid, serial, signed, reason)])
        log_results(self.run, result)
        commit_results(self.run, result)
        self.open_intent = False
        raise DeviceFailed(f"{rid}: signing failed: {reason}", rule="the device may try again")

    def _existing(self, rid: str, key_sha256: str, detail_text: str | None) -> Signed:
        """A device asked for again: its chain if it is the same key, refused otherwise."""
        row = self.run.journal.request(rid)
        if row is None or row[3] != key_sha256:
            raise InputError(
                f"{rid} has a certificate in lot {self.settings.batch_id} for another key",
                rule="one device, one key: revoke it and use a new registration ID",
            )
        detail = json.loads(detail_text or "{}")
        chain = (self.batch_dir / rid / FULL_CHAIN).read_bytes()
        if hashlib.sha256(chain).hexdigest() != detail.get("files", {}).get(FULL_CHAIN):
            raise CAError(
                f"{rid}: {FULL_CHAIN} differs from what the journal recorded",
                where=str(self.batch_dir / rid),
                rule="bundles match the log",
            )
        return Signed(rid, detail["serial"], detail["sha256_thumbprint"], chain, existing=True)


def one_request(request: SignRequest) -> RequestSource:
    """A source of exactly one request (``provline sign`` without ``--serve``)."""

    def source(should_stop: Callable[[], bool]) -> Iterator[SignRequest]:
        yield request

    return source
