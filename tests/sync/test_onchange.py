"""Summaries on change (sync/onchange.py): which windows are sent, from a table of cases, and on the simulator's
plant through the agent's own windows and the shipped model, how many rows it saves."""

from __future__ import annotations

import pytest

from sync.onchange import OnChange, OnChangeConfig
from sync.protocol import Summary
from testkit import batches
from testkit.plant import summaries_sent

THRESHOLDS = {"TWF": 0.3, "HDF": 0.3, "PWF": 0.3, "OSF": 0.3}


def window(minute: int, **changes) -> Summary:
    return Summary.model_validate(batches.summary("gw", "m1", minute=minute, **changes))


def policy(**config) -> OnChange:
    return OnChange(OnChangeConfig(enabled=True, **config), THRESHOLDS)


@pytest.mark.parametrize(("name", "changes", "sent"), [
    ("alike", {}, False),
    ("health within the deadband", {"health_mean": 91.5, "health_min": 80.0}, False),
    ("mean health beyond the deadband", {"health_mean": 87.0}, True),
    ("min health beyond the deadband", {"health_min": 75.0}, True),
    ("another state", {"worst_state": "warning"}, True),
    ("a mode's risk crosses its threshold", {"mode_risk_max": {"TWF": 0.35, "HDF": 0.002, "PWF": 0.0, "OSF": 0.02}},
     True),
    ("a mode's risk moves below its threshold", {"mode_risk_max": {"TWF": 0.2, "HDF": 0.002, "PWF": 0.0,
                                                                    "OSF": 0.02}}, False),
    ("a rejected reading", {"rejected": 3}, True),
    ("another model", {"model": {"name": "ai4i-gbt", "version": "2.0.0", "sha256": "cd" * 32}}, True),
    ("a candidate scored in shadow", {"shadow": {
        "model": {"name": "ai4i-gbt", "version": "2.0.0", "sha256": "cd" * 32}, "readings": 60, "agreed": 60,
        "live_warning": 0, "live_alarm": 0, "warning": 0, "alarm": 0, "out_of_distribution": 0, "score_s": 0.01}},
     True),
])
def test_a_window_is_sent_when_it_differs_from_the_last_one_sent(name, changes, sent):
    on_change = policy()
    assert on_change.keep(window(0, rejected=0, out_of_distribution=0)) is True  # the first one always
    assert on_change.keep(window(1, **{"rejected": 0, "out_of_distribution": 0, **changes})) is sent, name


def test_an_unchanged_machine_is_still_sent_every_max_interval():
    on_change = policy(max_interval_s=300)
    sent = [on_change.keep(window(m, rejected=0, out_of_distribution=0)) for m in range(11)]
    assert sent == [True, False, False, False, False, True, False, False, False, False, True]
    assert (on_change.sent, on_change.held_back) == (3, 8)


def test_a_slow_drift_is_sent_once_it_adds_up_to_the_deadband():
    on_change = policy(health_deadband=2.0)
    kept = [on_change.keep(window(m, rejected=0, out_of_distribution=0, health_mean=90.0 - 0.5 * m))
            for m in range(9)]
    assert kept == [True, False, False, False, False, True, False, False, False]


def test_on_by_default_and_switched_off_every_window_is_sent():
    assert OnChange(OnChangeConfig(), THRESHOLDS).config.enabled
    on_change = OnChange(OnChangeConfig(enabled=False), THRESHOLDS)
    assert all(on_change.keep(window(m, rejected=0, out_of_distribution=0)) for m in range(5))


def test_rows_saved_on_the_simulator_plant(shipped_model):
    """The demo's plant (5 machines, one drifting), 2 hours of one reading a second through the agent's windows and
    the shipped model: the windows sent with and without summaries on change."""
    every = summaries_sent(shipped_model, None)
    on_change = OnChange(OnChangeConfig(enabled=True), shipped_model.manifest.thresholds.modes)
    fewer = summaries_sent(shipped_model, on_change.keep)
    print(f"\nsimulator plant, 5 machines x 2 h: {every} windows sent without, {fewer} with summaries on change "
          f"({100 * (1 - fewer / every):.0f} % fewer rows)")
    assert every >= 5 * 115  # about one a minute per machine
    assert 5 * 2 * 60 // 5 <= fewer < every  # at least every 5 minutes per machine, and fewer than every minute
