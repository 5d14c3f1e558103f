"""End to end: MQTT -> `pdm-edge run` -> outbox -> `pdm-central serve` -> PostgreSQL, with central stopped mid-run.

Every closed window of every machine reaches PostgreSQL exactly once (summaries on change switched off), and an
alarm's events arrive no later than the summaries of the same period. With summaries on change (the default), a
steady machine's windows after its first are held back and counted, a change is sent at once.
"""

from __future__ import annotations

import json
import signal

import psycopg
import requests

from testkit.mqtt import Publisher
from testkit.net import free_port
from tests.agent.test_run import EVERY_WINDOW, VALUES, AgentProcess, wait_for
from tests.agent.test_status import families, value
from tests.central.support import Server

T0 = 1_790_000_000  # window-aligned for 1 s windows
MACHINES, WINDOWS, PER_WINDOW = 5, 12, 5
DRIFTING = "m04"  # in windows 5-7: power out of band, an alarm, then back to ok


def telemetry(window: int) -> list[tuple[str, str]]:
    messages = []
    for m in range(MACHINES):
        machine = f"m{m:02d}"
        for k in range(PER_WINDOW):
            body = {"ts": T0 + window + k / PER_WINDOW, **VALUES, "tool_wear": window}
            if machine == DRIFTING and 5 <= window <= 7:
                body.update(torque=68.0, rotational_speed=1400)  # about 10 kW: PWF
            messages.append((f"pdm/{machine}/telemetry", json.dumps(body)))
    return messages


def stored(central_url: str, gateway: str) -> tuple[list, list]:
    with psycopg.connect(central_url) as conn:
        summaries = conn.execute(
            "SELECT s.machine_id, extract(epoch FROM s.window_start), s.readings, s.received_at FROM summaries s"
            " JOIN gateways g ON g.id = s.gateway_id WHERE g.name = %s", (gateway,)).fetchall()
        events = conn.execute(
            "SELECT e.machine_id, extract(epoch FROM e.ts), e.from_state, e.to_state, e.received_at FROM events e"
            " JOIN gateways g ON g.id = e.gateway_id WHERE g.name = %s ORDER BY e.ts", (gateway,)).fetchall()
    return summaries, events


def test_every_window_reaches_postgresql_exactly_once_across_a_central_outage(
        tmp_path, private_broker, central_url, gateways):
    name, token = gateways.add("e2e")
    port = free_port()

    def start_central(log: str) -> Server:
        return Server.central(central_url, tmp_path / log, port)

    central = start_central("central-1.log")
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 0.5},
                         summary={"window_s": 1, "grace_s": 0.5}, **EVERY_WINDOW)
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([m for w in range(4) for m in telemetry(w)])
            wait_for(lambda: len(stored(central_url, name)[0]) >= 3 * MACHINES, 60, "the first windows at central")

            assert central.terminate() == 0  # central goes away for several windows
            publisher.publish_all([m for w in range(4, 9) for m in telemetry(w)])
            wait_for(lambda: agent.count("outbox WHERE kind = 'summary'") >= 8 * MACHINES, 60,
                     "windows closed while central is down")
            central = start_central("central-2.log")
            publisher.publish_all([m for w in range(9, WINDOWS) for m in telemetry(w)])

        wait_for(lambda: len(stored(central_url, name)[0]) >= WINDOWS * MACHINES, 90, "every window at central")
        summaries, events = stored(central_url, name)
        windows = [(machine, int(start)) for machine, start, _, _ in summaries]
        assert len(windows) == len(set(windows)) == WINDOWS * MACHINES
        assert set(windows) == {(f"m{m:02d}", T0 + w) for m in range(MACHINES) for w in range(WINDOWS)}
        assert {readings for _, _, readings, _ in summaries} == {PER_WINDOW}

        assert [(machine, from_state, to_state) for machine, _, from_state, to_state, _ in events] == [
            (DRIFTING, "ok", "alarm"), (DRIFTING, "alarm", "ok")]
        received = {(machine, int(start)): at for machine, start, _, at in summaries}
        for machine, ts, _, _, at in events:
            assert at <= received[(machine, int(ts))]  # the event came no later than its window's summary
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()
        central.terminate()


def held_back(agent: AgentProcess) -> int:
    metrics = families(requests.get(f"http://127.0.0.1:{agent.status_port}/metrics", timeout=10).text)
    return int(value(metrics, "pdm_summaries_held_back", "pdm_summaries_held_back_total"))


def test_by_default_a_steady_machine_is_sent_once_and_a_change_at_once(tmp_path, private_broker, central_url,
                                                                       gateways):
    name, token = gateways.add("on-change")
    central = Server.central(central_url, tmp_path / "central.log", free_port())
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 0.5},
                         summary={"window_s": 1, "grace_s": 0.5})
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([m for w in range(WINDOWS) for m in telemetry(w)])
        closed = WINDOWS * MACHINES
        wait_for(lambda: agent.count("outbox WHERE kind = 'summary'") + held_back(agent) >= closed, 60,
                 "every window closed")
        sent = agent.count("outbox WHERE kind = 'summary'")
        wait_for(lambda: len(stored(central_url, name)[0]) >= sent, 60, "the windows sent at central")
        summaries, events = stored(central_url, name)
        windows = {(machine, int(start) - T0) for machine, start, _, _ in summaries}
        assert len(summaries) == sent == closed - held_back(agent)
        steady = {(f"m{m:02d}", 0) for m in range(MACHINES) if f"m{m:02d}" != DRIFTING}
        assert {w for w in windows if w[0] != DRIFTING} == steady  # the first window, then nothing: unchanged
        # The drifting machine: its first window, the one it went into alarm and the one it came back
        assert {(DRIFTING, 0), (DRIFTING, 5), (DRIFTING, 8)} <= {w for w in windows if w[0] == DRIFTING}
        assert [(machine, from_state, to_state) for machine, _, from_state, to_state, _ in events] == [
            (DRIFTING, "ok", "alarm"), (DRIFTING, "alarm", "ok")]  # events are never held back
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()
        central.terminate()
