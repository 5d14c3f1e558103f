"""Sparkplug B through a real Mosquitto, published by testkit's edge node (built from the schema the agent decodes
with): what a plant running Sparkplug relies on.

- `pdm-edge run` stores a device's births and data, answers a sequence gap and data it has no birth for with a
  rebirth request on the node's NCMD topic, quarantines an unknown alias and a payload that is not protobuf with
  their reasons and goes on, forgets a device at its DDEATH and ignores a stale NDEATH.
- A message is acknowledged only once its reading is committed: what the pipeline had not committed when the
  driver went away is delivered again to the next session, what it had is not.
"""

from __future__ import annotations

import json
import urllib.request
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt import MqttConfig, MqttDriver
from drivers.sparkplug import REBIRTH_METRIC
from testkit.mqtt import Publisher
from testkit.net import wait_until
from testkit.sparkplug import EdgeNode, decode
from tests.agent.test_run import wait_for
from tests.drivers.test_mqtt_broker import Agent

T_MS = 1_790_000_000_000
VALUES = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
          "tool_wear": 10.0}


class Commands:
    """A subscriber to the edge node's NCMD topic: the rebirth requests the agent publishes."""

    def __init__(self, url: str, topic: str) -> None:
        self.received: list[bytes] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda client, userdata, message: self.received.append(message.payload)
        subscribed = []
        self.client.on_subscribe = lambda *args: subscribed.append(True)
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.subscribe(topic, qos=0)
        self.client.loop_start()
        assert wait_until(lambda: bool(subscribed), 10)

    def rebirths(self) -> int:
        return sum(decode(p).metrics[0].name == REBIRTH_METRIC and decode(p).metrics[0].boolean_value
                   for p in self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def sparkplug_agent(tmp_path, url: str) -> Agent:
    agent = Agent(tmp_path, url, mqtt={"format": "sparkplug_b"},
                  **{"mqtt.sparkplug": {"group_id": "plant", "edge_node_ids": ["line-3"], "rebirth_retry_s": 1}})
    text = agent.config.read_text()
    # AgentProcess writes max_payload_bytes = 2048 for JSON: fine for Sparkplug too, kept.
    assert '[mqtt.sparkplug]\ngroup_id = "plant"' in text, text
    return agent


def stored(agent: Agent) -> list[tuple[str, float, float]]:
    with agent.db() as db:
        return [(m, ts, json.loads(values)["torque"])
                for m, ts, values in db.execute('SELECT machine_id, ts, "values" FROM readings ORDER BY ts')]


def quarantined(agent: Agent) -> list[tuple[str, str]]:
    with agent.db() as db:
        return db.execute("SELECT reason, message FROM quarantine ORDER BY id").fetchall()


def driver_status(agent: Agent) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.status_port}/api/v1/status", timeout=10) as response:
        return next(d["details"] for d in json.load(response)["drivers"] if d["name"] == "mqtt")


def test_births_data_gaps_deaths_and_bad_messages_through_pdm_edge_run(tmp_path, private_broker):
    agent = sparkplug_agent(tmp_path, private_broker.url)
    commands = Commands(private_broker.url, "spBv1.0/plant/NCMD/line-3")
    node = EdgeNode("plant", "line-3", bd_seq=1)
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([node.nbirth(ts_ms=T_MS), node.dbirth("press-1", VALUES, ts_ms=T_MS),
                                   *(node.ddata("press-1", {"torque": 41.0 + i}, ts_ms=T_MS + 1000 * (i + 1))
                                     for i in range(3))], qos=1)
            wait_for(lambda: agent.count("readings") >= 4, 30, "the birth's and the data's readings")
            assert commands.rebirths() == 0

            node.skip()  # a lost message
            publisher.publish_all([node.ddata("press-1", {"torque": 50.0}, ts_ms=T_MS + 5000)], qos=1)
            wait_for(lambda: commands.rebirths() == 1, 30, "the rebirth request after the gap")

            topic, raw = node.ddata("press-1", {"torque": 51.0}, ts_ms=T_MS + 6000)
            message = decode(raw)
            message.metrics.add(alias=99).double_value = 1.0  # an alias no birth defined
            publisher.publish_all([(topic, message.SerializeToString()),
                                   (node.topic("DDATA", "press-1"), b"\x0a\xff not protobuf"),
                                   node.ddata("press-1", {"torque": 52.0}, ts_ms=T_MS + 7000)], qos=1)
            wait_for(lambda: agent.count("quarantine") >= 2 and agent.count("readings") >= 6, 30,
                     "the bad messages quarantined and the next reading stored")

            publisher.publish_all([node.ddeath("press-1"), node.ddata("press-1", {"torque": 53.0}),
                                   node.ndeath(bd_seq=0),  # the will of an earlier connection: stale
                                   node.dbirth("press-2", VALUES, ts_ms=T_MS + 8000)], qos=1)
            wait_for(lambda: agent.count("quarantine") >= 3 and agent.count("readings") >= 7, 30,
                     "the data after the DDEATH quarantined and the other device's birth stored")
            publisher.publish_all([node.ndeath()], qos=1)
            wait_for(lambda: driver_status(agent)["edge_nodes_online"] == 0, 30, "the NDEATH")

        assert stored(agent) == [("press-1", T_MS / 1000, 40.0), *(("press-1", T_MS / 1000 + i, 40.0 + i)
                                                                    for i in (1, 2, 3)),
                                 ("press-1", T_MS / 1000 + 5, 50.0), ("press-1", T_MS / 1000 + 7, 52.0),
                                 ("press-2", T_MS / 1000 + 8, 40.0)]
        reasons = quarantined(agent)
        assert [reason for reason, _ in reasons] == ["malformed"] * 3
        assert "metric alias 99 is not in the birth certificate of device 'press-1' of 'line-3'" in reasons[0][1]
        assert "not a Sparkplug B payload (protobuf)" in reasons[1][1]
        assert "is not in the birth certificate of device 'press-1'" in reasons[2][1]  # forgotten at its DDEATH
        details = driver_status(agent)
        assert details["sequence_gaps"] == 1 and details["stale_deaths"] == 1 and details["unknown_aliases"] == 2
        assert details["rebirth_requests"] == commands.rebirths() >= 1
        assert agent.process.poll() is None
    finally:
        commands.close()
        agent.stop()


class HoldingSink:
    """A pipeline that has not committed yet: keeps the readings, acknowledges nothing until told to."""

    def __init__(self) -> None:
        self.readings = []

    def put(self, reading) -> None:
        self.readings.append(reading)

    def commit(self) -> None:
        for reading in self.readings:
            if reading.ack is not None:
                reading.ack()


def test_a_message_is_acknowledged_only_once_its_reading_is_committed(private_broker):
    group = f"ack-{uuid.uuid4().hex[:6]}"
    config = MqttConfig(url=private_broker.url, client_id=f"pdm-{group}", format="sparkplug_b", qos=1,
                        default_machine_type="M", sparkplug={"group_id": group})
    node = EdgeNode(group, "n1")

    def session(sink: HoldingSink) -> MqttDriver:
        driver = MqttDriver(config, "machine_type")
        driver.start(sink)
        assert wait_until(lambda: driver.status()["connected"] and driver.link.up, 10)
        return driver

    first = HoldingSink()
    driver = session(first)
    with Publisher(private_broker.url) as publisher:
        def subscribed() -> bool:
            publisher.publish_all([node.nbirth()], qos=1)
            return wait_until(lambda: driver.status()["births"] > 0, 0.5)

        assert wait_until(subscribed, 10)
        data = [node.ddata("m1", {"torque": 41.0 + i}, ts_ms=T_MS + 1000 * (i + 1)) for i in range(3)]
        publisher.publish_all([node.dbirth("m1", VALUES, ts_ms=T_MS), *data], qos=1)
        assert wait_until(lambda: len(first.readings) == 4, 10)
        driver.close()  # nothing committed: the broker keeps all four for the session

        second = HoldingSink()
        driver = session(second)
        assert wait_until(lambda: len(second.readings) == 4, 10), second.readings
        assert [r.fields["torque"] for r in second.readings] == [40.0, 41.0, 42.0, 43.0]
        assert [r.ts for r in second.readings] == [r.ts for r in first.readings]
        second.commit()
        publisher.publish_all([node.ddata("m1", {"torque": 44.0}, ts_ms=T_MS + 5000)], qos=1)
        assert wait_until(lambda: len(second.readings) == 5, 10)
        second.commit()
        driver.close()

        third = HoldingSink()
        driver = session(third)
        publisher.publish_all([node.ddata("m1", {"torque": 45.0}, ts_ms=T_MS + 6000, by_name=True)], qos=1)
        assert wait_until(lambda: len(third.readings) >= 1, 10)
        assert [r.fields["torque"] for r in third.readings] == [45.0]  # nothing committed came back
        driver.close()
