"""MQTT over WebSockets (RFC 6455) on the HTTPS listeners, as DPS and IoT Hub serve it on
port 443: ``GET /$iothub/websocket`` with ``Upgrade: websocket`` and the ``mqtt``
subprotocol, then MQTT in binary frames (Microsoft Learn, "Communicate with DPS using the
MQTT protocol"; "Communicate with an IoT hub using the MQTT protocol")."""

from __future__ import annotations

import base64
import hashlib
import struct

from .stream import Stream

WEBSOCKET_PATH = "/$iothub/websocket"
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_MAX_FRAME = 1 << 20


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()


def handshake_response(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    ).encode()


class WebSocketStream:
    """A byte stream over WebSocket frames: client frames are masked (RFC 6455 §5.3), the
    server's are not; pings are answered, a close frame ends the stream."""

    def __init__(self, inner: Stream) -> None:
        self._inner = inner
        self._buffer = bytearray()
        self._closed = False

    @property
    def timeout(self) -> float | None:
        return self._inner.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._inner.timeout = value

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._inner.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def _frame(self) -> None:
        head = self._exact(2)
        opcode, masked, length = head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._exact(8))[0]
        if not masked or length > _MAX_FRAME:
            raise EOFError  # a client must mask; an oversized frame ends the connection
        mask = self._exact(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(self._exact(length)))
        if opcode == 0x8:
            self._send_frame(0x8, data[:2])
            raise EOFError
        if opcode == 0x9:
            self._send_frame(0xA, data)
        elif opcode in (0x0, 0x2):
            self._buffer += data
        elif opcode == 0x1:
            raise EOFError  # MQTT travels in binary frames only

    def recv(self, n: int) -> bytes:
        if self._closed:
            return b""
        try:
            while not self._buffer:
                self._frame()
        except EOFError:
            self._closed = True
            return b""
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def _send_frame(self, opcode: int, data: bytes) -> None:
        length = len(data)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, length)
        self._inner.send(head + data)

    def send(self, data: bytes) -> None:
        self._send_frame(0x2, data)

    def close(self) -> None:
        self._closed = True
        self._inner.close()
