"""RFC 7512 URIs: parsing, printing, and refusing what must never be in one."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import hsm
from pipeline.errors import InputError


def test_uri_round_trip_and_escaping() -> None:
    uri = hsm.Pkcs11Uri.parse(
        "pkcs11:token=station%2001;object=dev-7;id=%01%FF;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin"
    )
    assert (uri.token, uri.object, uri.id, uri.type) == (
        "station 01",
        "dev-7",
        b"\x01\xff",
        "private",
    )
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.pin_source == "file:/run/pin"
    assert hsm.Pkcs11Uri.parse(str(uri)) == uri
    assert (
        str(hsm.Pkcs11Uri(token="t", object="a;b", type="private"))
        == "pkcs11:token=t;object=a%3Bb;type=private"
    )


@pytest.mark.parametrize("text", ["pkcs11:token=t?pin-value=1234", "token=t", "pkcs11:type=bogus"])
def test_uri_rejects(text: str) -> None:
    with pytest.raises(InputError) as info:
        hsm.Pkcs11Uri.parse(text)
    assert "1234" not in info.value.line()


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(
    token=_text,
    label=_text,
    key_id=st.binary(min_size=1, max_size=20),
    kind=st.sampled_from(["private", "public", "secret-key"]),
    pin=st.sampled_from([None, "env:PIN", "file:/run/secrets/pin"]),
)
def test_uri_round_trips_any_label(
    token: str, label: str, key_id: bytes, kind: str, pin: str | None
) -> None:
    uri = hsm.Pkcs11Uri(token=token, object=label, id=key_id, type=kind, pin_source=pin)
    assert hsm.Pkcs11Uri.parse(str(uri)) == uri


@given(st.text(max_size=60))
def test_uri_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(InputError):  # refusing is fine; any other exception is not
        hsm.Pkcs11Uri.parse("pkcs11:" + text)
