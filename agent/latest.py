"""Each machine's newest committed reading, health trend and saved alarm, kept in memory for the status API
(`LatestReadings`).

The pipeline hands every newly committed reading, and the alarm of every machine whose state the batch saved, to
`committed()` right after its batch's commit, so a request of /api/v1/machines reads no reading or alarm from the
database and decodes none: it costs what changed, not the ingest rate. Each change of a machine gives it another
version, so the status API encodes a machine again only when it changed (agent/status/listing.py, metrics.py).
What the process did not commit itself (the readings stored before a restart, what the buffer cap or the retention
deleted) is read from the store at the next request after `start` or `forget()`, once.

Who calls it: the pipeline thread (`committed`), the retention and the cap (`forget`), the status API's worker
threads (`machines`, `alarms`, `view`); a lock guards the maps.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol, TypeAlias, cast

from agent.alarms import Seen, saved_alarm
from agent.store import StoredReading

log = logging.getLogger(__name__)

TREND_POINTS = 60  # readings in each machine's trend on /api/v1/machines
# A trend: an array('H') of tenths (2 bytes a point; a deque of float pointers took about 0.8 kB a machine), or an
# array('d') once a point is not a tenth from 0 to 100 (see _appended).
Trend: TypeAlias = "array[int] | array[float]"  # array is not subscriptable at run time before 3.12


class Source(Protocol):
    """What a view is read from when it knows nothing yet (agent.store.Store)."""

    def latest_by_machine(self) -> dict[str, StoredReading]: ...

    def trend(self, machine_id: str, limit: int) -> list[tuple[float, float]]: ...

    def machines(self, path: str | None = None, machine_id: str | None = None) -> dict[str, Any]: ...


class MachineView(NamedTuple):
    """One machine as the status API lists it."""

    reading: StoredReading  # its newest
    trend: list[float]
    alarm: Seen | None  # as saved; None: none saved yet, or unreadable
    version: int  # another whenever its reading, trend or alarm changes (never one it had before)


class LatestReadings:
    """The newest reading of each machine (by ts) and the health of its newest TREND_POINTS readings, oldest first. A
    reading older than its machine's newest (late, or redelivered) changes neither: it is in the machine's history."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, StoredReading] = {}
        self._trends: dict[str, Trend] = {}
        self._alarms: dict[str, Seen] = {}  # each machine's alarm as saved (MachineAlarm.to_json())
        self._loaded = False  # from the store, since the start or the last forget()
        self._version = 0  # of the last change
        self._changed: dict[str, int] = {}  # the version of each machine's last change
        self._machines: tuple[MachineView, ...] | None = None  # machines() since the last change
        self._views: dict[str, MachineView] = {}  # each machine's in machines(), kept until it changes

    def committed(self, readings: Iterable[StoredReading], alarms: Mapping[str, Seen] | None = None) -> None:
        """Readings just committed, in arrival order (never a duplicate of a stored one), and the alarms saved with
        them (by machine id; never changed afterwards: an update saves a new dict)."""
        with self._lock:
            self._version += 1
            self._machines = None
            if alarms:
                self._alarms.update(alarms)
                self._changed.update(dict.fromkeys(alarms, self._version))
            for reading in readings:
                newest = self._latest.get(reading.machine_id)
                if newest is not None and reading.ts <= newest.ts:
                    continue
                self._latest[reading.machine_id] = reading
                trend = self._trends.get(reading.machine_id, _EMPTY)
                self._trends[reading.machine_id] = _appended(trend, rounded(reading.health))
                self._changed[reading.machine_id] = self._version

    def forget(self) -> None:
        """Readings were deleted: read everything from the store again at the next view."""
        with self._lock:
            self._loaded = False

    def view(self, source: Source) -> list[tuple[StoredReading, list[float]]]:
        """Each machine's newest reading and its trend."""
        with self._lock:
            if not self._loaded:
                self._load(source)
            return [(reading, _points(self._trends[machine_id])) for machine_id, reading in self._latest.items()]

    def machines(self, source: Source) -> tuple[MachineView, ...]:
        """Each machine's newest reading, trend and saved alarm, and the version of them: the same tuple until
        something changes."""
        with self._lock:
            if not self._loaded:
                self._load(source)
            if self._machines is None:
                self._machines = tuple(self._view(machine_id, reading) for machine_id, reading in self._latest.items())
            return self._machines

    def _view(self, machine_id: str, reading: StoredReading) -> MachineView:
        """Under the lock: the machine's view as last made, unless it changed since; its trend copied only then."""
        version = self._changed[machine_id]
        view = self._views.get(machine_id)
        if view is None or view.version != version:
            view = self._views[machine_id] = MachineView(reading, _points(self._trends[machine_id]),
                                                         self._alarms.get(machine_id), version)
        return view

    def alarms(self, source: Source) -> dict[str, Seen]:
        """Each machine's saved alarm (MachineAlarm.to_json()), as last committed; a machine without one (none
        saved yet, or unreadable) is not listed."""
        with self._lock:
            if not self._loaded:
                self._load(source)
            return dict(self._alarms)

    def _load(self, source: Source) -> None:
        """Under the lock, so no commit is applied meanwhile; one applied just before is in the store too, and the
        ts rule above keeps it from counting twice."""
        latest = source.latest_by_machine()
        trends: dict[str, Trend] = {}
        for machine_id, reading in latest.items():
            known = self._latest.get(machine_id)
            if known is not None and known.ts >= reading.ts and len(self._trends[machine_id]) == TREND_POINTS:
                trends[machine_id] = self._trends[machine_id]  # committed here since: nothing to read
                latest[machine_id] = known
                continue
            points = source.trend(machine_id, TREND_POINTS)
            trend: Trend = _EMPTY
            for health in [h for _, h in points] or [reading.health]:
                trend = _appended(trend, rounded(health))
            trends[machine_id] = trend
        alarms = {}
        for machine_id, text in source.machines("$.alarm").items():
            alarm = saved_alarm(text)
            if alarm is None:
                log.warning("machine %s: saved state unreadable", machine_id)
            else:
                alarms[machine_id] = alarm
        self._latest, self._trends, self._alarms, self._loaded = latest, trends, alarms, True
        self._version += 1
        self._changed = dict.fromkeys(latest.keys() | alarms.keys(), self._version)
        self._machines, self._views = None, {}


def rounded(health: float) -> float:
    """To 0.1: plenty for a sparkline. Each of the 1,001 values from 0 to 100 is one shared float, so the trends'
    lists of thousands of machines hold pointers, not a float object per point (about 2 MB at 2,000 machines)."""
    value = round(float(health), 1)
    return _STEPS.setdefault(value, value) if 0.0 <= value <= 100.0 else value


_STEPS: dict[float, float] = {}


# A trend's tenths come back as the shared floats of rounded(): the status API shows what the floats would show.
_TENTHS = tuple(_STEPS.setdefault(k / 10, k / 10) for k in range(1001))
_EMPTY: array[int] = array("H")


def _appended(trend: Trend, point: float) -> Trend:
    """The trend with `point` appended and its oldest dropped beyond TREND_POINTS: the same array, but for _EMPTY
    (shared) and a first point that is not a tenth (the array becomes one of floats)."""
    tenths = round(point * 10) if 0.0 <= point <= 100.0 else -1  # and not NaN
    if trend.typecode == "H" and tenths >= 0 and _TENTHS[tenths] == point:
        grown: Trend = array("H") if trend is _EMPTY else trend
        grown.append(tenths)
    else:
        floats = array("d", _points(trend)) if trend.typecode == "H" else cast("array[float]", trend)
        floats.append(point)
        grown = floats
    if len(grown) > TREND_POINTS:
        del grown[:len(grown) - TREND_POINTS]
    return grown


def _points(trend: Trend) -> list[float]:
    return [_TENTHS[t] for t in cast("array[int]", trend)] if trend.typecode == "H" else list(trend)
