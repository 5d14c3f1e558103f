"""Fuzzing the MQTT driver's own PUBLISH decoding (drivers/mqtt_client.py) against paho's: for any packet a broker
could send, well-formed or not, both hand on_message the same message (topic bytes, payload, mid, QoS, dup, retain,
properties, where the fast path's None stands for paho's empty set) or both refuse it the same way. The fast path may only ever be faster, never different."""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as mqtt
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt_client import BufferedClient
from tests.fuzz.strategies import fuzz_settings

PROTOCOLS = st.sampled_from([mqtt.MQTTv311, mqtt.MQTTv5])


def outcome(client_class: type[mqtt.Client], protocol: int, command: int, packet: bytes) -> tuple[Any, ...]:
    client = client_class(CallbackAPIVersion.VERSION2, client_id="fuzz", protocol=protocol, manual_ack=True)
    seen: list[tuple[Any, ...]] = []
    client.on_message = lambda c, u, m: seen.append(
        (m._topic, m.payload, m.mid, m.qos, m.dup, m.retain, m.properties.json() if m.properties else {}))  # none = empty
    client._in_packet = {"command": command, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
                         "remaining_length": len(packet), "packet": bytearray(packet), "to_process": 0, "pos": 0}
    client._send_pubrec = lambda mid: mqtt.MQTT_ERR_SUCCESS  # QoS 2 answers: not under test, no socket here
    try:
        rc = client._handle_publish()
    except Exception as error:  # noqa: BLE001 - the refusal itself is what is compared
        return ("raised", type(error).__name__, tuple(seen))
    return ("returned", rc, tuple(seen))


def well_formed(topic: bytes, qos: int, mid: int, properties: bytes, payload: bytes, protocol: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    if protocol == mqtt.MQTTv5:
        body += bytes([len(properties)]) + properties  # a one-byte variable integer: properties below 128 bytes
    return body + payload


PROPERTIES = st.sampled_from([b"", b"\x01\x01", b"\x03\x00\x04json", b"\x23\x00\x05", b"\x26\x00\x01k\x00\x01v",
                              b"\x02\x00\x00\x00\x3c", b"\xff", b"\x03\x00"])


@fuzz_settings(300, 5_000)
@given(protocol=PROTOCOLS, flags=st.integers(0, 15), topic=st.binary(max_size=40), mid=st.integers(0, 65535),
       properties=PROPERTIES, payload=st.binary(max_size=60))
def test_a_well_formed_publish_is_decoded_as_paho_decodes_it(protocol, flags, topic, mid, properties, payload):
    command = 0x30 | flags
    packet = well_formed(topic, (flags >> 1) & 3, mid, properties, payload, protocol)
    assert outcome(BufferedClient, protocol, command, packet) == outcome(mqtt.Client, protocol, command, packet)


@fuzz_settings(300, 5_000)
@given(protocol=PROTOCOLS, flags=st.integers(0, 15), packet=st.binary(max_size=80))
def test_any_bytes_as_a_publish_are_decoded_or_refused_as_paho_does(protocol, flags, packet):
    command = 0x30 | flags
    assert outcome(BufferedClient, protocol, command, packet) == outcome(mqtt.Client, protocol, command, packet)
