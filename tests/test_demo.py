"""`pdm-edge demo`: the simulator and the agent in one process.

- With the shipped model and the agent's default hysteresis, the demo's drifting machine goes ok -> warning -> alarm
  within two minutes, and the healthy machines stay ok (the plant scored step by step, no waiting).
- The command itself, as a newcomer runs it: scored machines within 10 s of the start, the drifting machine in
  alarm (short drift), the status page answering; SIGINT -> exit 0, the temporary data folder removed.
- The simulator's example agent configs validate (`pdm-edge check-config`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent.alarms import Alarms
from agent.cli import main
from drivers.simulator import Drift, Plant
from sync.remote import AlarmsConfig
from testkit.net import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["OSF", "PWF"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_drifting_machine_goes_ok_warning_alarm_within_two_minutes(scorer, mode, seed):
    manifest = scorer.model.manifest
    alarms = Alarms(AlarmsConfig())  # the agent's default hysteresis, as Machines sets it up
    points = dict(manifest.health.points)
    alarms.set_bands(points[manifest.thresholds.warning], points[manifest.thresholds.alarm])
    plant = Plant(5, seed=seed, drift=Drift("m3", mode, minutes=1.5))
    path: dict[str, list[tuple[int, str]]] = {m: [(0, "ok")] for m in plant.machines}
    for second in range(1, 121):
        readings = plant.step(1.0)
        scores = scorer.score([{**values, "machine_type": plant.machine_type(m)} for m, values in readings.items()])
        for machine_id, score in zip(readings, scores):
            change = alarms.update(machine_id, score.state.value, score.health)
            if change:
                path[machine_id].append((second, change[1]))
    assert [state for _, state in path["m3"]] == ["ok", "warning", "alarm"]
    assert 40 <= path["m3"][1][0] < path["m3"][2][0] <= 100
    assert all(len(states) == 1 for m, states in path.items() if m != "m3")


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_the_demo_shows_scored_machines_within_10_s_then_an_alarm_and_stops_on_sigint(tmp_path):
    status_port = free_port()
    env = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PDM_CONFIG", None)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "demo", "--machines", "4", "--drift", "m2:OSF", "--drift-minutes", "0.2",
         "--status-port", str(status_port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    rows: dict[str, str] = {}
    scored_after = alarm_after = None
    try:
        deadline = started + 60
        while alarm_after is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            output.append(line)
            match = re.match(r"^(m\d)\s+(ok|warning|alarm)\s+(\d+)\s", line)
            if match:
                rows[match[1]] = match[2]
                if scored_after is None and len(rows) == 4:
                    scored_after = time.monotonic() - started
                if match[1] == "m2" and match[2] == "alarm":
                    alarm_after = time.monotonic() - started
        text = "".join(output)
        assert scored_after is not None and scored_after <= 10, text
        assert alarm_after is not None, text
        data_dir = re.search(r"data in (\S+)", text)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/api/v1/machines", timeout=5) as response:
            machines = {m["machine_id"]: m for m in json.load(response)["machines"]}
        assert machines["m2"]["state"] == "alarm" and machines["m2"]["dominant"]["mode"] == "OSF"
        assert {machines[m]["state"] for m in ("m1", "m3", "m4")} == {"ok"}
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not Path(data_dir).exists()


@pytest.mark.parametrize("example", ["simulator-modbus.toml", "simulator-mqtt.toml"])
def test_the_simulator_examples_validate(example, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env of the working directory
    assert main(["check-config", "--config", str(ROOT / "examples" / example)]) == 0
    assert "configuration valid" in capsys.readouterr().err


def test_a_drift_of_a_missing_machine_is_a_usage_error(capsys):
    assert main(["demo", "--drift", "m9:OSF", "--machines", "3", "--status-port", str(free_port())]) == 2
    assert "m1..m3" in capsys.readouterr().err


def test_a_malformed_drift_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "modbus", "--drift", "m3"])
    assert exit_.value.code == 2
    assert "MACHINE:MODE" in capsys.readouterr().err
