"""The streaming YAML loader against PyYAML's own loader, its limits, and the one place
problems are printed (escaping, bounded values) and input files are opened."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import yamlfile
from pipeline.config.yamlfile import Document, load
from pipeline.errors import InputError, ValidationFailed, escape, printable_line, shown
from pipeline.inputfile import Bounded, open_input, read_input

_LIBYAML = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
)
_keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=25,
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(_keys, _values, min_size=1, max_size=5), st.sampled_from([None, True, False])
)
def test_builds_what_pyyaml_builds(tmp_path: Path, doc: dict[str, Any], flow: bool | None) -> None:
    text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True)
    path = tmp_path / "doc.yaml"
    path.write_text(text, encoding="utf-8")
    ours, problems = load(path, limit=1 << 20, what="test file")
    assert problems == []
    assert _same(ours, yaml.load(text, Loader=_LIBYAML)), text


def test_merge_keys_and_lines_like_pyyaml(tmp_path: Path) -> None:
    text = """\
base: &base {a: 1, b: 2}
more: &more {b: 3, c: 4}
one:
  <<: [*base, *more]
  c: 5
two:
  <<: *more
  a: 0
"""
    path = tmp_path / "m.yaml"
    path.write_text(text)
    ours, problems = load(path, limit=1 << 20, what="test file")
    assert problems == []
    assert ours == yaml.safe_load(text)
    assert ours["one"] == {"a": 1, "b": 2, "c": 5}  # earlier merges win, explicit keys win
    assert ours["one"].line_of("c") == 5 and ours["one"].line_of("a") == 4
    assert ours.line_of("two") == 6


def test_duplicate_keys_are_problems_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("a: 1\nb:\n  x: 1\n  x: 2\na: 3\n")
    doc, problems = load(path, limit=1 << 20, what="test file")
    assert doc == {"a": 3, "b": {"x": 2}}
    assert problems == [
        f"{path}:4: duplicate key 'x' (schema)",
        f"{path}:5: duplicate key 'a' (schema)",
    ]


def test_the_streamed_list_is_handed_over_item_by_item(tmp_path: Path) -> None:
    text = "a: 1\nitems:\n  - {n: 1}\n  - &two {n: 2}\n  - *two\nz: 2\n"
    document = Document(tmp_path / "s.yaml", text, stream="items")
    items = list(document.items())
    assert [(item["n"], line) for item, line in items] == [(1, 3), (2, 4), (2, 5)]
    assert document.doc is not None
    stand_in = document.doc["items"]
    assert isinstance(stand_in, yamlfile.Streamed) and stand_in.count == 3
    assert document.doc["z"] == 2


def test_alias_budget_counts_expanded_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlfile, "MAX_ALIAS_VALUES", 40)
    path = tmp_path / "a.yaml"
    # An alias of l0 stands for 4 values (the list and its items), one of l1 for
    # 1 + 3 * 4 = 13: 3 * 4 + 3 * 13 = 51 values in all, over 40.
    path.write_text("l0: &l0 [a, b, c]\nl1: &l1 [*l0, *l0, *l0]\nx: [*l1, *l1, *l1]\n")
    with pytest.raises(InputError) as info:
        load(path, limit=1 << 20, what="test file")
    assert info.value.line() == (
        f"{path}:3: aliases stand for more than 40 values (alias bombs are refused "
        "(docs/limits.md))"
    )
    path.write_text("l0: &l0 [a, b, c]\nl1: &l1 [*l0, *l0, *l0]\nx: [*l1]\n")
    assert load(path, limit=1 << 20, what="test file")[0]["x"][0][2] == ["a", "b", "c"]


@pytest.mark.parametrize("depth, refused", [(23, False), (24, True)])
def test_nesting_limit(tmp_path: Path, depth: int, refused: bool) -> None:
    path = tmp_path / "n.yaml"
    path.write_text("k: " + "[" * depth + "]" * depth + "\n")  # the top mapping is one level
    if refused:
        with pytest.raises(InputError, match="nested deeper than 24 levels"):
            load(path, limit=1 << 20, what="test file")
    else:
        load(path, limit=1 << 20, what="test file")


@given(st.text())
def test_escape_makes_one_printable_line(text: str) -> None:
    line = printable_line(text)
    assert line.isprintable() or all(
        ch == " " or ch.isprintable() or not (0xD800 <= ord(ch) <= 0xDFFF) for ch in line
    )
    assert len(line.splitlines()) <= 1
    assert "\x1b" not in line and "\0" not in line and "\u202e" not in line
    if text.isprintable() and len(text) <= 2000:
        assert line == text


def test_escape_examples() -> None:
    assert escape("dev-1\n") == "dev-1\\n"
    assert escape("a\x1b[2Jb\u202ec\x85d\u2028e\udcff") == "a\\x1b[2Jb\\u202ec\\x85d\\u2028e\\udcff"
    assert escape("Zürich 🙂") == "Zürich 🙂"
    long = printable_line("x" * 5000)
    assert len(long) < 2100 and "[3001 characters cut]" in long


def test_validation_failed_prints_one_line_per_problem() -> None:
    exc = ValidationFailed(["m.yaml:1: bad 'a\nb' (rule)", "m.yaml:2: ok (rule)"], stopped=True)
    assert exc.line().splitlines() == [
        "m.yaml:1: bad 'a\\nb' (rule)",
        "m.yaml:2: ok (rule)",
        "checking stopped after 2 problems (fix these first)",
    ]


def test_shown_is_bounded_even_for_shared_structures() -> None:
    value: Any = ["lol"] * 10
    for _ in range(9):  # 10**10 leaves if it were walked
        value = [value] * 10
    assert shown(value) == "a list of 10 items"
    assert shown("x" * 1000).endswith("…' (1000 characters)")
    assert shown(10**300) == "an integer of 997 bits"
    assert shown(b"\0" * 9) == "9 bytes of binary data"


def test_input_files_must_be_small_regular_files(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * 101)
    for path, why in (
        (tmp_path / "dir", "is a directory"),
        (tmp_path / "fifo", "is not a regular file"),
        (Path("/dev/zero"), "is not a regular file"),
        (tmp_path / "big", "is 101 bytes"),
        (tmp_path / "missing", "does not exist"),
        (Path(f"{tmp_path}/a\0b"), "contains a NUL byte"),
    ):
        with pytest.raises(InputError, match=why):
            read_input(path, limit=100, what="test file")


def test_a_file_that_grows_while_it_is_read_is_cut_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 50)
    handle = open_input(path, limit=100, what="test file")  # checked at 50 bytes
    with path.open("ab") as more:
        more.write(b"y" * 100)
    reader = Bounded(handle, path, limit=100, what="test file", where="here")
    with pytest.raises(InputError, match="grew past 100 bytes while it was read"):
        reader.read()
    reader.close()
