"""Score raw readings: validate them, run the model on the valid ones, map probabilities to health and state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.package import Model
from model.states import State
from model.validate import Rejection, Validator


@dataclass(frozen=True, slots=True)
class Score:
    p_failure: float
    risk: dict[str, float]  # per failure mode, in the manifest's order
    health: float  # 0-100, 100 is healthy
    state: State
    ood: tuple[str, ...]  # inputs outside the training range: scored, but less trustworthy

    @property
    def dominant_mode(self) -> str:
        return max(self.risk, key=self.risk.__getitem__)


class Scorer:
    """Validation and scoring with one model package; score() is safe from one thread at a time."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.validator = Validator(model.manifest)
        manifest = model.manifest
        self._modes = manifest.outputs.modes
        self._warning = manifest.thresholds.warning
        self._alarm = manifest.thresholds.alarm
        self._health_p, self._health_value = (np.array(axis, dtype=np.float64) for axis in zip(*manifest.health.points))

    def score(self, readings: Sequence[object]) -> list[Score | Rejection]:
        """One result per reading, in order."""
        valid, rejected = self.validator.validate(readings)
        results: list[Score | Rejection] = [None] * len(readings)  # type: ignore[list-item]
        for position, rejection in rejected.items():
            results[position] = rejection
        if valid.index:
            p_failure, p_mode = self.model.predict(valid.values, valid.machine_types)
            health = np.round(np.interp(p_failure, self._health_p, self._health_value), 1).tolist()
            modes = self._modes
            for position, p, risks, h, ood in zip(valid.index, p_failure.tolist(), p_mode.tolist(), health, valid.ood):
                results[position] = Score(p, dict(zip(modes, risks)), h, self.state_of(p), ood)
        return results

    def state_of(self, p_failure: float) -> State:
        if p_failure >= self._alarm:
            return State.ALARM
        return State.WARNING if p_failure >= self._warning else State.OK
