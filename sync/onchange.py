"""Summaries on change (issue 21 item 3; the default, `[central.on_change] enabled = false` sends every window): a
machine whose window is like the last one sent is not sent, until `max_interval_s` has passed since that one.

"Like" means all of: the same worst state; health (min and mean) within `health_deadband` points; no failure mode's
risk on the other side of its threshold; the same model; no rejected or out-of-distribution reading in the window;
no candidate model scored in shadow (its figures per window are what central decides a rollout on).
The comparison is with the last summary *sent* (not the last one seen), so a slow drift is sent once it adds up to
the deadband. The first window of each machine after a start is always sent. Events (state changes) are never held
back: they do not pass here.

Central keeps nothing for a window not sent: the machine's latest state stays the last sent one, which is the
current one within the deadband; its chart has a gap there, which means "unchanged". With the default
`max_interval_s` (300) each machine is heard of at least every 5 minutes, under the dashboard's 10 minutes before a
gateway counts as silent.

Who calls: agent/machines.py, from the pipeline thread, for each closed window (`keep`).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from sync.protocol import Summary


class OnChangeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True  # 68 % fewer summaries on the simulator's plant (BENCHMARKS.md, central_scale)
    health_deadband: float = Field(2.0, ge=0, le=50)  # health points
    max_interval_s: int = Field(300, ge=60, le=3600)


class OnChange:
    def __init__(self, config: OnChangeConfig, thresholds: Mapping[str, float]) -> None:
        self.config = config
        self.thresholds = dict(thresholds)  # per failure mode: the risk at which it counts
        self._last: dict[str, Summary] = {}
        self.sent = 0
        self.held_back = 0

    def keep(self, summary: Summary) -> bool:
        """Whether to send this window's summary (and remember it as the last sent)."""
        last = self._last.get(summary.machine_id)
        if not self.config.enabled or last is None or self._changed(last, summary):
            self._last[summary.machine_id] = summary
            self.sent += 1
            return True
        self.held_back += 1
        return False

    def _changed(self, last: Summary, now: Summary) -> bool:
        band = self.config.health_deadband
        return (now.worst_state != last.worst_state
                or abs(now.health_mean - last.health_mean) > band or abs(now.health_min - last.health_min) > band
                or now.model != last.model
                or now.rejected > 0 or now.out_of_distribution > 0
                or now.shadow is not None  # a candidate's figures (SPEC §9): each window is evidence for its rollout
                or any(self._crossed(mode, last, now) for mode in self.thresholds)
                or (now.window_start - last.window_start).total_seconds() >= self.config.max_interval_s)

    def _crossed(self, mode: str, last: Summary, now: Summary) -> bool:
        threshold = self.thresholds[mode]
        return (last.mode_risk_max.get(mode, 0.0) >= threshold) != (now.mode_risk_max.get(mode, 0.0) >= threshold)
