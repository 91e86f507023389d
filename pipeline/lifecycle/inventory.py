"""The station inventory (docs/lifecycle.md): every certificate the station issued, of every
batch and every renewal, in one SQLite database indexed by serial, registration ID and SHA-1
/ SHA-256 thumbprint, with each device's lifecycle state (active or revoked, and how far it
was shut out of DPS and IoT Hub).

``provline run`` keeps it current (:func:`record_batch`, called once at the end of every run);
``provline inventory rebuild`` makes it again from sealed batch directories and the station
lifecycle log after both verify (:mod:`.rebuild`). Lifecycle operations (revoke, renew,
promote) keep their own journal in the same database, so an operation step and the
inventory change it makes commit in one transaction.

Every certificate with a key also records the SHA-256 of its SubjectPublicKeyInfo
(``public_key_sha256``, indexed): custody ``device`` refuses a CSR whose key the station has
already certified in another batch or renewal (a cloned or reused device key,
docs/device-keys.md). Inventories made before that column existed gain it when opened; the
keys of their certificates are read from the bundles once, on the first look-up
(:meth:`Inventory.keys_seen`).

The database is in WAL mode with synchronous=FULL: a committed step survives a crash.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from ..ca.certs import public_key_sha256
from ..config.station import Station
from ..errors import InputError
from ..layout import DEVICE_CERT
from ..vocabulary import CertificateStatus, DeviceState, RegistrationMode
from .paths import inventory_path

_ACTIVE = CertificateStatus.ACTIVE.value
_WITH_BUNDLE = frozenset(s.value for s in DeviceState if s.has_bundle)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,        -- upper-case hex, as the batch journal writes it
    registration_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,         -- the batch, or the renewal operation, that issued it
    station TEXT NOT NULL,
    issuer TEXT NOT NULL,           -- the issuing CA's key identifier (the leaf's AKI), hex
    sha1 TEXT,                      -- upper-case hex; NULL for a void serial
    sha256 TEXT,
    not_after TEXT,                 -- ISO 8601, UTC
    custody TEXT,
    key_profile TEXT,
    bundle TEXT,                    -- the bundle directory
    status TEXT NOT NULL,           -- active | staged | retired | revoked | void
    reason TEXT,                    -- RFC 5280 CRLReason name when on the CRL
    revoked_at TEXT,                -- CRL revocationDate, ISO 8601 UTC
    updated REAL NOT NULL,
    public_key_sha256 TEXT          -- hex, of the SubjectPublicKeyInfo; NULL for a void serial
);
CREATE INDEX IF NOT EXISTS certificates_rid ON certificates(registration_id);
CREATE INDEX IF NOT EXISTS certificates_sha1 ON certificates(sha1);
CREATE INDEX IF NOT EXISTS certificates_sha256 ON certificates(sha256);
CREATE INDEX IF NOT EXISTS certificates_batch ON certificates(batch_id);
CREATE INDEX IF NOT EXISTS certificates_status ON certificates(status, not_after);
CREATE TABLE IF NOT EXISTS devices (
    registration_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,         -- the latest batch that issued it a certificate
    station TEXT NOT NULL,
    mode TEXT NOT NULL,             -- none | individual | group | hub
    registration TEXT NOT NULL,     -- its batch state: registered, conflict, bundled, ...
    enrollment TEXT,                -- individual: enrollment id; group: enrollment group id
    hub_device_id TEXT,             -- the IoT Hub identity, once known
    state TEXT NOT NULL,            -- active | revoked
    reason TEXT,
    revoked_at TEXT,
    dps TEXT,                       -- shut out of DPS: disabled | blocked | absent | failed
    hub TEXT,                       -- shut out of IoT Hub: disabled | absent | failed
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_state ON devices(state);
CREATE TABLE IF NOT EXISTS crls (
    issuer TEXT PRIMARY KEY,        -- issuing CA key identifier, hex
    number INTEGER NOT NULL,        -- the last CRL Number reserved
    path TEXT,
    sha256 TEXT,
    entries INTEGER,
    this_update TEXT,
    next_update TEXT
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,             -- revoke | renew | promote | reconcile
    args TEXT NOT NULL,             -- JSON: what identifies "the same command"
    state TEXT NOT NULL,            -- open | done | incomplete
    phase TEXT NOT NULL,
    log_offset INTEGER NOT NULL,    -- byte offset of the lifecycle log when it started
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS op_items (
    op TEXT NOT NULL,
    registration_id TEXT NOT NULL,
    step TEXT NOT NULL,
    detail TEXT NOT NULL,           -- JSON
    PRIMARY KEY (op, registration_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS op_items_step ON op_items(op, step);
"""


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def normalise_hex(text: str) -> str:
    """Serials and thumbprints as a query gives them: upper-case hex, no separators. The
    inventory stores serials as the batch journal wrote them: an even number of digits
    (:func:`pipeline.serials.serial_hex`), or no leading zero from an older provline."""
    return text.replace(":", "").replace(" ", "").strip().upper()


def _even(digits: str) -> str:
    """Hex digits padded to an even count, as openssl prints a serial."""
    return digits if len(digits) % 2 == 0 else "0" + digits


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    registration_id: str
    device_id: str
    batch_id: str
    station: str
    issuer: str
    sha1: str | None
    sha256: str | None
    not_after: str | None
    custody: str | None
    key_profile: str | None
    bundle: str | None
    status: CertificateStatus
    reason: str | None = None
    revoked_at: str | None = None
    public_key_sha256: str | None = None  # recorded on insert; look-ups leave it out

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def cert_path(self) -> Path | None:
        return Path(self.bundle) / DEVICE_CERT if self.bundle else None


_CERT_COLUMNS = (
    "serial, registration_id, device_id, batch_id, station, issuer, sha1, sha256, not_after, "
    "custody, key_profile, bundle, status, reason, revoked_at"
)


def _cert(row: Sequence[Any]) -> CertificateRecord:
    values = list(row[:15])
    values[12] = CertificateStatus(values[12])
    return CertificateRecord(*values)


@dataclass(frozen=True)
class DeviceRecord:
    registration_id: str
    device_id: str
    batch_id: str
    station: str
    mode: RegistrationMode
    registration: str
    enrollment: str | None
    hub_device_id: str | None
    state: CertificateStatus  # ACTIVE or REVOKED
    reason: str | None = None
    revoked_at: str | None = None
    dps: str | None = None
    hub: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def revoked(self) -> bool:
        return self.state is CertificateStatus.REVOKED

    @property
    def expected_hub_device_id(self) -> str:
        """The IoT Hub identity DPS makes for it: an individual enrollment's deviceId, the
        certificate CN (= registration ID) in a group (docs/dps.md §1.6)."""
        if self.hub_device_id:
            return self.hub_device_id
        return self.registration_id if self.mode is RegistrationMode.GROUP else self.device_id


_DEVICE_COLUMNS = (
    "registration_id, device_id, batch_id, station, mode, registration, enrollment, "
    "hub_device_id, state, reason, revoked_at, dps, hub"
)


def _device(row: Sequence[Any]) -> DeviceRecord:
    values = list(row)
    values[4], values[8] = RegistrationMode(values[4]), CertificateStatus(values[8])
    return DeviceRecord(*values)


class JournalRows(Protocol):
    """What :func:`record_batch` reads of a batch journal (pipeline.batch.journal.Journal)."""

    def meta(self) -> dict[str, str]: ...

    def voids(self) -> list[dict[str, str]]: ...

    def inventory_rows(self) -> Iterator[tuple[str, str, str, str | None, str | None]]: ...


@dataclass(frozen=True)
class Found:
    """One answer of ``provline find``: a certificate and its device."""

    certificate: CertificateRecord
    device: DeviceRecord | None

    def to_json(self) -> dict[str, Any]:
        return {
            "certificate": self.certificate.to_json(),
            "device": self.device.to_json() if self.device else None,
        }


class Inventory:
    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.db = conn

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> Inventory:
        if not create and not path.exists():
            raise InputError(
                f"{path} does not exist (no batch recorded yet, or run "
                "`provline inventory rebuild`)",
                rule="a station inventory",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        _add_public_key_column(conn)
        return cls(path, conn)

    @classmethod
    def of(cls, station: Station, *, create: bool = True) -> Inventory:
        return cls.open(inventory_path(station), create=create)

    def close(self) -> None:
        self.db.close()

    def tx(self) -> Transaction:
        return Transaction(self.db)

    # -- batches ----------------------------------------------------------------------
    def add_batch(
        self,
        station: str,
        batch_dir: Path,
        meta: dict[str, str],
        rows: Iterable[tuple[str, str, str, str | None, str | None]],
        voids: Iterable[tuple[str, str]],
        issuer: str,
        chunk: int = 5000,
    ) -> int:
        """Upsert a batch's certificates and devices. Lifecycle state already recorded
        (revoked, retired, staged) is never undone by a batch. Returns certificates seen."""
        batch_id, custody = meta.get("batch_id", batch_dir.name), meta.get("custody")
        profile, mode = meta.get("key_profile"), meta.get("registration", "none")
        now = time.time()
        seen = 0
        certs: list[tuple[Any, ...]] = []
        devices: list[tuple[Any, ...]] = []

        def flush() -> None:
            with self.tx():
                self.db.executemany(
                    f"INSERT INTO certificates ({_CERT_COLUMNS}, updated, public_key_sha256) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,?,?) ON CONFLICT(serial) DO "
                    "UPDATE SET device_id=excluded.device_id, sha1=excluded.sha1, "
                    "sha256=excluded.sha256, not_after=excluded.not_after, "
                    "bundle=excluded.bundle, updated=excluded.updated, public_key_sha256="
                    "COALESCE(excluded.public_key_sha256, certificates.public_key_sha256)",
                    certs,
                )
                self.db.executemany(
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}, updated) VALUES "
                    "(?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,NULL,?) ON CONFLICT(registration_id) "
                    "DO UPDATE SET device_id=excluded.device_id, batch_id=excluded.batch_id, "
                    "station=excluded.station, mode=excluded.mode, "
                    "registration=excluded.registration, "
                    "enrollment=COALESCE(excluded.enrollment, devices.enrollment), "
                    "hub_device_id=COALESCE(excluded.hub_device_id, devices.hub_device_id), "
                    "updated=excluded.updated",
                    devices,
                )
            certs.clear()
            devices.clear()

        base = str(batch_dir)
        for rid, device_id, state, serial, detail_text in rows:
            if not serial or state not in _WITH_BUNDLE:
                continue
            detail = json.loads(detail_text or "{}")
            outcome = detail.get("registration", {})
            certs.append(
                (
                    serial,
                    rid,
                    device_id,
                    batch_id,
                    station,
                    issuer,
                    detail.get("sha1_thumbprint"),
                    detail.get("sha256_thumbprint"),
                    detail.get("not_after"),
                    custody,
                    profile,
                    f"{base}/{rid}",
                    _ACTIVE,
                    now,
                    detail.get("public_key_sha256"),
                )
            )
            devices.append(
                (
                    rid,
                    device_id,
                    batch_id,
                    station,
                    mode,
                    state,
                    outcome.get("enrollment") or outcome.get("group"),
                    outcome.get("device_id"),
                    _ACTIVE,
                    now,
                )
            )
            seen += 1
            if len(certs) >= chunk:
                flush()
        flush()
        stamp = utc_now()
        with self.tx():
            for rid, serial in voids:
                self.db.execute(
                    f"INSERT INTO certificates ({_CERT_COLUMNS}, updated) VALUES "
                    "(?,?,?,?,?,?,NULL,NULL,NULL,?,?,NULL,?,?,?,?) ON CONFLICT(serial) DO UPDATE "
                    "SET status = excluded.status, reason = excluded.reason, "
                    "revoked_at = excluded.revoked_at WHERE certificates.status = 'active'",
                    (
                        serial,
                        rid,
                        rid,
                        batch_id,
                        station,
                        issuer,
                        custody,
                        profile,
                        CertificateStatus.VOID.value,
                        "superseded",
                        stamp,
                        now,
                    ),
                )
                seen += 1
        return seen

    def add_certificate(self, record: CertificateRecord) -> None:
        """A certificate made after the factory (a renewal); idempotent."""
        self.db.execute(
            f"INSERT INTO certificates ({_CERT_COLUMNS}, updated, public_key_sha256) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(serial) DO NOTHING",
            (*astuple_cert(record), time.time(), record.public_key_sha256),
        )

    def add_certificates(self, records: Iterable[CertificateRecord]) -> None:
        """Bulk insert (benchmarks, rebuild); one transaction."""
        now = time.time()
        with self.tx():
            self.db.executemany(
                f"INSERT INTO certificates ({_CERT_COLUMNS}, updated, public_key_sha256) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(serial) DO NOTHING",
                ((*astuple_cert(r), now, r.public_key_sha256) for r in records),
            )

    # -- device keys ------------------------------------------------------------------
    def keys_seen(
        self, public_key_sha256s: Iterable[str], *, except_batch: str | None = None
    ) -> dict[str, tuple[str, str]]:
        """Which of these public keys (SHA-256 hex of the SubjectPublicKeyInfo) a certificate
        of this station already has, outside ``except_batch``: key -> (registration ID,
        batch or renewal operation). Custody ``device`` refuses such keys."""
        self._index_public_keys()
        wanted = sorted(set(public_key_sha256s))
        found: dict[str, tuple[str, str]] = {}
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            rows = self.db.execute(
                "SELECT public_key_sha256, registration_id, batch_id FROM certificates WHERE "
                f"public_key_sha256 IN ({','.join('?' * len(part))}) AND batch_id != ? "
                "ORDER BY updated",
                (*part, except_batch or ""),
            )
            for key, rid, batch in rows:
                found.setdefault(key, (rid, batch))
        return found

    def _index_public_keys(self) -> None:
        """Inventories recorded before ``public_key_sha256`` existed: read the keys of their
        certificates from the bundles, once (a meta row says it was done)."""
        if self.db.execute("SELECT 1 FROM meta WHERE key = ?", _KEYS_INDEXED).fetchone():
            return
        rows = self.db.execute(
            "SELECT serial, bundle FROM certificates WHERE public_key_sha256 IS NULL "
            "AND sha256 IS NOT NULL AND bundle IS NOT NULL"
        ).fetchall()
        found = []
        for serial, bundle in rows:
            try:
                cert = x509.load_pem_x509_certificate((Path(bundle) / DEVICE_CERT).read_bytes())
            except (OSError, ValueError):
                continue  # a bundle moved away: rebuild the inventory to index it
            found.append((public_key_sha256(cert), serial))
        with self.tx():
            self.db.executemany(
                "UPDATE certificates SET public_key_sha256 = ? WHERE serial = ?", found
            )
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", _KEYS_INDEXED)

    # -- looking up -------------------------------------------------------------------
    def find(self, query: str) -> list[Found]:
        """Certificates whose serial, SHA-1 or SHA-256 thumbprint is ``query``, or every
        certificate of the registration ID ``query``; each with its device."""
        text = query.strip()
        if not text:
            return []
        hexed = normalise_hex(text)
        rows = self.db.execute(
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial IN (?1, ?4) UNION "
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE sha1 = ?2 UNION "
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE sha256 = ?2 UNION "
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE registration_id = ?3",
            (hexed.lstrip("0") or "0", hexed, text.lower(), _even(hexed.lstrip("0") or "0")),
        ).fetchall()
        found = [_cert(r) for r in rows]
        return [Found(c, self.device(c.registration_id)) for c in found]

    def device(self, registration_id: str) -> DeviceRecord | None:
        row = self.db.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE registration_id = ?", (registration_id,)
        ).fetchone()
        return _device(row) if row else None

    def certificate(self, serial: str) -> CertificateRecord | None:
        row = self.db.execute(
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,)
        ).fetchone()
        return _cert(row) if row else None

    def by_thumbprint(self, sha256: str) -> CertificateRecord | None:
        row = self.db.execute(
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE sha256 = ?", (sha256.upper(),)
        ).fetchone()
        return _cert(row) if row else None

    def certificates_of(
        self, registration_id: str, statuses: tuple[CertificateStatus, ...] | None = None
    ) -> list[CertificateRecord]:
        sql = f"SELECT {_CERT_COLUMNS} FROM certificates WHERE registration_id = ?"
        args: list[Any] = [registration_id]
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += [s.value for s in statuses]
        return [_cert(r) for r in self.db.execute(sql + " ORDER BY updated, serial", args)]

    def devices_of_batch(self, batch_id: str) -> list[str]:
        return [
            rid
            for (rid,) in self.db.execute(
                "SELECT DISTINCT registration_id FROM certificates WHERE batch_id = ? "
                "AND sha256 IS NOT NULL ORDER BY registration_id",
                (batch_id,),
            )
        ]

    def devices(self, state: CertificateStatus | None = None) -> Iterator[DeviceRecord]:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices"
        rows = (
            self.db.execute(sql + " WHERE state = ? ORDER BY registration_id", (state.value,))
            if state
            else self.db.execute(sql + " ORDER BY registration_id")
        )
        for row in rows.fetchall():
            yield _device(row)

    def live_thumbprints(self, registration_id: str) -> set[str]:
        """SHA-256 thumbprints of the device's certificates that may be enrolled."""
        return {
            c.sha256
            for c in self.certificates_of(
                registration_id, (CertificateStatus.ACTIVE, CertificateStatus.STAGED)
            )
            if c.sha256
        }

    def expiring(self, before: str) -> list[tuple[CertificateRecord, bool]]:
        """Active certificates ending before ``before`` (ISO 8601), each with whether a
        renewal is already staged for its device."""
        rows = self.db.execute(
            f"SELECT {_CERT_COLUMNS}, EXISTS (SELECT 1 FROM certificates s WHERE "
            "s.registration_id = c.registration_id AND s.status = 'staged') "
            "FROM certificates c WHERE status = ? AND not_after < ? ORDER BY not_after, serial",
            (_ACTIVE, before),
        ).fetchall()
        return [(_cert(r[:15]), bool(r[15])) for r in rows]

    def on_crl(self, issuer: str) -> Iterator[tuple[str, str, str | None, str | None]]:
        """(serial, status, reason, revoked_at) of every serial the issuer's CRL lists."""
        marks = ",".join("?" * 3)
        yield from self.db.execute(
            f"SELECT serial, status, reason, revoked_at FROM certificates WHERE issuer = ? "
            f"AND status IN ({marks}) ORDER BY serial",
            (
                issuer,
                CertificateStatus.REVOKED.value,
                CertificateStatus.RETIRED.value,
                CertificateStatus.VOID.value,
            ),
        )

    def issuers(self) -> list[str]:
        return [i for (i,) in self.db.execute("SELECT DISTINCT issuer FROM certificates")]

    def counts(self) -> dict[str, Any]:
        return {
            "certificates": dict(
                self.db.execute("SELECT status, COUNT(*) FROM certificates GROUP BY status")
            ),
            "devices": dict(self.db.execute("SELECT state, COUNT(*) FROM devices GROUP BY state")),
            "batches": int(
                self.db.execute("SELECT COUNT(DISTINCT batch_id) FROM devices").fetchone()[0]
            ),
        }

    # -- lifecycle changes (called inside an operation's transaction) -------------------
    def set_certificate_status(
        self,
        serial: str,
        status: CertificateStatus,
        reason: str | None = None,
        at: str | None = None,
    ) -> None:
        self.db.execute(
            "UPDATE certificates SET status = ?, reason = ?, revoked_at = ?, updated = ? "
            "WHERE serial = ?",
            (status.value, reason, at, time.time(), serial),
        )

    def revoke_device(self, registration_id: str, reason: str, at: str) -> None:
        self.db.execute(
            "UPDATE devices SET state = ?, reason = ?, revoked_at = ?, updated = ? "
            "WHERE registration_id = ? AND state != ?",
            (
                CertificateStatus.REVOKED.value,
                reason,
                at,
                time.time(),
                registration_id,
                CertificateStatus.REVOKED.value,
            ),
        )

    def set_shut_out(
        self,
        registration_id: str,
        *,
        dps: str | None = None,
        hub: str | None = None,
        hub_device_id: str | None = None,
    ) -> None:
        self.db.execute(
            "UPDATE devices SET dps = COALESCE(?, dps), hub = COALESCE(?, hub), "
            "hub_device_id = COALESCE(?, hub_device_id), updated = ? WHERE registration_id = ?",
            (dps, hub, hub_device_id, time.time(), registration_id),
        )

    def reserve_crl_number(self, issuer: str) -> int:
        """The next CRL Number of ``issuer``, reserved durably before the CRL is signed, so
        a number is never used for two different CRLs (RFC 5280 §5.2.3)."""
        with self.tx():
            self.db.execute(
                "INSERT INTO crls (issuer, number) VALUES (?, 0) ON CONFLICT DO NOTHING",
                (issuer,),
            )
            self.db.execute("UPDATE crls SET number = number + 1 WHERE issuer = ?", (issuer,))
            return int(
                self.db.execute("SELECT number FROM crls WHERE issuer = ?", (issuer,)).fetchone()[0]
            )

    def record_crl(
        self,
        issuer: str,
        number: int,
        path: Path,
        sha256: str,
        entries: int,
        this_update: str,
        next_update: str,
    ) -> None:
        self.db.execute(
            "INSERT INTO crls (issuer, number, path, sha256, entries, this_update, next_update) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT(issuer) DO UPDATE SET "
            "number = MAX(crls.number, excluded.number), path = excluded.path, "
            "sha256 = excluded.sha256, entries = excluded.entries, "
            "this_update = excluded.this_update, next_update = excluded.next_update",
            (issuer, number, str(path), sha256, entries, this_update, next_update),
        )

    def crls(self) -> list[dict[str, Any]]:
        keys = ("issuer", "number", "path", "sha256", "entries", "this_update", "next_update")
        return [
            dict(zip(keys, row, strict=True))
            for row in self.db.execute(f"SELECT {', '.join(keys)} FROM crls ORDER BY issuer")
        ]


_KEYS_INDEXED = ("public_keys_indexed",)


def _add_public_key_column(conn: sqlite3.Connection) -> None:
    """Inventories made before the public-key index gain the column and its index."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(certificates)")}
    if "public_key_sha256" not in columns:
        conn.execute("ALTER TABLE certificates ADD COLUMN public_key_sha256 TEXT")
    elif not conn.execute("SELECT 1 FROM certificates LIMIT 1").fetchone():
        # A new inventory: nothing recorded without the column.
        conn.execute("INSERT OR IGNORE INTO meta VALUES (?, '1')", _KEYS_INDEXED)
    conn.execute(
        "CREATE INDEX IF NOT EXISTS certificates_public_key ON certificates(public_key_sha256)"
    )


def astuple_cert(r: CertificateRecord) -> tuple[Any, ...]:
    return (
        r.serial,
        r.registration_id,
        r.device_id,
        r.batch_id,
        r.station,
        r.issuer,
        r.sha1,
        r.sha256,
        r.not_after,
        r.custody,
        r.key_profile,
        r.bundle,
        r.status.value,
        r.reason,
        r.revoked_at,
    )


def issuer_key_id(cert: x509.Certificate) -> str:
    """The key identifier naming an issuing CA: the leaf's AKI, or the CA's own SKI."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            return ski.digest.hex().upper()
    except x509.ExtensionNotFound:
        pass
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise InputError("a certificate without an authority key identifier", rule="RFC 5280")
    return aki.key_identifier.hex().upper()


def record_batch(
    station: Station,
    batch_dir: Path,
    journal: JournalRows,
    log: Callable[[str], None] = print,
) -> None:
    """``provline run`` keeps the inventory current: at the end of every run (finished,
    aborted or resumed) the batch's certificates, voids and registration outcomes are
    upserted. A failure here never fails the batch: it is reported through ``log`` and
    ``provline inventory sync`` (or ``rebuild``) catches up."""
    try:
        meta = journal.meta()
        issuer = batch_issuer(station, batch_dir, journal)
        inventory = Inventory.of(station)
        try:
            inventory.add_batch(
                station.name,
                batch_dir,
                meta,
                journal.inventory_rows(),
                ((v["registration_id"], v["serial"]) for v in journal.voids()),
                issuer,
            )
        finally:
            inventory.close()
    except (sqlite3.Error, OSError, ValueError, InputError) as exc:
        log(
            f"station inventory not updated ({type(exc).__name__}: {exc}); "
            f"run `provline inventory sync {batch_dir} --station {station.path}`"
        )


def batch_issuer(station: Station, batch_dir: Path, journal: JournalRows) -> str:
    """The issuing CA of a batch, from one of its certificates (every leaf of a batch has
    the same issuer), or from the station chain when none was issued yet."""
    for rid, _, state, serial, _ in journal.inventory_rows():
        if serial and state in _WITH_BUNDLE:
            path = batch_dir / rid / DEVICE_CERT
            return issuer_key_id(x509.load_pem_x509_certificate(path.read_bytes()))
    from ..ca.chain import load_chain

    return issuer_key_id(load_chain(station).issuer)


class Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception); nests as a no-op."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self) -> None:
        self._outer = not self._db.in_transaction
        if self._outer:
            self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        if self._outer:
            self._db.execute("ROLLBACK" if kind else "COMMIT")
