"""The ingest pipeline: raw readings in, committed scores out.

Drivers put raw readings on a bounded queue (put() blocks when it is full: back-pressure, never unbounded memory).
One thread takes micro-batches off it — everything already waiting, up to `batch_max`, lingering a moment for more
while readings keep arriving but never longer than `batch_max_age_ms` — validates and scores them, commits the
batch in one transaction, and only then acknowledges each reading to its driver. That thread is the store's only
writer. A write that fails (disk full, I/O error) is retried with backoff while nothing is acknowledged, so the
queue fills and the drivers slow down; nothing accepted is dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import Metric

from agent.config import PipelineConfig
from agent.latest import LatestReadings
from agent.machines import Machines
from agent.roster import MACHINE_LABELS_MAX, Roster
from agent.store import MachineRecord, OutboxRecord, QuarantinedReading, Store, StoredReading, StoreError, WriteResult
from agent.summaries import ShadowScore
from drivers.base import Availability, BatchAck, RawReading
from model.score import Scorer
from model.validate import Reason, Rejection
from sync.protocol import ModelRef
from sync.remote import AlarmsConfig, SummaryConfig

log = logging.getLogger(__name__)

LINGER_S = 0.002  # how long a batch waits for one more reading before it is committed
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
CAP_HEADROOM_BYTES = 2**20  # room is made down to the cap minus this, so the next batches stay under the cap
NO_MACHINE = Rejection(Reason.UNKNOWN_MACHINE, "the reading names no machine")
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# Readings are counted by machine for MACHINE_LABELS_MAX machine ids, then under "other": a stream of invented ids
# (a misconfigured publisher) must not grow /metrics without bound.


@dataclass(frozen=True)
class PipelineStats:
    """The pipeline since the agent started (`Pipeline.stats()`)."""

    queue_depth: int
    queue_max: int
    batches: int  # committed
    errors: int  # unexpected errors committing a batch (retried)
    last_commit_age_s: float | None
    progressing: bool  # went round its loop within the `within_s` asked for
    database_up: bool  # the last database write succeeded
    database_failures: int
    database_last_error: str | None
    readings_by_machine: Mapping[tuple[str, str], int]  # (machine, "accepted" | "rejected") -> committed
    summaries_held_back: int  # closed windows not sent: like the last one sent (summaries on change)
    histograms: Sequence[Metric]  # batch sizes and scoring time, as Prometheus families


class Pipeline:
    def __init__(self, scorer: Scorer, store: Store, config: PipelineConfig, machines: Machines | None = None,
                 max_db_bytes: int | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, roster: Roster | None = None) -> None:
        self._queue: queue.Queue[RawReading] = queue.Queue(config.queue_max)
        self._queue_max = config.queue_max
        self._scorer = scorer
        self._store = store
        self._batch_max = config.batch_max
        self._batch_age_s = config.batch_max_age_ms / 1000
        self._machines = machines  # None: no alarms or summaries (tests of the pipeline alone)
        self._roster = roster  # None: readings of any machine are taken
        self._max_db_bytes = max_db_bytes  # the buffer cap; None: none
        self._dropped_unlogged: Counter[str] = Counter()  # drops at the cap not yet logged
        self._next_drop_log = 0.0
        self._clock = clock
        self._monotonic = monotonic
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self.database = Availability(f"database {store.path}", log)
        self._model_changed = False
        self._shadow: Scorer | None = None  # a candidate scored beside the live model (SPEC §9)
        self._shadow_ref: ModelRef | None = None
        self._sections: tuple[AlarmsConfig | None, SummaryConfig | None] | None = None  # remote overrides, pending
        self._next_tick = 0.0
        self.gave_up = False  # stopped with a batch the database would not take
        self.score_seconds = Histogram("pdm_scoring_seconds", "Validating and scoring one batch.", registry=None)
        self.shadow_seconds = Histogram("pdm_shadow_scoring_seconds",
                                        "Validating and scoring one batch with the shadow model.", registry=None)
        self.batch_size = Histogram("pdm_pipeline_batch_size", "Readings in each committed batch.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=None)
        self.readings_by_machine: Counter[tuple[str, str]] = Counter()  # (machine, "accepted" | "rejected"): committed
        self.heartbeat = monotonic()  # when the pipeline thread last went round its loop: stuck if this gets old
        self.batches = 0
        self.errors = 0  # unexpected errors while committing a batch (each is logged with its traceback)
        self.last_commit: float | None = None  # monotonic time of the last committed batch
        self.latest = LatestReadings()  # each machine's newest committed reading and trend, for the status API

    # --- called by drivers, from their threads ---
    def put(self, reading: RawReading) -> None:
        self._queue.put(reading)

    def offer(self, reading: RawReading) -> bool:
        """put() if the queue has room now, without waiting (drivers.base.OfferingSink); False when full."""
        try:
            self._queue.put_nowait(reading)
        except queue.Full:
            return False
        return True

    # --- called by the agent ---
    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def progressing(self, within_s: float) -> bool:
        """Whether the pipeline thread is alive and went round its loop within the last `within_s` seconds (a
        batch that keeps failing, or a hang, stops it going round)."""
        return self._thread.is_alive() and self._monotonic() - self.heartbeat <= within_s

    def stats(self, within_s: float) -> PipelineStats:
        """Read from any thread, without locks: a value may be one batch old."""
        last = self.last_commit
        database = self.database
        histograms = [*self.batch_size.collect(), *self.score_seconds.collect(), *self.shadow_seconds.collect()]
        return PipelineStats(
            queue_depth=self.depth, queue_max=self._queue_max, batches=self.batches, errors=self.errors,
            last_commit_age_s=None if last is None else max(0.0, self._monotonic() - last),
            progressing=self.progressing(within_s), database_up=database.up,
            database_failures=database.failures_total, database_last_error=database.last_error,
            readings_by_machine=dict(self.readings_by_machine), histograms=histograms,
            summaries_held_back=self._machines.held_back if self._machines is not None else 0)

    @property
    def scorer(self) -> Scorer:
        return self._scorer

    def swap_scorer(self, scorer: Scorer) -> None:
        """Score with another model from the next batch on; the batch in progress finishes with the old one."""
        self._scorer = scorer
        self._model_changed = True

    @property
    def shadow(self) -> Scorer | None:
        return self._shadow

    def set_shadow(self, scorer: Scorer | None) -> None:
        """Score every batch with `scorer` too, from the next batch on (None: stop); the live model decides."""
        model = scorer.model if scorer is not None else None
        self._shadow_ref = None if model is None else ModelRef(
            name=model.name, version=model.version, sha256=model.sha256, package_digest=model.package_digest or None)
        self._shadow = scorer

    def reconfigure(self, alarms: AlarmsConfig | None, summary: SummaryConfig | None) -> None:
        """Remote overrides of the hysteresis and the summaries: taken by the pipeline thread at its next batch."""
        self._sections = (alarms, summary)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Commit everything queued, then end. Call after the drivers stopped putting. False if it had to give up
        (the database kept failing): what was not committed was not acknowledged either, so it is not lost."""
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(RETRY_MAX_S + 1)
        return not self._thread.is_alive() and not self.gave_up and self._queue.empty()

    # --- the pipeline thread ---
    def _run(self) -> None:
        while not self._abandon.is_set():
            self.heartbeat = self._monotonic()
            batch = self._take()
            try:
                if batch:
                    self._commit_until_done(batch)
                elif self._stopping.is_set():
                    self._tick(force=True)
                    return
                else:
                    self._tick()
            except _Abandoned:
                self.gave_up = bool(batch)
                return

    def _commit_until_done(self, batch: list[RawReading]) -> None:
        """Commit a batch, retrying after an unexpected error too: a reading is never dropped because of a bug,
        only left unacknowledged (the watchdog restarts a pipeline that stays stuck)."""
        delay = RETRY_MIN_S
        while True:
            try:
                self._commit(batch)
                return
            except _Abandoned:
                raise
            except Exception:
                self.errors += 1
                log.exception("the pipeline failed on a batch of %d readings; retrying it", len(batch))
                if self._abandon.wait(delay):
                    raise _Abandoned from None
                delay = min(delay * 2, RETRY_MAX_S)

    def _take(self) -> list[RawReading]:
        try:
            batch = [self._queue.get(timeout=0.05)]
        except queue.Empty:
            return []
        deadline = self._monotonic() + self._batch_age_s
        while len(batch) < self._batch_max:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                break
            # Slept, then drained: waiting in get() would wake this thread for every reading put meanwhile.
            time.sleep(min(remaining, LINGER_S))
            if self._queue.empty():
                break
        return batch

    def _commit(self, batch: list[RawReading]) -> None:
        scorer = self._scorer
        model = scorer.model
        model_version = f"{model.name}@{model.version}"
        inputs, type_key = model.manifest.input_names, model.manifest.machine_type.name
        for reading in batch:
            if reading.rejection is None:
                reading.rejection = self._admit(reading.machine_id, reading.received_at)
        candidates = [r for r in batch if r.rejection is None]
        with self.score_seconds.time():
            results = iter(scorer.score([r.fields for r in candidates]))
        shadow = self._score_shadow(candidates)
        stored: list[StoredReading] = []
        quarantined: list[QuarantinedReading] = []
        outcomes: Counter[tuple[str | None, str]] = Counter()
        for reading in batch:  # in arrival order
            result = reading.rejection or next(results)
            if isinstance(result, Rejection) or reading.machine_id is None:  # no id: _admit rejected it
                quarantined.append(_quarantined(reading, result if isinstance(result, Rejection) else NO_MACHINE))
                outcomes[reading.machine_id, "rejected"] += 1
                continue
            outcomes[reading.machine_id, "accepted"] += 1
            stored.append(StoredReading(
                reading.machine_id, reading.ts, {name: float(reading.fields[name]) for name in inputs},
                reading.fields[type_key], result.p_failure, result.risk, result.health, result.state.value,
                result.ood, model_version, reading.received_at,
            ))
        new, outbox, machines = self._summarise(scorer, batch, stored, shadow)
        self._write(stored, quarantined, outbox, machines)
        self.latest.committed(new, self._machines.saved_alarms if self._machines is not None else None)
        _acknowledge(batch)
        self.batches += 1
        self.batch_size.observe(len(batch))
        self._count_by_machine(outcomes)
        self.last_commit = self._monotonic()
        self._keep_under_cap()

    def _admit(self, machine_id: str | None, received_at: float) -> Rejection | None:
        """A reading without a machine id (a driver's bug) is quarantined, not stored: nothing could show it."""
        if machine_id is None:
            return NO_MACHINE
        return None if self._roster is None else self._roster.admit(machine_id, received_at)

    def _count_by_machine(self, outcomes: Counter[tuple[str | None, str]]) -> None:
        counted = self.readings_by_machine
        machines = {machine for machine, _ in counted}
        for (machine_id, outcome), n in outcomes.items():
            machine = machine_id or "unknown"
            if machine not in machines and len(machines) >= MACHINE_LABELS_MAX:
                machine = "other"
            machines.add(machine)
            counted[machine, outcome] += n

    def _score_shadow(self, candidates: list[RawReading],
                      ) -> tuple[ModelRef, dict[tuple[str, float], ShadowScore]] | None:
        """The shadow model's score of each reading, keyed (machine id, ts); in memory only: its figures go into
        the summaries this batch's transaction writes anyway (no transaction of its own)."""
        shadow, ref = self._shadow, self._shadow_ref
        if shadow is None or ref is None or not candidates:
            return None
        started = time.perf_counter()
        results = shadow.score([r.fields for r in candidates])
        seconds = time.perf_counter() - started
        self.shadow_seconds.observe(seconds)
        share = seconds / len(candidates)
        scores: dict[tuple[str, float], ShadowScore] = {}
        for reading, result in zip(candidates, results):
            if reading.machine_id is None:
                continue
            if isinstance(result, Rejection):
                scores[reading.machine_id, reading.ts] = ShadowScore(None, False, share)
            else:
                scores[reading.machine_id, reading.ts] = ShadowScore(result.state.value, bool(result.ood), share)
        return ref, scores

    def _summarise(self, scorer: Scorer, batch: list[RawReading], stored: list[StoredReading],
                   shadow: tuple[ModelRef, dict[tuple[str, float], ShadowScore]] | None = None,
                   ) -> tuple[list[StoredReading], list[OutboxRecord], list[MachineRecord]]:
        """The readings not stored before, and from them alone (a redelivered reading is never counted twice) the
        alarm events, closed summaries and machine states for this batch."""
        if self._machines is None:
            return stored, [], []
        if self._sections is not None:
            sections, self._sections = self._sections, None
            self._machines.reconfigure(*sections)
        if self._model_changed:
            self._machines.use_model(scorer.model)
            self._model_changed = False
        known = self._store.stored([(r.machine_id, r.ts) for r in stored])
        new = []
        for reading in stored:
            key = (reading.machine_id, reading.ts)
            if key not in known:
                known.add(key)
                new.append(reading)
        rejected = [(r.machine_id, r.ts) for r in batch if r.rejection is not None]
        return new, *self._machines.update(new, rejected, self._clock(), shadow)

    def _keep_under_cap(self) -> None:
        """After every commit, and once a second while idle: make room when the database is over the buffer cap
        (see Store.enforce_cap; under the cap that is one query). Checking only once a second let a fast stream
        overshoot the cap by a second of readings, and a database left over it by the last batch stayed over it.
        A failure is reported and retried at the next call: the batch itself is committed and acknowledged."""
        if self._max_db_bytes is None:
            return
        try:
            dropped = self._store.enforce_cap(self._max_db_bytes - CAP_HEADROOM_BYTES)
        except StoreError as exc:
            self.database.failed(str(exc))
            return
        if dropped.get("readings"):
            self.latest.forget()
        self._dropped_unlogged.update(dropped)
        if self._dropped_unlogged and self._monotonic() >= self._next_drop_log:  # one line a second at most
            self._next_drop_log = self._monotonic() + 1.0
            log.warning("buffer cap of %d MB reached: dropped %s", self._max_db_bytes // 2**20,
                        ", ".join(f"{n} {kind}" for kind, n in self._dropped_unlogged.items()))
            self._dropped_unlogged.clear()

    def _tick(self, force: bool = False) -> None:
        """While idle, at most once a second, and when stopping: keep under the buffer cap and close the summary
        windows due by the clock."""
        if self._monotonic() < self._next_tick and not force:
            return
        self._next_tick = self._monotonic() + 1.0
        self._keep_under_cap()
        if self._machines is None:
            return
        outbox, machines = self._machines.close_due(self._clock())
        if outbox or machines:
            self._write([], [], outbox, machines)
            self.latest.committed((), self._machines.saved_alarms)

    def _write(self, stored: list[StoredReading], quarantined: list[QuarantinedReading],
               outbox: Sequence[OutboxRecord] = (), machines: Sequence[MachineRecord] = ()) -> WriteResult:
        delay = RETRY_MIN_S
        while True:
            try:
                result = self._store.write(stored, quarantined, outbox, machines)
                self.database.succeeded()
                return result
            except StoreError as exc:
                self.database.failed(str(exc))
            if self._abandon.wait(delay):
                raise _Abandoned
            delay = min(delay * 2, RETRY_MAX_S)


class _Abandoned(Exception):
    """The agent is stopping and the database still fails: leave the batch unacknowledged."""


def _acknowledge(batch: list[RawReading]) -> None:
    """Each reading's ack, in order; the BatchAcks of one sender in one call at the end."""
    tokens: dict[Callable[[list[Any]], object], list[Any]] = {}
    for reading in batch:
        ack = reading.ack
        if isinstance(ack, BatchAck):
            tokens.setdefault(ack.send, []).append(ack.token)
        elif ack is not None:
            ack()
    for send, sent in tokens.items():
        send(sent)


def _quarantined(reading: RawReading, rejection: Rejection) -> QuarantinedReading:
    payload = reading.payload or (json.dumps(reading.fields, default=repr) if reading.fields else "")
    return QuarantinedReading(reading.received_at, reading.source, reading.machine_id, rejection.reason.value,
                              rejection.message, payload)
