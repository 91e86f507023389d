"""The line protocol of `provline sign --serve` (pipeline/batch/serve.py): framing, bounds,
requests that are not requests, answers. Pipes only: no HSM."""

from __future__ import annotations

import base64
import json
import os
import threading

from pipeline.batch.serve import (
    MAX_REQUEST_LINE,
    encode_answer,
    parse_request,
    read_lines,
    requests_from,
)
from pipeline.batch.sign import DeviceFailed, Signed, SignRequest
from pipeline.errors import InputError, StorageError

from .support import crypto_csr, software_key


def _feed(chunks: list[bytes]) -> int:
    read, write = os.pipe()

    def writer() -> None:
        for chunk in chunks:
            os.write(write, chunk)
        os.close(write)

    threading.Thread(target=writer, daemon=True).start()
    return read


def test_lines_across_chunks_and_a_last_line_without_newline() -> None:
    fd = _feed([b'{"a"', b":1}\n\n", b'{"b":2}\n{"c"', b":3}"])
    assert list(read_lines(fd, lambda: False)) == [b'{"a":1}', b"", b'{"b":2}', b'{"c":3}']


def test_an_overlong_line_is_skipped_never_held() -> None:
    huge = b"x" * (MAX_REQUEST_LINE * 3)
    fd = _feed([b'{"first":1}\n', huge[: MAX_REQUEST_LINE * 2], huge, b"\n", b'{"next":1}\n'])
    assert list(read_lines(fd, lambda: False)) == [b'{"first":1}', None, b'{"next":1}']


def test_a_stop_ends_an_idle_reader() -> None:
    read, write = os.pipe()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert list(read_lines(read, stop.is_set)) == []
    os.close(write)
    os.close(read)


def test_requests_pem_or_base64_der_with_id_and_registration_id() -> None:
    pem = crypto_csr(software_key("ec-p256"), "d-1")
    der = crypto_csr(software_key("ec-p256"), "d-2", der=True)
    one = parse_request(json.dumps({"csr": pem.decode(), "id": 7}).encode())
    assert one.csr == pem and one.tag == 7 and one.error is None
    two = parse_request(
        json.dumps({"csr": base64.b64encode(der).decode(), "registration_id": "d-2"}).encode()
    )
    assert two.csr == der and two.registration_id == "d-2" and two.error is None


def test_requests_that_are_not_requests_carry_their_error() -> None:
    for line, says in [
        (b"not json", "bad request"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"csr": "x", "extra": 1}', "unknown key 'extra'"),
        (b'{"id": "a"}', "csr (PEM text or base64 DER) is missing"),
        (b'{"csr": "%%%"}', "neither PEM text nor base64 DER"),
        (b'{"csr": "AAAA", "registration_id": 5}', "registration_id must be a string"),
        (b'{"csr": "AAAA", "id": {"x": 1}}', "id must be a string or a number"),
        (b"\xff\xfe", "bad request"),
    ]:
        request = parse_request(line)
        assert isinstance(request.error, InputError), line
        assert says in request.error.line(), (line, request.error.line())


def test_the_source_answers_overlong_lines_in_order() -> None:
    fd = _feed([b"x" * (MAX_REQUEST_LINE + 5) + b"\n", b"\n", b'{"csr":"AAAA","id":2}\n'])
    requests = list(requests_from(fd)(lambda: False))
    assert len(requests) == 2
    assert requests[0].error is not None and "over 64 KiB" in requests[0].error.line()
    assert requests[1].tag == 2


def test_answers() -> None:
    request = SignRequest(b"", tag="r-1")
    ok = json.loads(encode_answer(request, Signed("d-1", "AB", "CD", b"-----BEGIN X-----\n")))
    assert ok == {
        "id": "r-1",
        "ok": True,
        "registration_id": "d-1",
        "serial": "AB",
        "sha256_thumbprint": "CD",
        "existing": False,
        "chain": "-----BEGIN X-----\n",
    }
    refused = json.loads(encode_answer(request, InputError("bad", rule="r")))
    assert refused == {"id": "r-1", "ok": False, "exit_code": 2, "error": "bad (r)", "fatal": False}
    failed = json.loads(encode_answer(request, DeviceFailed("signing failed", rule="r")))
    assert failed["exit_code"] == 4 and failed["fatal"] is False
    fatal = json.loads(encode_answer(request, StorageError("no space left on device", where="/x")))
    assert fatal["exit_code"] == 7 and fatal["fatal"] is True
