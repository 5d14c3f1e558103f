"""Score raw readings: validate them, run the model on the valid ones, map probabilities to health and state."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import NamedTuple

import numpy as np

from model.package import Model
from model.states import State
from model.validate import Rejection, Validator


class Score(NamedTuple):  # a tuple, not a dataclass: a batch builds hundreds, at C speed (Scorer.score)
    p_failure: float
    risk: dict[str, float]  # per failure mode, in the manifest's order
    health: float  # 0-100, 100 is healthy
    state: State
    ood: tuple[str, ...]  # inputs outside the training range: scored, but less trustworthy

    @property
    def dominant_mode(self) -> str:
        return max(self.risk, key=self.risk.__getitem__)


_STATES = (State.OK, State.WARNING, State.ALARM)


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
        if not valid.index:
            return [rejected[position] for position in range(len(readings))]
        p_failure, p_mode = self.model.predict(valid.values, valid.machine_types)
        p = p_failure.astype(np.float64)  # compared as state_of compares: the float32 value, exactly
        health = np.round(np.interp(p, self._health_p, self._health_value), 1).tolist()
        states = map(_STATES.__getitem__, np.where(p >= self._alarm, 2, p >= self._warning).tolist())
        risks = map(dict, map(zip, repeat(self._modes), p_mode.tolist()))
        fields = zip(p.tolist(), risks, health, states, valid.ood)
        # tuple.__new__ skips NamedTuple's Python-level __new__: the same Score, without a Python call per reading
        scores: list[Score | Rejection] = list(map(tuple.__new__, repeat(Score), fields))
        if not rejected:
            return scores
        results: list[Score | Rejection] = [None] * len(readings)  # type: ignore[list-item]
        for position, score in zip(valid.index, scores):
            results[position] = score
        for position, rejection in rejected.items():
            results[position] = rejection
        return results

    def state_of(self, p_failure: float) -> State:
        if p_failure >= self._alarm:
            return State.ALARM
        return State.WARNING if p_failure >= self._warning else State.OK
