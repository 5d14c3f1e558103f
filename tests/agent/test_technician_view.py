"""What a technician sees of a machine — its state, health and main risk on the status API, the page, `pdm-edge
status` and the demo (all from `machine_infos`) — agrees at every reading, while the hysteresis holds a state the
latest reading does not share: real readings through a real agent's pipeline, store and status server."""

from __future__ import annotations

import time

from agent.status_cli import table
from drivers.base import RawReading
from tests.agent.test_status import serving, wait_for

OK = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
      "tool_wear": 10.0, "machine_type": "M"}
WARN = {**OK, "torque": 30.0, "tool_wear": 225.0}  # warning on its own, health about 68
ALARM = {**OK, "torque": 60.0, "tool_wear": 200.0}  # overstrain: alarm on its own, health about 0
HOVER = {**OK, "torque": 30.0, "tool_wear": 219.0}  # ok on its own, health about 71: inside the leave margin


def test_state_health_and_main_risk_agree_at_every_reading(tmp_path):
    # ok; into warning; readings in alarm and in ok while it holds; into alarm; out of alarm on readings in ok
    # within the margin (no reading of the streak is in warning); back to ok.
    steps = [OK] * 3 + [WARN] * 3 + [ALARM, HOVER, ALARM, WARN] + [ALARM] * 3 + [HOVER] * 5 + [OK] * 5
    with serving(tmp_path) as running:
        store, pipeline = running.agent.store, running.agent.pipeline
        model = running.get("/api/v1/status").json()["model"]
        at_warning, at_alarm = model["health_at_warning"], model["health_at_alarm"]
        fed: list[tuple[str, float, str]] = []  # each reading's own (state, health, dominant mode)
        seen = []
        start = time.time() - len(steps)
        for i, values in enumerate(steps):
            pipeline.put(RawReading("m1", start + i, dict(values), "test", time.time()))
            wait_for(lambda n=i + 1: store.counters().readings_accepted == n, f"reading {i + 1} committed")
            [machine] = running.get("/api/v1/machines").json()["machines"]
            fed.append((machine["reading_state"], machine["reading_health"],
                        max(store.history("m1", 0.0, 1)[0].risk.items(), key=lambda kv: kv[1])[0]))
            state, health, main = machine["state"], machine["health"], machine["dominant"]["mode"]
            seen.append((state, round(health)))
            assert health >= at_warning if state == "ok" else health <= at_warning, (i, machine)
            assert health <= at_alarm if state == "alarm" else health >= at_alarm, (i, machine)
            assert main == max(machine["risk"], key=machine["risk"].get)
            # health and main risk are those of a reading in the state shown, or the latest one's limited to its
            # band when no reading since the change shares it
            assert (state, health, main) in fed or (health in (at_warning, at_alarm) and main == fed[-1][2]), i
            [row] = table([machine]).splitlines()[1:]
            assert row.split()[1:3] == [state, f"{health:.0f}"]
            detail = running.get("/api/v1/machines/m1?history=1").json()
            assert (detail["state"], detail["health"], detail["dominant"]) == (state, health, machine["dominant"])
        warn, alarm, hover = fed[3], fed[10], fed[14]
        assert (warn[0], alarm[0], hover[0]) == ("warning", "alarm", "ok") and hover[1] < at_warning + 5
        assert seen == [("ok", round(fed[0][1]))] * 5 + [("warning", round(warn[1]))] * 7 + \
            [("alarm", round(alarm[1]))] * 5 + [("warning", at_warning)] * 5 + [("ok", round(fed[-1][1]))]
