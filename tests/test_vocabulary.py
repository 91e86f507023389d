"""One vocabulary: registration outcomes are states in the journal and events in the log."""

from __future__ import annotations

from pipeline.vocabulary import (
    REGISTRATION_EVENTS,
    REGISTRATION_STATES,
    AuditEvent,
    DeviceState,
)


def test_registration_states_and_events_map_both_ways() -> None:
    assert {REGISTRATION_STATES[e] for e in REGISTRATION_EVENTS.values()} == set(
        REGISTRATION_EVENTS
    )
    # the values written to journals and logs before this vocabulary existed
    assert REGISTRATION_EVENTS[DeviceState.REGISTER_FAILED] == "registration_failed"
    assert AuditEvent.REGISTRATION_CONFLICT == "registration_conflict"


def test_which_states_have_a_bundle() -> None:
    with_bundle = {s for s in DeviceState if s.has_bundle}
    assert with_bundle == {
        DeviceState.BUNDLED,
        DeviceState.REGISTERED,
        DeviceState.CONFLICT,
        DeviceState.REGISTER_FAILED,
    }
