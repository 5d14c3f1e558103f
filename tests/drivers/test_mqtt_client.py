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
