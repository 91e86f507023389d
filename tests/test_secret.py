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
    name=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
        min_size=1,
        max_size=40,
    ),
)
def test_parse_round_trips(kind: str, name: str) -> None:
    ref = SecretRef.parse(f"{kind}:{name}")
    assert (ref.kind, ref.name) == (kind, name)
    assert SecretRef.parse(str(ref)) == ref


@given(st.text(min_size=1, max_size=40).filter(lambda t: not t.startswith(("env:", "file:"))))
def test_anything_else_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(InputError) as info:
        SecretRef.parse(text, where="hsm.pin")
    # The value may be the secret itself: the message is the same whatever it was.
    assert info.value.line() == (
        "hsm.pin: not a secret source: expected env:NAME or file:PATH (the value is not shown: "
        "it may be the secret itself) (secrets come from env vars or files)"
    )


def test_relative_files_are_relative_to_the_config(tmp_path: Path) -> None:
    ref = SecretRef.parse("file:secrets/pin", base=tmp_path)
    assert ref.name == str(tmp_path / "secrets" / "pin")


def test_read_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIT_PIN", "1234")
    assert SecretRef("env", "UNIT_PIN").read() == "1234"
    (tmp_path / "pin").write_text("5678\n")
    (tmp_path / "pin").chmod(0o600)
    assert SecretRef("file", str(tmp_path / "pin")).read() == "5678"
    monkeypatch.delenv("UNIT_PIN")
    assert SecretRef("env", "UNIT_PIN").problem() == "environment variable UNIT_PIN is not set"
    with pytest.raises(InputError, match="does not exist"):
        SecretRef("file", str(tmp_path / "missing")).read()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o622])
def test_a_secret_file_others_can_read_is_refused_like_ssh_does(tmp_path: Path, mode: int) -> None:
    pin = tmp_path / "pin"
    pin.write_text("5678\n")
    pin.chmod(mode)
    with pytest.raises(InputError) as info:
        SecretRef("file", str(pin)).read(where="station.yaml:4")
    assert f"accessible to group or others (mode {mode:04o}); chmod 600 it" in info.value.line()
    assert "5678" not in info.value.line()
    pin.chmod(0o400)
    assert SecretRef("file", str(pin)).read() == "5678"


def test_secret_files_that_are_not_small_regular_files(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    big.chmod(0o600)
    latin = tmp_path / "latin"
    latin.write_bytes(b"caf\xe9\n")
    latin.chmod(0o600)
    for path, why in (
        (tmp_path / "dir", "is not a regular file"),
        (Path("/dev/zero"), "is not a regular file"),
        (big, "is 65,537 bytes"),
        (latin, "is not UTF-8 text"),
    ):
        with pytest.raises(InputError, match=why):
            SecretRef("file", str(path)).read()
