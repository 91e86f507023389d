"""The emulator's wire pieces as pure logic: MQTT 3.1.1 packets and a session's answers, the
WebSocket handshake key (RFC 6455), the IoT Hub query subset. The real clients (paho,
azure-iot-device) talk to them in test_sdk.py."""

from __future__ import annotations

import struct

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from pipeline.emulator import mqtt
from pipeline.emulator.hubquery import QueryError, parse
from pipeline.emulator.websocket import accept_key


class Pipe:
    """Bytes in, bytes out: a client's packets queued up front, the server's collected."""

    def __init__(self, data: bytes) -> None:
        self.incoming = bytearray(data)
        self.outgoing = bytearray()
        self.timeout: float | None = None
        self.closed = False

    def recv(self, n: int) -> bytes:
        out = bytes(self.incoming[:n])
        del self.incoming[:n]
        return out

    def send(self, data: bytes) -> None:
        self.outgoing += data

    def close(self) -> None:
        self.closed = True


def _string(text: str) -> bytes:
    return struct.pack("!H", len(text.encode())) + text.encode()


def _connect(level: int = 4, client_id: str = "dev-001", username: str = "u") -> bytes:
    body = _string("MQTT") + bytes([level, 0x80]) + struct.pack("!H", 60)
    return mqtt.encode(mqtt.CONNECT, 0, body + _string(client_id) + _string(username))


def _packets(data: bytes) -> list[tuple[int, int, bytes]]:
    pipe, out = Pipe(data), []
    while pipe.incoming:
        out.append(mqtt.read_packet(pipe))
    return out


class Echo:
    def __init__(self) -> None:
        self.seen: list[mqtt.Message] = []

    def publish(self, message: mqtt.Message) -> list[tuple[str, bytes]] | None:
        self.seen.append(message)
        return [("reply/" + message.topic, message.payload)]

    def subscribe(self, topic_filter: str, qos: int) -> int:
        return min(qos, 1) if topic_filter == "ok/#" else mqtt.SUBACK_FAILURE

    def closed(self) -> None:
        return


@given(st.binary(max_size=20000))
def test_packets_round_trip(payload: bytes) -> None:
    [(ptype, flags, body)] = _packets(mqtt.encode(mqtt.PUBLISH, 0x02, payload))
    assert (ptype, flags, body) == (mqtt.PUBLISH, 0x02, payload)


def test_remaining_length_uses_at_most_four_bytes() -> None:
    assert mqtt.encode(mqtt.PINGRESP, 0, b"") == b"\xd0\x00"
    assert mqtt.encode(mqtt.PUBACK, 0, b"x" * 128)[:3] == b"\x40\x80\x01"
    with pytest.raises(mqtt.ProtocolError):
        mqtt.read_packet(Pipe(b"\x30\xff\xff\xff\xff\x01"))


def test_a_session_answers_like_dps_and_iot_hub() -> None:
    handler = Echo()
    routed: list[mqtt.Connect] = []

    def router(
        connect: mqtt.Connect, chain: list[x509.Certificate]
    ) -> tuple[int, mqtt.Handler | None]:
        routed.append(connect)
        return mqtt.ACCEPTED, handler

    subscribe = _string("ok/#") + b"\x01" + _string("no/#") + b"\x01"
    publish = _string("a/b") + struct.pack("!H", 7) + b"hello"
    pipe = Pipe(
        _connect()
        + mqtt.encode(mqtt.SUBSCRIBE, 0x02, struct.pack("!H", 1) + subscribe)
        + mqtt.encode(mqtt.PUBLISH, 0x02, publish)
        + mqtt.encode(mqtt.PINGREQ, 0, b"")
        + mqtt.encode(mqtt.UNSUBSCRIBE, 0x02, struct.pack("!H", 2) + _string("ok/#"))
        + mqtt.encode(mqtt.DISCONNECT, 0, b"")
    )
    mqtt.Session(pipe, [], router).run()
    assert routed[0].client_id == "dev-001" and routed[0].username == "u"
    assert routed[0].password is None and not routed[0].clean_session
    answers = _packets(bytes(pipe.outgoing))
    assert answers[0] == (mqtt.CONNACK, 0, b"\x00\x00")
    assert answers[1] == (mqtt.SUBACK, 0, b"\x00\x01\x01\x80")
    assert answers[2] == (mqtt.PUBACK, 0, b"\x00\x07")  # before the reply
    assert answers[3] == (mqtt.PUBLISH, 0x02, _string("reply/a/b") + b"\x00\x01hello")
    assert answers[4] == (mqtt.PINGRESP, 0, b"")
    assert answers[5] == (mqtt.UNSUBACK, 0, b"\x00\x02")
    assert handler.seen == [mqtt.Message("a/b", b"hello", 1)] and pipe.closed


def test_a_session_refuses_other_protocol_levels_and_qos_2() -> None:
    pipe = Pipe(_connect(level=3))
    mqtt.Session(pipe, [], lambda c, ch: (mqtt.ACCEPTED, Echo())).run()
    assert _packets(bytes(pipe.outgoing)) == [(mqtt.CONNACK, 0, b"\x00\x01")]
    qos2 = mqtt.encode(mqtt.PUBLISH, 0x04, _string("a") + b"\x00\x01x")
    handler = Echo()
    pipe = Pipe(_connect() + qos2 + mqtt.encode(mqtt.PINGREQ, 0, b""))
    mqtt.Session(pipe, [], lambda c, ch: (mqtt.ACCEPTED, handler)).run()
    assert _packets(bytes(pipe.outgoing)) == [(mqtt.CONNACK, 0, b"\x00\x00")]
    assert handler.seen == [] and pipe.closed
    pipe = Pipe(_connect())
    mqtt.Session(pipe, [], lambda c, ch: (mqtt.NOT_AUTHORIZED, None)).run()
    assert _packets(bytes(pipe.outgoing)) == [(mqtt.CONNACK, 0, b"\x00\x05")]


def test_websocket_accept_key_is_rfc_6455s() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_hub_query_subset() -> None:
    devices = [
        {"deviceId": "a", "status": "enabled"},
        {"deviceId": "b", "status": "disabled"},
        {"deviceId": "it's", "status": "enabled"},
    ]

    def ids(query: str) -> list[str]:
        predicate = parse(query)
        return [d["deviceId"] for d in devices if predicate(d)]

    assert ids("SELECT * FROM devices") == ["a", "b", "it's"]
    assert ids("select * from devices where status = 'disabled'") == ["b"]
    assert ids("SELECT * FROM devices WHERE deviceId = 'it''s'") == ["it's"]
    assert ids("SELECT * FROM devices WHERE status <> 'disabled' AND deviceId != 'a'") == ["it's"]
    assert ids("SELECT * FROM devices WHERE (deviceId = 'a' OR deviceId IN ['b']) ") == ["a", "b"]
    for bad in (
        "SELECT COUNT() FROM devices",
        "SELECT * FROM devices.modules",
        "SELECT * FROM devices WHERE tags.line = 'A'",
        "SELECT * FROM devices WHERE deviceId = 'a' GROUP BY status",
        "SELECT * FROM devices WHERE deviceId = ",
    ):
        with pytest.raises(QueryError):
            parse(bad)
