"""`pdm-edge run`: wires the store, the model, the pipeline and the drivers, and runs until SIGTERM.

Start order: store, model, pipeline, then the drivers (inputs last, so nothing arrives before it can be stored).
Stop order: drivers stop putting, the pipeline commits and acknowledges what is queued, the drivers disconnect,
the store closes. SIGHUP, or a changed model package on disk, reloads the model: a package that fails
verification is refused and the running one goes on scoring.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import stat
import threading
import time
from collections import Counter
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from agent import __version__
from agent.config import AgentConfig, check_inputs
from agent.machines import Machines
from agent.notify import Notifier
from agent.pipeline import Pipeline
from agent.roster import Roster
from agent.status import StatusServer
from agent.store import Store, StoreError
from drivers.base import Availability, Driver
from drivers.modbus import ModbusDriver
from drivers.mqtt import MqttDriver
from model.manifest import MANIFEST_FILE, PackageError
from model.package import SHIPPED, load
from model.score import Scorer
from sync.client import Outcome, Round, SyncClient
from sync.protocol import GatewayStatus

log = logging.getLogger(__name__)

DATABASE_FILE = "agent.db"
STOP_TIMEOUT_S = 20.0  # systemd's TimeoutStopSec must exceed this
MODEL_WATCH_S = 5.0
RETENTION_EVERY_S = 600.0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.package = Path(config.model.path or SHIPPED)
        self.started_at = time.time()
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.drivers: list[Driver] = []
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._package_stamp = _stamp(self.package)
        self._reload_lock = threading.Lock()
        self._stopping = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.sync: SyncClient | None = None
        self.sync_rounds: Counter[str] = Counter()  # by outcome: synced, retry, refused
        self.sync_records: Counter[str] = Counter()  # sent (central has them), set_aside
        self.status: StatusServer | None = None

    def start(self) -> None:
        """Raises PackageError, StoreError or OSError on what keeps the agent from running at all."""
        config = self.config
        _prepare_data_dir(config.data_dir)
        scorer = self._scorer(self.package)
        self.store = Store.open(config.data_dir / DATABASE_FILE, synchronous=config.buffer.synchronous,
                                quarantine_cap=config.buffer.quarantine_max_rows,
                                quarantine_max_bytes=config.buffer.quarantine_max_bytes)
        machines = Machines(config.gateway_id, config.summary, config.alarms, scorer.model, self.store.machines())
        configured = [device.machine_id for device in config.modbus] + list(config.mqtt.machines if config.mqtt else ())
        last_seen = {machine_id: r.received_at for machine_id, r in self.store.latest_by_machine().items()}
        self.pipeline = Pipeline(scorer, self.store, config.pipeline, machines, config.buffer.max_db_mb * 2**20,
                                 roster=Roster(config.machines, configured, last_seen))
        self.pipeline.start()
        self.status = StatusServer(self)
        self.status.start()  # before the drivers: a port conflict fails the start before any device is touched
        type_key = scorer.model.manifest.machine_type.name
        if config.mqtt is not None:
            self.drivers.append(MqttDriver(config.mqtt, type_key))
        if config.modbus:
            self.drivers.append(ModbusDriver(config.modbus, type_key))
        if config.opcua:
            from drivers.opcua import OpcuaDriver  # asyncua is the opcua extra's: imported only when configured

            self.drivers.append(OpcuaDriver(config.opcua, type_key))
        for driver in self.drivers:
            driver.start(self.pipeline)
        if config.central.enabled:
            self._start_sync()
        self._scheduler.add_job(self.reload_model_if_changed, "interval", seconds=MODEL_WATCH_S)
        self._scheduler.add_job(self._retention, "interval", seconds=RETENTION_EVERY_S)
        self._scheduler.start()
        model = scorer.model
        log.info("pdm-edge %s started: gateway %s, model %s %s (package digest %s), %d driver(s), data in %s",
                 __version__, config.gateway_id, model.name, model.version, model.package_digest, len(self.drivers),
                 config.data_dir)

    def stop(self) -> bool:
        """Safe to call twice or after a failed start. False if queued readings could not be committed."""
        if self.status is not None:
            self.status.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._stopping.set()
        if self._sync_thread is not None:
            self._sync_thread.join()
            self._sync_thread = None
        for driver in self.drivers:
            driver.stop()
        drained = self.pipeline.stop(STOP_TIMEOUT_S) if self.pipeline else True
        for driver in self.drivers:
            driver.close()
        self.drivers = []
        if self.store is not None:
            self.store.close()
        log.info("pdm-edge stopped%s", "" if drained else "; readings still queued were not acknowledged")
        return drained

    def reload_model(self) -> bool:
        """Swap to the package on disk if it verifies and fits the devices; otherwise keep the running one."""
        with self._reload_lock:
            self._package_stamp = _stamp(self.package)
            running = self.pipeline.scorer.model
            try:
                scorer = self._scorer(self.package)
            except PackageError as exc:
                log.error("model package %s refused, still scoring with %s %s: %s", self.package, running.name,
                          running.version, exc)
                return False
            self.pipeline.swap_scorer(scorer)
            log.info("model reloaded: %s %s, package digest %s (was %s %s, %s)", scorer.model.name,
                     scorer.model.version, scorer.model.package_digest, running.name, running.version,
                     running.package_digest)
            return True

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

    def _start_sync(self) -> None:
        self.sync = SyncClient(self.config.central, self.config.gateway_id, __version__, self.store,
                               self.gateway_status)
        self._sync_thread = threading.Thread(target=self._sync_loop, name="sync", daemon=True)
        self._sync_thread.start()

    def _sync_loop(self) -> None:
        central = Availability(f"central {self.config.central.url}", log)
        while not self._stopping.is_set():
            try:
                result = self.sync.sync_once()
            except StoreError as exc:
                result = Round(Outcome.RETRY, 0, 0, 5.0, str(exc))
            self.sync_rounds[result.outcome.value] += 1
            self.sync_records.update(sent=result.sent, set_aside=result.set_aside)
            if result.outcome is Outcome.SYNCED:
                central.succeeded()
            else:
                central.failed(result.error)
            self._stopping.wait(result.retry_after)
        self.sync.close()

    def gateway_status(self) -> GatewayStatus:
        pending, _ = self.store.outbox_backlog()
        dropped = {kind.removeprefix("dropped_"): n for kind, n in self.store.counters().items()
                   if kind.startswith("dropped_")}
        return GatewayStatus(buffer_pending=pending, dropped_total=sum(dropped.values()), dropped=dropped,
                             uptime_s=time.time() - self.started_at)

    def _retention(self) -> None:
        buffer = self.config.buffer
        deleted = self.store.delete_readings_before(time.time() - buffer.reading_retention_h * 3600)
        forgotten = self.store.delete_synced_before(time.time() - buffer.synced_retention_h * 3600)
        if deleted or forgotten:
            log.info("retention: deleted %d readings older than %g h and %d synced records older than %g h",
                     deleted, buffer.reading_retention_h, forgotten, buffer.synced_retention_h)


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


def _stamp(package: Path) -> tuple:
    """What changes when a package on disk is replaced: the manifest's and the ONNX file's mtime and size."""
    stamp = []
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
    except Exception as exc:  # anything that keeps it from starting: say it in one line, exit 1
        log.error("cannot start: %s", exc)
        agent.stop()
        return 1
    gc.freeze()  # what start-up allocated lives as long as the process: keep full collections from scanning it
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
