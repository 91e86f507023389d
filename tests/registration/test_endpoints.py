"""Connection strings and the shared access signatures made from them."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.emulator import sas
from pipeline.errors import InputError
from pipeline.registration.endpoints import ConnectionString

_host = st.from_regex(
    r"[a-z][a-z0-9-]{0,20}\.azure-devices(-provisioning)?\.net(:[0-9]{2,5})?", fullmatch=True
)
_policy = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True)
_key = st.binary(min_size=16, max_size=64).map(lambda b: base64.b64encode(b).decode())


@given(host=_host, policy=_policy, key=_key)
def test_parse_any_field_order_and_case(host: str, policy: str, key: str) -> None:
    text = f"sharedaccesskey={key};HostName={host};SharedAccessKeyName={policy}"
    assert ConnectionString.parse(text) == ConnectionString(host, policy, key)


@given(host=_host, policy=_policy, key=_key)
def test_tokens_verify_as_the_service_checks_them(host: str, policy: str, key: str) -> None:
    token = ConnectionString(host, policy, key).token(ttl=600)
    assert sas.verify(token, host, {policy: key}) == policy
    other = base64.b64encode(b"another key of sixteen bytes").decode()
    with pytest.raises(sas.SasError):
        sas.verify(token, host, {policy: other})


@pytest.mark.parametrize("text", ["", "HostName=h", "HostName=h;SharedAccessKeyName=p", "garbage"])
def test_missing_parts_are_named(text: str) -> None:
    with pytest.raises(InputError, match="has no"):
        ConnectionString.parse(text)
