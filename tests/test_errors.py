"""One table of exit codes: every code the error hierarchy can end a command with is in the
README table, in the errors module's own table, and has a kind in the JSON error object."""

from __future__ import annotations

import re

import pipeline.errors as errors
from pipeline.cli.app import ERROR_KINDS

from .support import ROOT


def _codes() -> set[int]:
    """Every exit code a command can end with: the hierarchy's, a signal's, and 1."""
    seen: set[int] = set()
    todo: list[type[errors.ProvlineError]] = [errors.ProvlineError]
    while todo:
        cls = todo.pop()
        seen.add(cls.exit_code)
        todo.extend(cls.__subclasses__())
    seen |= {
        errors.UNEXPECTED_EXIT_CODE,
        errors.exit_code_of(errors.Interrupted("SIGINT", 130)),
        errors.exit_code_of(errors.Interrupted("SIGTERM", 143)),
        errors.exit_code_of(KeyboardInterrupt()),
    }
    return seen


def test_every_exit_code_is_in_the_readme_table_and_has_a_kind() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Exit codes") : readme.index("## CI contract")]
    documented = {
        int(n) for row in re.findall(r"^\| ([\d, ]+) \|", table, re.M) for n in row.split(",")
    }
    hsm_row = re.search(r"^\| 3 \|.*$", table, re.M)
    assert hsm_row is not None
    documented |= {int(n) for n in re.findall(r"\b(3\d) [a-z]", hsm_row.group(0))}  # 30-34
    codes = _codes()
    assert codes <= documented, codes - documented
    assert codes <= set(ERROR_KINDS), codes - set(ERROR_KINDS)
    assert set(ERROR_KINDS) <= documented | {0}
    module_table = errors.__doc__ or ""
    for code in codes - {1}:
        assert re.search(rf"^ {code}\b|; {code}\b", module_table, re.M), code
