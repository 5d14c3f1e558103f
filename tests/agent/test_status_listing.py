"""/api/v1/machines from rows encoded once per change (agent/status/listing.py) and /metrics from per-machine families
rendered once per change (agent/status/metrics.py), on a real agent: the machines' body is the one pydantic encodes
of their models, and both follow what is committed after they were encoded, and the clock."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from pydantic import TypeAdapter
from pydantic_core import to_json

import agent.snapshot
from agent.snapshot import AgentSnapshot, snapshot
from agent.status.gateway import at
from agent.status.listing import AGE, ROW, MachineListing, _row, floats
from agent.status.machines import health_bands, machine_fields, machine_infos, row_fields
from agent.status.models import MachineInfo, MachineList
from drivers.base import RawReading
from tests.agent.test_status import HEAT, READINGS_EACH, families, feed, serving, value, wait_for

MACHINE_LIST = TypeAdapter(MachineList)


def encoded(snap: AgentSnapshot) -> bytes:
    """What the route answered before its rows were kept: the models of every machine, encoded at once."""
    return MACHINE_LIST.dump_json(MachineList(now=at(snap.taken_at), machines=machine_infos(snap)))


def test_the_body_is_the_machines_models_encoded_at_each_request(tmp_path):
    with serving(tmp_path) as running:
        feed(running.agent)
        listing = MachineListing()
        first = snapshot(running.agent)
        assert listing.body(first) == encoded(first)
        later = replace(first, taken_at=first.taken_at + 12.3456)  # the rows kept: only the ages change
        assert listing.body(later) == encoded(later) != encoded(first)
        forget_after_s = running.agent.config.machines.forget_after_h * 3600
        gone = replace(first, taken_at=first.taken_at + forget_after_s + 200)  # none heard within forget_after_h
        assert listing.body(gone) == encoded(gone) and MachineList.model_validate_json(listing.body(gone)).machines == []


def test_a_row_encoded_without_its_model_is_the_one_pydantic_encodes(tmp_path):
    """A row whose numbers are all floats is encoded from its fields, without a MachineInfo; one holding an int (as
    a saved alarm decoded from JSON may) from the model, which makes it a float; either is what pydantic encodes."""
    with serving(tmp_path) as running:
        feed(running.agent)
        snap = snapshot(running.agent)
        model, bands, now = snap.model, health_bands(snap.model), snap.taken_at
        views = snap.latest.machines(snap.records)
        whole = {"health": 40, "p_failure": 0.5, "risk": {"HDF": 1, "OSF": 0.25}}  # ints: not from this agent
        nan = [view._replace(reading=replace(view.reading, health=float("nan"),
                                             values={**view.reading.values, "torque": 1e16})) for view in views]
        ints = [view._replace(alarm={**(view.alarm or {}), "state": "alarm", "shown": whole}) for view in views]
        ints += [view._replace(reading=replace(view.reading, values={**view.reading.values, "torque": 40}))
                 for view in views]
        for view, all_floats in [(view, True) for view in (*views, *nan)] + [(view, False) for view in ints]:
            fields = row_fields(view.reading, view.alarm, model, view.trend, bands)
            assert floats(fields) is all_floats
            row = _row(view, model, bands)
            info = MachineInfo(**machine_fields(view.reading, view.alarm, model, now, view.trend, bands))
            assert row.head + to_json(info.last_reading_age_s) + row.tail == ROW.dump_json(info)
            assert row.head.endswith(AGE)


def test_a_reading_committed_after_the_rows_were_encoded_is_listed(tmp_path):
    with serving(tmp_path) as running:
        feed(running.agent)
        before = running.get("/api/v1/machines").json()
        assert [m["machine_id"] for m in before["machines"]] == ["m-hdf", "m-ood", "m-ok"]
        assert running.get("/api/v1/status").json()["machines"] == {"ok": 1, "warning": 0, "alarm": 2}

        store, start = running.agent.store, time.time()
        for i in range(READINGS_EACH):  # m-ok overheats: into alarm after the hysteresis
            running.agent.pipeline.put(RawReading("m-ok", start + i, dict(HEAT), "test", time.time()))
        wait_for(lambda: store.counters().readings_accepted == 4 * READINGS_EACH, "the new readings to be committed")
        after = running.get("/api/v1/machines").json()
        assert [m["machine_id"] for m in after["machines"]] == ["m-hdf", "m-ok", "m-ood"]  # alarms first, by id
        hot = {m["machine_id"]: m for m in after["machines"]}["m-ok"]
        assert hot["state"] == hot["reading_state"] == "alarm" and hot["dominant"]["mode"] == "HDF"
        assert abs(datetime.fromisoformat(hot["last_reading_at"]).timestamp() - (start + READINGS_EACH - 1)) < 1e-3
        assert hot["trend"][-1] < hot["trend"][0] and len(hot["trend"]) == 2 * READINGS_EACH
        assert running.get("/api/v1/status").json()["machines"] == {"ok": 0, "warning": 0, "alarm": 3}


class Later:
    """The status API's clock (agent.snapshot.clock), `ahead_s` ahead of the real one."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead_s


@pytest.fixture
def later(monkeypatch):
    clock = Later()
    monkeypatch.setattr(agent.snapshot, "clock", clock)
    return clock


def test_the_ages_follow_the_clock_while_nothing_is_committed(tmp_path, later):
    with serving(tmp_path) as running:
        feed(running.agent)
        first = running.get("/api/v1/machines").json()
        later.ahead_s = 90
        second = running.get("/api/v1/machines").json()
        assert datetime.fromisoformat(second["now"]) - datetime.fromisoformat(first["now"]) >= timedelta(seconds=90)
        for old, new in zip(first["machines"], second["machines"], strict=True):
            assert new["last_reading_age_s"] >= old["last_reading_age_s"] + 90
            assert {**new, "last_reading_age_s": None} == {**old, "last_reading_age_s": None}


def test_metrics_follow_a_reading_committed_after_they_were_rendered(tmp_path, later):
    with serving(tmp_path) as running:
        feed(running.agent)
        before = families(running.get("/metrics").text)
        assert value(before, "pdm_machine_alarm_level", machine="m-ok") == 0
        assert value(before, "pdm_machine_health", machine="m-ok") > 70
        later.ahead_s = 90
        again = families(running.get("/metrics").text)  # nothing committed: the same, but for the ages
        age = "pdm_machine_last_reading_age_seconds"
        assert value(again, age, machine="m-ok") >= value(before, age, machine="m-ok") + 90
        assert value(again, "pdm_machine_mode_risk", machine="m-hdf", mode="HDF") == value(
            before, "pdm_machine_mode_risk", machine="m-hdf", mode="HDF")

        store, start = running.agent.store, time.time()
        for i in range(READINGS_EACH):
            running.agent.pipeline.put(RawReading("m-ok", start + i, dict(HEAT), "test", time.time()))
        wait_for(lambda: store.counters().readings_accepted == 4 * READINGS_EACH, "the new readings to be committed")
        after = families(running.get("/metrics").text)
        assert value(after, "pdm_machine_alarm_level", machine="m-ok") == 2
        assert value(after, "pdm_machine_health", machine="m-ok") < 40
        assert value(after, "pdm_machine_mode_risk", machine="m-ok", mode="HDF") > value(
            before, "pdm_machine_mode_risk", machine="m-ok", mode="HDF")
