"""kill -9 of `pdm-edge run` at random moments under Modbus ingest, with 1 s summary windows closing, one machine
going in and out of alarm, and a sync to the real central in flight (SPEC §8): after every kill the database opens
clean, every reading and outbox record seen committed before the kill is still there, and at the end central holds
every window exactly once, each counting exactly the readings the agent stored for it, and every alarm event once,
in an unbroken chain of states.

MQTT ingest under kill -9 is tests/agent/test_run.py; the agent killed mid-sync with MQTT, and central killed
mid-request, are tests/central/test_faults.py. PDM_CRASH_SEED replays a run; PDM_RELIABILITY=long makes 200 kills.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections import Counter
from itertools import pairwise

import pytest

from testkit.modbus import ModbusServers
from tests.agent.test_run import EVERY_WINDOW, AgentProcess, wait_for
from tests.central.support import Server
from tests.central.test_faults import stored
from tests.reliability.plant import (
    ALARMING,
    LAYOUT,
    add_modbus,
    healthy_unit,
    integrity,
    outbox_ids,
    readings,
    set_values,
)
from tests.scale import scaled

MACHINES = 5
POLL_S = 0.05  # 20 readings a second per machine: 100 a second in all


@pytest.mark.timeout(scaled(600, 3600))  # 200 kills, each a start of the agent
def test_kill_9_under_modbus_ingest_while_windows_close_and_sync_runs_loses_and_duplicates_nothing(
        tmp_path, private_broker, central_url, gateways):
    rng = random.Random(int(os.environ.get("PDM_CRASH_SEED", "31")))
    wanted = scaled(10, 200)
    name, token = gateways.add("kill-modbus")
    central = Server.central(central_url, tmp_path / "central.log")
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 0.1, "batch_size": 5},
                         summary={"window_s": 1, "grace_s": 0.5}, **EVERY_WINDOW)
    seen_readings: set[tuple[str, float]] = set()
    seen_records: set[str] = set()
    kills = in_flight = 0
    started = time.monotonic()
    try:
        with ModbusServers() as servers:
            units = {k: healthy_unit() for k in range(1, MACHINES + 1)}
            modbus = servers.tcp(units)
            add_modbus(agent, modbus, MACHINES, POLL_S)
            agent.start()
            while kills < wanted:
                alarm = kills % 4 == 1  # m1 goes into alarm and back every few kills
                set_values(units[1], **(ALARMING if alarm else {k: LAYOUT[k][1] for k in ALARMING}))
                time.sleep(rng.uniform(0.1, 0.8))  # a random moment: the point of this test
                deadline = time.monotonic() + 1.0
                while (pending := agent.count("outbox WHERE synced_at IS NULL")) == 0 \
                        and time.monotonic() < deadline:
                    time.sleep(0.005)  # a moment when records wait for central: a sync round is running or due
                in_flight += pending > 0
                before_readings, before_records = readings(agent), outbox_ids(agent)  # committed: accepted
                agent.process.kill()
                agent.process.wait()
                kills += 1
                assert integrity(agent) == "ok", f"after kill {kills}"
                missing = before_readings - readings(agent)
                assert not missing, f"kill {kills} lost {len(missing)} committed readings"
                assert before_records <= outbox_ids(agent), f"kill {kills} lost outbox records"
                seen_readings |= before_readings
                seen_records |= before_records
                agent.start()
            for values, state in ((ALARMING, "alarm"), ({k: LAYOUT[k][1] for k in ALARMING}, "ok")):
                set_values(units[1], **values)  # at least one alarm and its end, whatever the kills cut short
                wait_for(lambda state=state: agent.count(
                    f"machines WHERE machine_id = 'm1' AND state LIKE '%\"state\": \"{state}\"%'") == 1, 60,
                    f"m1 to be in {state}")
            servers.stop(modbus)  # the devices go quiet: the last windows close by the clock

        wait_for(lambda: agent.count("machines WHERE state LIKE '%\"window\": null%'") == MACHINES, 30,
                 "every open window to close")
        wait_for(lambda: agent.count("outbox WHERE synced_at IS NULL") == 0, 60, "the outbox to be synced")
        summaries, events = stored(central_url, name)
        final = readings(agent)
        with agent.db() as db:
            produced = {r for (r,) in db.execute("SELECT record_id FROM outbox WHERE kind = 'summary'")}
        duration = time.monotonic() - started
        print(f"\nModbus kill -9: {kills} kills ({in_flight} with records pending for central) in {duration:.0f} s; "
              f"{len(final)} readings, {len(summaries)} windows and {len(events)} alarm events at central")

        with agent.db() as db:
            produced_events = {r for (r,) in db.execute("SELECT record_id FROM outbox WHERE kind = 'event'")}
        assert seen_readings <= final and seen_records <= produced | produced_events
        assert {e[0] for e in events} == produced_events
        keys = Counter((machine, start) for _, machine, start, _ in summaries)
        assert max(keys.values()) == 1  # no window twice at central
        assert {sid for sid, *_ in summaries} == produced  # everything the agent produced, nothing else
        per_window = Counter((machine, math.floor(ts)) for machine, ts in final)
        assert {(machine, start): n for _, machine, start, n in summaries} == per_window  # each reading counted once
        assert len({e[0] for e in events}) == len(events) >= 2  # m1's alarms, each once
        chain = [(before, after) for _, machine, before, after in events]  # in time order
        assert {machine for _, machine, *_ in events} == {"m1"}
        assert chain[0][0] == "ok" and all(a[1] == b[0] for a, b in pairwise(chain)), chain
        assert in_flight >= wanted // 2
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()
        central.terminate()
