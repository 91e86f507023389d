"""MQTT 3.1.1 (OASIS mqtt-v3.1.1-os), server side: the subset DPS and IoT Hub speak to
devices. They are request/response endpoints, not brokers, so there is no routing, no retained
message and no persistent session: CONNECT/CONNACK, SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK,
PUBLISH at QoS 0 and 1 both ways with PUBACK, PINGREQ/PINGRESP and DISCONNECT. What a
publish means is decided by a :class:`Handler` (DPS or IoT Hub, :mod:`.mqttapi`).

Why not a broker library: see docs/emulator.md ("MQTT"). In short, the emulator must judge
the client's whole certificate chain per connection, which the Python brokers' TLS (the
standard library's ``ssl``) does not expose on Python 3.11, and it must answer each request
itself rather than route messages between clients.
"""

from __future__ import annotations

import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from .stream import Stream

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

# CONNACK return codes (MQTT §3.2.2.3)
ACCEPTED = 0
UNACCEPTABLE_PROTOCOL = 1
IDENTIFIER_REJECTED = 2
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80
MAX_PACKET = 300 * 1024  # IoT Hub messages are at most 256 KB, plus topic and properties
CONNECT_TIMEOUT = 30.0


class ProtocolError(Exception):
    """A malformed or unsupported packet: the connection is closed (MQTT §4.8)."""


@dataclass(frozen=True)
class Connect:
    client_id: str
    username: str | None
    password: bytes | None
    keepalive: int
    clean_session: bool


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int


class Handler(Protocol):
    """One authenticated connection's service (DPS or IoT Hub)."""

    def publish(self, message: Message) -> list[tuple[str, bytes]] | None:
        """Replies (topic, payload), each sent at QoS 1 after the PUBACK; None closes the
        connection, as IoT Hub does on a publish it does not accept."""
        ...

    def subscribe(self, topic_filter: str, qos: int) -> int:
        """The granted QoS, or :data:`SUBACK_FAILURE`."""
        ...

    def closed(self) -> None: ...


# (CONNECT, client chain leaf first) -> (CONNACK return code, handler when accepted)
Router = Callable[[Connect, list[x509.Certificate]], tuple[int, Handler | None]]


def _exact(stream: Stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = stream.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def read_packet(stream: Stream) -> tuple[int, int, bytes]:
    """(type, flags, rest of the packet); EOFError at the end of the stream."""
    first = _exact(stream, 1)[0]
    length, shift = 0, 0
    for _ in range(4):  # the remaining length is at most four bytes (MQTT §2.2.3)
        byte = _exact(stream, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("malformed remaining length")
    if length > MAX_PACKET:
        raise ProtocolError(f"packet of {length} bytes")
    return first >> 4, first & 0x0F, _exact(stream, length)


def encode(ptype: int, flags: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([ptype << 4 | flags])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def _string(data: bytes, at: int) -> tuple[str, int]:
    if at + 2 > len(data):
        raise ProtocolError("truncated string")
    (n,) = struct.unpack_from("!H", data, at)
    raw = data[at + 2 : at + 2 + n]
    if len(raw) != n:
        raise ProtocolError("truncated string")
    try:
        return raw.decode("utf-8"), at + 2 + n
    except UnicodeDecodeError as exc:
        raise ProtocolError("string is not UTF-8") from exc


def _encode_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def parse_connect(body: bytes) -> tuple[int, Connect]:
    """(protocol level, CONNECT); the caller refuses levels other than 4 (3.1.1)."""
    name, at = _string(body, 0)
    if name not in ("MQTT", "MQIsdp") or at + 4 > len(body):
        raise ProtocolError("not an MQTT CONNECT")
    level, flags = body[at], body[at + 1]
    (keepalive,) = struct.unpack_from("!H", body, at + 2)
    if flags & 0x01:
        raise ProtocolError("reserved connect flag set")  # MQTT-3.1.2-3
    at += 4
    client_id, at = _string(body, at)
    if flags & 0x04:  # will topic and message: read and ignored (DPS and IoT Hub keep none)
        _, at = _string(body, at)
        (n,) = struct.unpack_from("!H", body, at)
        at += 2 + n
    username = password = None
    if flags & 0x80:
        username, at = _string(body, at)
    if flags & 0x40:
        (n,) = struct.unpack_from("!H", body, at)
        password = body[at + 2 : at + 2 + n]
    return level, Connect(client_id, username, password, keepalive, bool(flags & 0x02))


class Session:
    """One client connection, from CONNECT to DISCONNECT (or a protocol error, a keep-alive
    timeout or a handler's refusal)."""

    def __init__(self, stream: Stream, chain: list[x509.Certificate], router: Router) -> None:
        self._stream = stream
        self._chain = chain
        self._router = router
        self._next_id = 0

    def _send(self, ptype: int, flags: int, body: bytes) -> None:
        self._stream.send(encode(ptype, flags, body))

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def run(self) -> None:
        handler: Handler | None = None
        try:
            self._stream.timeout = CONNECT_TIMEOUT
            ptype, _, body = read_packet(self._stream)
            if ptype != CONNECT:
                return
            level, connect = parse_connect(body)
            if level != 4:
                self._send(CONNACK, 0, bytes([0, UNACCEPTABLE_PROTOCOL]))
                return
            code, handler = self._router(connect, self._chain)
            self._send(CONNACK, 0, bytes([0, code]))  # session present: never (no sessions)
            if code != ACCEPTED or handler is None:
                return
            # the server may close after 1.5 keep-alive periods without a packet (MQTT §3.1.2.10)
            self._stream.timeout = connect.keepalive * 1.5 if connect.keepalive else None
            while self._serve(handler, *read_packet(self._stream)):
                pass
        except (EOFError, TimeoutError, ProtocolError, struct.error, OSError):
            return
        finally:
            if handler is not None:
                handler.closed()
            self._stream.close()

    def _serve(self, handler: Handler, ptype: int, flags: int, body: bytes) -> bool:
        """Answer one packet; False ends the connection."""
        if ptype == PUBLISH:
            qos = (flags >> 1) & 0x03
            if qos > 1:
                return False  # IoT Hub closes the connection on QoS 2; DPS grants at most 1
            topic, at = _string(body, 0)
            packet_id = None
            if qos:
                (packet_id,) = struct.unpack_from("!H", body, at)
                at += 2
            replies = handler.publish(Message(topic, body[at:], qos))
            if replies is None:
                return False
            if packet_id is not None:
                self._send(PUBACK, 0, struct.pack("!H", packet_id))
            for reply_topic, payload in replies:
                head = _encode_string(reply_topic) + struct.pack("!H", self._packet_id())
                self._send(PUBLISH, 0x02, head + payload)
            return True
        if ptype == PUBACK:
            return True  # the client acknowledges a reply: nothing is retried
        if ptype == SUBSCRIBE:
            if flags != 0x02:
                return False  # MQTT-3.8.1-1
            (packet_id,) = struct.unpack_from("!H", body, 0)
            at, codes = 2, bytearray()
            while at < len(body):
                topic_filter, at = _string(body, at)
                codes.append(handler.subscribe(topic_filter, body[at] & 0x03))
                at += 1
            if not codes:
                return False  # MQTT-3.8.3-3
            self._send(SUBACK, 0, struct.pack("!H", packet_id) + bytes(codes))
            return True
        if ptype == UNSUBSCRIBE:
            (packet_id,) = struct.unpack_from("!H", body, 0)
            self._send(UNSUBACK, 0, struct.pack("!H", packet_id))
            return True
        if ptype == PINGREQ:
            self._send(PINGRESP, 0, b"")
            return True
        return False  # DISCONNECT, or a packet a server never receives


def serve_session(stream: Stream, chain: list[x509.Certificate], router: Router) -> None:
    """Run one connection; an emulator bug is logged and ends only this connection."""
    try:
        Session(stream, chain, router).run()
    except Exception:
        traceback.print_exc(file=sys.stderr)
