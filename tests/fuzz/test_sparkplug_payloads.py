"""Fuzzing the Sparkplug B decoder (drivers/sparkplug.py): any bytes on any topic, payloads of the schema with any
metrics, and sequences of them that go through the decoder's session state, never raise; each message becomes
readings the pipeline can take or one refusal with a reason in one line; what reaches the model is valid."""

from __future__ import annotations

import base64
import math
import re

from hypothesis import given
from hypothesis import strategies as st

from drivers.base import RawReading
from drivers.simulator import INPUTS
from drivers.sparkplug import EARLIEST_MS, LATEST_MS, PAYLOAD_KEPT_BYTES, SparkplugDecoder
from drivers.sparkplug_b_pb2 import Payload
from drivers.sparkplug_config import SparkplugConfig
from model.features import MACHINE_TYPE_INPUT
from model.validate import Reason
from tests.fuzz.strategies import fuzz_settings
from tests.fuzz.test_mqtt_payloads import assert_scored_only_if_valid

RECEIVED = 1_790_000_000.0
MACHINE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MESSAGE_TYPES = ["NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA", "NCMD", "DCMD", "STATE", "DDATA "]
NAMES = st.sampled_from([*INPUTS, "bdSeq", "Node Control/Rebirth", "Firmware", "Sensors/torque", ""]) \
    | st.text(max_size=8)
UINT64 = st.integers(0, 2**64 - 1)
CONFIGS = [
    {},
    {"metrics": {"Sensors/torque": "torque"}},
    {"edge_node_ids": ["n1"], "devices": [{"edge_node_id": "n1", "device_id": "Press 1", "machine_id": "press-1"},
                                          {"edge_node_id": "n1", "machine_type": "H"}]},
    {"request_rebirth": False},
]

ids = st.sampled_from(["n1", "n2", "m1", "Press 1", "bad id!", "x" * 70, ""])
topics = st.one_of(
    st.builds(lambda t, n, d: "/".join(["spBv1.0", "g", t, n, *([d] if d is not None else [])]),
              st.sampled_from(MESSAGE_TYPES), ids, st.none() | ids),
    st.text(max_size=40),
)


@st.composite
def metrics(draw, message: Payload) -> None:
    for _ in range(draw(st.integers(0, 8))):
        metric = message.metrics.add()
        if draw(st.booleans()):
            metric.name = draw(NAMES)
        if draw(st.booleans()):
            metric.alias = draw(st.integers(0, 12) | UINT64)
        if draw(st.booleans()):
            metric.datatype = draw(st.integers(0, 40) | st.integers(0, 2**32 - 1))
        if draw(st.booleans()):
            metric.timestamp = draw(st.integers(EARLIEST_MS - 10, LATEST_MS + 10) | UINT64)
        if draw(st.integers(0, 9)) == 0:
            metric.is_null = True
        kind = draw(st.sampled_from(["int", "long", "float", "double", "bool", "string", "bytes", "dataset", "none"]))
        if kind == "int":
            metric.int_value = draw(st.integers(0, 2**32 - 1))
        elif kind == "long":
            metric.long_value = draw(UINT64)
        elif kind == "float":
            metric.float_value = draw(st.floats(width=32))
        elif kind == "double":
            metric.double_value = draw(st.floats())
        elif kind == "bool":
            metric.boolean_value = draw(st.booleans())
        elif kind == "string":
            metric.string_value = draw(st.text(max_size=10))
        elif kind == "bytes":
            metric.bytes_value = draw(st.binary(max_size=10))
        elif kind == "dataset":
            metric.dataset_value.num_of_columns = 1


@st.composite
def payloads(draw) -> bytes:
    message = Payload()
    if draw(st.booleans()):
        message.timestamp = draw(st.integers(EARLIEST_MS - 10, LATEST_MS + 10) | UINT64)
    if draw(st.integers(0, 4)):
        message.seq = draw(st.integers(0, 260) | UINT64)
    draw(metrics(message))
    raw = message.SerializeToString()
    spoil = draw(st.integers(0, 5))
    if spoil == 0 and raw:  # flip a byte
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    elif spoil == 1:  # cut
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


messages = st.tuples(topics, payloads() | st.binary(max_size=200))


def decoder(config: dict) -> SparkplugDecoder:
    return SparkplugDecoder(SparkplugConfig(group_id="g", **config), {"m1": "L"}, "M", MACHINE_TYPE_INPUT, 4096)


def assert_decoded(readings: list[RawReading], topic: str, payload: bytes) -> None:
    assert isinstance(readings, list)
    refusals = [r for r in readings if r.rejection is not None and r.rejection.reason is Reason.MALFORMED]
    assert len(refusals) <= 1
    for reading in readings:
        assert reading.received_at == RECEIVED and reading.source.startswith("mqtt:")
        if reading.rejection is not None:
            assert isinstance(reading.rejection.reason, Reason)
            assert reading.rejection.message and "\n" not in reading.rejection.message
            assert len(reading.rejection.message) < 400
            assert base64.b64decode(reading.payload.removeprefix("base64:")) == payload[:PAYLOAD_KEPT_BYTES]
            continue
        assert MACHINE_ID.fullmatch(reading.machine_id)
        assert math.isfinite(reading.ts) and EARLIEST_MS / 1000 <= reading.ts <= LATEST_MS / 1000 \
            or reading.ts == RECEIVED
        assert reading.fields[MACHINE_TYPE_INPUT] in ("L", "M", "H")


@fuzz_settings(short=300, long=30_000)
@given(config=st.sampled_from(CONFIGS), topic=topics, payload=payloads() | st.binary(max_size=300))
def test_any_message_becomes_readings_or_a_refusal_with_a_reason(scorer, config, topic, payload):
    dec = decoder(config)
    readings = dec.readings(topic, payload, RECEIVED)
    assert_decoded(readings, topic, payload)
    assert_scored_only_if_valid(scorer, readings)
    for command_topic, command in dec.requests():
        assert command_topic.startswith("spBv1.0/g/NCMD/") and Payload.FromString(command).metrics


@fuzz_settings(short=100, long=10_000)
@given(config=st.sampled_from(CONFIGS), sequence=st.lists(messages, max_size=30))
def test_any_sequence_of_messages_keeps_the_decoder_working(scorer, config, sequence):
    """Births, data, deaths and garbage in any order: state never breaks the decoder, and it still reads a
    well-formed session afterwards."""
    dec = decoder(config)
    for topic, payload in sequence:
        readings = dec.readings(topic, payload, RECEIVED)
        assert_decoded(readings, topic, payload)
        assert_scored_only_if_valid(scorer, readings)
        dec.requests()
    stats = dec.stats()
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
    birth = Payload(seq=0, metrics=[{"name": "bdSeq", "long_value": 1, "datatype": 8}])
    data = Payload(seq=1, timestamp=EARLIEST_MS + 1000,
                   metrics=[{"name": name, "double_value": 1.0, "datatype": 10} for name in INPUTS])
    assert dec.readings("spBv1.0/g/NBIRTH/n9", birth.SerializeToString(), RECEIVED) == []
    readings = dec.readings("spBv1.0/g/DBIRTH/n9/m9", data.SerializeToString(), RECEIVED)
    if "metrics" not in config:  # with a map naming none of these metrics, the device has nothing to read
        assert [(r.rejection, r.fields["torque"]) for r in readings] == [(None, 1.0)]
