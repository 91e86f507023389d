"""One error hierarchy. The CLI prints ``error: <where>: <what> (<rule>)`` and exits with
``exit_code``; library callers catch :class:`ProvlineError` or a subclass.

Exit codes (a stable contract for factory CI):

====  ==========================================================
 2    bad input or usage (manifest, station config, arguments)
 3    HSM error not covered below
 30   PKCS#11 module cannot be loaded
 31   token not found (by label)
 32   PIN incorrect or locked (never retried)
 33   key or object not found in the token
 34   mechanism not supported by the token
 4    CA / issuance error
 5    registration finished with failures (partial)
 51   DPS / IoT Hub would refuse the batch: found before anything was signed (conflicting
      enrollments or identities, a CA not verified by proof of possession, a group
      conflict, a CA upload the endpoint cannot take)
 6    audit verification failed
 61   the audit log checks out but is not anchored: no trusted root was given (--root)
 7    I/O failure: disk full, read-only or failing storage (the line names the path)
 130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM): the run was stopped cleanly
 8    a programming fixture refused a bundle (wrong transport key, damaged blob, key and
      certificate do not match)
====  ==========================================================

The HSM family shares the leading digit 3 so that a script can test ``code // 10 == 3``
or ``code == 3`` for "any HSM problem" and still tell the causes apart; registration (5,
51) and audit (6, 61) do the same.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Characters that must never reach the operator's terminal raw: controls (C0, C1, DEL:
# newlines that split one problem into two lines, escape sequences that repaint the
# terminal), format characters (bidirectional overrides that reorder what is shown), line and
# paragraph separators, and lone surrogates (undecodable bytes of a file name).
_UNSAFE = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))
MAX_LINE = 2000  # characters of one printed problem; longer ones keep their head and tail


def escape(text: str) -> str:
    """``text`` with every unsafe character written as a Python escape (``\\n``,
    ``\\x1b``, ``\\u202e``), so one problem is always one printable line."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == " " or unicodedata.category(ch) not in _UNSAFE:
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{ord(ch):02x}"))
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def printable_line(text: str) -> str:
    """One problem as it is printed: escaped, and at most :data:`MAX_LINE` characters (the
    head, where the file and line are, and the tail, where the rule is)."""
    line = escape(text)
    if len(line) <= MAX_LINE:
        return line
    head, tail = MAX_LINE * 2 // 3, MAX_LINE // 3
    return f"{line[:head]}…[{len(line) - head - tail} characters cut]…{line[-tail:]}"


def shown(value: Any, limit: int = 64) -> str:
    """A short, bounded representation of an offending value for a message: a string is
    quoted and cut at ``limit`` characters; a list or mapping is named by its kind and size
    (never walked: it may be an alias bomb). Escaping happens when the line is printed."""
    if isinstance(value, str):
        if len(value) > limit:
            return repr(value[:limit])[:-1] + f"…' ({len(value)} characters)"
        return repr(value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return (
            str(value) if value.bit_length() < 200 else f"an integer of {value.bit_length()} bits"
        )
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    if isinstance(value, bytes):
        return f"{len(value)} bytes of binary data"
    return f"a {type(value).__name__}"


class ProvlineError(Exception):
    exit_code = 1

    def __init__(self, what: str, *, where: str = "", rule: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.where = where
        self.rule = rule

    def __reduce__(self) -> tuple[object, ...]:
        # Worker processes raise these to the orchestrator: pickle every field, not only args.
        return (_rebuild, (type(self), self.args, self.__dict__))

    def line(self) -> str:
        """The problem as one printable line: ``where: what (rule)``, escaped."""
        parts = [p for p in (self.where, self.what) if p]
        text = ": ".join(parts)
        return printable_line(f"{text} ({self.rule})" if self.rule else text)


class InputError(ProvlineError):
    """Bad manifest, station config or argument. Raised before any side effect."""

    exit_code = 2


class ValidationFailed(InputError):
    """Several input rules were broken at once; ``problems`` holds one each (raw text, escaped
    when printed). ``stopped``: there were so many that checking stopped early."""

    def __init__(self, problems: list[str], stopped: bool = False) -> None:
        self.problems = problems
        self.stopped = stopped
        first = problems[0] if problems else "invalid input"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more)

    def line(self) -> str:
        """One printable line per problem."""
        lines = [printable_line(p) for p in self.problems]
        if self.stopped:
            lines.append(
                f"checking stopped after {len(self.problems):,} problems (fix these first)"
            )
        return "\n".join(lines)


class HsmError(ProvlineError):
    exit_code = 3


class ModuleLoadError(HsmError):
    exit_code = 30


class TokenNotFound(HsmError):
    exit_code = 31


class PinError(HsmError):
    exit_code = 32


class KeyNotFound(HsmError):
    exit_code = 33


class MechanismUnsupported(HsmError):
    exit_code = 34


class CAError(ProvlineError):
    exit_code = 4


class RegistrationError(ProvlineError):
    exit_code = 5


class RegistrationRefused(RegistrationError):
    """DPS or IoT Hub would refuse the batch, found before any certificate is signed (plan,
    and run before it issues): registration IDs enrolled with other certificates,
    identities of another kind, a CA not verified by proof of possession, an enrollment
    group with another signing certificate. ``problems`` holds one line each."""

    exit_code = 51

    def __init__(
        self, what: str, *, where: str = "", rule: str = "", problems: list[str] | None = None
    ) -> None:
        super().__init__(what, where=where, rule=rule)
        self.problems = problems or []

    def line(self) -> str:
        if not self.problems:
            return super().line()
        return "\n".join(printable_line(p) for p in self.problems)


class AuditError(ProvlineError):
    exit_code = 6


class AuditUnanchored(AuditError):
    """Every check of an audit log passed, but against the root the log itself names: with
    no trusted root given (``--root``) nothing outside the batch vouches for the signer."""

    exit_code = 61


class StorageError(ProvlineError):
    """The disk is full, read-only or failing. Nothing half-written is left behind; free space
    (or fix the storage) and run the same command again to resume."""

    exit_code = 7


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal (SIGINT or SIGTERM): it stops cleanly, marks the
    run aborted, seals the log, writes the report and releases the batch lock."""

    def __init__(self, signal_name: str = "SIGINT", exit_code: int = 130) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


UNEXPECTED_EXIT_CODE = 1


def exit_code_of(exc: BaseException) -> int:
    """The process exit code for a run that ended with ``exc`` (the CLI and report.json use
    this one mapping, so they always agree)."""
    if isinstance(exc, ProvlineError | Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return UNEXPECTED_EXIT_CODE


def _rebuild(
    cls: type[ProvlineError], args: tuple[object, ...], state: dict[str, object]
) -> ProvlineError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class DeliveryRefused(ProvlineError):
    """A programming fixture refused to hand out a device key (docs/key-delivery.md): the
    bundle names a transport key the fixture does not hold, a bundle file differs from what
    ``device.json`` records, the blob does not unwrap, or the key does not match its
    certificate. ``problems`` holds one line each when several bundles were refused at once."""

    exit_code = 8

    def __init__(
        self, what: str, *, where: str = "", rule: str = "", problems: list[str] | None = None
    ) -> None:
        super().__init__(what, where=where, rule=rule)
        self.problems = problems or []

    SHOWN = 20  # lines printed; the fixture log lists every refusal

    def line(self) -> str:
        if not self.problems:
            return super().line()
        more = len(self.problems) - self.SHOWN
        tail = [f"... {more} more bundles refused (all in the fixture log)"] if more > 0 else []
        return "\n".join(self.problems[: self.SHOWN] + tail)
