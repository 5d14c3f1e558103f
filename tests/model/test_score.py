"""Scoring: what a technician reads off a score must agree with the model's declared thresholds and rules."""

from __future__ import annotations

import numpy as np
import pytest

from model.states import State
from model.validate import Rejection
from tests.model.test_validate import reading


def test_health_and_state_follow_the_manifest_thresholds(scorer):
    t = scorer.model.manifest.thresholds
    for p, state in ((0.0, State.OK), (np.nextafter(t.warning, 0), State.OK), (t.warning, State.WARNING),
                     (np.nextafter(t.alarm, 0), State.WARNING), (t.alarm, State.ALARM), (1.0, State.ALARM)):
        assert scorer.state_of(float(p)) is state


def test_health_falls_as_risk_rises_and_bands_match_states(scorer):
    # Readings from healthy to overstrained: rising tool wear at high torque on an L machine.
    readings = [reading(machine_type="L", torque=55.0, tool_wear=w) for w in range(0, 250, 5)]
    scores = scorer.score(readings)
    by_p = sorted(scores, key=lambda s: s.p_failure)
    assert [s.health for s in by_p] == sorted((s.health for s in by_p), reverse=True)
    bands = {State.OK: (70.0, 100.0), State.WARNING: (40.0, 70.0), State.ALARM: (0.0, 40.0)}
    for s in scores:
        low, high = bands[s.state]
        assert low <= s.health <= high
    assert scores[0].state is State.OK and scores[-1].state is State.ALARM


@pytest.mark.parametrize(
    ("changes", "mode"),
    [
        # The data set's documented generating rules, at values well inside each mode's region.
        ({"air_temperature": 302.0, "process_temperature": 309.5, "rotational_speed": 1300, "torque": 55.0}, "HDF"),
        ({"rotational_speed": 2800, "torque": 10.0}, "PWF"),  # 2.9 kW, below 3.5 kW
        ({"rotational_speed": 1400, "torque": 68.0}, "PWF"),  # 10 kW, above 9 kW
        ({"machine_type": "L", "torque": 55.0, "tool_wear": 215}, "OSF"),  # 11,825 min*Nm > 11,000
    ],
)
def test_documented_failure_conditions_alarm_with_the_right_dominant_mode(scorer, changes, mode):
    (score,) = scorer.score([reading(**changes)])
    assert score.state is State.ALARM
    assert score.dominant_mode == mode
    assert score.risk[mode] >= scorer.model.manifest.thresholds.modes[mode]


def test_a_typical_healthy_reading_is_ok(scorer):
    (score,) = scorer.score([reading()])
    assert score.state is State.OK and score.health > 80 and score.ood == ()


def test_overstrain_limit_depends_on_machine_type(scorer):
    # 12,500 min*Nm: above the L limit (11,000), below the H limit (13,000).
    low, high = scorer.score([reading(machine_type="L", torque=50.0, tool_wear=250),
                              reading(machine_type="H", torque=50.0, tool_wear=250)])
    assert low.risk["OSF"] > 0.5 > high.risk["OSF"]


def test_results_come_back_in_input_order(scorer):
    readings = [reading(tool_wear=w) if w % 3 else {"bad": w} for w in range(50)]
    results = scorer.score(readings)
    assert [isinstance(r, Rejection) for r in results] == [w % 3 == 0 for w in range(50)]
    singles = [scorer.score([r])[0] for r in readings]
    assert results == singles
