"""HTTPS plumbing for the emulator: three TLS listeners on loopback (DPS global device
endpoint, DPS service endpoint + management, IoT Hub), client certificates requested and read
as the *chain* the client sent (pyOpenSSL: Python 3.11's ssl exposes only the leaf), quotas,
and fault injection."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from OpenSSL import SSL


@dataclass
class Request:
    method: str
    path: list[str]  # decoded segments
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    chain: list[x509.Certificate]  # client certificate chain as presented, leaf first

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


@dataclass
class Faults:
    """Fault injection; re-read from ``<data-dir>/faults.json`` when that file changes."""

    error_rate: float = 0.0  # probability of a 500 or 503
    drop_rate: float = 0.0  # probability of closing the connection with no response
    latency_ms: float = 0.0


class Window:
    """A quota in fixed wall-clock windows (a minute, as DPS documents its rates; tests
    shorten the window to see the next one open)."""

    def __init__(self, limit: int, seconds: float = 60.0) -> None:
        self.limit = limit
        self.seconds = seconds
        self._window = -1
        self._count = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None when allowed; otherwise whole seconds until the next window (Retry-After)."""
        with self._lock:
            now = time.time()
            window = int(now // self.seconds)
            if window != self._window:
                self._window, self._count = window, 0
            if self._count >= self.limit:
                return max(1, math.ceil((window + 1) * self.seconds - now))
            self._count += 1
            return None


class _TLSStream(io.RawIOBase):
    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._conn.recv(len(buffer))
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return 0
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        self._conn.sendall(bytes(data))
        return len(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        ssl_context: SSL.Context,
        route: Handler,
        faults: Callable[[], Faults],
    ) -> None:
        self.ssl_context = ssl_context
        self.route = route
        self.faults = faults
        super().__init__(address, _RequestHandler)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.conn = SSL.Connection(self.server.ssl_context, self.request)
        self.conn.set_accept_state()
        try:
            self.conn.do_handshake()
        except (SSL.Error, OSError):
            self.handshake_ok = False
        else:
            self.handshake_ok = True
        self.rfile = io.BufferedReader(_TLSStream(self.conn))
        self.wfile = _TLSStream(self.conn)  # type: ignore[assignment]

    def handle(self) -> None:
        if self.handshake_ok:
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            self.conn.shutdown()

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        return

    def _chain(self) -> list[x509.Certificate]:
        """Leaf first. On the server side OpenSSL's peer chain leaves the leaf out."""
        leaf = self.conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return []
        rest = list(self.conn.get_peer_cert_chain(as_cryptography=True) or [])
        return [leaf, *(c for c in rest if c != leaf)]

    def _serve(self) -> None:
        faults = self.server.faults()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        if faults.drop_rate and random.random() < faults.drop_rate:
            self.close_connection = True
            self.conn.sock_shutdown(socket.SHUT_RDWR)
            return
        split = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=[unquote(p) for p in split.path.split("/") if p],
            query={k: v[0] for k, v in parse_qs(split.query).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            chain=self._chain(),
        )
        if faults.error_rate and random.random() < faults.error_rate:
            status = random.choice((500, 503))
            response = error(
                status,
                status * 1000 + 1,
                "injected fault",
                {"Retry-After": "1"} if status == 503 else None,
            )
        else:
            try:
                response = self.server.route(request)
            except Exception as exc:  # a bug in the emulator must still answer
                response = error(500, 500001, f"emulator error: {type(exc).__name__}: {exc}")
        self._send(response)

    def _send(self, response: Response) -> None:
        data = b"" if response.body is None else json.dumps(response.body).encode()
        self.send_response(response.status)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve


def error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A DPS error body (ProvisioningServiceErrorDetails) with x-ms-error-code."""
    body = {
        "errorCode": code,
        "trackingId": str(uuid.uuid4()),
        "message": message,
        "timestampUtc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Response(status, body, {"x-ms-error-code": str(code), **(headers or {})})


def tls_context(cert_file: Path, key_file: Path) -> SSL.Context:
    """Ask every client for a certificate, accept any at the TLS layer: like DPS, the
    emulator judges the chain in the application and answers 401 with a JSON body."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(str(cert_file))
    ctx.use_privatekey_file(str(key_file))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)
    ctx.set_session_id(b"provline-emulator")
    return ctx


def serve(
    host: str, port: int, ctx: SSL.Context, route: Handler, faults: Callable[[], Faults]
) -> _Server:
    server = _Server((host, port), ctx, route, faults)
    threading.Thread(
        target=server.serve_forever, name=f"emulator:{server.server_port}", daemon=True
    ).start()
    return server
