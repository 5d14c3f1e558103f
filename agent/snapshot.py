"""The read side of a running agent: `snapshot(agent)` is the only code that reads its parts (the store, the
pipeline, the drivers, the sync loop) for the status API and the metrics, which read `AgentSnapshot`s only.

A snapshot is taken per request. Its parts are read when first asked for, once (a request that needs only the
machines reads nothing of the sync loop), and a part that cannot be read raises where it is asked for: the metrics
leave that part out and count it, a route answers 500. Before `Agent.start()` has made the parts (`Running`), asking
for one raises `NotRunning`. Counters are read without locks: a value may be one batch old.

Who calls it: the status API's worker threads, any number at once; nothing here writes, except what a technician
records through `actions` (agent/actions.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from agent.actions import ActionLog
from agent.alarms import Seen
from agent.config import AgentConfig
from agent.counters import BufferCounters
from agent.downlink import Downlink, DownlinkStats
from agent.episodes import ClosedEpisode, OpenEpisode, closed_episodes, open_episodes
from agent.latest import LatestReadings
from agent.pipeline import Pipeline, PipelineStats
from agent.store import OutboxRecord, Store, StoredReading, StoreError
from agent.sync_loop import SyncLoop, SyncStats
from drivers.base import Driver, DriverStats
from model.package import Model
from model.states import SEVERITY

log = logging.getLogger(__name__)

PIPELINE_STALL_S = 10.0  # ready: the pipeline thread went round its loop within this
CLOSED_EPISODES = 50  # recently closed alarm episodes the status API lists


@dataclass
class Running:
    """The parts `Agent.start()` makes, in its start order; it adds the drivers and the sync loop as it starts them."""

    store: Store
    pipeline: Pipeline
    drivers: list[Driver] = field(default_factory=list)
    sync: SyncLoop | None = None
    downlink: Downlink | None = None  # when central is configured (agent/downlink.py)


class Parts(Protocol):
    """What a snapshot is taken of (`agent.service.Agent`)."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def started_at(self) -> float: ...

    @property
    def running(self) -> Running | None: ...


class Records(Protocol):
    """The stored readings and events, read only."""

    def latest_by_machine(self) -> dict[str, StoredReading]: ...

    def history(self, machine_id: str, since_ts: float, limit: int) -> list[StoredReading]: ...

    def trend(self, machine_id: str, limit: int) -> list[tuple[float, float]]: ...

    def healths_after(self, after_id: int, limit: int) -> list[tuple[int, str, float, float]]: ...

    def machines(self, path: str | None = None, machine_id: str | None = None) -> dict[str, Any]: ...

    def events(self, machine_id: str | None = None, since: float | None = None,
               limit: int = 100) -> list[tuple[OutboxRecord, bool]]: ...


class NotRunning(Exception):
    """The agent has not started (yet), or failed to: none of its parts exists."""


@dataclass(frozen=True)
class BufferStats:
    counters: BufferCounters
    pending: int  # summaries and events central has not accepted yet
    oldest_pending_at: float | None
    used_bytes: int  # of database pages holding data
    size_bytes: int  # of the database file
    max_bytes: int  # the buffer cap
    disk_free_bytes: int | None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    why_not: str


@dataclass(frozen=True)
class AgentSnapshot:
    config: AgentConfig
    started_at: float
    taken_at: float  # epoch seconds
    _running: Running | None = field(repr=False)

    @property
    def running(self) -> bool:
        return self._running is not None

    def _parts(self) -> Running:
        if self._running is None:
            raise NotRunning("the agent is not running (yet)")
        return self._running

    @cached_property
    def model(self) -> Model:
        return self._parts().pipeline.scorer.model

    @cached_property
    def buffer(self) -> BufferStats:
        store = self._parts().store
        counters = store.counters()
        pending, oldest = store.outbox_backlog()
        try:
            disk_free: int | None = shutil.disk_usage(self.config.data_dir).free
        except OSError:
            disk_free = None
        return BufferStats(counters=counters, pending=pending, oldest_pending_at=oldest,
                           used_bytes=store.used_bytes(), size_bytes=store.size_bytes(),
                           max_bytes=self.config.buffer.max_db_mb * 2**20, disk_free_bytes=disk_free)

    @cached_property
    def pipeline(self) -> PipelineStats:
        return self._parts().pipeline.stats(within_s=PIPELINE_STALL_S)

    @cached_property
    def sync(self) -> SyncStats | None:
        loop = self._parts().sync
        return None if loop is None else loop.stats()

    @cached_property
    def downlink(self) -> DownlinkStats | None:
        downlink = self._parts().downlink
        return downlink.stats() if downlink is not None else None

    @cached_property
    def drivers(self) -> tuple[DriverStats, ...]:
        return tuple(_stats(driver) for driver in list(self._parts().drivers))

    @cached_property
    def latest(self) -> LatestReadings:
        """Each machine's newest reading and trend, as the pipeline committed them."""
        return self._parts().pipeline.latest

    @cached_property
    def records(self) -> Records:
        return self._parts().store

    @cached_property
    def alarm_states(self) -> Mapping[str, str]:
        """Each machine's alarm state (after the hysteresis), as the pipeline last committed it."""
        states: dict[str, str] = {}
        for machine_id, alarm in self.saved_alarms.items():
            if isinstance(state := alarm.get("state"), str) and state in SEVERITY:
                states[machine_id] = state
            else:
                log.warning("machine %s: saved state unreadable", machine_id)
        return states

    @cached_property
    def saved_alarms(self) -> Mapping[str, Seen]:
        """Each machine's saved alarm (agent/alarms.py's MachineAlarm.to_json()), as last committed: from `latest`,
        in memory, rather than read from every machine's saved state in the database and decoded at each request;
        one unreadable is left out."""
        return self.latest.alarms(self.records)

    def saved_alarms_of(self, machine_id: str) -> Mapping[str, Any]:
        """`saved_alarms` of one machine (empty when it has no saved state), without reading every machine's."""
        return self._parts().store.machines("$.alarm", machine_id)

    @cached_property
    def open_episodes(self) -> tuple[OpenEpisode, ...]:
        """The machines' open alarm episodes (agent/episodes.py), the worst first."""
        return tuple(open_episodes(self.saved_alarms, self._parts().store))

    @cached_property
    def closed_episodes(self) -> tuple[ClosedEpisode, ...]:
        """Alarm episodes closed among the newest events the gateway keeps, the latest closed first."""
        return tuple(closed_episodes(self._parts().store, CLOSED_EPISODES))

    @cached_property
    def actions(self) -> ActionLog:
        """What technicians did about the episodes, and central's acknowledgements; where the status API records an
        acknowledgement or a label (agent/actions.py): the one part of the agent it writes to."""
        return ActionLog(self._parts().store, self.config.gateway_id)

    def readiness(self) -> list[Check]:
        """A model is loaded, the store answers and takes writes, the data folder is writable, the pipeline goes
        round."""
        if self._running is None:
            return [Check("started", False, "the agent has not started")]
        running = self._running
        checks = [Check("model", running.pipeline.scorer.model is not None, "no model loaded")]
        try:
            running.store.counters()
            checks.append(Check("store", True, ""))
        except StoreError as exc:
            checks.append(Check("store", False, str(exc)))
        pipeline = self.pipeline
        directory = self.config.data_dir
        return [*checks,
                Check("database_writes", pipeline.database_up,
                      f"the last write failed: {pipeline.database_last_error}"),
                Check("data_dir_writable", os.access(directory, os.W_OK), f"{directory} is not writable"),
                Check("pipeline", pipeline.progressing, f"the pipeline made no progress for {PIPELINE_STALL_S:g} s")]


clock = time.time  # the moment a snapshot is taken: every age the status API shows is measured from it


def snapshot(agent: Parts) -> AgentSnapshot:
    return AgentSnapshot(agent.config, agent.started_at, clock(), agent.running)


def _stats(driver: Driver) -> DriverStats:
    try:
        return driver.stats()
    except Exception as exc:  # noqa: BLE001 - one driver's broken stats() must not take the status API down
        log.warning("stats of driver %s unavailable: %s", driver.name, exc)
        return DriverStats(name=driver.name, connected=None, errors={}, last_error=f"stats unavailable: {exc}")
