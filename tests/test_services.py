"""The test services themselves, and the broker properties the agent's tests rely on."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from testkit.mqtt import Publisher
from testkit.net import ServiceError, free_port, port_open

PROTOCOLS = [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5]


class Subscriber:
    """A persistent-session subscriber (like the agent's) that records the payloads it receives."""

    def __init__(self, broker, client_id: str, protocol: MQTTProtocolVersion, manual_ack: bool = False) -> None:
        self.broker, self.protocol = broker, protocol
        session = {} if protocol == MQTTProtocolVersion.MQTTv5 else {"clean_session": False}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  manual_ack=manual_ack, **session)
        self.payloads: list[bytes] = []
        self.session_present: bool | None = None
        self._changed = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._notify()
        self.client.on_message = self._on_message

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.session_present = flags.session_present
        self._notify()

    def _on_message(self, client, userdata, message) -> None:
        with self._changed:
            self.payloads.append(message.payload)
            self._changed.notify_all()

    def wait(self, condition, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(condition, timeout)

    def connect(self) -> None:
        options: dict[str, Any] = {}
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            options["clean_start"] = False
            options["properties"] = Properties(PacketTypes.CONNECT)
            options["properties"].SessionExpiryInterval = 300
        self.session_present = None
        self.client.connect(self.broker.host, self.broker.port, **options)
        self.client.loop_start()
        assert self.wait(lambda: self.session_present is not None), "no CONNACK"

    def subscribe(self, topic: str) -> None:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5), "no SUBACK"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_offline_session_keeps_more_than_1000_qos1_messages(private_broker, protocol):
    # What the crash tests rely on: nothing published while the agent is down is lost (Mosquitto's default keeps
    # 1,000 per client and silently drops the rest).
    subscriber = Subscriber(private_broker, "agent-under-test", protocol)
    subscriber.connect()
    subscriber.subscribe("plant/+/reading")
    subscriber.disconnect()

    sent = [(f"plant/m{i % 7}/reading", str(i)) for i in range(3000)]
    with Publisher(private_broker.url, protocol=protocol) as publisher:
        assert publisher.publish_all(sent) == 3000
    assert len(publisher.published_at) == 3000

    subscriber.connect()
    try:
        assert subscriber.session_present
        assert subscriber.wait(lambda: len(subscriber.payloads) >= 3000), f"{len(subscriber.payloads)} of 3000"
        assert {p.decode() for p in subscriber.payloads} == {payload for _, payload in sent}
    finally:
        subscriber.disconnect()


def test_unacknowledged_messages_are_not_capped_in_flight(private_broker):
    # The agent acknowledges a message only after committing it; Mosquitto's default sends 20 and then waits.
    subscriber = Subscriber(private_broker, "slow-committer", MQTTProtocolVersion.MQTTv311, manual_ack=True)
    subscriber.connect()
    subscriber.subscribe("t")
    try:
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all(("t", str(i)) for i in range(500))
        assert subscriber.wait(lambda: len(subscriber.payloads) >= 500), f"{len(subscriber.payloads)} of 500"
    finally:
        subscriber.disconnect()


def test_restart_comes_back_on_the_same_port(private_broker):
    port = private_broker.port
    private_broker.stop()
    private_broker.stop()
    assert not port_open(private_broker.host, port)

    private_broker.restart()
    assert private_broker.port == port and port_open(private_broker.host, port)
    with Publisher(private_broker.url) as publisher:
        assert publisher.publish_all([("t", b"after restart")]) == 1


def test_publisher_paces_to_an_absolute_schedule(mqtt_broker):
    with Publisher(mqtt_broker.url) as publisher:
        publisher.publish_all((("pdm-edge-test/pace", b"x") for _ in range(51)), qos=0, rate=500)
    span = publisher.published_at[-1] - publisher.published_at[0]
    assert 0.099 <= span < 0.3


def test_publisher_raises_on_an_unreachable_broker():
    start = time.monotonic()
    with pytest.raises(ServiceError, match="cannot connect"):
        Publisher(f"mqtt://127.0.0.1:{free_port()}", timeout=2)
    assert time.monotonic() - start < 3
