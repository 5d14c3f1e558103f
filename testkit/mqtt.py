"""MQTT for tests and benchmarks: a throwaway Mosquitto broker with unlimited queues, a broker someone else runs,
and a publisher that knows when the broker has each message."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from testkit.net import LOCALHOST, ServiceError, free_port, port_open, wait_until


@dataclass(frozen=True)
class Broker:
    """An MQTT broker that someone else runs (e.g. the machine's own on port 1883)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


# Both limits are per client. mosquitto.conf(5) of 2.0.11 says "Set to 0 for no maximum" for each, and
# tests/test_services.py checks it on the binary: 3,000 QoS 1 messages stay queued for an offline persistent
# session (the default keeps 1,000), and a subscriber that acknowledges nothing still receives 500 QoS 1
# messages (the default lets 20 be in flight). Nothing is written to disk, so running as root (mosquitto then
# drops to the mosquitto user) needs no file ownership tweaks.
MOSQUITTO_CONFIG = """\
listener {port} {host}
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
log_dest stderr
"""


class Mosquitto:
    """A throwaway broker process with unlimited queues, listening on 127.0.0.1 only.

    `Mosquitto.start(workdir)` returns it listening; `stop()` is idempotent; `restart()` keeps the port (sessions
    are lost: persistence is off). Its log is `workdir / "mosquitto.log"`.
    """

    host = LOCALHOST

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.port = port
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @classmethod
    def start(cls, workdir: Path, port: int | None = None, timeout: float = 10.0,
              extra_config: str = "") -> Mosquitto:
        """`extra_config` is appended to the config: options such as `certfile` then apply to the one listener, and
        a repeated option (e.g. `allow_anonymous false`) overrides the default above it."""
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise ServiceError(
                "mosquitto is not installed: run ./scripts/test.sh (it installs it) or apt-get install mosquitto")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        broker = cls(binary, workdir, port or free_port())
        broker.config.write_text(MOSQUITTO_CONFIG.format(host=broker.host, port=broker.port) + extra_config)
        broker._launch(timeout)
        return broker

    def _launch(self, timeout: float) -> None:
        # Checked first, or we would wait for someone else's broker while ours exits on "address in use".
        if port_open(self.host, self.port):
            raise ServiceError(f"port {self.port} is already in use: cannot start mosquitto on it")
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([self.binary, "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log)
        if not wait_until(lambda: self._process.poll() is not None or port_open(self.host, self.port), timeout):
            self.stop()
            raise ServiceError(f"mosquitto did not listen on port {self.port} within {timeout:g} s:\n{self.log_tail()}")
        if self._process.poll() is not None:
            code = self._process.returncode
            self._process = None
            raise ServiceError(f"mosquitto exited with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self._launch(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Publisher:
    """A connected paho-mqtt client that publishes test data and knows when the broker has it.

    `published_at[i]` is the wall-clock time (time.time()) at which message i of the last `publish_all` was handed
    to paho: the start of an end-to-end latency measurement.
    """

    def __init__(self, url: str, client_id: str | None = None,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5, timeout: float = 5.0,
                 ca_file: str | Path | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        """An mqtts:// `url` connects over TLS, verifying the broker against `ca_file` (else the system's CAs)."""
        parts = urlsplit(url)
        self.url = url
        self.published_at: list[float] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=protocol)
        self.client.connect_timeout = timeout
        if parts.scheme == "mqtts":
            self.client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        if username is not None:
            self.client.username_pw_set(username, password)
        connected = threading.Event()
        self._connack = None

        def on_connect(client, userdata, flags, reason_code, properties):
            self._connack = reason_code
            connected.set()

        self.client.on_connect = on_connect
        try:
            self.client.connect(parts.hostname or LOCALHOST, parts.port or (8883 if parts.scheme == "mqtts" else 1883))
        except OSError as exc:
            raise ServiceError(f"cannot connect to the MQTT broker at {url}: {exc}") from exc
        self.client.loop_start()
        if not connected.wait(timeout) or self._connack.is_failure:
            self.close()
            raise ServiceError(f"the MQTT broker at {url} refused the connection: {self._connack or 'no CONNACK'}")

    def publish_all(self, messages: Iterable[tuple[str, bytes | str]], qos: int = 1, rate: float | None = None,
                    timeout: float = 30.0) -> int:
        """Publish every (topic, payload), at `rate` messages/s when given; return how many.

        Returns once the broker has acknowledged every QoS 1/2 message (QoS 0: once written to the socket);
        raises ServiceError when paho refuses a message or acknowledgements are missing `timeout` s after the last
        publish.
        """
        self.published_at = []
        infos = []
        start = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            if rate:
                # An absolute schedule: a late message does not delay the ones after it.
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.published_at.append(time.time())
            info = self.client.publish(topic, payload, qos=qos)
            # publish() reports a full queue in rc instead of raising. AGAIN means "written later by the loop".
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                raise ServiceError(f"publishing message {i} to {topic!r} failed: {mqtt.error_string(info.rc)}")
            infos.append(info)
        deadline = time.monotonic() + timeout
        for info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            info.wait_for_publish(remaining)
        missing = sum(not info.is_published() for info in infos)
        if missing:
            raise ServiceError(f"{missing} of {len(infos)} messages were not acknowledged by {self.url} "
                               f"within {timeout:g} s")
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
