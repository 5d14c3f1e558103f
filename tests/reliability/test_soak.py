"""Soak: `pdm-edge run` under steady load — MQTT readings of 20 machines, 5 Modbus devices polled 5 times a second,
summaries closing, a sync to the real central, the status API scraped — sampling the process from /proc. After a
warm-up, RSS, open file descriptors and threads must stay flat (growth under 5 %), and no line of the log may be at
error level. Short: 45 s in the everyday suite; PDM_RELIABILITY=long: an hour. The figures are printed and written
to artifacts/reliability/soak-<short|long>.json.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from testkit.modbus import ModbusServers
from testkit.mqtt import Publisher
from testkit.net import ServiceError
from tests.agent.test_run import AgentProcess, reading, wait_for
from tests.central.support import Server
from tests.reliability.plant import (
    LEVEL,
    accepted,
    add_modbus,
    error_lines,
    growth,
    healthy_unit,
    process_figures,
    status_base,
)
from tests.scale import LONG, scaled

DURATION_S = scaled(45, 3600)
WARM_UP_S = scaled(15, 600)
SAMPLE_EVERY_S = scaled(1, 10)
MQTT_RATE = 200  # readings a second
ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "reliability" / f"soak-{'long' if LONG else 'short'}.json"


def steady_mqtt(broker_url: str, stop: threading.Event, errors: list[Exception]) -> threading.Thread:
    def publish() -> None:
        i = 0
        try:
            with Publisher(broker_url) as publisher:
                while not stop.is_set():  # 10 s at a time: paho's queue and the acknowledgements stay small
                    chunk = [reading(i % 20, i) for i in range(i, i + 10 * MQTT_RATE)]
                    publisher.publish_all(chunk, qos=1, rate=MQTT_RATE, timeout=60)
                    i += len(chunk)
        except ServiceError as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(DURATION_S + 600)  # the suite's 600 s per test is for tests that do not soak
def test_soak_rss_fds_and_threads_stay_flat_and_nothing_is_logged_at_error_level(
        tmp_path, private_broker, central_url, gateways):
    name, token = gateways.add("soak")
    central = Server.central(central_url, tmp_path / "central.log")
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 2},
                         summary={"window_s": 60, "grace_s": 5})
    stop, publish_errors, samples = threading.Event(), [], []
    try:
        with ModbusServers() as servers:
            add_modbus(agent, servers.tcp({k: healthy_unit() for k in range(1, 6)}), 5, 0.2)
            agent.start()
            publishing = steady_mqtt(private_broker.url, stop, publish_errors)
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < DURATION_S:
                time.sleep(SAMPLE_EVERY_S)
                assert agent.process.poll() is None, agent.log.read_text()[-2000:]
                assert requests.get(status_base(agent) + "/metrics", timeout=10).status_code == 200  # scraped
                if elapsed >= WARM_UP_S:
                    samples.append({"t_s": round(elapsed, 1), **process_figures(agent.process.pid),
                                    "readings": accepted(agent)})
            stop.set()
            publishing.join(30)
        assert not publish_errors, publish_errors
        wait_for(lambda: agent.count("outbox WHERE synced_at IS NULL") == 0, 60, "the outbox to be synced")
        figures = {key: growth(samples, key, level) for key, level in LEVEL.items()}
        stored = samples[-1]["readings"] - samples[0]["readings"]
        result = {"variant": "long" if LONG else "short", "duration_s": DURATION_S, "warm_up_s": WARM_UP_S,
                  "readings_per_s": round(stored / (samples[-1]["t_s"] - samples[0]["t_s"]), 1),
                  "outbox_synced": agent.count("outbox"),
                  **{f"{key}_early": early for key, (early, _, _) in figures.items()},
                  **{f"{key}_late": late for key, (_, late, _) in figures.items()},
                  **{f"{key}_growth_pct": round(100 * g, 2) for key, (_, _, g) in figures.items()},
                  "error_lines": len(error_lines(agent)), "samples": samples}
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.write_text(json.dumps(result, indent=1))
        print("\nsoak: " + ", ".join(f"{k} {v}" for k, v in result.items() if k != "samples"))
        assert result["readings_per_s"] >= 0.8 * (MQTT_RATE + 25)  # the load really ran
        for key, (early, late, g) in figures.items():
            assert g < 0.05, f"{key} grew {100 * g:.1f} % ({early} -> {late})"
        assert agent.signal(signal.SIGTERM) == 0
        assert not error_lines(agent), error_lines(agent)[:3]
    finally:
        stop.set()
        agent.stop()
        central.terminate()
