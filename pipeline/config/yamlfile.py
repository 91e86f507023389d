"""YAML loading that remembers line numbers, so every input error can name ``file:line``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError


class Mapping(dict[str, Any]):
    """A YAML mapping with the line of the mapping and of each key (1-based)."""

    line: int = 0
    lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    duplicate_keys: list[tuple[str, int]]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Mapping:
    loader.flatten_mapping(node)
    mapping = Mapping()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in mapping:
            loader.duplicate_keys.append((str(key), line))
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(path: Path) -> tuple[Mapping, list[str]]:
    """The document's top mapping and the problems found while reading it (duplicate keys)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist", rule="input files exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read: {exc}", rule="UTF-8 text files") from exc
    loader = _Loader(text)
    loader.duplicate_keys = []
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(
            f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where, rule="YAML syntax"
        ) from exc
    finally:
        loader.dispose()
    if not isinstance(doc, Mapping):
        raise InputError("the document is not a mapping", where=f"{path}:1", rule="schema")
    problems = [
        f"{path}:{line}: duplicate key {key!r} (schema)" for key, line in loader.duplicate_keys
    ]
    return doc, problems


def sorted_by_line(problems: list[str]) -> list[str]:
    """Problems in file order, so an operator can fix them top to bottom."""

    def key(problem: str) -> tuple[str, int]:
        path, _, rest = problem.partition(":")
        line = rest.split(":", 1)[0]
        return path, int(line) if line.isdigit() else 0

    return sorted(problems, key=key)


class Checker:
    """Collects every problem in one file as ``file:line: [subject: ]what (rule)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def add(self, line: int, what: str, rule: str, subject: str = "") -> None:
        prefix = f"{self.path}:{line}: " + (f"{subject}: " if subject else "")
        self.problems.append(f"{prefix}{what} ({rule})")

    def keys(self, mapping: Mapping, allowed: set[str], required: set[str], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                self.add(mapping.line_of(key), f"unknown key {where}{key!r}", "schema")
        for key in sorted(required - set(mapping)):
            self.add(mapping.line, f"missing key {where}{key!r}", "schema")

    def section(self, mapping: Mapping, key: str, required: bool = False) -> Mapping:
        value = mapping.get(key)
        if value is None:
            if required:
                self.add(mapping.line, f"missing section {key!r}", "schema")
            empty = Mapping()
            empty.line, empty.lines = mapping.line_of(key), {}
            return empty
        if not isinstance(value, Mapping):
            self.add(mapping.line_of(key), f"{key!r} must be a mapping", "schema")
            empty = Mapping()
            empty.line, empty.lines = mapping.line_of(key), {}
            return empty
        return value

    def typed(
        self,
        mapping: Mapping,
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        what: str = "",
    ) -> Any:
        if key not in mapping or mapping[key] is None:
            return default
        value = mapping[key]
        if isinstance(value, bool) and kind is int:
            value = None
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.add(mapping.line_of(key), f"{what}{key!r} must be {names}", "schema")
            return default
        return value
