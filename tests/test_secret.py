"""Secret sources: ``env:NAME`` and ``file:PATH``, never the secret itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import InputError
from pipeline.secret import SecretRef


@given(
    kind=st.sampled_from(["env", "file"]),
    name=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
)
def test_parse_round_trips(kind: str, name: str) -> None:
    ref = SecretRef.parse(f"{kind}:{name}")
    assert (ref.kind, ref.name) == (kind, name)
    assert SecretRef.parse(str(ref)) == ref


@given(st.text(max_size=40).filter(lambda t: not t.startswith(("env:", "file:"))))
def test_anything_else_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(InputError):
        SecretRef.parse(text)


def test_relative_files_are_relative_to_the_config(tmp_path: Path) -> None:
    ref = SecretRef.parse("file:secrets/pin", base=tmp_path)
    assert ref.name == str(tmp_path / "secrets" / "pin")


def test_read_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIT_PIN", "1234")
    assert SecretRef("env", "UNIT_PIN").read() == "1234"
    (tmp_path / "pin").write_text("5678\n")
    assert SecretRef("file", str(tmp_path / "pin")).read() == "5678"
    monkeypatch.delenv("UNIT_PIN")
    assert SecretRef("env", "UNIT_PIN").problem() == "environment variable UNIT_PIN is not set"
    with pytest.raises(InputError, match="does not exist"):
        SecretRef("file", str(tmp_path / "missing")).read()
