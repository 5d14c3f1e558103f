"""The simulator's plant scored through the agent's windows, offline: how many summaries a gateway sends."""

from __future__ import annotations

from collections.abc import Callable

from agent.machines import Machines
from agent.store import StoredReading
from drivers.simulator import Plant
from model.package import Model
from model.score import Score, Scorer
from sync.protocol import Summary
from sync.remote import AlarmsConfig, SummaryConfig

T0 = 1_790_000_000.0


def summaries_sent(model: Model, keep: Callable[[Summary], bool] | None, machines: int = 5,
                   hours: float = 2.0) -> int:
    """The demo's plant (one machine drifting towards a tool wear failure), one reading a second for `hours`,
    scored by `model` and summarised in one-minute windows; the summaries sent when `keep` decides (None: all)."""
    plant, scorer = Plant(machines=machines, seed=7, drift=("m2", "TWF")), Scorer(model)
    windows = Machines("gw", SummaryConfig(), AlarmsConfig(), model, {}, started_at=0.0, keep=keep)
    sent = 0
    for second in range(int(hours * 3600)):
        now = T0 + second
        values = plant.step(1.0)
        ids = list(values)
        readings = [{**values[i], "machine_type": plant.machine_type(i)} for i in ids]
        stored = [StoredReading(i, now, values[i], plant.machine_type(i), s.p_failure, s.risk, s.health,
                                str(s.state), s.ood, "1", now)
                  for i, s in zip(ids, scorer.score(readings), strict=True)
                  if isinstance(s, Score)]
        outbox, _ = windows.update(stored, [], now)
        sent += sum(1 for record in outbox if record.kind == "summary")
    return sent
