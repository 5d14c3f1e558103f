"""The MQTT driver against real Mosquitto brokers, through `pdm-edge run`: what a gateway operator relies on.

- Readings published while the agent is stopped (an upgrade, a reboot) arrive once it is back: its persistent
  session, under both protocol versions.
- A broker that goes away and comes back is reconnected to without restarting the agent, which subscribes again
  and logs the outage once, not once per attempt.
- TLS with a private CA, a username and a password from a file: readings arrive; a wrong password, or a broker
  certificate the agent's CA did not sign, leaves the agent running, logs the refusal once without the password,
  and stores nothing.

The agent runs as `pdm-edge run` (tests.agent.test_run.AgentProcess); every broker is a throwaway Mosquitto on
127.0.0.1 with persistence off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from testkit.mqtt import Mosquitto, Publisher
from tests.agent.test_run import T0, AgentProcess, reading, wait_for

PUBLISHER_PROTOCOL = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class Agent(AgentProcess):
    """`AgentProcess` with more `[mqtt]` keys, variables added to its environment, and a start that can wait for
    another log line than "subscribed to" (an agent that cannot connect never subscribes)."""

    def __init__(self, tmp_path: Path, broker_url: str, mqtt: dict | None = None, env: dict | None = None,
                 **sections) -> None:
        super().__init__(tmp_path, broker_url, **sections)
        keys = "".join(f"{key} = {json.dumps(value)}\n" for key, value in (mqtt or {}).items())
        config = self.config.read_text()
        assert config.count("[mqtt]\n") == 1, config  # the table AgentProcess writes: the keys go at its top
        self.config.write_text(config.replace("[mqtt]\n", "[mqtt]\n" + keys))
        self.env = {**os.environ, **(env or {})}

    def start(self, until: str = "subscribed to") -> None:
        before = self.count_log(until)
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.starts += 1
        wait_for(lambda: self.count_log(until) > before or self.process.poll() is not None, 60, repr(until))
        assert self.process.poll() is None, self.log.read_text()[-2000:]

    def messages(self, containing: str = "") -> list[str]:
        """The messages of the JSON log lines that contain `containing`."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [m for m in (json.loads(line)["message"] for line in lines if line.startswith("{")) if containing in m]

    def counters(self) -> dict[str, int]:
        with self.db() as db:
            return dict(db.execute("SELECT name, value FROM counters"))

    def stored_ts(self) -> list[float]:
        with self.db() as db:
            return sorted(ts for (ts,) in db.execute("SELECT ts FROM readings"))


def expected_ts(count: int) -> list[float]:
    return [float(T0 + i) for i in range(count)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_readings_published_while_the_agent_is_stopped_are_stored_once_after_it_starts_again(
        tmp_path, private_broker, protocol):
    agent = Agent(tmp_path, private_broker.url, mqtt={"protocol": protocol})

    def publish(first: int, count: int) -> None:
        with Publisher(private_broker.url, protocol=PUBLISHER_PROTOCOL[protocol]) as publisher:
            assert publisher.publish_all([reading(i % 10, i) for i in range(first, first + count)], qos=1) == count

    try:
        agent.start()
        publish(0, 50)  # stored and acknowledged before the stop: must not come back after it
        wait_for(lambda: agent.count("readings") >= 50, 30, "the first 50 readings")
        assert agent.signal(signal.SIGTERM) == 0

        publish(50, 500)  # the broker has them acknowledged while the agent is down
        agent.start()
        wait_for(lambda: agent.count("readings") >= 550, 60, "the 500 readings published while it was down")
        # A barrier: published now, this one is delivered after any late redelivery of the earlier ones.
        publish(550, 1)
        wait_for(lambda: agent.count("readings") >= 551, 30, "the reading published after the restart")

        assert agent.stored_ts() == expected_ts(551)
        assert agent.count("quarantine") == 0
        counters = agent.counters()
        # The store ignores a reading it already has; this counter shows whether the broker sent any twice, i.e.
        # whether the agent acknowledged everything it committed before it disconnected.
        assert counters.get("readings_duplicate", 0) == 0, counters
        assert counters["readings_accepted"] == 551
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()


# How long the broker stays down: longer than the driver's first reconnect delay (at most 2 s), so at least one
# reconnection attempt fails and the "available again" line must count it instead of logging it.
OUTAGE_S = 3.0


def test_the_agent_reconnects_and_resubscribes_after_the_broker_restarts(tmp_path, private_broker):
    broker = f"MQTT broker {private_broker.host}:{private_broker.port}"
    agent = Agent(tmp_path, private_broker.url)
    try:
        agent.start()
        pid = agent.process.pid
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([reading(i % 10, i) for i in range(100)])
        wait_for(lambda: agent.count("readings") >= 100, 30, "readings before the restart")

        private_broker.stop()
        wait_for(lambda: agent.messages(f"{broker} unavailable"), 30, "the agent to notice the broker is gone")
        down_since = time.monotonic()
        while time.monotonic() - down_since < OUTAGE_S:  # the outage itself, not a wait for a condition
            assert agent.process.poll() is None, agent.log.read_text()[-2000:]
            time.sleep(0.1)
        private_broker.restart()  # sessions are lost: persistence is off, so the agent must subscribe again

        # paho's backoff: the next attempt comes at most 4 s (twice the first delay) after the failed one.
        wait_for(lambda: agent.count_log("subscribed to") >= 2, 30, "the agent to subscribe again")
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([reading(i % 10, i) for i in range(100, 200)])
        wait_for(lambda: agent.count("readings") >= 200, 30, "readings after the restart")

        assert agent.process.pid == pid and agent.process.poll() is None and agent.starts == 1
        assert agent.stored_ts() == expected_ts(200)
        unavailable = agent.messages(f"{broker} unavailable")
        back = agent.messages(f"{broker} available again")
        assert len(unavailable) == 1, unavailable
        assert len(back) == 1, back
        failed = int(re.search(r"and (\d+) failed attempts", back[0]).group(1))
        assert failed >= 2, back[0]  # the disconnection and at least one refused reconnection, counted
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()


# --- TLS and credentials -------------------------------------------------------------------------------------------

AGENT_USER, AGENT_PASSWORD = "gateway", "agent-pw-7f3a9c"
SENSOR_USER, SENSOR_PASSWORD = "sensor", "sensor-pw-51be02"


def _run(*command: str, cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"


def make_ca(folder: Path, name: str) -> Path:
    """A throwaway CA: `<name>.crt` and `<name>.key` in `folder`."""
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=pdm-edge {name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         cwd=folder)
    return folder / f"{name}.crt"


def make_server_cert(folder: Path, ca: str) -> tuple[Path, Path]:
    """server.crt (for 127.0.0.1 and localhost, signed by `ca`) and server.key."""
    (folder / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n"
        "basicConstraints = critical, CA:FALSE\n")
    _run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext", cwd=folder)
    return folder / "server.crt", folder / "server.key"


@pytest.fixture
def tls_broker(tmp_path):
    """A Mosquitto with a TLS listener for 127.0.0.1, no anonymous clients, and two users; yields (broker, CA
    certificate). Started as root, Mosquitto drops to the mosquitto user before it reads the key and the password
    file, and pytest's tmp_path sits in a folder only root may enter (0700): these throwaway files go to a folder of
    their own in /tmp, world-readable (0755, files 0644) so the broker can read them whoever runs the tests."""
    tools = [tool for tool in ("openssl", "mosquitto_passwd") if shutil.which(tool) is None]
    if tools:
        pytest.skip(f"{' and '.join(tools)} not installed (Debian: apt-get install openssl mosquitto-clients)")
    secrets = Path(tempfile.mkdtemp(prefix="pdm-edge-tls-"))
    try:
        secrets.chmod(0o755)
        ca = make_ca(secrets, "ca")
        certfile, keyfile = make_server_cert(secrets, "ca")
        passwords = secrets / "passwd"
        _run("mosquitto_passwd", "-c", "-b", str(passwords), AGENT_USER, AGENT_PASSWORD, cwd=secrets)
        _run("mosquitto_passwd", "-b", str(passwords), SENSOR_USER, SENSOR_PASSWORD, cwd=secrets)
        for path in secrets.iterdir():
            path.chmod(0o644)
        extra = (f"cafile {ca}\ncertfile {certfile}\nkeyfile {keyfile}\n"
                 f"allow_anonymous false\npassword_file {passwords}\n")
        with Mosquitto.start(tmp_path / "mosquitto", extra_config=extra) as broker:
            yield broker, ca
    finally:
        shutil.rmtree(secrets, ignore_errors=True)


def tls_agent(tmp_path: Path, broker: Mosquitto, ca: Path, password: str) -> Agent:
    password_file = tmp_path / "mqtt.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return Agent(tmp_path, f"mqtts://{broker.host}:{broker.port}",
                 mqtt={"ca_file": str(ca), "username": AGENT_USER},
                 env={"PDM_MQTT__PASSWORD_FILE": str(password_file)})


def publish_tls(broker: Mosquitto, ca: Path, messages: list[tuple[str, str]]) -> None:
    with Publisher(f"mqtts://{broker.host}:{broker.port}", ca_file=ca, username=SENSOR_USER,
                   password=SENSOR_PASSWORD) as publisher:
        assert publisher.publish_all(messages) == len(messages)


def test_readings_arrive_over_tls_with_a_username_and_a_password_file(tmp_path, tls_broker):
    broker, ca = tls_broker
    agent = tls_agent(tmp_path, broker, ca, AGENT_PASSWORD)
    try:
        agent.start()
        publish_tls(broker, ca, [reading(i % 10, i) for i in range(200)])
        wait_for(lambda: agent.count("readings") >= 200, 30, "readings over TLS")
        assert agent.stored_ts() == expected_ts(200)
        assert agent.messages("unavailable") == []
        assert re.search(rf"New client connected from .* as pdm-test-\S+ \(.*u'{AGENT_USER}'\)",
                         broker.log.read_text()), broker.log_tail()
        assert AGENT_PASSWORD not in agent.log.read_text()
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()


def test_a_wrong_password_is_logged_once_and_the_agent_stays_up_storing_nothing(tmp_path, tls_broker):
    broker, ca = tls_broker
    wrong = "wrong-pw-c0ffee42"
    agent = tls_agent(tmp_path, broker, ca, wrong)
    name = f"MQTT broker {broker.host}:{broker.port}"
    try:
        agent.start(until=f"{name} unavailable")
        # paho retries with backoff (1-2 s, then twice that): wait for the broker to refuse a second attempt, so
        # that a refusal logged per attempt would show.
        wait_for(lambda: broker.log.read_text().count("disconnected, not authorised") >= 2, 30,
                 "a second refused attempt")
        publish_tls(broker, ca, [reading(i % 10, i) for i in range(20)])

        assert agent.process.poll() is None, agent.log.read_text()[-2000:]
        refusals = agent.messages(f"{name} unavailable")
        assert len(refusals) == 1, refusals
        assert re.search(r"refused: (Not authorized|Bad user name or password)", refusals[0]), refusals[0]
        assert agent.messages("subscribed to") == []
        assert wrong not in agent.log.read_text()
        assert agent.count("readings") == 0 and agent.count("quarantine") == 0
        started = time.monotonic()
        assert agent.signal(signal.SIGTERM) == 0  # a stop during the reconnection backoff is still clean
        assert time.monotonic() - started < 10
        assert wrong not in agent.log.read_text()
    finally:
        agent.stop()


def untrusted_ca(tmp_path: Path) -> Path:
    folder = tmp_path / "other-ca"
    folder.mkdir()
    return make_ca(folder, "other-ca")


def test_a_broker_certificate_from_another_ca_is_refused_and_the_agent_stays_up(tmp_path, tls_broker):
    broker, ca = tls_broker
    agent = tls_agent(tmp_path, broker, untrusted_ca(tmp_path), AGENT_PASSWORD)
    name = f"MQTT broker {broker.host}:{broker.port}"
    try:
        agent.start(until=f"{name} unavailable")
        # The broker sees the agent abort the handshake; the second time is the first retry (paho waits 3 to 6 s).
        wait_for(lambda: broker.log.read_text().count("tlsv1 alert unknown ca") >= 2, 30, "a second attempt")
        publish_tls(broker, ca, [reading(i % 10, i) for i in range(20)])

        assert agent.process.poll() is None, agent.log.read_text()[-2000:]
        assert len(agent.messages(f"{name} unavailable")) == 1, agent.messages("unavailable")
        assert agent.messages("subscribed to") == []
        assert " as pdm-test-" not in broker.log.read_text()  # the agent's client never got past the handshake
        assert agent.count("readings") == 0
        assert AGENT_PASSWORD not in agent.log.read_text()
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()


def test_the_log_says_why_a_tls_connection_failed(tmp_path, tls_broker):
    broker, _ = tls_broker
    agent = tls_agent(tmp_path, broker, untrusted_ca(tmp_path), AGENT_PASSWORD)
    name = f"MQTT broker {broker.host}:{broker.port}"
    try:
        agent.start(until=f"{name} unavailable")
        [line] = agent.messages(f"{name} unavailable")
        assert "certificate verify failed" in line
    finally:
        agent.stop()
