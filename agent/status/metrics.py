"""/metrics: Prometheus families computed from an `AgentSnapshot` at each scrape (nothing is counted twice: the
store's counters are the durable truth). A part that cannot be read is left out and counted in
`pdm_status_scrape_errors`; the scrape itself does not fail. README's metric table names every family.

The per-machine families but the ages are rendered once per change of the machines (`MachineFamilies`), and
`exposition` takes their text as rendered: with 500 machines they are most of the text."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.latest import MachineView
from agent.roster import labelled
from agent.snapshot import AgentSnapshot
from model.states import SEVERITY
from sync.outbox import Outcome

log = logging.getLogger("agent.status")


class AgentCollector:
    """A prometheus_client collector: `collect()` takes a snapshot with `read` and yields its families."""

    def __init__(self, read: Callable[[], AgentSnapshot]) -> None:
        self._read = read
        self._machines = MachineFamilies()

    def collect(self) -> Iterator[Metric]:
        snap = self._read()
        yield gauge("pdm_agent_start_time_seconds", "When the agent started (epoch seconds).", snap.started_at)
        info = InfoMetricFamily("pdm_agent", "The agent.")
        info.add_metric([], {"version": __version__, "gateway_id": snap.config.gateway_id})
        yield info
        yield gauge("pdm_agent_running", "Whether the agent's store and pipeline are running.", int(snap.running))
        if not snap.running:
            return
        errors = 0
        for part in (_model, _store, _pipeline, _sync, _drivers, self._machines.machines, _scoring, _alarms):
            try:
                metrics = list(part(snap))
            except Exception as exc:  # noqa: BLE001 - the rest of the scrape is still worth having
                errors += 1
                log.warning("metrics: %s failed: %s", part.__name__.strip("_"), exc)
                continue
            yield from metrics
        yield gauge("pdm_status_scrape_errors", "Parts of the agent's state this scrape could not read.", errors)


def _model(snap: AgentSnapshot) -> Iterable[Metric]:
    model = snap.model
    info = InfoMetricFamily("pdm_model", "The model package scoring the readings.")
    info.add_metric([], {"name": model.name, "version": model.version, "sha256": model.sha256})
    yield info


def _store(snap: AgentSnapshot) -> Iterable[Metric]:
    buffer = snap.buffer
    counters = buffer.counters
    readings = CounterMetricFamily("pdm_readings", "Readings by outcome, and rejected readings by reason.",
                                   labels=["outcome", "reason"])
    readings.add_metric(["accepted", ""], counters.readings_accepted)
    readings.add_metric(["duplicate", ""], counters.readings_duplicate)
    for reason, n in counters.rejected.items():
        readings.add_metric(["rejected", reason], n)
    yield readings
    yield counter("pdm_quarantine_evicted", "Rejected readings evicted from the quarantine by its cap.",
                  counters.quarantine_evicted)
    dropped = CounterMetricFamily("pdm_buffer_dropped", "Unsynced records the buffer cap forced out, by kind.",
                                  labels=["kind"])
    for kind in ("quarantine", "readings", "summaries"):
        dropped.add_metric([kind], counters.dropped.get(kind, 0))
    yield dropped
    set_aside = CounterMetricFamily("pdm_sync_set_aside", "Records central refused as invalid, set aside.",
                                    labels=["kind"])
    for kind in ("event", "summary"):
        set_aside.add_metric([kind], counters.set_aside.get(kind, 0))
    yield set_aside
    yield gauge("pdm_database_used_bytes", "Bytes of database pages holding data.", buffer.used_bytes)
    yield gauge("pdm_database_size_bytes", "Size of the database file.", buffer.size_bytes)
    yield gauge("pdm_database_max_bytes", "The buffer cap.", buffer.max_bytes)
    yield gauge("pdm_outbox_pending", "Summaries and events not yet accepted by central.", buffer.pending)
    oldest = buffer.oldest_pending_at
    yield gauge("pdm_outbox_oldest_pending_age_seconds", "Age of the oldest record not yet accepted by central "
                "(0 when none).", 0.0 if oldest is None else max(0.0, snap.taken_at - oldest))


def _pipeline(snap: AgentSnapshot) -> Iterable[Metric]:
    pipeline = snap.pipeline
    yield gauge("pdm_pipeline_queue_depth", "Readings waiting for the pipeline.", pipeline.queue_depth)
    yield gauge("pdm_pipeline_queue_capacity", "The pipeline queue's size.", pipeline.queue_max)
    yield counter("pdm_pipeline_batches", "Batches committed.", pipeline.batches)
    yield from (h for h in pipeline.histograms if h.name == "pdm_pipeline_batch_size")
    by_machine = CounterMetricFamily("pdm_machine_readings", "Readings committed since the agent started, by "
                                     "machine and outcome (accepted or rejected).", labels=["machine", "outcome"])
    for (machine, outcome), n in sorted(pipeline.readings_by_machine.items()):
        by_machine.add_metric([machine, outcome], n)
    yield by_machine
    yield counter("pdm_pipeline_errors", "Unexpected errors committing a batch (retried).", pipeline.errors)
    yield counter("pdm_summaries_held_back", "Closed windows not sent to central since the agent started: like the "
                  "last one sent (summaries on change).", pipeline.summaries_held_back)
    yield gauge("pdm_database_up", "Whether the last database write succeeded.", int(pipeline.database_up))
    yield counter("pdm_database_write_failures", "Failed database writes (retried).", pipeline.database_failures)


def _sync(snap: AgentSnapshot) -> Iterable[Metric]:
    sync = snap.sync
    yield gauge("pdm_sync_enabled", "Whether sync to central is configured.", int(snap.config.central.enabled))
    last = sync.last_success if sync else None
    yield gauge("pdm_sync_last_success_timestamp_seconds", "When the outbox was last emptied into central "
                "(0: never).", last.timestamp() if last else 0.0)
    rounds = CounterMetricFamily("pdm_sync_rounds", "Sync rounds since the agent started, by result: synced "
                                 "(outbox emptied), retry (central unreachable or failing), refused (401/403).",
                                 labels=["result"])
    for outcome in Outcome:
        rounds.add_metric([outcome.value], sync.rounds.get(outcome.value, 0) if sync else 0)
    yield rounds
    yield counter("pdm_sync_records_sent", "Summaries and events central has accepted since the agent started.",
                  sync.records_sent if sync else 0)


def _drivers(snap: AgentSnapshot) -> Iterable[Metric]:
    up = GaugeMetricFamily("pdm_driver_up", "Whether the driver's connections are up (every device connected).",
                           labels=["driver"])
    device_up = GaugeMetricFamily("pdm_driver_device_up", "Whether one polled device is connected.",
                                  labels=["driver", "device"])
    errors = CounterMetricFamily("pdm_driver_errors", "Driver errors since the agent started, by device (empty "
                                 "for a driver's own connection) and kind.", labels=["driver", "device", "kind"])
    polls = CounterMetricFamily("pdm_driver_polls", "Polls of one device since the agent started.",
                                labels=["driver", "device"])
    skips = CounterMetricFamily("pdm_driver_poll_skips", "Polls of one device skipped because the previous one "
                                "was still running.", labels=["driver", "device"])
    for driver in snap.drivers:
        up.add_metric([driver.name], 1 if driver.connected else 0)
        for kind, n in (driver.errors.items() if not driver.devices else ()):
            errors.add_metric([driver.name, "", kind], n)
        for device in driver.devices:
            device_up.add_metric([driver.name, device.device], int(device.connected))
            for kind, n in device.errors.items():
                errors.add_metric([driver.name, device.device, kind], n)
            polls.add_metric([driver.name, device.device], device.polls)
            skips.add_metric([driver.name, device.device], device.skipped_polls)
    yield from (up, device_up, errors, polls, skips)


class Rendered(Metric):
    """A family and its text as generate_latest renders it."""

    def __init__(self, family: Metric) -> None:
        super().__init__(family.name, family.documentation, family.type, family.unit)
        self.samples = family.samples
        self.text = generate_latest(_Only(family))


class _Only(Collector):
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterable[Metric]:
        return [self._family]


def exposition(registry: CollectorRegistry) -> bytes:
    """generate_latest(registry), byte for byte, with a `Rendered` family's text taken as it was rendered."""
    return b"".join(family.text if isinstance(family, Rendered) else generate_latest(_Only(family))
                    for family in registry.collect())


class MachineFamilies:
    """Each machine's health, alarm level, p_failure, risks and ood inputs, rendered again only when the machines
    changed (agent/latest.py's view of them is another) or another set of them is labelled; the ages at each scrape.
    Who calls it: the status API's worker threads, any number at once (two may render the same families)."""

    def __init__(self) -> None:
        self._rendered: tuple[tuple[MachineView, ...], list[str], list[Metric]] | None = None

    def machines(self, snap: AgentSnapshot) -> Iterable[Metric]:
        views, now = snap.latest.machines(snap.records), snap.taken_at
        listed = labelled([view.reading for view in views], snap.config.machines.forget_after_h, now)
        ids, rendered = [reading.machine_id for reading in listed], self._rendered
        if rendered is None or rendered[0] is not views or rendered[1] != ids:
            rendered = self._rendered = views, ids, [Rendered(f) for f in _latest_families(views, set(ids))]
        age = GaugeMetricFamily("pdm_machine_last_reading_age_seconds", "Since the latest reading was received.",
                                labels=["machine"])
        for reading in listed:
            age.add_metric([reading.machine_id], max(0.0, now - reading.received_at))
        return [*rendered[2], age]


def _latest_families(views: tuple[MachineView, ...], ids: set[str]) -> list[Metric]:
    """Of the machines `ids` (in memory: none read from the database, none decoded), by id."""
    health = GaugeMetricFamily("pdm_machine_health", "Health of the latest reading, 0-100.", labels=["machine"])
    level = GaugeMetricFamily("pdm_machine_alarm_level", "Alarm state after the hysteresis: 0 ok, 1 warning, "
                              "2 alarm.", labels=["machine"])
    p_failure = GaugeMetricFamily("pdm_machine_failure_probability", "p_failure of the latest reading.",
                                  labels=["machine"])
    risk = GaugeMetricFamily("pdm_machine_mode_risk", "Risk of each failure mode in the latest reading.",
                             labels=["machine", "mode"])
    ood = GaugeMetricFamily("pdm_machine_ood_inputs", "Inputs of the latest reading outside the training range.",
                            labels=["machine"])
    for view in sorted((v for v in views if v.reading.machine_id in ids), key=lambda v: v.reading.machine_id):
        reading, machine_id = view.reading, view.reading.machine_id
        saved = view.alarm.get("state") if view.alarm else None
        state = saved if isinstance(saved, str) and saved in SEVERITY else reading.state
        health.add_metric([machine_id], reading.health)
        level.add_metric([machine_id], SEVERITY.get(state, 0))
        p_failure.add_metric([machine_id], reading.p_failure)
        for mode, value in reading.risk.items():
            risk.add_metric([machine_id, mode], value)
        ood.add_metric([machine_id], len(reading.ood))
    return [health, level, p_failure, risk, ood]


def _scoring(snap: AgentSnapshot) -> Iterable[Metric]:
    yield from (h for h in snap.pipeline.histograms if h.name == "pdm_scoring_seconds")


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _alarms(snap: AgentSnapshot) -> Iterable[Metric]:
    episodes = snap.open_episodes
    done = snap.actions.of_episodes(e.ref.episode_id for e in episodes)
    unacknowledged = sum(1 for e in episodes if (d := done.get(e.ref.episode_id)) is None or d.acknowledged_at is None)
    yield gauge("pdm_alarm_episodes_open", "Open alarm episodes of this gateway's machines.", len(episodes))
    yield gauge("pdm_alarm_episodes_unacknowledged", "Open alarm episodes nobody acknowledged (here or at central).",
                unacknowledged)
    yield gauge("pdm_alarm_actions_pending", "Acknowledgements and labels given here that central has not taken yet.",
                snap.actions.pending_count())
