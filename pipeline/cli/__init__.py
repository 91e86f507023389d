"""provline: the command line. A thin layer: parse options, call one library function, print.

Library errors (:mod:`pipeline.errors`) become one ``error: <where>: <what> (<rule>)`` line
each and their exit code.
"""

from __future__ import annotations

import sys

from ..errors import ProvlineError
from . import audit, batch, ca, emulator, export, fixture, hsm  # noqa: F401  (each registers its commands)
from .app import app


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line each."""
    try:
        app()
    except ProvlineError as exc:
        for line in exc.line().splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


__all__ = ["app", "main"]
