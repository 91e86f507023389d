"""A byte stream over a pyOpenSSL connection, with a read timeout (MQTT keep-alive), for the
MQTT listener and MQTT over WebSockets."""

from __future__ import annotations

import contextlib
import select
import socket
from typing import Protocol

from OpenSSL import SSL


class Stream(Protocol):
    timeout: float | None

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end; TimeoutError after ``timeout`` seconds idle."""
        ...

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class TLSStream:
    def __init__(self, conn: SSL.Connection, sock: socket.socket, prefix: bytes = b"") -> None:
        self._conn = conn
        self._sock = sock
        self._prefix = bytearray(prefix)
        self.timeout: float | None = None

    def recv(self, n: int) -> bytes:
        if self._prefix:
            out = bytes(self._prefix[:n])
            del self._prefix[:n]
            return out
        while True:
            if not self._conn.pending() and self.timeout is not None:
                ready, _, _ = select.select([self._sock], [], [], self.timeout)
                if not ready:
                    raise TimeoutError
            try:
                return bytes(self._conn.recv(n))
            except SSL.WantReadError:
                continue
            except (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error, OSError):
                return b""

    def send(self, data: bytes) -> None:
        self._conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            self._conn.shutdown()
        with contextlib.suppress(OSError):
            self._sock.close()
