"""The pipeline on a real SQLite file and the shipped model: commit before acknowledge, back-pressure, faults."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from agent.config import PipelineConfig
from agent.pipeline import Pipeline
from agent.store import Store, StoreError
from drivers.base import BatchAck, RawReading
from model.validate import Reason, Rejection

VALUES = {"machine_type": "M", "air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500,
          "torque": 40.0, "tool_wear": 10}


def raw(i: int, machine: str = "press-1", ack=None, **changes) -> RawReading:
    return RawReading(machine, 1_764_000_000.0 + i, {**VALUES, **changes}, "test", 1_764_000_000.0 + i,
                      payload=f"reading {i}", ack=ack)


def stored_ts(path) -> list[float]:
    with sqlite3.connect(path) as db:
        return [ts for (ts,) in db.execute("SELECT ts FROM readings ORDER BY ts")]


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "agent.db") as store:
        yield store


def pipeline_for(scorer, store, **config) -> Pipeline:
    return Pipeline(scorer, store, PipelineConfig(**config))


def test_each_reading_is_acknowledged_only_after_its_commit(scorer, store):
    seen_at_ack = {}

    def ack_for(i):
        return lambda: seen_at_ack.setdefault(i, 1_764_000_000.0 + i in stored_ts(store.path))

    pipeline = pipeline_for(scorer, store)
    pipeline.start()
    for i in range(300):
        pipeline.put(raw(i, ack=ack_for(i)))
    assert pipeline.stop(timeout=30)
    assert seen_at_ack == {i: True for i in range(300)}
    assert len(stored_ts(store.path)) == 300


def test_batch_acks_of_a_sender_go_out_together_once_each_after_their_commit(scorer, store):
    """An MQTT driver's acks (BatchAck): one call per committed batch and sender, every message id once, in order."""
    sent = []

    def send(tokens):
        sent.append((list(tokens), all(1_764_000_000.0 + i in stored_ts(store.path) for i in tokens)))

    other = []
    pipeline = pipeline_for(scorer, store, batch_max=100)
    for i in range(300):  # queued before the pipeline starts: three full batches
        pipeline.put(raw(i, ack=BatchAck(send, i) if i % 3 else lambda i=i: other.append(i)))
    pipeline.start()
    assert pipeline.stop(timeout=30)
    assert sent == [([i for i in range(b, b + 100) if i % 3], True) for b in (0, 100, 200)]
    assert other == list(range(0, 300, 3))


def test_rejections_from_drivers_and_validation_are_quarantined_and_acknowledged(scorer, store):
    acked = []
    pipeline = pipeline_for(scorer, store)
    pipeline.start()
    pipeline.put(raw(1, ack=lambda: acked.append(1)))
    pipeline.put(raw(2, ack=lambda: acked.append(2), torque="40"))
    bad = RawReading(None, 0.0, {}, "mqtt:x", 0.0, "garbage", Rejection(Reason.MALFORMED, "not JSON"),
                     ack=lambda: acked.append(3))
    pipeline.put(bad)
    assert pipeline.stop(timeout=30)
    assert sorted(acked) == [1, 2, 3]
    assert [(q.reason, q.payload) for q in store.quarantine(10)] == [("malformed", "garbage"),
                                                                      ("not_a_number", "reading 2")]
    counters = store.counters()
    assert counters.readings_accepted == 1
    assert counters.rejected["not_a_number"] == counters.rejected["malformed"] == 1


def test_a_rejected_reading_without_a_payload_is_quarantined_with_its_fields_as_json(scorer, store):
    """Modbus readings carry no payload: the quarantine shows the values the device sent instead."""
    pipeline = pipeline_for(scorer, store)
    pipeline.start()
    pipeline.put(RawReading("press-1", 1_764_000_000.0, {**VALUES, "torque": "40"}, "modbus:press-1", 1_764_000_000.0))
    assert pipeline.stop(timeout=30)
    [quarantined] = store.quarantine(10)
    assert quarantined.reason == "not_a_number" and json.loads(quarantined.payload) == {**VALUES, "torque": "40"}


def test_a_reading_without_a_machine_id_is_quarantined_not_stored_and_the_pipeline_goes_on(scorer, store):
    """A driver's bug (a reading with no machine id and no rejection) once crashed each commit of its batch, over
    and over: the batch was never acknowledged and the pipeline stalled."""
    acked = []
    pipeline = pipeline_for(scorer, store)
    pipeline.start()
    pipeline.put(RawReading(None, 1_764_000_000.0, dict(VALUES), "test", 1_764_000_000.0, "no id",
                            ack=lambda: acked.append("no id")))
    pipeline.put(raw(1, ack=lambda: acked.append("press-1")))
    assert pipeline.stop(timeout=30)
    assert sorted(acked) == ["no id", "press-1"] and pipeline.errors == 0
    assert [(q.reason, q.machine_id, q.payload) for q in store.quarantine(10)] == [
        ("unknown_machine", None, "no id")]
    assert store.counters().readings_accepted == 1


def test_a_redelivered_reading_is_stored_once(scorer, store):
    pipeline = pipeline_for(scorer, store)
    pipeline.start()
    for i in (*range(10), *range(5, 15)):
        pipeline.put(raw(i))
    assert pipeline.stop(timeout=30)
    assert len(stored_ts(store.path)) == 15
    assert store.counters().readings_duplicate == 5


def test_a_full_queue_blocks_the_driver_until_the_pipeline_catches_up(scorer, store):
    pipeline = pipeline_for(scorer, store, queue_max=10)
    driver = threading.Thread(target=lambda: [pipeline.put(raw(i)) for i in range(50)])
    driver.start()
    driver.join(timeout=0.5)
    assert driver.is_alive() and pipeline.depth == 10  # blocked: memory is bounded by queue_max
    pipeline.start()
    driver.join(timeout=30)
    assert not driver.is_alive()
    assert pipeline.stop(timeout=30)
    assert len(stored_ts(store.path)) == 50


def test_offer_takes_a_reading_only_while_the_queue_has_room_and_never_waits(scorer, store):
    pipeline = pipeline_for(scorer, store, queue_max=10)
    assert [pipeline.offer(raw(i)) for i in range(12)] == [True] * 10 + [False] * 2  # no pipeline thread yet
    assert pipeline.depth == 10
    pipeline.start()
    assert pipeline.stop(timeout=30)
    assert len(stored_ts(store.path)) == 10


class FailingStore(Store):
    """Fault injection: the first `failures` writes fail as a full disk would."""

    failures = 0

    def write(self, *batch):
        if self.failures:
            self.failures -= 1
            raise StoreError(f"database or disk is full writing {self.path}")
        return super().write(*batch)


def test_a_failing_database_is_retried_and_nothing_is_acknowledged_before_it_commits(scorer, tmp_path, caplog):
    with FailingStore.open(tmp_path / "agent.db") as store:
        store.failures = 3
        acked = []
        pipeline = pipeline_for(scorer, store)
        pipeline.start()
        for i in range(20):
            pipeline.put(raw(i, ack=lambda i=i: acked.append((i, len(stored_ts(store.path))))))
        assert pipeline.stop(timeout=30)
        assert len(stored_ts(store.path)) == 20
        assert all(count > i for i, count in acked) and len(acked) == 20
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1 and "disk is full" in unavailable[0].getMessage()
    assert pipeline.database.failures_total == 3 and pipeline.database.up


def test_stop_gives_up_without_acknowledging_when_the_database_never_recovers(scorer, tmp_path):
    with FailingStore.open(tmp_path / "agent.db") as store:
        store.failures = 10**9
        acked = []
        pipeline = pipeline_for(scorer, store)
        pipeline.start()
        pipeline.put(raw(1, ack=lambda: acked.append(1)))
        assert pipeline.stop(timeout=0.5) is False
        assert acked == []


def test_swapping_the_model_mid_stream_loses_nothing(scorer, store, shipped_model):
    from model.score import Scorer

    pipeline = pipeline_for(scorer, store)
    pipeline.start()
    for i in range(2000):
        pipeline.put(raw(i))
        if i == 1000:
            pipeline.swap_scorer(Scorer(shipped_model))
    assert pipeline.stop(timeout=30)
    assert len(stored_ts(store.path)) == 2000


def test_an_unexpected_error_is_retried_and_the_pipeline_survives(scorer, tmp_path, caplog):
    class BrokenOnceStore(Store):
        broken = True

        def write(self, *batch):
            if self.broken:
                self.broken = False
                raise RuntimeError("a bug")
            return super().write(*batch)

    with BrokenOnceStore.open(tmp_path / "agent.db") as store:
        pipeline = pipeline_for(scorer, store)
        pipeline.start()
        pipeline.put(raw(1))
        assert pipeline.stop(timeout=30)
        assert stored_ts(store.path) == [1_764_000_001.0]
    assert pipeline.errors == 1
    assert "retrying it" in caplog.text and "RuntimeError: a bug" in caplog.text
