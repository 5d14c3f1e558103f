"""Faults along MQTT -> `pdm-edge run` -> outbox -> `pdm-central serve` -> PostgreSQL (SPEC §6, §8).

- the agent killed -9 at random moments while it syncs: every closed window reaches PostgreSQL exactly once, with
  every reading of its window counted, and every event once;
- central killed -9 while batches are being posted: nothing lost, nothing stored twice;
- the buffer cap with central down and a flood of readings: the agent stays up, the database stays near the cap,
  the oldest readings are dropped and counted, events are kept, and the counters reach central when it is back.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import threading
import time
from contextlib import closing

import psycopg

from testkit.mqtt import Publisher
from testkit.net import ServiceError, free_port
from tests.agent.test_run import EVERY_WINDOW, VALUES, AgentProcess, wait_for
from tests.central.support import Server

T0 = 1_790_000_000  # window-aligned for 1 s and 60 s windows, in the past: every window can close by the clock
DRIFTING = "m03"


def telemetry(machines: int, windows: int, per_window: int, drift: range) -> list[tuple[str, str]]:
    """Window by window, `per_window` readings of each machine; DRIFTING goes into alarm during `drift`."""
    messages = []
    for window in range(windows):
        for m in range(machines):
            machine = f"m{m:02d}"
            for k in range(per_window):
                body = {"ts": T0 + window + k / per_window, **VALUES, "tool_wear": window % 200}
                if machine == DRIFTING and window in drift:
                    body.update(torque=68.0, rotational_speed=1400)  # about 10 kW: PWF, an alarm
                messages.append((f"pdm/{machine}/telemetry", json.dumps(body)))
    return messages


def publish_in_background(broker_url: str, messages: list, rate: float) -> tuple[threading.Thread, list[Exception]]:
    """Publish at `rate` messages/s (QoS 1) from a thread: (the thread, where its error goes)."""
    errors: list[Exception] = []

    def publish() -> None:
        try:
            with Publisher(broker_url) as publisher:
                publisher.publish_all(messages, qos=1, rate=rate, timeout=120)
        except ServiceError as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    return thread, errors


def stored(central_url: str, gateway: str) -> tuple[list, list]:
    with psycopg.connect(central_url) as conn:
        summaries = conn.execute(
            "SELECT s.summary_id::text, s.machine_id, extract(epoch FROM s.window_start)::bigint, s.readings"
            " FROM summaries s JOIN gateways g ON g.id = s.gateway_id WHERE g.name = %s", (gateway,)).fetchall()
        events = conn.execute(
            "SELECT e.event_id::text, e.machine_id, e.from_state, e.to_state FROM events e"
            " JOIN gateways g ON g.id = e.gateway_id WHERE g.name = %s ORDER BY e.ts", (gateway,)).fetchall()
    return summaries, events


def last_status(central_url: str, gateway: str) -> dict | None:
    with psycopg.connect(central_url) as conn:
        row = conn.execute("SELECT last_status FROM gateways WHERE name = %s", (gateway,)).fetchone()
    return row[0] if row else None


def assert_exactly_once(central_url: str, name: str, agent: AgentProcess, machines: int, windows: int,
                        per_window: int) -> None:
    summaries, events = stored(central_url, name)
    keys = [(machine, start) for _, machine, start, _ in summaries]
    assert len(keys) == len(set(keys)) == machines * windows
    assert set(keys) == {(f"m{m:02d}", T0 + w) for m in range(machines) for w in range(windows)}
    assert {readings for *_, readings in summaries} == {per_window}  # no reading lost or counted twice
    assert [(machine, before, after) for _, machine, before, after in events] == [
        (DRIFTING, "ok", "alarm"), (DRIFTING, "alarm", "ok")]
    with agent.db() as db:  # what the agent produced is exactly what central has
        produced = dict(db.execute("SELECT record_id, kind FROM outbox"))
        assert db.execute("SELECT count(*) FROM outbox WHERE synced_at IS NULL").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert produced == {**{sid: "summary" for sid, *_ in summaries}, **{eid: "event" for eid, *_ in events}}


def test_agent_killed_9_at_random_moments_while_syncing_stores_every_window_once(
        tmp_path, private_broker, central_url, gateways):
    rng = random.Random(int(os.environ.get("PDM_CRASH_SEED", "23")))
    machines, windows, per_window = 5, 150, 4
    name, token = gateways.add("kill-agent")
    central = Server.central(central_url, tmp_path / "central.log")
    # Batches of 5 records: a round is tens of posts, so a kill lands in the middle of one most of the time.
    # A short grace: a window restored at start-up must wait for the readings the broker still holds for it
    # (regression: it used to close by the clock before they were redelivered, and they became late).
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 0.1, "batch_size": 5},
                         summary={"window_s": 1, "grace_s": 0.5}, **EVERY_WINDOW)
    messages = telemetry(machines, windows, per_window, drift=range(20, 26))
    try:
        agent.start()
        # 12 s of publishing, a window closed every 70 ms: each kill waits for records pending in the outbox.
        publishing, publisher_error = publish_in_background(private_broker.url, messages, rate=250)
        kills = in_flight = 0
        while publishing.is_alive() or kills < 10:
            time.sleep(rng.uniform(0.1, 0.7))  # a random moment: the point of this test
            deadline = time.monotonic() + 1.0
            while (pending := agent.count("outbox WHERE synced_at IS NULL")) == 0 and time.monotonic() < deadline:
                time.sleep(0.005)  # a moment when records wait for central: a sync round is running or due
            in_flight += pending > 0
            agent.process.kill()
            agent.process.wait()
            kills += 1
            agent.start()
        publishing.join()
        assert not publisher_error, publisher_error

        wait_for(lambda: len(stored(central_url, name)[0]) >= machines * windows, 120, "every window at central")
        wait_for(lambda: agent.count("outbox WHERE synced_at IS NULL") == 0, 30, "the outbox to be synced")
        print(f"\nagent kill -9: {kills} kills, {in_flight} with records pending, {agent.starts} starts")
        assert kills >= 10 and in_flight >= 5
        assert_exactly_once(central_url, name, agent, machines, windows, per_window)
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()
        central.terminate()


def test_central_killed_9_mid_request_loses_and_duplicates_nothing(tmp_path, private_broker, central_url, gateways):
    rng = random.Random(int(os.environ.get("PDM_CRASH_SEED", "29")))
    machines, windows, per_window = 5, 60, 4
    name, token = gateways.add("kill-central")
    port = free_port()
    starts = 0

    def start_central() -> Server:
        nonlocal starts
        starts += 1
        return Server.central(central_url, tmp_path / f"central-{starts}.log", port)

    central = start_central()
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 0.1, "batch_size": 5},
                         summary={"window_s": 1, "grace_s": 0.5}, **EVERY_WINDOW)
    messages = telemetry(machines, windows, per_window, drift=range(20, 26))
    try:
        agent.start()
        publishing, publisher_error = publish_in_background(private_broker.url, messages, rate=250)
        kills = 0
        while publishing.is_alive() or kills < 5:
            time.sleep(rng.uniform(0.1, 0.7))
            deadline = time.monotonic() + 1.0
            while agent.count("outbox WHERE synced_at IS NULL") == 0 and time.monotonic() < deadline:
                time.sleep(0.002)  # records waiting for central: a post is being made or about to be
            central.process.kill()  # SIGKILL: no graceful shutdown, requests cut wherever they are
            central.process.wait()
            kills += 1
            central = start_central()
        publishing.join()
        assert not publisher_error, publisher_error

        wait_for(lambda: len(stored(central_url, name)[0]) >= machines * windows, 120, "every window at central")
        wait_for(lambda: agent.count("outbox WHERE synced_at IS NULL") == 0, 60, "the outbox to be synced")
        cut = sum("cannot reach central" in line or "central answered 5" in line
                  for line in agent.log.read_text().splitlines())
        print(f"\ncentral kill -9: {kills} kills, {cut} failed-round log lines in the agent")
        assert kills >= 5
        assert_exactly_once(central_url, name, agent, machines, windows, per_window)
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()
        central.terminate()


def used_bytes(path) -> int:
    """Pages holding data, as Store.used_bytes, through a read-only connection."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT (page_count - freelist_count) * page_size FROM pragma_page_count,"
                          " pragma_freelist_count, pragma_page_size").fetchone()[0]


def counters(agent: AgentProcess) -> dict[str, int]:
    with agent.db() as db:
        return dict(db.execute("SELECT name, value FROM counters"))


def test_buffer_cap_with_central_down_drops_oldest_readings_counts_them_and_reports_them(
        tmp_path, private_broker, central_url, gateways):
    cap_mb = 16  # the smallest cap the config allows
    cap = cap_mb * 2**20
    machines, total = 20, 150_000
    name, token = gateways.add("cap")
    port = free_port()  # nothing listens there until central is started at the end
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": f"http://127.0.0.1:{port}", "token": token, "sync_interval_s": 0.5},
                         summary={"window_s": 60, "grace_s": 1}, buffer={"max_db_mb": cap_mb},
                         **EVERY_WINDOW)
    drift = range(machines * 1000, machines * 1300)  # early in the stream: its events are older than most readings
    messages = []
    for i in range(total):
        body = {"ts": T0 + i / machines / 10, **VALUES, "tool_wear": (i // 1000) % 200}
        if i in drift and i % machines == 3:
            body.update(torque=68.0, rotational_speed=1400)
        messages.append((f"pdm/m{i % machines:02d}/telemetry", json.dumps(body)))
    windows = machines * math.ceil(total / machines / 10 / 60)
    database = agent.data / "agent.db"
    central = None
    try:
        agent.start()
        peak, per_reading, stop = [0], [], threading.Event()

        def watch() -> None:  # the database's used bytes, sampled all along the flood
            while not stop.wait(0.05):
                try:
                    used = used_bytes(database)
                except sqlite3.OperationalError:  # busy with a checkpoint, or not created yet
                    continue
                peak[0] = max(peak[0], used)
                if not per_reading:
                    accepted = counters(agent).get("readings_accepted", 0)
                    if 20_000 <= accepted and not counters(agent).get("dropped_readings"):
                        with agent.db() as db:
                            rows = db.execute("SELECT count(*) FROM readings").fetchone()[0]
                        per_reading.append(used / rows)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        with Publisher(private_broker.url) as publisher:
            for i in range(0, total, 10_000):  # paho's queue holds 65,535 messages: a chunk at a time
                publisher.publish_all(messages[i:i + 10_000], qos=1, timeout=120)
        wait_for(lambda: counters(agent).get("readings_accepted", 0) >= total, 300, "every reading to be accepted")
        flood_s = time.monotonic() - started
        # The cap is enforced after every commit and once a second while idle.
        wait_for(lambda: used_bytes(database) <= cap, 10, "the database to be under the cap after the flood")
        wait_for(lambda: agent.count("outbox WHERE kind = 'summary'") >= windows, 30, "the last windows to close")
        stop.set()
        watcher.join()

        assert agent.process.poll() is None  # the agent stayed up
        seen = counters(agent)
        with agent.db() as db:
            readings = db.execute("SELECT count(*), min(ts) FROM readings").fetchone()
            kinds = dict(db.execute("SELECT kind, count(*) FROM outbox WHERE synced_at IS NULL GROUP BY kind"))
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        print(f"\ncap {cap_mb} MB: {total:,} readings in {flood_s:.1f} s, about {per_reading[0]:.0f} bytes per "
              f"reading ({total * per_reading[0] / 2**20:.0f} MB in all); peak used {peak[0] / 2**20:.2f} MB; "
              f"kept {readings[0]:,}; counters {seen}; pending {kinds}")
        assert seen["dropped_readings"] > 0
        assert seen["readings_accepted"] == total == readings[0] + seen["dropped_readings"]  # every drop counted
        assert readings[1] > T0  # the oldest went first
        assert not seen.get("dropped_summaries")  # summaries were never needed to make room
        assert kinds["event"] == 2  # events are never dropped
        assert kinds["summary"] == windows  # every closed window is kept
        assert peak[0] <= cap, f"peak {peak[0] / 2**20:.2f} MB"

        central = Server.central(central_url, tmp_path / "central.log", port)

        def reported() -> bool:
            status = last_status(central_url, name)
            return bool(status) and status["dropped"].get("readings") == seen["dropped_readings"]

        wait_for(reported, 60, "the drop counters at central")
        status = last_status(central_url, name)
        assert status["dropped_total"] == seen["dropped_readings"] > 0
        wait_for(lambda: agent.count("outbox WHERE synced_at IS NULL") == 0, 60, "the outbox to be synced")
        summaries, events = stored(central_url, name)
        assert len(summaries) == kinds["summary"] and len(events) == 2
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()
        if central is not None:
            central.terminate()
