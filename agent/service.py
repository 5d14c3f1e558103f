"""`pdm-edge run`: wires the store, the model, the pipeline and the drivers, and runs until SIGTERM.

Start order: store, model, pipeline, then the drivers (inputs last, so nothing arrives before it can be stored).
Stop order: drivers stop putting, the pipeline commits and acknowledges what is queued, the drivers disconnect,
the store closes. SIGHUP, or a changed model package on disk, reloads the model: a package that fails
verification is refused and the running one goes on scoring.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import BaseModel

from agent import __version__
from agent.actions import ActionLog
from agent.config import AgentConfig, check_inputs
from agent.downlink import Downlink
from agent.machines import Machines
from agent.notify import Notifier
from agent.pipeline import Pipeline
from agent.roster import Roster
from agent.snapshot import Running
from agent.status.server import StatusServer
from agent.store import Store
from agent.sync_loop import SyncLoop
from drivers.base import Driver
from drivers.modbus import ModbusDriver
from drivers.mqtt import MqttDriver
from model.bundle import trusted_keys
from model.manifest import MANIFEST_FILE, PackageError
from model.package import SHIPPED, Model, load
from model.score import Scorer
from sync.onchange import OnChange
from sync.outbox import FetchError
from sync.protocol import GatewayStatus
from sync.remote import AlarmsConfig, SummaryConfig

if TYPE_CHECKING:
    from sync.client import SyncClient

log = logging.getLogger(__name__)

DATABASE_FILE = "agent.db"
STOP_TIMEOUT_S = 20.0  # systemd's TimeoutStopSec must exceed this
MODEL_WATCH_S = 5.0
RETENTION_EVERY_S = 600.0
ACTIONS_KEPT_S = 30 * 86400.0  # synced gateway actions (acknowledgements, labels)


class NotStarted(RuntimeError):
    """A part of the agent was asked for before `start()` made it."""


class Agent:
    """Who calls what: `run()` (or a test) calls start(), then stop() once, from one thread; reload_model() from
    that thread or the scheduler's. The status API reads the parts through `agent.snapshot.snapshot(agent)`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.configured_package = self.package = Path(config.model.path or SHIPPED)
        self.downlink: Downlink | None = None  # made by start() when central is configured
        self.started_at = time.time()
        self.running: Running | None = None  # the parts, made by start()
        self.status = StatusServer(self)  # started by start(), after the pipeline
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._package_stamp = _stamp(self.package)
        self._reload_lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self._running().store

    @property
    def pipeline(self) -> Pipeline:
        return self._running().pipeline

    @property
    def drivers(self) -> list[Driver]:
        return self.running.drivers if self.running is not None else []

    def _running(self) -> Running:
        if self.running is None:
            raise NotStarted("the agent has not started")
        return self.running

    def start(self) -> None:
        """Raises PackageError, StoreError or OSError on what keeps the agent from running at all."""
        config = self.config
        _prepare_data_dir(config.data_dir)
        shadow: Scorer | None = None
        client: SyncClient | None = None
        if config.central.enabled:
            self.downlink = Downlink(config.data_dir, trusted_keys(list(config.model.trusted_keys)),
                                     lambda path: _fetch(client, path), config.model.pinned,
                                     {"alarms": config.alarms, "summary": config.summary, "central": config.central})
            self._take_overrides(self.downlink.start_overrides())
            scorer = self._first_scorer(self.downlink.installed_live())
            shadow = self._shadow_scorer(self.downlink.installed_shadow())
        else:
            scorer = self._scorer(self.package)
        store = Store.open(config.data_dir / DATABASE_FILE, synchronous=config.buffer.synchronous,
                           quarantine_cap=config.buffer.quarantine_max_rows,
                           quarantine_max_bytes=config.buffer.quarantine_max_bytes)
        running = self.running = Running(store, self._pipeline(scorer, store))
        running.pipeline.set_shadow(shadow)
        running.pipeline.start()
        self.status.start()  # before the drivers: a port conflict fails the start before any device is touched
        running.drivers.extend(self._drivers(scorer.model.manifest.machine_type.name))
        for driver in running.drivers:
            driver.start(running.pipeline)
        if config.central.enabled and config.central.url is not None:
            from sync.client import SyncClient  # requests: loaded only by an agent that syncs

            client = SyncClient(config.central, config.gateway_id, __version__, store, self.gateway_status,
                                downlink=self.downlink,
                                actions=ActionLog(store, config.gateway_id))
            running.sync = SyncLoop(client, str(config.central.url))
            running.downlink = self.downlink
            if self.downlink is not None:
                self.downlink.start(self, shadow.model if shadow is not None else None)
            running.sync.start()
        self._scheduler.add_job(self.reload_model_if_changed, "interval", seconds=MODEL_WATCH_S)
        self._scheduler.add_job(self._retention, "interval", seconds=RETENTION_EVERY_S)
        self._scheduler.start()
        model = scorer.model
        log.info("pdm-edge %s started: gateway %s, model %s %s (package digest %s), %d driver(s), data in %s",
                 __version__, config.gateway_id, model.name, model.version, model.package_digest, len(self.drivers),
                 config.data_dir)

    def _pipeline(self, scorer: Scorer, store: Store) -> Pipeline:
        config = self.config
        on_change = OnChange(config.central.on_change, scorer.model.manifest.thresholds.modes)
        machines = Machines(config.gateway_id, config.summary, config.alarms, scorer.model, store.machines(),
                            keep=on_change.keep if config.central.on_change.enabled else None)
        configured = [device.machine_id for device in config.modbus]
        configured += config.mqtt.listed_machines() if config.mqtt else []
        configured += [machine.machine_id for server in config.opcua for machine in server.machines]
        last_seen = {machine_id: r.received_at for machine_id, r in store.latest_by_machine().items()}
        return Pipeline(scorer, store, config.pipeline, machines, config.buffer.max_db_mb * 2**20,
                        roster=Roster(config.machines, configured, last_seen))

    def _drivers(self, type_key: str) -> list[Driver]:
        config = self.config
        drivers: list[Driver] = []
        if config.mqtt is not None:
            drivers.append(MqttDriver(config.mqtt, type_key))
        if config.modbus:
            drivers.append(ModbusDriver(config.modbus, type_key))
        if config.opcua:
            from drivers.opcua import OpcuaDriver  # asyncua is the opcua extra's: imported only when configured

            drivers.append(OpcuaDriver(config.opcua, type_key))
        return drivers

    def stop(self) -> bool:
        """Safe to call twice or after a failed start. False if queued readings could not be committed."""
        self.status.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        if self.downlink is not None:
            self.downlink.stop()
        running, self.running = self.running, None
        drained = True
        if running is not None:
            if running.sync is not None:
                running.sync.stop()
            for driver in running.drivers:
                driver.stop()
            drained = running.pipeline.stop(STOP_TIMEOUT_S)
            for driver in running.drivers:
                driver.close()
            running.store.close()
        log.info("pdm-edge stopped%s", "" if drained else "; readings still queued were not acknowledged")
        return drained

    def reload_model(self) -> bool:
        """Swap to the package on disk if it verifies and fits the devices; otherwise keep the running one."""
        with self._reload_lock:
            self._package_stamp = _stamp(self.package)
            pipeline = self._running().pipeline
            running = pipeline.scorer.model
            try:
                scorer = self._scorer(self.package)
            except PackageError as exc:
                log.error("model package %s refused, still scoring with %s %s: %s", self.package, running.name,
                          running.version, exc)
                return False
            pipeline.swap_scorer(scorer)
            log.info("model reloaded: %s %s, package digest %s (was %s %s, %s)", scorer.model.name,
                     scorer.model.version, scorer.model.package_digest, running.name, running.version,
                     running.package_digest)
            return True

    # --- the downlink's target (agent/downlink.py), called from its thread ---
    def live_model(self) -> Model:
        return self._running().pipeline.scorer.model

    def use_live(self, package: Path | None) -> Model:
        """Serve the package in `package` (None: the configured one) from the next batch; PackageError if refused."""
        with self._reload_lock:
            target = package or self.configured_package
            scorer = self._scorer(target)
            pipeline = self._running().pipeline
            before = pipeline.scorer.model
            pipeline.swap_scorer(scorer)
            self.package, self._package_stamp = target, _stamp(target)
            log.info("model swapped by central: %s %s (was %s %s)", scorer.model.name, scorer.model.version,
                     before.name, before.version)
            return scorer.model

    def use_shadow(self, package: Path | None) -> Model | None:
        scorer = self._scorer(package) if package is not None else None
        self._running().pipeline.set_shadow(scorer)
        log.info("shadow model: %s", f"{scorer.model.name} {scorer.model.version}" if scorer else "none")
        return scorer.model if scorer is not None else None

    def reconfigure(self, sections: Mapping[str, BaseModel]) -> None:
        """Apply central's overrides of the configuration (already validated by sync/remote.py)."""
        self._take_overrides(sections)
        running = self._running()
        alarms, summary = sections.get("alarms"), sections.get("summary")
        running.pipeline.reconfigure(alarms if isinstance(alarms, AlarmsConfig) else self.config.alarms,
                                     summary if isinstance(summary, SummaryConfig) else self.config.summary)
        if running.sync is not None:
            running.sync.reconfigure(self.config.central)

    @property
    def overrides(self) -> dict[str, object]:
        """Central's configuration overrides in force (sync/remote.py); the file holds the rest."""
        return dict(self.downlink.state.overrides) if self.downlink is not None else {}

    def _take_overrides(self, sections: Mapping[str, BaseModel]) -> None:
        """The effective configuration: the file's, with these sections as central overrides them."""
        self.config = self.config.model_copy(update=dict(sections))

    def _first_scorer(self, package: Path | None) -> Scorer:
        """At start: the package the downlink installed, falling back to the configured one if it is refused."""
        if package is None:
            return self._scorer(self.configured_package)
        try:
            scorer = self._scorer(package)
        except PackageError as exc:
            log.error("the model central installed is refused, serving the configured one: %s", exc)
            return self._scorer(self.configured_package)
        self.package, self._package_stamp = package, _stamp(package)
        return scorer

    def _shadow_scorer(self, package: Path | None) -> Scorer | None:
        """At start: the shadow model the downlink installed, if it still loads (else none: never a failed start)."""
        if package is None:
            return None
        try:
            return self._scorer(package)
        except PackageError as exc:
            log.error("the shadow model central installed is refused, no shadow scoring: %s", exc)
            return None

    def reload_model_if_changed(self) -> None:
        if _stamp(self.package) != self._package_stamp:
            self.reload_model()

    def _scorer(self, package: Path) -> Scorer:
        model = load(package)
        manifest = model.manifest
        problems = check_inputs(self.config, manifest.input_names, manifest.machine_type.name)
        if problems:
            raise PackageError(f"{package} does not fit the configured devices: " + "; ".join(problems))
        return Scorer(model)

    def gateway_status(self) -> GatewayStatus:
        """What each sync round tells central of the gateway (called from the sync thread)."""
        store = self._running().store
        pending, _ = store.outbox_backlog()
        counters = store.counters()
        return GatewayStatus(buffer_pending=pending, dropped_total=counters.dropped_total,
                             dropped=dict(counters.dropped), uptime_s=time.time() - self.started_at,
                             applied=self.downlink.applied() if self.downlink is not None else None)

    def _retention(self) -> None:
        buffer, store = self.config.buffer, self._running().store
        deleted = store.delete_readings_before(time.time() - buffer.reading_retention_h * 3600)
        if deleted:
            self._running().pipeline.latest.forget()
        forgotten = store.delete_synced_before(time.time() - buffer.synced_retention_h * 3600)
        # An acknowledgement or a label central has: kept a while longer, for the page of an episode still open.
        ActionLog(store, self.config.gateway_id).delete_synced_before(time.time() - ACTIONS_KEPT_S)
        if deleted or forgotten:
            log.info("retention: deleted %d readings older than %g h and %d synced records older than %g h",
                     deleted, buffer.reading_retention_h, forgotten, buffer.synced_retention_h)


def _fetch(client: SyncClient | None, path: str) -> bytes:
    if client is None:
        raise FetchError("sync has not started")
    return client.fetch(path)


def _prepare_data_dir(data_dir: Path) -> None:
    """Create the data folder for the agent's user only (0700; the store creates its files 0600). A folder that
    already exists keeps its mode, which may be the operator's choice (systemd's StateDirectoryMode, a backup
    group): a warning says so when other users can reach into it."""
    try:
        data_dir.mkdir(mode=0o700)
    except FileExistsError:
        for path in (data_dir, data_dir / DATABASE_FILE):
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                continue
            if mode & stat.S_IRWXO:
                log.warning("%s is open to other users (mode %s); the buffer holds plant data: "
                            "chmod o-rwx %s", path, stat.filemode(mode), path)
    except FileNotFoundError:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(mode=0o700, exist_ok=True)
    if not os.path.isdir(data_dir):
        raise NotADirectoryError(f"data_dir {data_dir} is not a folder")


def _stamp(package: Path) -> tuple[tuple[int, int] | None, ...]:
    """What changes when a package on disk is replaced: the manifest's and the ONNX file's mtime and size."""
    stamp: list[tuple[int, int] | None] = []
    for name in (MANIFEST_FILE, "model.onnx"):
        try:
            info = (package / name).stat()
            stamp.append((info.st_mtime_ns, info.st_size))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def run(config: AgentConfig) -> int:
    """Run in the foreground until SIGTERM or SIGINT; 0 after a clean shutdown, 1 if the agent cannot start."""
    agent = Agent(config)
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    systemd = Notifier()
    try:
        agent.start()
    except Exception as exc:  # noqa: BLE001 - anything that keeps it from starting: say it in one line, exit 1
        log.error("cannot start: %s", exc)
        agent.stop()
        return 1
    _settle_memory()
    systemd.send("READY=1", f"STATUS=gateway {config.gateway_id}: running")
    next_ping = 0.0
    while not stop.wait(0.2):
        if reload.is_set():
            reload.clear()
            systemd.send("RELOADING=1")
            agent.reload_model()
            systemd.send("READY=1")
        next_ping = _watchdog(systemd, agent.pipeline, next_ping)
    log.info("stopping")
    systemd.send("STOPPING=1")
    return 0 if agent.stop() else 1


def _settle_memory() -> None:
    """Once started: start-up's garbage collected, what remains frozen (it lives as long as the process: full
    collections skip it), and the C heap's free pages given back to the system, which glibc otherwise keeps."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to give back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _watchdog(systemd: Notifier, pipeline: Pipeline, next_ping: float) -> float:
    """Ping systemd's watchdog every half period, only while the pipeline makes progress: a stuck pipeline stops
    the pings and systemd restarts the agent (what was not committed was not acknowledged: nothing is lost)."""
    if systemd.watchdog_s is None or time.monotonic() < next_ping:
        return next_ping
    if pipeline.progressing(within_s=systemd.watchdog_s / 2):
        systemd.send("WATCHDOG=1")
    else:
        log.error("the pipeline has made no progress for %.0f s: not pinging the watchdog", systemd.watchdog_s / 2)
    return time.monotonic() + systemd.watchdog_s / 2
