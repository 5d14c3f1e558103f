"""Fuzzing MQTT payloads through the decoder, the validator and the pipeline: whatever a broker delivers becomes a
valid reading or a quarantined one with a reason; nothing raises, nothing invalid is scored, every message is
counted exactly once."""

from __future__ import annotations

import math
import re
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import PipelineConfig
from agent.pipeline import Pipeline
from agent.store import Store
from drivers.base import RawReading
from drivers.mqtt import EARLIEST_TS, LATEST_TS, MqttConfig, PayloadDecoder
from model.features import INPUT_NAMES, MACHINE_TYPE_INPUT
from model.score import Score
from model.validate import Reason, Rejection
from testkit.mqtt import Publisher
from tests.agent.test_run import AgentProcess, reading, wait_for
from tests.fuzz.strategies import (
    bad_utf8,
    deep_json,
    fuzz_settings,
    json_values,
    nested,
    numbers,
    spoil_utf8,
    to_json,
)

# Payloads up to 70 KB make hypothesis warn that their repr is large: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

RECEIVED = 1_764_000_000.0
MACHINE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
GOOD = {"air_temperature": 300.1, "process_temperature": 310.2, "rotational_speed": 1500, "torque": 40.5,
        "tool_wear": 12}

topics = st.one_of(st.just("pdm/press-1/telemetry"), st.builds("pdm/{}/telemetry".format, st.text(max_size=70)),
                   st.text(max_size=30))
# A reading's keys with hostile values: each input, the time and the machine type may be missing or anything.
field_values = st.one_of(numbers, json_values, st.text(max_size=5000))
readings = st.fixed_dictionaries(
    {}, optional={**{name: st.one_of(numbers, field_values) for name in INPUT_NAMES},
                  "ts": st.one_of(numbers, st.text(max_size=40), st.datetimes().map(lambda d: d.isoformat()),
                                  json_values),
                  MACHINE_TYPE_INPUT: st.one_of(st.sampled_from(["L", "M", "H", "X", ""]), json_values),
                  "machine": st.one_of(st.sampled_from(["mill-2", "bad id!"]), json_values)},
).flatmap(lambda fixed: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(lambda extra: {**extra,
                                                                                                      **fixed}))
plausible = st.builds(lambda changes: {**GOOD, **changes},
                      st.dictionaries(st.sampled_from([*INPUT_NAMES, "ts", MACHINE_TYPE_INPUT]), field_values,
                                      max_size=2))
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(to_json),
    readings.map(to_json),
    plausible.map(to_json),
    deep_json,
    st.builds(spoil_utf8, plausible.map(to_json), st.integers(min_value=0), bad_utf8),
    st.builds(lambda n: to_json({**GOOD, "note": "x" * n}), st.integers(min_value=0, max_value=70_000)),
)
configs = st.sampled_from([
    {"default_machine_type": "M"},
    {"machines": {"press-1": "H"}},
    {},
    {"machine_id_from": "machine", "default_machine_type": "L"},
    {"payload_map": {"air": "air_temperature", "mt": MACHINE_TYPE_INPUT}, "default_machine_type": "M"},
    {"max_payload_bytes": 256, "default_machine_type": "M"},
])


def decoder(config: dict) -> PayloadDecoder:
    return PayloadDecoder(MqttConfig(url="mqtt://127.0.0.1", **config), MACHINE_TYPE_INPUT)


def assert_decoded(reading: RawReading, topic: str, payload: bytes) -> None:
    """A reading the pipeline can take: identified and timed if accepted, else a rejection with a reason."""
    assert isinstance(reading, RawReading)
    assert reading.source == f"mqtt:{topic}" and reading.received_at == RECEIVED
    assert reading.payload == payload[:4096].decode("utf-8", "replace")
    if reading.rejection is not None:
        assert isinstance(reading.rejection.reason, Reason) and reading.rejection.message
        return
    assert MACHINE_ID.fullmatch(reading.machine_id)
    assert math.isfinite(reading.ts) and EARLIEST_TS <= reading.ts <= LATEST_TS
    assert reading.fields[MACHINE_TYPE_INPUT] is not None


def assert_scored_only_if_valid(scorer, readings: list[RawReading]) -> None:
    """What reaches the model is finite, in its physical range and of a known machine type; the rest is rejected
    with a reason; one result per reading."""
    fields = [r.fields for r in readings if r.rejection is None]
    valid, rejected = scorer.validator.validate(fields)
    assert sorted([*valid.index, *rejected]) == list(range(len(fields)))
    manifest = scorer.model.manifest
    for row, machine_type in zip(valid.values, valid.machine_types[:, 0]):
        assert machine_type in manifest.machine_type.values
        for spec, value in zip(manifest.inputs, row):
            assert math.isfinite(value) and spec.physical_range.min <= value <= spec.physical_range.max
    assert all(isinstance(r, Rejection) and isinstance(r.reason, Reason) for r in rejected.values())
    for result in scorer.score(fields):
        if isinstance(result, Score):
            assert 0.0 <= result.p_failure <= 1.0 and 0.0 <= result.health <= 100.0
        else:
            assert isinstance(result.reason, Reason)


@fuzz_settings(short=300, long=30_000)
@given(config=configs, topic=topics, payload=payloads)
def test_any_payload_becomes_a_reading_or_a_rejection_with_a_reason(scorer, config, topic, payload):
    reading = decoder(config).decode(topic, payload, RECEIVED)
    assert_decoded(reading, topic, payload)
    assert_scored_only_if_valid(scorer, [reading])


@pytest.mark.parametrize("depth", [1_000, None])  # None: as deep as mqtt.max_payload_bytes allows
@pytest.mark.parametrize("brackets", [("[", "]"), ('{"a":', "}")])
def test_deeply_nested_json_is_rejected_as_malformed(depth, brackets):
    """Regression: json.loads raised RecursionError (not a ValueError) on deep nesting, which escaped the decoder
    and killed paho's network thread: one 2 KB message stopped all MQTT ingest."""
    opener, closer = brackets
    depth = depth or (MqttConfig.model_fields["max_payload_bytes"].default - 1) // len(opener + closer)
    payload = (opener * depth + ("1" if opener != "[" else "") + closer * depth).encode()
    reading = decoder({"default_machine_type": "M"}).decode("pdm/press-1/telemetry", payload, RECEIVED)
    assert reading.rejection is not None and reading.rejection.reason is Reason.MALFORMED


@pytest.mark.parametrize("ts", ["1" + "0" * 400, "1e400", "-1e400", "NaN", "Infinity"])
def test_a_ts_beyond_float_range_is_rejected_as_malformed(ts):
    """Regression: an integer ts beyond float range raised OverflowError out of the decoder."""
    payload = ('{"ts": ' + ts + ', "torque": 40}').encode()
    reading = decoder({"default_machine_type": "M"}).decode("pdm/press-1/telemetry", payload, RECEIVED)
    assert reading.rejection is not None and reading.rejection.reason is Reason.MALFORMED


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "agent.db") as store:
        yield store


def offered_counts(store: Store) -> int:
    counters = store.counters()
    return counters.readings_accepted + counters.readings_duplicate + counters.rejected_total


@fuzz_settings(short=25, long=2_000)
@given(config=configs, messages=st.lists(st.tuples(topics, payloads), min_size=1, max_size=20))
def test_the_pipeline_counts_every_message_once_and_quarantines_with_a_reason(scorer, store, config, messages):
    before, quarantined_before = offered_counts(store), len(store.quarantine(100_000))
    decode = decoder(config).decode
    acked = []
    pipeline = Pipeline(scorer, store, PipelineConfig(batch_max=7))
    pipeline.start()
    for i, (topic, payload) in enumerate(messages):
        reading = decode(topic, payload, RECEIVED + i)
        reading.ack = lambda i=i: acked.append(i)
        pipeline.put(reading)
    assert pipeline.stop(timeout=60)
    assert sorted(acked) == list(range(len(messages)))  # every message committed, then acknowledged
    assert offered_counts(store) - before == len(messages)  # accepted + duplicates + rejected == offered
    quarantined = store.quarantine(100_000)[:len(store.quarantine(100_000)) - quarantined_before]
    assert all(q.reason in set(Reason) and q.message for q in quarantined)
    for reading in store.latest_by_machine().values():
        assert all(math.isfinite(v) for v in reading.values.values())
        assert 0.0 <= reading.p_failure <= 1.0


def test_a_deeply_nested_payload_does_not_stop_mqtt_ingest(tmp_path, private_broker):
    """Regression, end to end: the decoder's RecursionError escaped into paho's network thread and ended it; the
    agent stayed up but took no message after that one. Now it is quarantined and the next reading is stored."""
    agent = AgentProcess(tmp_path, private_broker.url)
    agent.start()
    try:
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([("pdm/m01/telemetry", nested(1_000)), reading(1, 1)])
        wait_for(lambda: agent.count("readings") == 1, 30, "the reading after the nested payload")
        with agent.db() as db:
            assert db.execute("SELECT reason FROM quarantine").fetchall() == [("malformed",)]
    finally:
        assert agent.signal(signal.SIGTERM) == 0
