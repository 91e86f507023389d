"""provline: the command line. A thin layer: parse options, call one library function, print.

Library errors (:mod:`pipeline.errors`) become one ``error: <where>: <what> (<rule>)`` line
each on stderr and their exit code; a storage failure the library did not expect becomes
exit 7, a signal 130/143, anything else one ``error:`` line and exit 1 (``PROVLINE_DEBUG=1``
adds the traceback). The exit code is the one ``report.json`` records for a run.

With ``--json`` every outcome is one JSON object on stdout: the command's document on
success, the error object (``provline.error/1``, with the exit code inside) on failure,
usage errors included; the ``error:`` lines still go to stderr for people reading the log
(docs/ci.md).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

import typer

from ..errors import (
    DeliveryRefused,
    Interrupted,
    ProvlineError,
    RegistrationRefused,
    ValidationFailed,
    exit_code_of,
    printable_line,
)
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
from .app import app, print_error_json, wants_json


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line each."""
    as_json = wants_json(sys.argv[1:])
    try:
        if not as_json:
            app()
            return
        code = app(standalone_mode=False)  # usage errors raise instead of printing
        sys.exit(code if isinstance(code, int) else 0)
    except ProvlineError as exc:
        _fail(exc, as_json)
    except typer.TyperException as exc:  # --json only: a usage error, as an error object
        message = printable_line(exc.format_message())
        print(f"error: {message}", file=sys.stderr)
        print_error_json(exc.exit_code, "usage", message)
        sys.exit(exc.exit_code)
    except typer.Abort:
        _unexpected(RuntimeError("aborted"), as_json)
    except KeyboardInterrupt as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        message = f"stopped by {name}: run the same command again to resume"
        print(message, file=sys.stderr)
        if as_json:
            print_error_json(exit_code_of(exc), "stopped", message)
        sys.exit(exit_code_of(exc))
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            _unexpected(exc, as_json)
        _fail(storage_error(exc, exc.filename or "?"), as_json)
    except Exception as exc:
        _unexpected(exc, as_json)


def _fail(exc: ProvlineError, as_json: bool) -> NoReturn:
    lines = exc.line().splitlines()
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    if as_json:
        several = isinstance(exc, ValidationFailed | RegistrationRefused | DeliveryRefused)
        print_error_json(
            exc.exit_code,
            None,
            lines[0] if lines else exc.what,
            error=exc,
            problems=lines if several else (),
        )
    sys.exit(exc.exit_code)


def _unexpected(exc: BaseException, as_json: bool) -> NoReturn:
    if os.environ.get("PROVLINE_DEBUG"):
        traceback.print_exception(exc)
    text = printable_line(" ".join(str(exc).split()))
    message = f"unexpected {type(exc).__name__}: {text}"
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print_error_json(exit_code_of(exc), "unexpected", message)
    sys.exit(exit_code_of(exc))


__all__ = ["app", "main"]
