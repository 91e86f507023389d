"""YAML loading for manifests and station configs: line-aware, bounded, and streaming.

Every value remembers its line so an input error can name ``file:line``. The document is
built from parser events (libyaml's parser when PyYAML has it), one level at a time, which
lets the limits be enforced *while* parsing instead of after: nesting depth (no
RecursionError however deep the input), aliases (each alias counts the values it stands for,
so an alias bomb is refused at the alias that crosses the budget, never expanded), mapping keys
(strings only: a list as a key is refused, not a traceback), tags (JSON-like types and the
YAML 1.1 scalars only) and scalars that cannot be built (a 5,000-digit integer, 2024-13-45).
One top-level sequence (a manifest's ``devices``) can be streamed: each item is handed over as
soon as it is complete and then forgotten, so memory does not grow with the list.
Limits and their reasons: docs/limits.md.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml import events

from ..errors import InputError, shown
from ..inputfile import read_input

MAX_DEPTH = 24  # nested mappings and lists; a manifest needs 4 + a twin's 10
MAX_ALIAS_VALUES = 1_000_000  # values aliases may stand for, counted expanded, per file
MAX_PROBLEMS = 1000  # problems reported; checking stops there

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_YAML_RULE = "YAML syntax"
# Scalar types a manifest or station config may hold: the JSON ones, and the YAML 1.1 dates
# and binary that the twin check then refuses with a precise reason.
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "binary", "timestamp")
)
_SCHEMA = "schema"

# libyaml's parser makes events about ten times faster than PyYAML's own; both give the same
# events and marks.
_Parser: Any = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class Mapping(dict[str, Any]):
    """A YAML mapping with the line of the mapping and of each key (1-based)."""

    line: int = 0
    lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)


def empty_mapping(line: int) -> Mapping:
    mapping = Mapping()
    mapping.line, mapping.lines = line, {}
    return mapping


class Streamed:
    """Stands in the document for a streamed sequence: where it was and how many items."""

    def __init__(self, line: int) -> None:
        self.line = line
        self.count = 0


class _Merge:
    """The YAML 1.1 merge key ``<<``."""


_MERGE = _Merge()
_NO_KEY = object()


class _Frame:
    __slots__ = ("anchor", "key", "key_line", "line", "merges", "streamed", "value", "values")

    def __init__(self, value: Any, line: int, anchor: str | None) -> None:
        self.value = value
        self.line = line
        self.anchor = anchor
        self.key: Any = _NO_KEY
        self.key_line = 0
        self.merges: list[tuple[Any, int]] = []
        self.values = 1  # this value and everything in it, aliases expanded
        self.streamed = False


class Document:
    """One YAML document read from ``text`` (the contents of ``path``). Iterate
    :meth:`items` to parse: it yields the items of the top-level sequence ``stream`` (if
    any) as they complete; afterwards :attr:`doc` holds the top mapping and
    :attr:`problems` the duplicate keys. Structural errors raise :class:`InputError` with
    ``file:line`` at once: nothing after them can be trusted."""

    def __init__(self, path: Path, text: str, *, stream: str | None = None) -> None:
        self.path = path
        self.text = text
        self.stream = stream
        self.doc: Mapping | None = None
        self.problems: list[str] = []
        self._anchors: dict[str, tuple[Any, int]] = {}
        self._expanded = 0
        self._resolver: Any = yaml.resolver.Resolver()
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, line: int, what: str, rule: str = _YAML_RULE) -> InputError:
        return InputError(what, where=f"{self.path}:{line}", rule=rule)

    def items(self) -> Iterator[tuple[Any, int]]:
        """(item, line) of each item of the streamed sequence, in order."""
        parser = _Parser(self.text)
        try:
            yield from self._parse(parser)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            raise self.error(line, f"not valid YAML: {exc.problem or exc.context}") from exc
        except yaml.reader.ReaderError as exc:
            raise self.error(
                self._reader_line(exc.position), f"not valid YAML: {_character(exc.character)}"
            ) from exc
        except yaml.YAMLError as exc:
            raise self.error(1, f"not valid YAML: {exc}") from exc
        finally:
            parser.dispose()

    def _parse(self, parser: Any) -> Iterator[tuple[Any, int]]:
        frames: list[_Frame] = []
        documents = 0
        while True:
            event = parser.get_event()
            kind = type(event)
            line = event.start_mark.line + 1
            if kind is events.ScalarEvent:
                value = self._scalar(event, line)
                if event.anchor:
                    self._anchors[event.anchor] = (value, 1)
                if not frames:
                    self._top(value, line)
                elif self._attach(frames, value, line, 1):
                    yield value, line
            elif kind is events.AliasEvent:
                if event.anchor not in self._anchors:
                    raise self.error(line, f"alias *{event.anchor} names no anchor")
                value, count = self._anchors[event.anchor]
                self._expanded += count
                if self._expanded > MAX_ALIAS_VALUES:
                    raise self.error(
                        line,
                        f"aliases stand for more than {MAX_ALIAS_VALUES:,} values",
                        "alias bombs are refused (docs/limits.md)",
                    )
                if not frames:
                    self._top(value, line)
                elif self._attach(frames, value, line, count):
                    yield value, line
            elif kind is events.MappingStartEvent or kind is events.SequenceStartEvent:
                mapping = kind is events.MappingStartEvent
                if event.tag not in (None, "!", _MAP if mapping else _SEQ):
                    raise self.error(
                        line,
                        f"tag {shown(event.tag)} is not supported",
                        "plain mappings, lists and scalars",
                    )
                if len(frames) >= MAX_DEPTH:
                    raise self.error(
                        line,
                        f"nested deeper than {MAX_DEPTH} levels",
                        "nesting depth (docs/limits.md)",
                    )
                frame = _Frame(empty_mapping(line) if mapping else [], line, event.anchor)
                parent = frames[-1] if frames else None
                if (
                    not mapping
                    and parent is not None
                    and len(frames) == 1
                    and parent.key == self.stream
                    and self.stream is not None
                ):
                    if event.anchor:
                        raise self.error(
                            line, f"an anchor on {self.stream} is not supported", _SCHEMA
                        )
                    frame.streamed = True
                    frame.value = Streamed(line)
                frames.append(frame)
            elif kind is events.MappingEndEvent or kind is events.SequenceEndEvent:
                frame = frames.pop()
                if frame.merges:
                    self._merge(frame)
                if frame.anchor:
                    self._anchors[frame.anchor] = (frame.value, frame.values)
                if not frames:
                    self._top(frame.value, frame.line)
                elif self._attach(frames, frame.value, frame.line, frame.values):
                    yield frame.value, frame.line
            elif kind is events.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise self.error(line, "more than one YAML document in the file")
            elif kind is events.StreamEndEvent:
                if self.doc is None:
                    raise self.error(1, "the file holds no YAML document", _SCHEMA)
                return

    def _top(self, value: Any, line: int) -> None:
        if not isinstance(value, Mapping):
            what = "empty" if value is None else f"{shown(value)}, not a mapping"
            raise self.error(line, f"the document is {what}", _SCHEMA)
        self.doc = value

    def _attach(self, frames: list[_Frame], value: Any, line: int, count: int) -> bool:
        """Put ``value`` into the innermost open collection; True when it is an item of the
        streamed sequence (the caller hands it over instead)."""
        frame = frames[-1]
        frame.values += count
        if isinstance(frame.value, Streamed):
            frame.value.count += 1
            frame.values = 1
            return True
        if isinstance(frame.value, list):
            frame.value.append(value)
            return False
        if frame.key is _NO_KEY:
            if value is _MERGE:
                frame.key = _MERGE
            elif isinstance(value, str):
                frame.key = value
            else:
                raise self.error(line, f"mapping key {shown(value)} is not a string", _SCHEMA)
            frame.key_line = line
            return False
        mapping: Mapping = frame.value
        if frame.key is _MERGE:
            frame.merges.append((value, frame.key_line))
        else:
            if frame.key in mapping:
                self._problem(frame.key_line, f"duplicate key {shown(frame.key)} ({_SCHEMA})")
            mapping[frame.key] = value
            mapping.lines[frame.key] = frame.key_line
        frame.key = _NO_KEY
        return False

    def _merge(self, frame: _Frame) -> None:
        """YAML 1.1 merge keys: keys of the merged mappings that the mapping lacks."""
        mapping: Mapping = frame.value
        for value, line in frame.merges:
            sources = value if isinstance(value, list) else [value]
            for source in sources:
                if not isinstance(source, Mapping):
                    raise self.error(line, "<< merges mappings only", _SCHEMA)
                for key, item in source.items():
                    if key not in mapping:
                        mapping[key] = item
                        mapping.lines[key] = line

    def _scalar(self, event: Any, line: int) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR:
            return event.value
        if tag == _MERGE_TAG:
            return _MERGE
        if tag not in _SCALAR_TAGS:
            raise self.error(line, f"tag {shown(tag)} is not supported", "YAML scalars")
        build = self._constructor.yaml_constructors[tag]
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return build(self._constructor, node)
        except (yaml.YAMLError, ValueError, ArithmeticError, TypeError) as exc:
            reason = getattr(exc, "problem", None) or str(exc)
            raise self.error(
                line, f"{shown(event.value)} cannot be read as {tag.rsplit(':', 1)[-1]}: {reason}"
            ) from exc

    def _problem(self, line: int, text: str) -> None:
        self.problems.append(f"{self.path}:{line}: {text}")

    def _reader_line(self, position: int) -> int:
        """The line of a reader error: libyaml counts UTF-8 bytes, PyYAML characters."""
        if position < 0:
            return 1
        if _Parser is yaml.SafeLoader:
            return self.text.count("\n", 0, position) + 1
        return self.text.encode("utf-8", "surrogatepass").count(b"\n", 0, position) + 1


def _character(code: Any) -> str:
    if isinstance(code, int) and 0 <= code <= 0x10FFFF:
        return f"character {shown(chr(code))} is not allowed"
    return "a character that is not allowed"


def decode(path: Path, data: bytes, what: str) -> str:
    """``data`` as UTF-8 text (a byte-order mark is dropped); otherwise one line naming
    where the first bad byte is."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(
            f"{what} is UTF-16 text", where=f"{path}:1", rule="input files are UTF-8 text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"byte 0x{data[exc.start]:02x} is not UTF-8",
            where=f"{path}:{line}",
            rule="input files are UTF-8 text",
        ) from exc


def load(path: Path, *, limit: int, what: str) -> tuple[Mapping, list[str]]:
    """The document's top mapping and the problems found while reading it (duplicate keys).
    Reads at most ``limit`` bytes of a regular file."""
    text = decode(path, read_input(path, limit=limit, what=what), what)
    document = Document(path, text)
    for _ in document.items():
        pass
    assert document.doc is not None
    return document.doc, document.problems


def line_key(problem: str) -> tuple[str, int]:
    """(file, line) of a ``file:line: ...`` problem, for sorting."""
    path, _, rest = problem.partition(":")
    line = rest.split(":", 1)[0]
    return path, int(line) if line.isdigit() else 0


def sorted_by_line(problems: list[str]) -> list[str]:
    """Problems in file order, so an operator can fix them top to bottom."""
    return sorted(problems, key=line_key)


class TooManyProblems(Exception):
    """Raised by :class:`Checker` at its :data:`MAX_PROBLEMS`-th problem: the input is refused
    anyway, and reading the rest of a hostile file only to count its problems is time lost."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems


class Checker:
    """Collects every problem in one file as ``file:line: [subject: ]what (rule)``, up to
    :data:`MAX_PROBLEMS` (then :class:`TooManyProblems` stops the check)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def add(self, line: int, what: str, rule: str, subject: str = "") -> None:
        prefix = f"{self.path}:{line}: " + (f"{subject}: " if subject else "")
        self.append(f"{prefix}{what} ({rule})")

    def append(self, problem: str) -> None:
        self.problems.append(problem)
        if len(self.problems) >= MAX_PROBLEMS:
            raise TooManyProblems(self.problems)

    def extend(self, problems: list[str]) -> None:
        for problem in problems:
            self.append(problem)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def keys(self, mapping: Mapping, allowed: set[str], required: set[str], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                self.add(mapping.line_of(key), f"unknown key {where}{shown(key)}", _SCHEMA)
        for key in sorted(required - set(mapping)):
            self.add(mapping.line, f"missing key {where}{key!r}", _SCHEMA)

    def section(self, mapping: Mapping, key: str, required: bool = False) -> Mapping:
        value = mapping.get(key)
        if value is None:
            if required:
                self.add(mapping.line, f"missing section {key!r}", _SCHEMA)
            return empty_mapping(mapping.line_of(key))
        if not isinstance(value, Mapping):
            self.add(mapping.line_of(key), f"{key!r} must be a mapping", _SCHEMA)
            return empty_mapping(mapping.line_of(key))
        return value

    def typed(
        self,
        mapping: Mapping,
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        what: str = "",
        *,
        secret: bool = False,
    ) -> Any:
        """``mapping[key]`` if it has the type ``kind``, else ``default`` and a problem.
        Strings must be printable: a control character in a name or path is a mistake (or
        an attack on the terminal that shows it). A ``secret`` key's value is never shown: it
        may be the secret typed where its source belongs."""
        if key not in mapping or mapping[key] is None:
            return default
        value = mapping[key]
        if isinstance(value, bool) and kind is int:
            value = None
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            got = "(the value is not shown: it may be a secret)" if secret else shown(mapping[key])
            self.add(mapping.line_of(key), f"{what}{key!r} must be {names}, not {got}", _SCHEMA)
            return default
        if isinstance(value, str) and not printable(value):
            got = "" if secret else f" {shown(value)}"
            self.add(
                mapping.line_of(key),
                f"{what}{key!r} value{got} holds a control character",
                "names and paths are printable text",
            )
            return default
        return value


def printable(text: str) -> bool:
    """No control, format or separator characters other than the space."""
    return text.isprintable() or all(
        ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp", "Cs") for ch in text
    )
