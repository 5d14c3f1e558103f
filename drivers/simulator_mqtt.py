"""The plant simulator published over MQTT (`pdm-edge simulate mqtt`).

Every `interval_s`, one message per machine on `pdm/<machine_id>/telemetry`, QoS 1, in the agent's default payload
format: `{"ts": <epoch seconds>, "machine_type": "L", "air_temperature": 300.1, "process_temperature": 310.2,
"rotational_speed": 1500, "torque": 40.3, "tool_wear": 12}`. The agent's config for it is
examples/simulator-mqtt.toml.
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

from drivers.simulator import Plant

TOPIC = "pdm/{machine_id}/telemetry"


class PublishError(RuntimeError):
    """The broker could not be reached or refused the connection."""


def payload(ts: float, machine_type: str, values: dict[str, float]) -> bytes:
    return json.dumps({"ts": round(ts, 3), "machine_type": machine_type, **values}).encode()


class MqttSimulator:
    """Publishes a Plant's readings from paho's network thread; `run(stop)` steps the plant until `stop` is set."""

    def __init__(self, plant: Plant, url: str, interval_s: float = 1.0, client_id: str = "pdm-edge-simulator",
                 timeout_s: float = 10.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise PublishError(f"{url}: expected mqtt://host[:port] or mqtts://host[:port]")
        self.plant, self.url, self.interval_s = plant, url, interval_s
        self.published = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if parts.scheme == "mqtts":
            self._client.tls_set()
        if parts.username:
            self._client.username_pw_set(parts.username, parts.password)
        connected = threading.Event()
        self._client.on_connect = lambda client, userdata, flags, reason, properties: connected.set()
        try:
            self._client.connect(parts.hostname or "127.0.0.1",
                                 parts.port or (8883 if parts.scheme == "mqtts" else 1883))
        except OSError as exc:
            raise PublishError(f"cannot connect to the MQTT broker at {url}: {exc}") from exc
        self._client.loop_start()
        if not connected.wait(timeout_s):
            self.close()
            raise PublishError(f"the MQTT broker at {url} did not accept the connection within {timeout_s:g} s")

    def publish_once(self, dt: float) -> None:
        now = time.time()
        for machine_id, values in self.plant.step(dt).items():
            self._client.publish(TOPIC.format(machine_id=machine_id),
                                 payload(now, self.plant.machine_type(machine_id), values), qos=1)
            self.published += 1

    def run(self, stop: threading.Event) -> None:
        last = time.monotonic()
        self.publish_once(0.0)
        while not stop.wait(self.interval_s - (time.monotonic() - last) % self.interval_s):
            now = time.monotonic()
            self.publish_once(now - last)
            last = now

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
