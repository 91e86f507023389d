"""Journaled, resumable lifecycle operations (revoke, renew, promote).

An operation is a row in the inventory's ``operations`` table and one row per device in
``op_items`` (its next step and a JSON detail). Every step follows one rule:

    act (idempotent)  →  log the step's events (synced)  →  apply them to the inventory
                                                              in one transaction

and *applying* an event is a function of the event alone (:class:`Handlers`), written so that
applying an operation's events again, in order, changes nothing that is already applied.
So a kill at any line loses nothing and does nothing twice: on resume every event the log
holds for the operation since it started is applied again (the ones the database missed
take effect, the rest are no-ops), and the steps the log does not hold are done again —
idempotent acts against DPS and IoT Hub (disabling what is disabled is a no-op) or local
ones. The log is never written twice for one step.

Running the same command again resumes an unfinished operation; a different lifecycle
command is refused until it is finished (``--resume`` resumes it without its arguments).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..audit.log import Event
from ..batch.plan import check_operator
from ..config.station import Station
from ..errors import InputError
from ..vocabulary import AuditEvent
from .inventory import Inventory
from .log import StationLog, events_since
from .paths import inventory_path

OPEN, DONE, INCOMPLETE = "open", "done", "incomplete"
Handler = Callable[[Inventory, "Operation", str, dict[str, Any]], None]


@dataclass
class Operation:
    id: str
    kind: str
    args: dict[str, Any]
    state: str
    phase: str
    log_offset: int
    resumed: bool = False


def json_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as the operations table gives it back (lists, not tuples)."""
    loaded: dict[str, Any] = json.loads(json.dumps(args, sort_keys=True))
    return loaded


def new_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


class Lifecycle:
    """A lifecycle command's context: the station, its inventory and its open, locked log."""

    def __init__(
        self,
        station: Station,
        handlers: dict[AuditEvent, Handler],
        operator: str | None = None,
    ) -> None:
        self.station = station
        self.handlers = handlers
        self.operator = check_operator(station, operator)  # before the first side effect
        self.log = StationLog(station)
        try:
            self.inventory = Inventory.of(station)
        except BaseException:
            self.log.close()
            raise

    def close(self, note: Callable[[str], None] = print) -> bool:
        try:
            self.inventory.close()
        finally:
            sealed = self.log.close(note)
        return sealed

    # -- operations --------------------------------------------------------------------
    def open_operation(self) -> Operation | None:
        row = self.inventory.db.execute(
            "SELECT id, kind, args, state, phase, log_offset FROM operations WHERE state = ?",
            (OPEN,),
        ).fetchone()
        if row is None:
            return None
        return Operation(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def start(
        self,
        kind: str,
        args: dict[str, Any],
        items: Iterable[tuple[str, str, dict[str, Any]]],
        phase: str,
        *,
        resume: bool = False,
    ) -> Operation:
        """Resume the open operation when it is this command again (or ``resume``);
        otherwise journal a new one with ``items`` (registration id, first step, detail)."""
        current = self.open_operation()
        if current is not None:
            if current.kind == kind and (resume or current.args == json_args(args)):
                return self._resume(current)
            raise InputError(
                f"lifecycle operation {current.id} ({current.kind}) is unfinished",
                rule=f"finish it first: provline {current.kind} --resume --station "
                f"{self.station.path}",
            )
        if resume:
            raise InputError(f"no unfinished {kind} operation to resume", rule="--resume")
        op = Operation(new_id(kind), kind, args, OPEN, phase, self.log.offset())
        with self.inventory.tx():
            self.inventory.db.execute(
                "INSERT INTO operations (id, kind, args, state, phase, log_offset, created) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    op.id,
                    kind,
                    json.dumps(args, sort_keys=True),
                    OPEN,
                    phase,
                    op.log_offset,
                    time.time(),
                ),
            )
            self.inventory.db.executemany(
                "INSERT INTO op_items (op, registration_id, step, detail) VALUES (?,?,?,?)",
                ((op.id, rid, step, json.dumps(detail)) for rid, step, detail in items),
            )
        self.commit(op, [(AuditEvent.OPERATION_START, None, {"kind": kind, **args, **self._who()})])
        return op

    def _who(self) -> dict[str, str]:
        """Who runs this command, for its start or resume line (audit.require_operator)."""
        return {"operator": self.operator} if self.operator else {}

    def _resume(self, op: Operation) -> Operation:
        """Apply again every event the log holds for ``op`` (those the database missed take
        effect), then carry on from the database."""
        applied, started = 0, False
        with self.inventory.tx():
            for record in events_since(self.log.path, op.log_offset):
                data = record.get("data") or {}
                if data.get("op") != op.id:
                    continue
                event = AuditEvent(record["event"])
                started = started or event is AuditEvent.OPERATION_START
                self._apply(op, event, record.get("registration_id"), data)
                applied += 1
        phase = self.inventory.db.execute(
            "SELECT phase FROM operations WHERE id = ?", (op.id,)
        ).fetchone()[0]
        op.phase, op.resumed = phase, True
        events: list[Event] = []
        if not started:  # killed between journaling the operation and logging its start
            start = {"kind": op.kind, **op.args, **self._who()}
            events.append((AuditEvent.OPERATION_START, None, start))
        events.append((AuditEvent.RESUME, None, {"events_replayed": applied, **self._who()}))
        self.commit(op, events)
        return op

    def commit(self, op: Operation, events: list[Event]) -> None:
        """Log ``events`` (synced), then apply them to the inventory in one transaction."""
        tagged: list[Event] = [(e, rid, {**data, "op": op.id}) for e, rid, data in events]
        self.log.write(tagged)
        with self.inventory.tx():
            for event, rid, data in tagged:
                self._apply(op, event, rid, data)

    def _apply(
        self, op: Operation, event: AuditEvent, rid: str | None, data: dict[str, Any]
    ) -> None:
        handler = self.handlers.get(event)
        if handler is not None:
            handler(self.inventory, op, rid or "", data)

    def set_phase(self, op: Operation, phase: str) -> None:
        with self.inventory.tx():
            self.inventory.db.execute(
                "UPDATE operations SET phase = ? WHERE id = ?", (phase, op.id)
            )
        op.phase = phase

    def finish(self, op: Operation, summary: dict[str, Any]) -> str:
        state = INCOMPLETE if summary.get("failed") else DONE
        self.commit(op, [(AuditEvent.OPERATION_END, None, {"state": state, **summary})])
        with self.inventory.tx():
            self.inventory.db.execute(
                "UPDATE operations SET state = ?, finished = ? WHERE id = ?",
                (state, time.time(), op.id),
            )
        op.state = state
        return state

    # -- items ---------------------------------------------------------------------------
    def items(self, op: Operation, step: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (rid, json.loads(detail))
            for rid, detail in self.inventory.db.execute(
                "SELECT registration_id, detail FROM op_items WHERE op = ? AND step = ? "
                "ORDER BY registration_id",
                (op.id, step),
            )
        ]

    def step_counts(self, op: Operation) -> dict[str, int]:
        return dict(
            self.inventory.db.execute(
                "SELECT step, COUNT(*) FROM op_items WHERE op = ? GROUP BY step", (op.id,)
            )
        )


def item(inventory: Inventory, op: Operation, rid: str) -> tuple[str, dict[str, Any]] | None:
    row = inventory.db.execute(
        "SELECT step, detail FROM op_items WHERE op = ? AND registration_id = ?", (op.id, rid)
    ).fetchone()
    return (row[0], json.loads(row[1])) if row else None


def move(
    inventory: Inventory,
    op: Operation,
    rid: str,
    *,
    when: tuple[str, ...],
    to: str,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Move the item to step ``to`` if it is at one of ``when`` (merging ``detail``);
    returns whether it moved. What makes applying an event twice a no-op."""
    current = item(inventory, op, rid)
    if current is None or current[0] not in when:
        return False
    merged = {**current[1], **(detail or {})}
    inventory.db.execute(
        "UPDATE op_items SET step = ?, detail = ? WHERE op = ? AND registration_id = ?",
        (to, json.dumps(merged), op.id, rid),
    )
    return True


def update_detail(inventory: Inventory, op: Operation, rid: str, detail: dict[str, Any]) -> None:
    current = item(inventory, op, rid)
    if current is not None:
        inventory.db.execute(
            "UPDATE op_items SET detail = ? WHERE op = ? AND registration_id = ?",
            (json.dumps({**current[1], **detail}), op.id, rid),
        )


def resumes(station: Station, kind: str, args: dict[str, Any]) -> bool:
    """Whether this command is the unfinished operation again (same kind and arguments): then
    it resumes, without planning again from a state the operation already changed."""
    path = inventory_path(station)
    if not path.exists():
        return False
    inventory = Inventory.open(path)
    try:
        row = inventory.db.execute(
            "SELECT kind, args FROM operations WHERE state = ?", (OPEN,)
        ).fetchone()
    finally:
        inventory.close()
    return row is not None and row[0] == kind and json.loads(row[1]) == json_args(args)


def precheck(station: Station, kind: str, args: dict[str, Any], resume: bool) -> None:
    """Refuse, before any side effect, a command that cannot start now: another lifecycle
    operation is unfinished, or ``--resume`` with nothing to resume."""
    path = inventory_path(station)
    current = None
    if path.exists():
        inventory = Inventory.open(path)
        try:
            row = inventory.db.execute(
                "SELECT id, kind, args FROM operations WHERE state = ?", (OPEN,)
            ).fetchone()
        finally:
            inventory.close()
        current = (row[0], row[1], json.loads(row[2])) if row else None
    if current is None:
        if resume:
            raise InputError(f"no unfinished {kind} operation to resume", rule="--resume")
        return
    op_id, op_kind, op_args = current
    if op_kind == kind and (resume or op_args == json_args(args)):
        return
    raise InputError(
        f"lifecycle operation {op_id} ({op_kind}) is unfinished",
        rule=f"finish it first: provline {op_kind} --resume --station {station.path}",
    )
