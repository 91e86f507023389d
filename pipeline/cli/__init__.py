"""provline: the command line. A thin layer: parse options, call one library function, print.

Library errors (:mod:`pipeline.errors`) become one ``error: <where>: <what> (<rule>)`` line
each and their exit code; a storage failure the library did not expect becomes exit 7, a
signal 130/143, anything else one ``error:`` line and exit 1 (``PROVLINE_DEBUG=1`` adds the
traceback). The exit code is the one ``report.json`` records for a run.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

from ..errors import Interrupted, ProvlineError, exit_code_of
from ..files import STORAGE_ERRNOS, storage_error
from . import (  # noqa: F401  (each registers its commands)
    audit,
    batch,
    ca,
    emulator,
    export,
    fixture,
    hsm,
    lifecycle,
    sign,
)
from .app import app


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line each."""
    try:
        app()
    except ProvlineError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        print(f"stopped by {name}: run the same command again to resume", file=sys.stderr)
        sys.exit(exit_code_of(exc))
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            _unexpected(exc)
        _fail(storage_error(exc, exc.filename or "?"))
    except Exception as exc:
        _unexpected(exc)


def _fail(exc: ProvlineError) -> NoReturn:
    for line in exc.line().splitlines():
        print(f"error: {line}", file=sys.stderr)
    sys.exit(exc.exit_code)


def _unexpected(exc: BaseException) -> NoReturn:
    if os.environ.get("PROVLINE_DEBUG"):
        traceback.print_exception(exc)
    text = " ".join(str(exc).split())
    print(f"error: unexpected {type(exc).__name__}: {text}", file=sys.stderr)
    sys.exit(exit_code_of(exc))


__all__ = ["app", "main"]
