"""Decoding MQTT messages into readings: a table of payloads and what each becomes."""

from __future__ import annotations

import json

import pytest

from drivers.mqtt import MqttConfig, PayloadDecoder, parse_ts
from model.validate import Reason

RECEIVED = 1_764_000_000.0
TOPIC = "pdm/press-1/telemetry"
VALUES = {"air_temperature": 300.1, "process_temperature": 310.2, "rotational_speed": 1500, "torque": 40.5,
          "tool_wear": 12}


def decoder(**config):
    return PayloadDecoder(MqttConfig(url="mqtt://127.0.0.1", **config), "machine_type")


def payload(**fields):
    return json.dumps({**VALUES, **fields}).encode()


@pytest.mark.parametrize(
    ("config", "topic", "raw", "reason", "message"),
    [
        ({}, TOPIC, b"\xff\xfe", Reason.MALFORMED, "not JSON"),
        ({}, TOPIC, b"{\"torque\": ", Reason.MALFORMED, "not JSON"),
        ({}, TOPIC, b"[1, 2]", Reason.NOT_AN_OBJECT, "an array, not a JSON object"),
        ({}, TOPIC, b"42", Reason.NOT_AN_OBJECT, "a number"),
        ({"max_payload_bytes": 64}, TOPIC, payload(), Reason.PAYLOAD_TOO_LARGE, "more than mqtt.max_payload_bytes = 64"),
        ({}, "pdm", payload(), Reason.UNKNOWN_MACHINE, "no valid machine id in the topic level 1"),
        ({}, "pdm/bad id!/telemetry", payload(), Reason.UNKNOWN_MACHINE, "no valid machine id"),
        ({"machine_id_from": "machine"}, TOPIC, payload(), Reason.UNKNOWN_MACHINE, "payload field 'machine'"),
        ({}, TOPIC, payload(), Reason.UNKNOWN_MACHINE, "no machine type for press-1"),
        ({"default_machine_type": "M"}, TOPIC, payload(ts="yesterday"), Reason.MALFORMED, "not an ISO-8601 time"),
        ({"default_machine_type": "M"}, TOPIC, payload(ts=1_764_000_000_000), Reason.MALFORMED,
         "looks like milliseconds"),
        ({"default_machine_type": "M"}, TOPIC, payload(ts=True), Reason.MALFORMED, "ts is a boolean"),
    ],
)
def test_payloads_that_cannot_be_readings_are_rejected_with_a_reason(config, topic, raw, reason, message):
    reading = decoder(**config).decode(topic, raw, RECEIVED)
    assert reading.rejection is not None
    assert reading.rejection.reason is reason and message in reading.rejection.message
    assert reading.received_at == RECEIVED and reading.source == f"mqtt:{topic}"
    assert reading.payload == raw[:4096].decode("utf-8", "replace")


def test_the_default_payload_becomes_a_reading_with_its_own_time():
    reading = decoder(machines={"press-1": "H"}).decode(TOPIC, payload(ts="2026-11-26T08:00:00Z"), RECEIVED)
    assert reading.rejection is None
    assert (reading.machine_id, reading.ts) == ("press-1", 1_795_680_000.0)
    assert reading.fields == {**VALUES, "machine_type": "H"}


def test_machine_id_from_a_payload_field_and_keys_mapped_to_inputs():
    raw = json.dumps({"machine": "mill-2", "ts": 1_764_000_100, "air_temp_k": 300.1, "machine_type": "L"}).encode()
    reading = decoder(machine_id_from="machine", payload_map={"air_temp_k": "air_temperature"}).decode(
        "plant/telemetry", raw, RECEIVED)
    assert (reading.machine_id, reading.ts) == ("mill-2", 1_764_000_100.0)
    assert reading.fields == {"air_temperature": 300.1, "machine_type": "L"}


def test_the_configured_machine_type_wins_over_the_payload_and_the_default():
    decode = decoder(machines={"press-1": "H"}, default_machine_type="L").decode
    assert decode(TOPIC, payload(machine_type="M"), RECEIVED).fields["machine_type"] == "H"
    assert decode("pdm/other/telemetry", payload(machine_type="M"), RECEIVED).fields["machine_type"] == "M"
    assert decode("pdm/other/telemetry", payload(), RECEIVED).fields["machine_type"] == "L"


@pytest.mark.parametrize(
    ("value", "ts"),
    [(None, RECEIVED), (1_764_000_000, 1_764_000_000.0), (1_764_000_000.25, 1_764_000_000.25),
     ("2026-11-26T08:00:00", 1_795_680_000.0), ("2026-11-26T09:00:00+01:00", 1_795_680_000.0)],
)
def test_timestamps_iso_or_epoch_seconds_naive_is_utc(value, ts):
    assert parse_ts(value, RECEIVED) == ts


@pytest.mark.parametrize(
    "raw",
    [json.dumps(VALUES).encode("utf-16"),  # JSON in UTF-16, and UTF-8 with a BOM: json.loads reads both
     b"\xef\xbb\xbf" + json.dumps(VALUES).encode(),
     json.dumps({**VALUES, "note": "\ud800"}).encode(),  # a lone surrogate, escaped
     b"[" * 300 + b"]" * 300],  # nested deeper than pydantic-core's parser goes
)
def test_json_the_fast_parser_refuses_is_read_as_json_loads_reads_it(raw):
    reading = decoder(default_machine_type="M").decode(TOPIC, raw, RECEIVED)
    expected = json.loads(raw)
    if isinstance(expected, dict):
        assert reading.rejection is None and reading.fields == {**expected, "machine_type": "M"}
    else:
        assert reading.rejection is not None and reading.rejection.reason is Reason.NOT_AN_OBJECT


def test_a_topic_seen_again_gives_the_same_machine_and_source_and_long_topics_are_cut():
    decode = decoder(default_machine_type="M").decode
    for _ in range(2):
        reading = decode(TOPIC, payload(), RECEIVED)
        assert (reading.machine_id, reading.source) == ("press-1", f"mqtt:{TOPIC}")
    long_topic = "pdm/press-2/" + "x" * 70_000
    for _ in range(2):
        reading = decode(long_topic, payload(), RECEIVED)
        assert reading.machine_id == "press-2" and len(reading.source) == 256 and reading.source.endswith("[cut]")
