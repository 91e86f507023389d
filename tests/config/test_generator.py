"""Manifest generators: the IDs they produce, and the linear duplicate checks."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.manifest import REGISTRATION_ID, Generator, _generated_by, load_manifest

_prefix = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


@given(prefix=_prefix, digits=st.integers(1, 8), start=st.integers(0, 50), count=st.integers(1, 40))
def test_generator_ids(prefix: str, digits: int, start: int, count: int) -> None:
    if len(str(start + count - 1)) > digits:
        return
    gen = Generator(prefix, digits, start, count)
    ids = list(gen.registration_ids())
    assert len(ids) == len(set(ids)) == count
    assert all(REGISTRATION_ID.match(i) and len(i) == len(prefix) + digits for i in ids)
    assert all(_generated_by(gen, i) for i in ids)
    assert not _generated_by(gen, f"{prefix}{start + count:0{digits}d}")


def test_a_generated_manifest_expands_lazily_in_order(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("batch_id: b\ngenerator: {prefix: s-, digits: 3, start: 7, count: 4}\n")
    manifest = load_manifest(path)
    assert [d.registration_id for d in manifest.devices()] == ["s-007", "s-008", "s-009", "s-010"]
