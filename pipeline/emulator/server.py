"""HTTPS plumbing for the emulator: three TLS listeners on loopback (DPS global device
endpoint, DPS service endpoint + management, IoT Hub), client certificates requested and read
as the *chain* the client sent (pyOpenSSL: Python 3.11's ssl exposes only the leaf), quotas,
and fault injection."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import random
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from OpenSSL import SSL

from . import mqtt
from .stream import Stream, TLSStream
from .websocket import WEBSOCKET_PATH, WebSocketStream, handshake_response


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


def _recv(conn: SSL.Connection, n: int) -> bytes:
    try:
        return bytes(conn.recv(n))
    except (SSL.ZeroReturnError, SSL.SysCallError):
        return b""


class _Reader:
    """What BaseHTTPRequestHandler reads the request through (``readline``, ``read``),
    with the bytes it has buffered handed over when the connection becomes MQTT over
    WebSockets."""

    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn
        self._buffer = bytearray()

    def _fill(self) -> bool:
        data = _recv(self._conn, 65536)
        self._buffer += data
        return bool(data)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 and (limit < 0 or end < limit):
                n = end + 1
                break
            if 0 <= limit <= len(self._buffer) or not self._fill():
                n = len(self._buffer) if limit < 0 else min(limit, len(self._buffer))
                break
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n and self._fill():
            pass
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def take(self) -> bytes:
        out = bytes(self._buffer)
        self._buffer.clear()
        return out


class _Writer:
    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn

    def write(self, data: bytes) -> int:
        self._conn.sendall(bytes(data))
        return len(data)

    def flush(self) -> None:
        return


def peer_chain(conn: SSL.Connection) -> list[x509.Certificate]:
    """The client's chain as presented, leaf first. On the server side OpenSSL's peer chain
    leaves the leaf out."""
    leaf = conn.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return []
    rest = list(conn.get_peer_cert_chain(as_cryptography=True) or [])
    return [leaf, *(c for c in rest if c != leaf)]


# MQTT over WebSockets on an HTTPS listener: (stream, client chain) -> runs the session
WebSocketHandler = Callable[[Stream, list[x509.Certificate]], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        ssl_context: SSL.Context,
        route: Handler,
        faults: Callable[[], Faults],
        websocket: WebSocketHandler | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.route = route
        self.faults = faults
        self.websocket = websocket
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
        self.reader = _Reader(self.conn)
        self.rfile = self.reader  # type: ignore[assignment]
        self.wfile = _Writer(self.conn)  # type: ignore[assignment]

    def handle(self) -> None:
        if self.handshake_ok:
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            self.conn.shutdown()

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        return

    def _chain(self) -> list[x509.Certificate]:
        return peer_chain(self.conn)

    def _upgrade(self) -> None:
        """MQTT over WebSockets: only on the documented path with the ``mqtt`` subprotocol."""
        protocols = {p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")}
        key = self.headers.get("Sec-WebSocket-Key")
        self.close_connection = True
        if self.server.websocket is None or self.path != WEBSOCKET_PATH:
            self._send(Response(404, None))
            return
        if not key or "mqtt" not in protocols or self.command != "GET":
            self._send(Response(400, None))
            return
        self.conn.sendall(handshake_response(key))
        stream = WebSocketStream(TLSStream(self.conn, self.request, self.reader.take()))
        self.server.websocket(stream, self._chain())

    def _serve(self) -> None:
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self._upgrade()
            return
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


class ListenError(OSError):
    """An address and port the emulator cannot listen on, said in one line."""


@contextlib.contextmanager
def _listening(host: str, port: int) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EACCES and 0 < port < 1024:
            hint = (
                "; ports below 1024 need root, CAP_NET_BIND_SERVICE or "
                "net.ipv4.ip_unprivileged_port_start (docs/emulator.md)"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "; the address is not on this machine (a loopback alias? docs/emulator.md)"
        raise ListenError(
            exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}{hint}"
        ) from exc


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
    host: str,
    port: int,
    ctx: SSL.Context,
    route: Handler,
    faults: Callable[[], Faults],
    websocket: WebSocketHandler | None = None,
) -> _Server:
    with _listening(host, port):
        server = _Server((host, port), ctx, route, faults, websocket)
    threading.Thread(
        target=server.serve_forever, name=f"emulator:{server.server_port}", daemon=True
    ).start()
    return server


class _MqttServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], ssl_context: SSL.Context, router: mqtt.Router
    ) -> None:
        self.ssl_context = ssl_context
        self.router = router
        super().__init__(address, _MqttConnection)


class _MqttConnection(socketserver.BaseRequestHandler):
    server: _MqttServer

    def handle(self) -> None:
        conn = SSL.Connection(self.server.ssl_context, self.request)
        conn.set_accept_state()
        try:
            conn.do_handshake()
        except (SSL.Error, OSError):
            return
        mqtt.serve_session(TLSStream(conn, self.request), peer_chain(conn), self.server.router)


def serve_mqtt(host: str, port: int, ctx: SSL.Context, router: mqtt.Router) -> _MqttServer:
    """MQTT over TLS (port 8883 on Azure): the same accept-any TLS context as HTTPS, the
    chain judged by the router at CONNECT and by the service per request."""
    with _listening(host, port):
        server = _MqttServer((host, port), ctx, router)
    threading.Thread(
        target=server.serve_forever, name=f"emulator-mqtt:{server.server_address[1]}", daemon=True
    ).start()
    return server
