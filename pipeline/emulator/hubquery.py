"""The IoT Hub query language, as far as the emulator understands it: ``SELECT * FROM devices``
with an optional ``WHERE`` of comparisons on ``deviceId`` and ``status`` (``=``, ``!=``,
``<>``, ``IN [...]``) joined by ``AND`` / ``OR`` and parentheses (Microsoft Learn, "IoT Hub
query language for device and module twins, jobs, and message routing"). Anything else is a
:class:`QueryError`: the emulator refuses what it cannot answer faithfully."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

FIELDS = {"deviceid": "deviceId", "status": "status"}
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<op>!=|<>|=)|(?P<punct>[()\[\],*])|(?P<word>[A-Za-z_][\w.]*))"
)

Predicate = Callable[[dict[str, Any]], bool]


class QueryError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, at = [], 0
    text = text.rstrip()
    while at < len(text):
        m = _TOKEN.match(text, at)
        if not m or m.end() == at:
            raise QueryError(f"cannot read the query at {text[at : at + 20]!r}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        out.append((kind, value[1:-1].replace("''", "'") if kind == "str" else value))
        at = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.at] if self.at < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        got_kind, got = self.peek()
        if got_kind != kind or (value is not None and got.lower() != value.lower()):
            raise QueryError(f"expected {value or kind}, found {got or 'the end'!r}")
        self.at += 1
        return got

    def keyword(self, word: str) -> bool:
        kind, value = self.peek()
        if kind == "word" and value.lower() == word:
            self.at += 1
            return True
        return False

    def disjunction(self) -> Predicate:
        terms = [self.conjunction()]
        while self.keyword("or"):
            terms.append(self.conjunction())
        return lambda d: any(t(d) for t in terms)

    def conjunction(self) -> Predicate:
        terms = [self.term()]
        while self.keyword("and"):
            terms.append(self.term())
        return lambda d: all(t(d) for t in terms)

    def term(self) -> Predicate:
        if self.peek() == ("punct", "("):
            self.at += 1
            inner = self.disjunction()
            self.take("punct", ")")
            return inner
        name = self.take("word")
        field = FIELDS.get(name.lower().removeprefix("devices."))
        if field is None:
            raise QueryError(f"the emulator filters on deviceId and status only, not {name!r}")
        if self.keyword("in"):
            self.take("punct", "[")
            values = {self.take("str")}
            while self.peek() == ("punct", ","):
                self.at += 1
                values.add(self.take("str"))
            self.take("punct", "]")
            return lambda d: d.get(field) in values
        op = self.take("op")
        value = self.take("str")
        if op == "=":
            return lambda d: d.get(field) == value
        return lambda d: d.get(field) != value


def parse(query: str) -> Predicate:
    """A predicate over device identities for ``SELECT * FROM devices [WHERE …]``."""
    p = _Parser(_tokens(query))
    p.take("word", "select")
    p.take("punct", "*")
    p.take("word", "from")
    p.take("word", "devices")
    predicate: Predicate = lambda _d: True  # noqa: E731
    if p.keyword("where"):
        predicate = p.disjunction()
    if p.peek()[0] != "end":
        raise QueryError(f"unsupported query text from {p.peek()[1]!r}")
    return predicate
