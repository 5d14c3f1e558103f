"""The MQTT driver's paho client with buffered reads: every packet one recv() brought in is handled at once."""

from __future__ import annotations

import socket
import struct

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt_client import BufferedClient


def publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    """An MQTT 3.1.1 QoS 1 PUBLISH (remaining length below 128)."""
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", mid) + payload
    return bytes([0x32, len(body)]) + body


def test_packets_read_together_are_all_handled_in_one_loop_in_order_and_a_split_one_when_its_rest_arrives():
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311, manual_ack=True)
    got: list[tuple[str, bytes, int]] = []
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload, m.mid))
    client._sock = ours  # as paho's connect() would: the test plays the broker on the other end
    packets = [publish_packet(f"pdm/m{i}/telemetry", b'{"torque": %d}' % i, i + 1) for i in range(5)]
    stream = b"".join(packets)
    broker.sendall(stream[:-7])  # four packets and most of the fifth
    assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert got == [(f"pdm/m{i}/telemetry", b'{"torque": %d}' % i, i + 1) for i in range(4)]
    broker.sendall(stream[-7:])
    assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert [mid for _, _, mid in got] == [1, 2, 3, 4, 5]
    ours.close()
    broker.close()


def test_every_message_goes_to_on_message_per_topic_callbacks_are_refused():
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t", manual_ack=True)
    with pytest.raises(NotImplementedError):
        client.message_callback_add("pdm/#", lambda c, u, m: None)


def publish_v5(topic: str, payload: bytes, mid: int, qos: int = 1, properties: bytes = b"", flags: int = 0) -> bytes:
    """An MQTT 5 PUBLISH (remaining length below 128); `properties` encoded, without their length byte."""
    body = (struct.pack("!H", len(topic)) + topic.encode() + (struct.pack("!H", mid) if qos else b"")
            + bytes([len(properties)]) + properties + payload)
    return bytes([0x30 | qos << 1 | flags, len(body)]) + body


def test_mqtt_5_messages_with_and_without_properties_reach_on_message_as_paho_decodes_them():
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True)
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, m: got.append(m)
    client._sock = ours
    content_type = b"\x03" + struct.pack("!H", 4) + b"json"  # property 3: Content Type
    broker.sendall(publish_v5("pdm/a/telemetry", b"{}", 1) + publish_v5("pdm/b/telemetry", b"[]", 0, qos=0)
                   + publish_v5("pdm/c/telemetry", b"{}", 2, properties=content_type, flags=0x09))  # dup, retain
    assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
    seen = [(m.topic, m.payload, m.mid, m.qos, m.dup, m.retain) for m in got]
    assert seen == [("pdm/a/telemetry", b"{}", 1, 1, False, False), ("pdm/b/telemetry", b"[]", 0, 0, False, False),
                    ("pdm/c/telemetry", b"{}", 2, 1, True, True)]
    assert got[0].properties is None and getattr(got[2].properties, "ContentType", None) == "json"
    ours.close()
    broker.close()
