"""The gateway's clock jumping backwards and forwards (NTP corrections, a wrong RTC at boot), with a fake clock
injected where the agent reads wall time: the pipeline and summaries (stamping a reading on arrival, as the Modbus
driver does, and closing windows by the clock), retention, and the sync client.

Promises: no window is summarised twice and none explodes into empty windows; every reading is stored and scored
and is either in exactly one summary or counted late; retention never deletes a record central does not have;
the sync backoff stays within its bounds whatever the wall clock says, and a batch stamped a year off is accepted.
"""

from __future__ import annotations

import math
import threading
import types
from datetime import UTC, datetime, timedelta

import pytest

import agent.service
import sync.client
from agent.config import AgentConfig, PipelineConfig
from agent.machines import Machines
from agent.pipeline import Pipeline
from agent.service import Agent
from agent.snapshot import Running
from agent.store import Store
from drivers.base import RawReading
from sync.client import BACKOFF_MAX_S, BACKOFF_MIN_S
from sync.outbox import Outcome
from sync.protocol import Summary
from sync.remote import AlarmsConfig, SummaryConfig
from testkit.net import LOCALHOST, free_port
from tests.agent.test_pipeline import VALUES
from tests.central.support import Server
from tests.reliability.test_central_faults import fill_outbox, sync_client

T0 = 1_790_000_000.0
WINDOW_S, GRACE_S, EVERY_S = 60, 10, 5.0
HOUR, DAY, YEAR = 3600, 86_400, 365 * 86_400
MACHINES = ("m1", "m2", "m3")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Gateway:
    """The pipeline with summaries on a real store, fed readings stamped on arrival by a clock the test moves."""

    def __init__(self, scorer, store: Store, clock: Clock) -> None:
        self.clock = clock
        summary = SummaryConfig(window_s=WINDOW_S, grace_s=GRACE_S)
        self.machines = Machines("gw-clock", summary, AlarmsConfig(), scorer.model, store.machines(), clock.now)
        self.pipeline = Pipeline(scorer, store, PipelineConfig(), self.machines, clock=clock)
        self._acked = threading.Semaphore(0)
        self.pipeline.start()

    def run_for(self, seconds: float) -> int:
        """Every machine sends a reading every EVERY_S of clock time for `seconds`; returns how many."""
        for _ in range(int(seconds / EVERY_S)):
            self.clock.now += EVERY_S
            for machine in MACHINES:
                self.pipeline.put(RawReading(machine, self.clock.now, dict(VALUES), "modbus:" + machine,
                                             self.clock.now, ack=self._acked.release))
            for _ in MACHINES:  # committed before the clock moves on
                assert self._acked.acquire(timeout=10), "a reading was not committed within 10 s"
        return int(seconds / EVERY_S) * len(MACHINES)


def test_windows_survive_clock_jumps_without_duplicates_or_empty_windows(scorer, tmp_path):
    clock = Clock(T0)
    with Store.open(tmp_path / "agent.db") as store:
        gateway = Gateway(scorer, store, clock)
        total = gateway.run_for(10 * 60)
        clock.now -= HOUR  # NTP pulls a clock that ran an hour ahead back
        total += gateway.run_for(10 * 60)
        clock.now += DAY  # a gateway that booted with an old RTC and then got NTP
        total += gateway.run_for(10 * 60)
        clock.now -= 32.5  # a small correction back (readings stamped on arrival never share a timestamp exactly)
        total += gateway.run_for(2 * 60)
        clock.now += 2 * WINDOW_S + GRACE_S + 1  # quiet: the last windows close by the clock
        assert gateway.pipeline.stop(timeout=30)
        summaries = [Summary.model_validate_json(r.body) for r in store.outbox("summary")]
        stored = store.counters().readings_accepted
    late = gateway.machines.summaries.late
    windows = [(s.machine_id, s.window_start.timestamp()) for s in summaries]
    print(f"\nclock jumps: {total} readings, {len(summaries)} summaries, {late} late (stamped in closed windows)")
    assert stored == total  # every reading stored and scored, whatever the clock said
    assert len(windows) == len(set(windows))  # no window twice
    assert all(s.window_end.timestamp() - s.window_start.timestamp() == WINDOW_S for s in summaries)
    assert sum(s.readings for s in summaries) + late == total  # each reading in one summary, or counted late
    # 10 + 10 + 2 minutes of readings that are not late: about 22 windows a machine, never one per elapsed minute
    assert len(summaries) <= len(MACHINES) * (10 + 1 + 10 + 1 + 3)
    hour_back = 10 * 60 / EVERY_S * len(MACHINES)  # the readings of the hour stepped back: all late
    assert hour_back <= late <= hour_back + math.ceil(32.5 / EVERY_S) * len(MACHINES)


def test_retention_under_clock_jumps_never_deletes_what_central_does_not_have(scorer, tmp_path, monkeypatch):
    clock = Clock(T0)
    monkeypatch.setattr(agent.service, "time", types.SimpleNamespace(time=clock))
    config = AgentConfig(gateway_id="gw-clock", data_dir=tmp_path)
    with Store.open(tmp_path / "agent.db") as store:
        fill_outbox(store, "gw-clock", windows=20)
        gateway = Gateway(scorer, store, clock)
        gateway.run_for(5 * 60)
        assert gateway.pipeline.stop(timeout=30)
        records = store.outbox(pending=False)
        synced = [r.record_id for r in records[:10]]
        store.mark_synced(synced, at=clock.now)
        pending = {r.record_id for r in store.outbox()}
        machines = store.machines()
        service = Agent(config)
        service.running = Running(store, gateway.pipeline)  # retention needs the store alone
        for jump in (-YEAR, +YEAR, +10 * YEAR):
            clock.now = T0 + jump
            service._retention()
            assert {r.record_id for r in store.outbox()} == pending, jump  # unsynced records are never deleted
            assert store.machines() == machines, jump  # nor the open windows
        assert store.outbox_backlog()[0] == len(pending)
        assert not {r.record_id for r in store.outbox(pending=False)} & set(synced)  # synced ones may go
        assert store.counters().readings_accepted == 5 * 60 / EVERY_S * len(MACHINES)


class _Skewed(datetime):
    offset = timedelta(0)

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + cls.offset


@pytest.mark.parametrize("skew_days", [-365, 365])
def test_sync_backoff_is_bounded_and_a_year_off_clock_still_syncs(tmp_path, monkeypatch, central_url, gateways,
                                                                  skew_days):
    monkeypatch.setattr(sync.client, "datetime", _Skewed)
    name, token = gateways.add("clock")
    port = free_port()
    with Store.open(tmp_path / "agent.db") as store:
        fill_outbox(store, name, windows=10)
        client = sync_client(store, f"http://{LOCALHOST}:{port}", name, token)
        delays = []
        for round_ in range(30):  # the wall clock jumps back and forth between rounds
            _Skewed.offset = timedelta(days=skew_days * (-1) ** round_)
            result = client.sync_once()
            assert result.outcome is Outcome.RETRY
            delays.append(result.retry_after)
        assert all(BACKOFF_MIN_S / 2 <= d <= BACKOFF_MAX_S for d in delays), delays
        assert not any(math.isnan(d) for d in delays)
        central = Server.central(central_url, tmp_path / "central.log", port)
        try:
            _Skewed.offset = timedelta(days=skew_days)
            result = client.sync_once()
            client.close()
        finally:
            central.terminate()
        assert result.outcome is Outcome.SYNCED and result.set_aside == 0
        assert client.last_success is not None and abs(client.last_success - datetime.now(UTC)).days >= 364
