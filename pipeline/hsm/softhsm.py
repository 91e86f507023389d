"""SoftHSM2 token set-up for demos, tests and development stations.

``softhsm2-util`` takes PINs on the command line (visible in ``ps``) or from a terminal, so we
run it on a pseudo-terminal and type the PINs, which never touch argv.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import termios
import time
from pathlib import Path

from ..errors import HsmError, InputError

CONF_NAME = "softhsm2.conf"


def write_config(directory: Path) -> Path:
    """A SoftHSM2 config whose token directory lives under ``directory``."""
    directory = directory.resolve()
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    os.chmod(tokens, 0o700)
    conf = directory / CONF_NAME
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf


def init_token(directory: Path, label: str, *, so_pin: str, user_pin: str) -> Path:
    """Initialise a token labelled ``label`` in a SoftHSM2 config under ``directory``.
    Returns the config path to export as ``SOFTHSM2_CONF``."""
    if len(label.encode()) > 32:
        raise InputError(f"token label {label!r} is longer than 32 bytes", rule="CK_TOKEN_INFO")
    for name, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        if not 4 <= len(pin) <= 255:
            raise InputError(f"{name} must have 4 to 255 characters", rule="SoftHSM2 PIN length")
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise HsmError("softhsm2-util is not installed", rule="run `make setup` (Debian softhsm2)")
    conf = write_config(directory)
    if _token_labels(tool, conf).count(label):
        raise InputError(
            f"a token labelled {label!r} already exists in {conf}", rule="token labels are unique"
        )
    out, code = _run_with_pins(
        [tool, "--init-token", "--free", "--label", label],
        [so_pin, so_pin, user_pin, user_pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    if code != 0 or "has been initialized" not in out:
        raise HsmError(f"softhsm2-util could not initialise the token: {out.strip()[-200:]}")
    return conf


def _token_labels(tool: str, conf: Path) -> list[str]:
    import subprocess

    shown = subprocess.run(
        [tool, "--show-slots"],
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=False,
    )
    return [
        line.split(":", 1)[1].strip()
        for line in shown.stdout.splitlines()
        if line.strip().startswith("Label:") and line.split(":", 1)[1].strip()
    ]


def _await_no_echo(fd: int, timeout: float = 1.0) -> None:
    """Wait until the program has turned terminal echo off, i.e. is about to read a PIN.
    Typing earlier is lost: the tcsetattr(TCSAFLUSH) that turns echo off discards input
    already queued. A prompt that keeps echo on (a label) gets its answer after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not termios.tcgetattr(fd)[3] & termios.ECHO:
            time.sleep(0.01)  # let the read begin
            return
        time.sleep(0.01)


def _run_with_pins(
    argv: list[str], answers: list[str], env: dict[str, str], timeout: float = 30.0
) -> tuple[str, int]:
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    pending = list(answers)
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                break
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
            if pending and output.rstrip().endswith(b":"):
                _await_no_echo(fd)
                os.write(fd, pending.pop(0).encode() + b"\n")
                output += b"\n"
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)
