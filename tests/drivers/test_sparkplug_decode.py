"""Sparkplug B messages into readings (drivers/sparkplug.py): births, data by alias and by name, sequence gaps and
rebirth requests, deaths with bdSeq, and what is refused with which reason. No broker: the decoder is pure; the
messages come from testkit's edge node, built with the same schema. The `[mqtt.sparkplug]` table's validation."""

from __future__ import annotations

import pytest

from agent.config import AgentConfig, check_inputs
from drivers import sparkplug
from drivers.mqtt import MqttConfig
from drivers.simulator import INPUTS
from drivers.sparkplug import REBIRTH_METRIC, SparkplugDecoder, metric_value
from drivers.sparkplug_b_pb2 import Payload
from drivers.sparkplug_config import SparkplugConfig
from model.validate import Reason
from testkit.sparkplug import EdgeNode, decode, set_value

NOW = 1_790_000_000.0
T_MS = 1_790_000_100_000
VALUES = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
          "tool_wear": 10.0}


def decoder(default_type: str | None = "M", machines: dict | None = None, **sparkplug) -> SparkplugDecoder:
    config = SparkplugConfig(group_id="plant", **sparkplug)
    return SparkplugDecoder(config, machines or {}, default_type, "machine_type", 65536)


def feed(dec: SparkplugDecoder, *messages, at: float = NOW) -> list:
    return [reading for topic, payload in messages for reading in dec.readings(topic, payload, at)]


def test_a_birth_and_data_by_alias_make_readings_with_every_latest_value():
    dec, node = decoder(), EdgeNode("plant", "line-3")
    birth, = feed(dec, node.nbirth(), node.dbirth("press-1", VALUES, ts_ms=T_MS))
    assert birth.rejection is None and birth.machine_id == "press-1" and birth.ts == T_MS / 1000
    assert birth.fields == {**VALUES, "machine_type": "M"}
    data, = feed(dec, node.ddata("press-1", {"torque": 42.5}, ts_ms=T_MS + 1000))
    assert data.fields == {**VALUES, "torque": 42.5, "machine_type": "M"} and data.ts == T_MS / 1000 + 1
    assert decode(node.ddata("press-1", {"torque": 1.0})[1]).metrics[0].HasField("name") is False  # by alias only
    assert dec.requests() == [] and dec.stats()["births"] == 2 and dec.stats()["edge_nodes_online"] == 1


def test_a_metric_timestamp_wins_over_the_message_timestamp_and_none_means_received():
    dec, node = decoder(), EdgeNode("plant", "n")
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES))
    stamped, = feed(dec, node.ddata("m1", {"torque": 41.0}, ts_ms=T_MS, metric_ts_ms=T_MS - 5000))
    assert stamped.ts == (T_MS - 5000) / 1000
    unstamped, = feed(dec, node.ddata("m1", {"torque": 41.0}), at=NOW + 3)
    assert unstamped.ts == NOW + 3


def test_a_metric_reported_twice_in_one_message_makes_a_reading_for_each_value():
    dec, node = decoder(), EdgeNode("plant", "n")
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES))
    first, second = feed(dec, node.ddata("m1", [("torque", 41.0), ("tool_wear", 11.0), ("torque", 43.0)]))
    assert (first.fields["torque"], first.fields["tool_wear"]) == (41.0, 11.0)
    assert (second.fields["torque"], second.fields["tool_wear"]) == (43.0, 11.0)


def test_a_sequence_gap_is_counted_and_asks_the_node_for_a_rebirth_once_per_retry_interval():
    dec, node = decoder(rebirth_retry_s=30), EdgeNode("plant", "line-3")
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES))
    node.skip(2)
    used, = feed(dec, node.ddata("m1", {"torque": 44.0}))
    assert used.rejection is None and used.fields["torque"] == 44.0  # the message after the gap is still used
    (topic, command), = dec.requests()
    assert topic == "spBv1.0/plant/NCMD/line-3"
    metric, = decode(command).metrics
    assert (metric.name, metric.boolean_value, metric.datatype) == (REBIRTH_METRIC, True, 11)
    node.skip()
    feed(dec, node.ddata("m1", {"torque": 45.0}), at=NOW + 10)
    assert dec.requests() == []  # asked 10 s ago: not again yet
    assert dec.stats()["sequence_gaps"] == 2 and dec.stats()["rebirth_requests"] == 1
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES), node.ddata("m1", {"torque": 46.0}), at=NOW + 11)
    node.skip()
    feed(dec, node.ddata("m1", {"torque": 47.0}), at=NOW + 12)
    assert len(dec.requests()) == 1  # a new session: its first gap asks at once
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES))
    node.seq = 255
    feed(dec, node.ddata("m1", {"torque": 1.0}), node.ddata("m1", {"torque": 2.0}))
    assert dec.stats()["sequence_gaps"] == 4  # 1 -> 255 is a gap; 255 -> 0 is the wrap, not one


def test_data_from_a_node_whose_birth_was_not_seen_asks_for_one_and_uses_what_has_names():
    dec, node = decoder(), EdgeNode("plant", "n")
    node.nbirth(), node.dbirth("m1", VALUES)  # published before the agent started: never seen
    by_alias, = feed(dec, node.ddata("m1", {"torque": 41.0}))
    assert by_alias.rejection.reason is Reason.MALFORMED
    assert "metric alias 4 is not in the birth certificate of device 'm1' of 'n'" in by_alias.rejection.message
    assert by_alias.payload.startswith("base64:")
    assert len(dec.requests()) == 1 and dec.stats()["unknown_aliases"] == 1
    by_name, = feed(dec, node.ddata("m1", VALUES, by_name=True))
    assert by_name.rejection is None and by_name.fields["torque"] == 40.0


def test_an_unknown_alias_is_refused_without_changing_the_devices_values():
    dec, node = decoder(), EdgeNode("plant", "n")
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES))
    topic, raw = node.ddata("m1", {"torque": 99.0})
    message = Payload.FromString(raw)
    message.metrics.add(alias=77).double_value = 1.0
    refused, = feed(dec, (topic, message.SerializeToString()))
    assert refused.rejection.reason is Reason.MALFORMED and "metric alias 77" in refused.rejection.message
    after, = feed(dec, node.ddata("m1", {"tool_wear": 12.0}))
    assert after.fields["torque"] == 40.0 and after.fields["tool_wear"] == 12.0


def test_deaths_end_sessions_and_a_stale_will_is_ignored():
    dec, node = decoder(), EdgeNode("plant", "n", bd_seq=4)
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES), node.dbirth("m2", VALUES))
    assert feed(dec, node.ddeath("m1")) == []
    gone, = feed(dec, node.ddata("m1", {"torque": 41.0}))
    assert "not in the birth certificate" in gone.rejection.message  # forgotten until its next DBIRTH
    still, = feed(dec, node.ddata("m2", {"torque": 41.0}))
    assert still.rejection is None
    assert feed(dec, node.ndeath(bd_seq=3)) == []  # the will of the previous connection
    assert dec.stats()["stale_deaths"] == 1 and dec.stats()["edge_nodes_online"] == 1
    assert feed(dec, node.ndeath()) == []
    assert dec.stats()["edge_nodes_online"] == 0 and dec.stats()["deaths"] == 2


@pytest.mark.parametrize(("topic", "payload", "reason", "message"), [
    ("spBv1.0/plant/DDATA/n/m1", b"\xff\xff\xff", Reason.MALFORMED, "not a Sparkplug B payload (protobuf)"),
    ("spBv1.0/plant/DDATA/n/m1", b"\x12\x05\x0a\x03ab", Reason.MALFORMED, "not a Sparkplug B payload"),
    ("spBv1.0/plant/DDATA/n", b"", Reason.MALFORMED, "a DDATA topic needs a device level"),
    ("spBv1.0/plant/NDATA/n/m1", b"", Reason.MALFORMED, "a NDATA topic has no device level"),
    ("spBv1.0/other/DDATA/n/m1", b"", Reason.MALFORMED, "not a Sparkplug B topic of group 'plant'"),
    ("spBv1.0/plant/DSTUFF/n/m1", b"", Reason.MALFORMED, "not a Sparkplug B topic"),
    ("spBv1.0/plant/DDATA/n/m1", b"\x18\x01" + b"\x12\x00" * 40_000, Reason.PAYLOAD_TOO_LARGE, "more than"),
    ("spBv1.0/plant/DDATA/n/bad id!", Payload(seq=0, metrics=[{"name": "torque", "double_value": 1.0}])
     .SerializeToString(), Reason.UNKNOWN_MACHINE, "'bad id!' is not a valid machine id"),
])
def test_what_cannot_be_a_reading_is_refused_with_a_reason(topic, payload, reason, message):
    refused, = decoder().readings(topic, payload, NOW)
    assert refused.rejection.reason is reason and message in refused.rejection.message
    assert "\n" not in refused.rejection.message and len(refused.rejection.message) < 300


def test_a_device_without_a_machine_type_is_refused_saying_where_to_give_one():
    dec, node = decoder(default_type=None, machines={"m2": "H"}), EdgeNode("plant", "n")
    refused, = feed(dec, node.nbirth(), node.dbirth("m1", VALUES))
    assert refused.rejection.reason is Reason.UNKNOWN_MACHINE and "no machine type for m1" in refused.rejection.message
    typed, = feed(dec, node.dbirth("m2", VALUES))
    assert typed.fields["machine_type"] == "H"


def test_metric_maps_and_listed_devices_name_the_machine_its_type_and_its_inputs():
    shared = {f"Sensors/{name}": name for name in INPUTS}
    dec = decoder(metrics=shared, devices=[
        {"edge_node_id": "n", "device_id": "Press 1", "machine_id": "press-1", "machine_type": "H"},
        {"edge_node_id": "n", "machine_id": "node-n", "metrics": {"Torque": "torque"}}])
    node = EdgeNode("plant", "n")
    sensors = {f"Sensors/{name}": value for name, value in VALUES.items()}
    own, listed = feed(dec, node.nbirth({"Torque": 12.0, "Uptime": 5.0}),
                       node.dbirth("Press 1", {**sensors, "Firmware": "1.2"}))
    assert own.machine_id == "node-n" and own.fields == {"torque": 12.0, "machine_type": "M"}
    assert listed.machine_id == "press-1" and listed.fields == {**VALUES, "machine_type": "H"}  # Firmware ignored
    unlisted_node = EdgeNode("plant", "other")
    assert feed(dec, unlisted_node.nbirth({"Torque": 1.0}), unlisted_node.ndata({"Torque": 2.0})) == []


def test_invented_edge_nodes_and_devices_cannot_grow_the_decoder_without_end(monkeypatch):
    monkeypatch.setattr(sparkplug, "MAX_EDGE_NODES", 2)
    monkeypatch.setattr(sparkplug, "MAX_DEVICES_PER_NODE", 2)
    dec, node = decoder(), EdgeNode("plant", "n0")
    feed(dec, node.nbirth(), node.dbirth("m1", VALUES), node.dbirth("m2", VALUES))
    refused, = feed(dec, node.dbirth("m3", VALUES))
    assert refused.rejection.reason is Reason.UNKNOWN_MACHINE and "more than 2 devices on edge node 'n0'" in \
        refused.rejection.message
    assert feed(dec, EdgeNode("plant", "n1").nbirth()) == []
    refused, = feed(dec, EdgeNode("plant", "n2").nbirth())
    assert "more than 2 edge nodes in group 'plant'" in refused.rejection.message
    assert feed(dec, node.ddata("m1", {"torque": 41.0}))[0].rejection is None  # the known ones go on


def test_commands_to_nodes_are_ignored():
    dec, node = decoder(), EdgeNode("plant", "n")
    assert feed(dec, (node.topic("NCMD"), b"\xff"), (node.topic("DCMD", "m1"), b"")) == []
    assert dec.stats()["ignored"] == 2


@pytest.mark.parametrize(("datatype", "sent", "value"), [
    (1, -5, -5), (1, 251, -5), (2, 65531, -5), (3, -7, -7), (4, -9, -9), (5, 200, 200), (7, 4_000_000_000, 4e9),
    (8, 2**64 - 1, 2**64 - 1), (9, 1.5, 1.5), (10, 2.25, 2.25), (11, True, True), (12, "x", "x"), (10, None, None),
])
def test_signed_integers_sent_twos_complement_come_back_negative(datatype, sent, value):
    metric = Payload.Metric()
    if datatype in (1, 2) and isinstance(sent, int) and sent > 0:
        metric.datatype, metric.int_value = datatype, sent  # Int8/Int16 sent in their own width
    else:
        set_value(metric, sent, datatype)
    assert metric_value(metric, datatype) == value
    assert metric_value(Payload.Metric(bytes_value=b"\x00"), 17) == "<bytes>"


# --- configuration

def test_the_mqtt_format_and_the_sparkplug_table_go_together():
    url = "mqtt://127.0.0.1"
    with pytest.raises(ValueError, match=r'needs a \[mqtt.sparkplug\] table'):
        MqttConfig(url=url, format="sparkplug_b")
    with pytest.raises(ValueError, match="read only with format"):
        MqttConfig(url=url, sparkplug={"group_id": "g"})
    with pytest.raises(ValueError, match="payload_map, topics: for JSON payloads only"):
        MqttConfig(url=url, format="sparkplug_b", sparkplug={"group_id": "g"}, topics=["a/#"], payload_map={"a": "b"})
    config = MqttConfig(url=url, format="sparkplug_b", sparkplug={"group_id": "g", "edge_node_ids": ["n1", "n2"]})
    assert config.sparkplug.topics() == ["spBv1.0/g/+/n1/#", "spBv1.0/g/+/n2/#"]
    assert SparkplugConfig(group_id="g").topics() == ["spBv1.0/g/#"]


@pytest.mark.parametrize(("sparkplug", "message"), [
    ({"group_id": "a/b"}, "String should match pattern"),
    ({"group_id": "STATE"}, "STATE is Sparkplug's topic for host applications"),
    ({"group_id": "g", "devices": [{"edge_node_id": "n", "device_id": "Press 1"}]}, "set machine_id"),
    ({"group_id": "g", "devices": [{"edge_node_id": "n", "device_id": "d"}, {"edge_node_id": "n", "device_id": "d"}]},
     "devices[0] and devices[1] are both device 'd' of 'n'"),
    ({"group_id": "g", "edge_node_ids": ["n"], "devices": [{"edge_node_id": "x", "device_id": "d"}]},
     "edge node 'x' is not in edge_node_ids"),
    ({"group_id": "g", "metrics": {"A": "torque", "B": "torque"}}, "metrics 'A' and 'B' both map to 'torque'"),
])
def test_a_bad_sparkplug_table_is_refused_naming_the_key(sparkplug, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SparkplugConfig(**sparkplug)


def test_a_metric_mapped_to_something_that_is_not_a_model_input_is_a_config_problem():
    config = AgentConfig(gateway_id="gw", mqtt={
        "url": "mqtt://127.0.0.1", "format": "sparkplug_b",
        "sparkplug": {"group_id": "g", "metrics": {"Temp": "temperature"},
                      "devices": [{"edge_node_id": "n", "device_id": "d", "metrics": {"T": "torque"}}]}})
    problems = check_inputs(config, INPUTS, "machine_type")
    assert problems == [("mqtt.sparkplug.metrics.Temp: 'temperature' is not a model input; map it to one of "
                        "air_temperature, process_temperature, rotational_speed, torque, tool_wear")]
    assert config.mqtt.listed_machines() == ["d"]
