"""The line protocol of ``provline sign --serve`` (docs/device-keys.md, "The serve protocol"):
requests in on one file descriptor, answers out on another, one JSON object per line, in
order.

A request: ``{"csr": "<PEM text, or base64 of DER>", "registration_id": "<optional>",
"id": <optional, echoed>}``. An answer: ``{"id": ..., "ok": true, "registration_id",
"serial", "sha256_thumbprint", "existing", "chain": "<PEM: leaf, issuing CA, root>"}``, or
``{"id": ..., "ok": false, "exit_code": N, "error": "<one line>", "fatal": false}``. A fatal
answer (an HSM or storage failure) is the last: the process then exits with that code.

Reading is bounded: a line is at most :data:`MAX_REQUEST_LINE` bytes (a longer one is
answered as an error and skipped, never held), and the reader wakes every
:data:`POLL_SECONDS` to see whether the session was asked to stop, so SIGTERM ends an idle
session at once.
"""

from __future__ import annotations

import errno
import json
import os
import select
from collections.abc import Callable, Iterator
from typing import Any

from ..ca.csr import CSR_RULE, MAX_CSR_BYTES, decode_base64
from ..errors import InputError, ProvlineError
from ..files import write_all
from ..inputfile import KIB
from .sign import DeviceFailed, Signed, SignRequest

MAX_REQUEST_LINE = 64 * KIB  # a 16 KiB CSR as base64 in JSON, with room to spare
POLL_SECONDS = 0.25
PROTOCOL_RULE = "serve protocol: one JSON object per line (docs/device-keys.md)"
_KEYS = {"csr", "registration_id", "id"}


def read_lines(fd: int, should_stop: Callable[[], bool]) -> Iterator[bytes | None]:
    """Lines from ``fd`` without their newline (None for a line over the limit, which is
    skipped), until end of input or ``should_stop()``."""
    buffer = bytearray()
    skipping = False
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if skipping:
                skipping = False
                yield None
            else:
                yield line if len(line) <= MAX_REQUEST_LINE else None
            continue
        if len(buffer) > MAX_REQUEST_LINE:
            buffer.clear()
            skipping = True
        if should_stop():
            return
        ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if buffer.strip() or skipping:
                yield None if skipping else bytes(buffer)
            return
        buffer += chunk


def parse_request(line: bytes) -> SignRequest:
    """A request line, or a request that carries why it is not one (answered in order)."""
    tag: Any = None
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        tag = data.get("id")
        if not isinstance(tag, str | int | float | type(None)) or isinstance(tag, bool):
            tag = None
            raise ValueError("id must be a string or a number")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}")
        csr = data.get("csr")
        if not isinstance(csr, str) or not csr:
            raise ValueError("csr (PEM text or base64 DER) is missing")
        rid = data.get("registration_id")
        if rid is not None and not isinstance(rid, str):
            raise ValueError("registration_id must be a string")
    except ValueError as exc:
        return SignRequest(
            b"", tag=tag, error=InputError(f"bad request: {exc}", rule=PROTOCOL_RULE)
        )
    try:
        body = csr.encode("ascii") if "-----BEGIN" in csr else decode_base64(csr)
    except (UnicodeEncodeError, InputError):
        error = InputError("bad request: csr is neither PEM text nor base64 DER", rule=CSR_RULE)
        return SignRequest(b"", rid, tag, error=error)
    return SignRequest(body, rid, tag)


def too_long() -> SignRequest:
    return SignRequest(
        b"",
        error=InputError(
            f"bad request: a line over {MAX_REQUEST_LINE // KIB} KiB (a CSR is at most "
            f"{MAX_CSR_BYTES // KIB} KiB)",
            rule=PROTOCOL_RULE,
        ),
    )


def requests_from(fd: int) -> Callable[[Callable[[], bool]], Iterator[SignRequest]]:
    """The requests on ``fd``, as a session reads them (blank lines are ignored)."""

    def source(should_stop: Callable[[], bool]) -> Iterator[SignRequest]:
        for line in read_lines(fd, should_stop):
            if line is None:
                yield too_long()
            elif line.strip():
                yield parse_request(line)

    return source


def encode_answer(request: SignRequest, outcome: Signed | ProvlineError) -> bytes:
    answer: dict[str, Any] = {"id": request.tag}
    if isinstance(outcome, Signed):
        answer.update(outcome.to_json())
    else:
        fatal = not isinstance(outcome, InputError | DeviceFailed)
        answer.update(ok=False, exit_code=outcome.exit_code, error=outcome.line(), fatal=fatal)
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


def answers_to(fd: int) -> Callable[[SignRequest, Signed | ProvlineError], bool]:
    """Writes each answer to ``fd`` at once; False once the reader is gone (EPIPE)."""

    def answer(request: SignRequest, outcome: Signed | ProvlineError) -> bool:
        try:
            write_all(fd, encode_answer(request, outcome))
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                return False
            raise
        return True

    return answer
