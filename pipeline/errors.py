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
 6    audit verification failed
 7    a programming fixture refused a bundle (wrong transport key, damaged blob, key and
      certificate do not match)
====  ==========================================================

The HSM family shares the leading digit 3 so that a script can test ``code // 10 == 3``
or ``code == 3`` for "any HSM problem" and still tell the causes apart.
"""

from __future__ import annotations


class ProvlineError(Exception):
    exit_code = 1

    def __init__(self, what: str, *, where: str = "", rule: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.where = where
        self.rule = rule

    def line(self) -> str:
        parts = [p for p in (self.where, self.what) if p]
        text = ": ".join(parts)
        return f"{text} ({self.rule})" if self.rule else text


class InputError(ProvlineError):
    """Bad manifest, station config or argument. Raised before any side effect."""

    exit_code = 2


class ValidationFailed(InputError):
    """Several input rules were broken at once; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        first = problems[0] if problems else "invalid input"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more)

    def line(self) -> str:
        return "\n".join(f"{p}" for p in self.problems)


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


class AuditError(ProvlineError):
    exit_code = 6


class DeliveryRefused(ProvlineError):
    """A programming fixture refused to hand out a device key (docs/key-delivery.md): the
    bundle names a transport key the fixture does not hold, a bundle file differs from what
    ``device.json`` records, the blob does not unwrap, or the key does not match its
    certificate. ``problems`` holds one line each when several bundles were refused at once."""

    exit_code = 7

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
