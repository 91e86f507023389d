"""The batch journal's requests table (custody device): one key per device, a device's
request replaced by its own newer one, never another device's request deleted by a clash.
Files only: a real SQLite journal in a temporary batch directory, no HSM."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipeline.batch.journal import Journal, RequestRow
from pipeline.errors import InputError
from pipeline.vocabulary import DeviceState


def _row(rid: str, key: str, csr: bytes = b"csr") -> RequestRow:
    return (rid, csr + rid.encode(), f"csr-{rid}-{key}", key)


def _batch(tmp: Path, requests: list[RequestRow]) -> Journal:
    devices = [(rid, rid, {}) for rid, *_ in requests]
    return Journal.create_batch(tmp / "out" / "b", {"batch_id": "b"}, devices, requests)


def test_requests_are_recorded_and_a_key_names_its_device(tmp_path: Path) -> None:
    journal = _batch(tmp_path, [_row("a", "k1"), _row("b", "k2")])
    try:
        assert journal.request("a") == _row("a", "k1")
        assert journal.key_owner("k2") == "b"
        assert journal.key_owner("k3") is None
        assert journal.request("c") is None
    finally:
        journal.close()


def test_a_device_replaces_its_own_request(tmp_path: Path) -> None:
    journal = _batch(tmp_path, [_row("a", "k1"), _row("b", "k2")])
    try:
        assert journal.add_requests([_row("a", "k9", b"new")]) == 1
        assert journal.request("a") == _row("a", "k9", b"new")
        assert journal.key_owner("k1") is None
        assert journal.key_owner("k9") == "a"
    finally:
        journal.close()


def test_a_key_of_another_device_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    journal = _batch(tmp_path, [_row("a", "k1"), _row("b", "k2")])
    try:
        with pytest.raises(InputError, match="another device's in this batch"):
            journal.add_requests([_row("a", "k2")])
        # INSERT OR REPLACE would have deleted b's request to make room for a's
        assert journal.request("a") == _row("a", "k1")
        assert journal.request("b") == _row("b", "k2")
    finally:
        journal.close()


def test_joining_with_another_devices_key_leaves_the_journal_as_it_was(tmp_path: Path) -> None:
    journal = _batch(tmp_path, [_row("a", "k1")])
    try:
        journal.join("c", "c", {}, _row("c", "k3"), "0A")
        assert journal.device_state("c") == (DeviceState.INTENT, None)
        with pytest.raises(sqlite3.IntegrityError):  # sign.py checks the key first
            journal.join("d", "d", {}, _row("d", "k1"), "0B")
        assert journal.device_state("d") is None
        assert journal.request("a") == _row("a", "k1")
        assert journal.serial_counts() == {"intent": 1}
    finally:
        journal.close()


def test_a_device_planned_again_after_a_void_joins_again(tmp_path: Path) -> None:
    """A kill voided the device's serial: it asks again with the same key and rejoins with a
    new serial, keeping its place (a regression: its row was inserted a second time)."""
    journal = _batch(tmp_path, [_row("a", "k1")])
    try:
        journal.join("c", "c", {}, _row("c", "k3"), "0A")
        journal.settle([("c", "0A")], [], "killed", "never signed")
        assert journal.device_state("c") == (DeviceState.PLANNED, None)
        journal.join("c", "c", {}, _row("c", "k3"), "0B")
        assert journal.device_state("c") == (DeviceState.INTENT, None)
        assert journal.total() == 2
        assert journal.serial_counts() == {"intent": 1, "void": 1}
    finally:
        journal.close()


def test_a_discarded_plan_forgets_its_requests(tmp_path: Path) -> None:
    journal = _batch(tmp_path, [_row("a", "k1"), _row("b", "k2")])
    try:
        journal.replan({"batch_id": "b"}, [("b", "b", {}), ("a", "a", {})], [_row("b", "k1")])
        assert journal.request("a") is None
        assert journal.key_owner("k1") == "b"
        assert journal.total() == 2
    finally:
        journal.close()
