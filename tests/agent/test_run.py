"""`pdm-edge run` as a subprocess against a real Mosquitto: exactly-once storage, kill -9, signals, bad config."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from model.package import SHIPPED
from testkit.mqtt import Publisher
from testkit.net import free_port

VALUES = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500, "torque": 40.0}
T0 = 1_790_000_000


def reading(machine: int, i: int, **changes) -> tuple[str, str]:
    body = {"ts": T0 + i, **VALUES, "tool_wear": i % 250, **changes}
    return f"pdm/m{machine:02d}/telemetry", json.dumps(body)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# Summaries on change switched off: for the tests that count every window at central (sync/onchange.py)
EVERY_WINDOW = {"central.on_change": {"enabled": False}}


class AgentProcess:
    """`pdm-edge run` with a config written for the test; its log is a JSON-lines file."""

    def __init__(self, tmp_path: Path, broker_url: str, gateway_id: str = "gw-test", status: dict | None = None,
                 **sections) -> None:
        self.data = tmp_path / "data"
        self.log = tmp_path / "agent.log"
        self.config = tmp_path / "agent.toml"
        self.status_port = free_port()
        lines = [f'gateway_id = "{gateway_id}"', f'data_dir = "{self.data}"', 'log_format = "json"',
                 "[mqtt]", f'url = "{broker_url}"', f'client_id = "pdm-test-{tmp_path.name}-{uuid.uuid4().hex[:8]}"',
                 'default_machine_type = "M"', "max_payload_bytes = 2048",
                 "[status]", f'bind = "127.0.0.1:{self.status_port}"',
                 *(f"{k} = {json.dumps(v)}" for k, v in (status or {}).items())]
        for section, values in sections.items():
            lines += [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        subscribed_before = self.count_log("subscribed to")
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        wait_for(lambda: self.count_log("subscribed to") > subscribed_before or self.process.poll() is not None,
                 60, "the agent to subscribe")
        assert self.process.poll() is None, self.log.read_text()[-2000:]

    def signal(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)

    def count_log(self, text: str) -> int:
        return self.log.read_text().count(text) if self.log.exists() else 0

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data / 'agent.db'}?mode=ro", uri=True)

    def count(self, table: str) -> int:
        with self.db() as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def agent_process(tmp_path, private_broker):
    process = AgentProcess(tmp_path, private_broker.url)
    yield process
    process.stop()


MALFORMED = [  # (topic, payload, reason): one of each kind, repeated to 1 % of the stream
    ("pdm/m01/telemetry", "not json {", "malformed"),
    ("pdm/m02/telemetry", json.dumps({"ts": T0, **VALUES, "tool_wear": "worn"}), "not_a_number"),
    ("pdm/m03/telemetry", (f'{{"ts": {T0:d}, "air_temperature": NaN, "process_temperature": 310, '
                          '"rotational_speed": 1500, "torque": 40, "tool_wear": 1}'), "not_finite"),
    ("pdm/m04/telemetry", json.dumps({"ts": T0, **VALUES, "torque": -5.0, "tool_wear": 1}), "out_of_range"),
    ("pdm/m05/telemetry", json.dumps({"ts": T0, **VALUES}), "missing_input"),
    ("pdm/m06/telemetry", json.dumps({"ts": T0, **VALUES, "tool_wear": 1, "pad": "x" * 3000}), "payload_too_large"),
    ("pdm/bad id!/telemetry", json.dumps({"ts": T0, **VALUES, "tool_wear": 1}), "unknown_machine"),
    ("pdm/m07/telemetry", "[1, 2, 3]", "not_an_object"),
]


def test_20_machines_10000_readings_with_1_percent_malformed_stored_exactly_once(agent_process, private_broker):
    rng = random.Random(7)
    messages, expected_reasons, valid = [], [], set()
    for i in range(10_000):
        if i % 100 == 50:
            topic, payload, reason = MALFORMED[(i // 100) % len(MALFORMED)]
            messages.append((topic, payload))
            expected_reasons.append(reason)
        else:
            machine = rng.randrange(20)
            messages.append(reading(machine, i, torque=round(rng.uniform(20, 60), 1)))
            valid.add((f"m{machine:02d}", float(T0 + i)))
    agent_process.start()
    with Publisher(private_broker.url) as publisher:
        assert publisher.publish_all(messages, qos=1) == 10_000

    wait_for(lambda: agent_process.count("readings") + agent_process.count("quarantine") >= 10_000, 120,
             "every message to be stored or quarantined")
    with agent_process.db() as db:
        stored = db.execute("SELECT machine_id, ts, p_failure, health, state FROM readings").fetchall()
        reasons = sorted(r for (r,) in db.execute("SELECT reason FROM quarantine"))
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(stored) == len(valid) == 9_900
    assert {(m, ts) for m, ts, *_ in stored} == valid
    assert all(0 <= p <= 1 and 0 <= h <= 100 and s in ("ok", "warning", "alarm") for _, _, p, h, s in stored)
    assert reasons == sorted(expected_reasons)
    assert agent_process.process.poll() is None
    assert agent_process.signal(signal.SIGTERM) == 0
    assert "pdm-edge stopped" in agent_process.log.read_text()


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(agent_process, private_broker):
    rng = random.Random(int(os.environ.get("PDM_CRASH_SEED", "11")))
    total = 6_000
    messages = [reading(i % 20, i) for i in range(total)]
    agent_process.start()
    publisher_error = []

    def publish():
        try:
            with Publisher(private_broker.url) as publisher:
                publisher.publish_all(messages, qos=1, rate=400, timeout=120)
        except Exception as exc:  # noqa: BLE001 -- whatever stops the publisher thread is reported by the test below
            publisher_error.append(exc)

    publishing = threading.Thread(target=publish)
    publishing.start()
    kills = 0
    while publishing.is_alive() or kills < 10:
        time.sleep(rng.uniform(0.05, 0.6))  # a random moment: the point of this test
        agent_process.process.kill()
        agent_process.process.wait()
        kills += 1
        agent_process.start()
    publishing.join()
    assert not publisher_error, publisher_error
    wait_for(lambda: agent_process.count("readings") >= total, 120, "every reading after the last restart")
    with agent_process.db() as db:
        stored = db.execute("SELECT machine_id, ts FROM readings").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert kills >= 10
    assert len(stored) == total
    assert sorted(ts for _, ts in stored) == [float(T0 + i) for i in range(total)]
    assert agent_process.signal(signal.SIGTERM) == 0


def test_sighup_refuses_a_broken_model_package_and_takes_a_good_one(tmp_path, private_broker):
    import shutil

    package = tmp_path / "package"
    shutil.copytree(SHIPPED, package)
    agent = AgentProcess(tmp_path, private_broker.url, model={"path": str(package)})
    try:
        agent.start()
        onnx = (package / "model.onnx").read_bytes()
        (package / "model.onnx").write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
        agent.process.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.count_log("refused, still scoring with ai4i-failure") >= 1, 30, "the refusal")
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([reading(1, i) for i in range(50)])
        wait_for(lambda: agent.count("readings") == 50, 30, "readings scored by the running model")

        (package / "model.onnx").write_bytes(onnx)
        agent.process.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.count_log("model reloaded") >= 1, 30, "the reload")
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([reading(1, i) for i in range(50, 100)])
        wait_for(lambda: agent.count("readings") == 100, 30, "readings scored by the new model")
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()


def test_run_refuses_a_broken_config_with_one_clear_message_and_exit_1(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('gateway_id = "gw"\n[mqtt]\nurl = "http://broker"\n')
    run = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], check=False,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "mqtt.url" in run.stderr
