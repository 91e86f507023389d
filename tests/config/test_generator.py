"""Manifest generators: the IDs they produce, and the linear duplicate checks (generators as
numeric intervals) against a brute-force expansion."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config.manifest import Generator, _Intervals, load_manifest, valid_registration_id

_prefix = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


@given(prefix=_prefix, digits=st.integers(1, 8), start=st.integers(0, 50), count=st.integers(1, 40))
def test_generator_ids(prefix: str, digits: int, start: int, count: int) -> None:
    if len(str(start + count - 1)) > digits:
        return
    gen = Generator(prefix, digits, start, count)
    ids = list(gen.registration_ids())
    assert len(ids) == len(set(ids)) == count
    assert all(valid_registration_id(i) and len(i) == len(prefix) + digits for i in ids)
    index = _Intervals([gen])
    assert all(index.owner(i) is gen for i in ids)
    assert index.owner(f"{prefix}{start + count:0{digits}d}") is None
    assert index.owner(f"{prefix}{start + count}x") is None


# Small generators over a shared alphabet so that clashes are frequent.
_small = st.builds(
    Generator,
    prefix=st.sampled_from(["n-", "n-0", "n-1", "n-00", "m-", "n-01", ""]),
    digits=st.integers(1, 3),
    start=st.integers(0, 30),
    count=st.integers(1, 30),
)


@settings(max_examples=300)
@given(st.lists(_small, min_size=1, max_size=6), st.lists(st.text("n-m0123", max_size=6)))
def test_intervals_agree_with_brute_force(gens: list[Generator], probes: list[str]) -> None:
    valid = [g for g in gens if g.start + g.count - 1 < 10**g.digits]
    gens = [Generator(g.prefix, g.digits, g.start, g.count, order=i) for i, g in enumerate(valid)]
    if not gens:
        return
    made = [set(g.registration_ids()) for g in gens]
    index = _Intervals(gens)
    clashing = {k for i in range(len(gens)) for j in range(i) if made[i] & made[j] for k in (i, j)}
    in_pairs = {g.order for a, b, _ in index.clashes for g in (a, b)}
    # Every generator that shares an ID with another is in a reported pair (and every
    # reported clash ID really is made by both).
    assert in_pairs == clashing
    for a, b, clash in index.clashes:
        assert clash in made[a.order] and clash in made[b.order]
    for probe in [*probes, *(i for m in made for i in list(m)[:3])]:
        owner = index.owner(probe)
        makers = [g for g, m in zip(gens, made, strict=True) if probe in m]
        assert (owner is None) == (not makers)
        assert owner is None or owner in makers


def test_a_generated_manifest_expands_lazily_in_order(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("batch_id: b\ngenerator: {prefix: s-, digits: 3, start: 7, count: 4}\n")
    manifest = load_manifest(path)
    assert [d.registration_id for d in manifest.devices()] == ["s-007", "s-008", "s-009", "s-010"]
