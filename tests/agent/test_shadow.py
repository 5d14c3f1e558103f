"""Shadow scoring (issue 17): a candidate scores every reading beside the live model, which alone decides states
and alarms; the candidate's figures ride in the summaries the batch's transaction writes anyway."""

from __future__ import annotations

import json

import numpy as np

from agent.pipeline import Pipeline
from agent.store import Store
from model import data
from model.features import INPUTS
from model.package import load
from model.score import Score, Scorer
from testkit.models import WORSE_THRESHOLDS, derive_package
from tests.agent.test_summaries import T0, agent_pipeline, raw


def summaries(store: Store) -> list[dict]:
    return [json.loads(r.body) for r in store.outbox("summary")]


def run(pipeline: Pipeline, readings) -> None:
    pipeline.start()
    for reading in readings:
        pipeline.put(reading)
    assert pipeline.stop(timeout=30)


def test_a_worse_shadow_model_is_measured_but_never_decides(scorer, tmp_path):
    candidate = Scorer(load(derive_package(tmp_path / "worse", "9.0.0", WORSE_THRESHOLDS)))
    stream = [raw(T0 + i, machine=f"m{i % 2}") for i in range(90)]  # healthy readings over two windows
    with Store.open(tmp_path / "agent.db") as store:
        now = [T0]
        pipeline = agent_pipeline(scorer, store, now)
        pipeline.set_shadow(candidate)
        now[0] = T0 + 200  # the clock closes every window when the pipeline stops
        run(pipeline, stream)
        written = summaries(store)
        events = store.outbox("event")
    assert written and events == []  # the live model saw a healthy plant: no alarm, whatever the candidate says
    assert {s["worst_state"] for s in written} == {"ok"}
    for summary in written:
        shadow = summary["shadow"]
        assert shadow["model"]["version"] == "9.0.0" and shadow["readings"] == summary["readings"]
        assert shadow["alarm"] == shadow["readings"] and shadow["agreed"] == 0 and shadow["live_alarm"] == 0
        assert shadow["score_s"] > 0


def test_without_a_shadow_model_summaries_carry_no_shadow_figures(scorer, tmp_path):
    with Store.open(tmp_path / "agent.db") as store:
        now = [T0]
        pipeline = agent_pipeline(scorer, store, now)
        now[0] = T0 + 200
        run(pipeline, [raw(T0 + i) for i in range(30)])
        written = summaries(store)
    assert written and all("shadow" not in s for s in written)


def shadowed(scorer, candidate, path, stream, end: float) -> list[dict]:
    """The summaries of `stream` scored by `scorer` with `candidate` in shadow, the clock at `end` once it is in."""
    with Store.open(path) as store:
        now = [T0]
        pipeline = agent_pipeline(scorer, store, now)
        pipeline.set_shadow(candidate)
        now[0] = end
        run(pipeline, stream)
        return summaries(store)


def test_the_same_model_in_shadow_agrees_on_every_reading(scorer, tmp_path):
    same = Scorer(load(derive_package(tmp_path / "same", "1.0.1")))
    stream = [raw(T0 + i, machine="m0", torque=68.0 if 10 <= i < 20 else 40.0,
                  rotational_speed=1400 if 10 <= i < 20 else 1500) for i in range(40)]
    written = shadowed(scorer, same, tmp_path / "agent.db", stream, T0 + 200)
    shadow = [s["shadow"] for s in written]
    assert sum(f["agreed"] for f in shadow) == sum(f["readings"] for f in shadow) == sum(
        s["readings"] for s in written) > 0
    assert sum(f["alarm"] for f in shadow) == sum(f["live_alarm"] for f in shadow) > 0


def test_a_trained_candidate_with_another_graph_agrees_on_most_readings_and_exactly_as_scored_alone(
        scorer, trained_candidate, ai4i, tmp_path):
    """A model trained with another seed and fewer trees (tests/conftest.py) in shadow on 1,000 rows of the data
    set's test part (3 % failing): the summaries count exactly the readings where its state is the live model's,
    as scoring both models apart says; that is most but not all of them."""
    _, test_idx = data.split(ai4i)
    fields = [{"machine_type": str(ai4i.machine_types[k, 0]),
               **{i.name: float(v) for i, v in zip(INPUTS, ai4i.readings[k], strict=True)}} for k in test_idx[:1000]]
    candidate = Scorer(load(trained_candidate))
    states = [[s.state for s in model.score(fields) if isinstance(s, Score)] for model in (scorer, candidate)]
    assert len(states[0]) == len(states[1]) == len(fields)
    apart = int(np.sum([a == b for a, b in zip(*states, strict=True)]))
    stream = [raw(T0 + i / 10, machine=f"m{i % 2}", **f) for i, f in enumerate(fields)]
    stream += [raw(T0 + 200, machine=m) for m in ("m0", "m1")]  # a later window closes the others; its own stays open
    shadow = [s["shadow"] for s in shadowed(scorer, candidate, tmp_path / "agent.db", stream, T0 + 300)]
    assert {f["model"]["version"] for f in shadow} == {"2.0.0"}
    readings, agreed = sum(f["readings"] for f in shadow), sum(f["agreed"] for f in shadow)
    assert readings == len(fields) and agreed == apart
    for key, model_states in (("live_warning", states[0]), ("warning", states[1]), ("live_alarm", states[0]),
                              ("alarm", states[1])):
        assert sum(f[key] for f in shadow) == model_states.count(key.removeprefix("live_")), key
    assert 0.95 < agreed / readings < 1.0  # about 0.98 here: the two graphs differ near the thresholds
