"""Deterministic crash points, for the crash-safety tests only.

Crash safety is claimed for a kill at any line (README "Crash safety and resume"); the tests
prove it by killing the run at every durable step in turn. Each durable step calls
:func:`crash_point` with its name right after it happens:

* ``commit.<what>`` after each journal transaction commits (``create``, ``plan``, ``intents``,
  ``results``, ``settle``, ``retry``, ``registration``);
* ``audit.flush`` after each sync of the audit log, and ``logged.<what>`` after the sync
  that must precede a commit or a destruction (``settle``, ``results``, ``registration``,
  ``orphan``): the window between the log and the act;
* ``batch.created`` once a new batch directory is in place, ``issue.start`` before the worker
  pool starts, ``register.start`` before the registration stage.

``PROVLINE_CRASH_AT=<name>:<n>`` makes the process kill itself with SIGKILL right after the
n-th time ``<name>`` is reached: a real kill (no exception, no cleanup, no flush), the same as
``kill -9``. ``PROVLINE_CRASH_AT=<name>:<n>:stop`` stops it with SIGSTOP instead, so a test can
change the world at that exact point (remove the PIN file, move the token directory, stop
DPS) and then let it go on with SIGCONT.

Unset, :func:`crash_point` is one dictionary lookup; nothing else reads the variable.
"""

from __future__ import annotations

import os
import signal

ENV = "PROVLINE_CRASH_AT"

_counts: dict[str, int] = {}
_target: tuple[str, int, signal.Signals] | None = None
_parsed = False


def _parse() -> tuple[str, int, signal.Signals] | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    action = signal.SIGKILL
    if parts[-1] in ("kill", "stop"):
        action = signal.SIGKILL if parts.pop() == "kill" else signal.SIGSTOP
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <name>:<n>[:kill|:stop]")
    return parts[0], int(parts[1]), action


def crash_point(name: str) -> None:
    """Count ``name``; kill (or stop) this process if it is the configured n-th time."""
    global _target, _parsed
    if not _parsed:
        _target, _parsed = _parse(), True
    if _target is None or _target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _target[1]:
        os.kill(os.getpid(), _target[2])
