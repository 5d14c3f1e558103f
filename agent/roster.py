"""Which machines the agent takes readings from: the `[machines]` table (issue 22 item 6, issue 14 item 14).

With `mqtt.default_machine_type` set, any topic a publisher invents is a machine: without a bound, 20,000 ids in a
second grew /api/v1/machines to 15 MB and /metrics to 120k series. The roster admits a machine when it is listed
(`machines.allowed`, the Modbus devices, `mqtt.machines`) or, without a list, while fewer than `max_machines` are
known; the reading of any other machine is rejected as `unknown_machine` (quarantined and counted). A machine
silent for `forget_after_h` is forgotten: it frees its place, and the status API and /metrics no longer list it
(its stored readings and state stay). Who calls it: only the pipeline thread.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

from agent.config import MachinesConfig
from agent.store import StoredReading
from model.validate import Reason, Rejection

log = logging.getLogger(__name__)

REFUSAL_LOG_EVERY_S = 60.0
# /metrics has per-machine series for at most this many machines, as pdm_machine_readings_total has labels.
MACHINE_LABELS_MAX = 1000


class Roster:
    def __init__(self, config: MachinesConfig, configured: Iterable[str], last_seen: dict[str, float]) -> None:
        self.config = config
        self._listed = {p for p in config.allowed if not _is_pattern(p)} | set(configured)
        self._patterns = [p for p in config.allowed if _is_pattern(p)]
        # The machines not listed, by when their last reading was received: the most recent max_machines of them
        # (an agent upgraded with more already known keeps the newest).
        unlisted = sorted(((m, t) for m, t in last_seen.items() if not self._allowed(m)), key=lambda mt: -mt[1])
        self._last_seen = dict(unlisted[:config.max_machines])
        self._refused_unlogged = 0
        self._next_log = 0.0

    @property
    def known(self) -> int:
        """Machines not listed that count toward max_machines."""
        return len(self._last_seen)

    def admit(self, machine_id: str, now: float) -> Rejection | None:
        """None when the machine may send readings (counted as heard at `now`); else why not. A machine counts
        from its first reading the drivers could read, even if validation then rejects that reading."""
        if self._allowed(machine_id):  # listed machines are expected: never refused, never counted
            return None
        if machine_id in self._last_seen:
            self._last_seen[machine_id] = now
            return None
        rejection = self._refusal(machine_id, now)
        if rejection is None:
            self._last_seen[machine_id] = now
        else:
            self._log(rejection, now)
        return rejection

    def _refusal(self, machine_id: str, now: float) -> Rejection | None:
        if self.config.allowed:
            return Rejection(Reason.UNKNOWN_MACHINE, f"machine {machine_id} is not in machines.allowed")
        if len(self._last_seen) >= self.config.max_machines:
            self._forget(now)
        if len(self._last_seen) >= self.config.max_machines:
            return Rejection(Reason.UNKNOWN_MACHINE, f"machine {machine_id} would be one more than "
                                                     f"machines.max_machines = {self.config.max_machines}")
        return None

    def _allowed(self, machine_id: str) -> bool:
        return machine_id in self._listed or bool(self._patterns) and any(
            fnmatch.fnmatchcase(machine_id, p) for p in self._patterns)

    def _forget(self, now: float) -> None:
        silent_since = now - self.config.forget_after_h * 3600
        for machine_id in [m for m, seen in self._last_seen.items() if seen < silent_since]:
            del self._last_seen[machine_id]

    def _log(self, rejection: Rejection, now: float) -> None:
        """One line a minute at most: a publisher inventing ids must not flood the log either."""
        self._refused_unlogged += 1
        if now >= self._next_log:
            self._next_log = now + REFUSAL_LOG_EVERY_S
            log.warning("readings of unknown machines quarantined (%d since the last such line): %s",
                        self._refused_unlogged, rejection.message)
            self._refused_unlogged = 0


def heard(latest: StoredReading, forget_after_h: float, now: float) -> bool:
    """Whether the machine of this latest reading is still listed: heard within forget_after_h."""
    return latest.received_at >= now - forget_after_h * 3600


def labelled(latest: Iterable[StoredReading], forget_after_h: float, now: float) -> list[StoredReading]:
    """The machines /metrics has series for: not forgotten, and at most MACHINE_LABELS_MAX of them (the most
    recently heard), by id."""
    current = sorted((r for r in latest if heard(r, forget_after_h, now)), key=lambda r: r.received_at, reverse=True)
    return sorted(current[:MACHINE_LABELS_MAX], key=lambda r: r.machine_id)


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")
