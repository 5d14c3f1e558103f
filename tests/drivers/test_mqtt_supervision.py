"""A bug in the MQTT driver's callbacks must cost one message, never all MQTT ingest.

paho runs the callbacks on its network thread and, by default, lets their exceptions end that thread: the agent
would stay up, look connected and store nothing more. Faults are injected in the decoder and in the hand-off to
the pipeline; the broker is a real throwaway Mosquitto.
"""

from __future__ import annotations

import json
import uuid

from drivers.mqtt import MqttConfig, MqttDriver, PayloadDecoder
from model.validate import Reason
from testkit.mqtt import Publisher
from testkit.net import wait_until

T0 = 1_796_000_000.0
HEALTHY = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
           "tool_wear": 10.0}


class Sink:
    """Collects readings and acknowledges them, as the pipeline does after its commit; raises once when told to."""

    def __init__(self) -> None:
        self.readings = []
        self.fail_next = False

    def put(self, reading) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in the hand-off")
        self.readings.append(reading)
        if reading.ack is not None:
            reading.ack()


def payload(ts: float, **extra) -> bytes:
    return json.dumps({"ts": T0 + ts, **HEALTHY, **extra}).encode()


def test_a_bug_in_a_callback_costs_one_message_not_all_ingest(private_broker, monkeypatch):
    decode = PayloadDecoder.decode

    def buggy(self, topic, data, received_at):
        if b"boom" in data:
            raise RuntimeError("a decoder bug")
        return decode(self, topic, data, received_at)

    monkeypatch.setattr(PayloadDecoder, "decode", buggy)
    name = f"sup-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(url=private_broker.url, client_id=name, topics=[f"{name}/+/telemetry"],
                        default_machine_type="M", qos=1)
    driver, sink = MqttDriver(config, "machine_type"), Sink()
    driver.start(sink)
    publisher = Publisher(private_broker.url)
    try:
        topic = f"{name}/m1/telemetry"

        def subscribed() -> bool:  # connected is not subscribed: a message published before the SUBACK is lost
            publisher.publish_all([(topic, payload(0.0))])
            return wait_until(lambda: bool(sink.readings), 0.5)

        assert wait_until(subscribed, 10)
        warm_up = len(sink.readings)  # a late warm-up reading may still come: told apart by its ts

        def fresh() -> list:
            return [r for r in sink.readings[warm_up:] if r.ts != T0]
        publisher.publish_all([(topic, payload(1.0, note="boom")), (topic, payload(2.0))])
        assert wait_until(lambda: len(fresh()) == 2, 10), sink.readings
        undecodable, valid = fresh()
        assert undecodable.rejection is not None and undecodable.rejection.reason is Reason.MALFORMED
        assert "boom" in undecodable.payload  # kept in the quarantine, not lost unseen
        assert valid.rejection is None and valid.ts == T0 + 2

        sink.fail_next = True  # the hand-off itself fails once: the thread survives, the next message arrives
        publisher.publish_all([(topic, payload(3.0)), (topic, payload(4.0))])
        assert wait_until(lambda: [r.ts - T0 for r in fresh()][2:] == [4.0], 10), [r.ts for r in fresh()]
        assert driver.status()["internal_errors"] == 2
        assert driver.status()["connected"]
    finally:
        publisher.close()
        driver.stop()
        driver.close()
