"""The gateway's side of the downlink (SPEC §9): apply central's desired state, remember it, report it.

Who calls what: the sync thread hands each desired state central answered with 200 to `offer()` (cheap: it only
records it and wakes this module's thread) and reads `applied()` for every ingest's `gateway` object. The
"downlink" thread applies: download the signed bundle, verify it, install it, swap it in; then the shadow model,
then the configuration overrides. Ingest never waits for any of it: readings go on being scored by the running
model while a bundle downloads, and a bundle that fails any check is refused and reported (`Applied.error`) while
the running model stays.

Atomicity. A bundle is verified in memory, written into `models/.tmp-*`, fsynced, and the folder renamed to its
final name; only then is it loaded, and only once it is serving does `state.json` (written to a temporary file,
fsynced, renamed) name it. A kill -9 at any moment leaves `state.json` naming a complete, verified folder (or none:
the configured model); leftover temporary folders are removed at the next start. On start the folder named is
verified again (signature and hash) before it is loaded; if that fails, the configured model serves.

A desired state whose bundle cannot be fetched (central or the network is down) is retried every RETRY_S; one that
is refused (signature, hash, a model that does not fit the devices, invalid overrides) is recorded as applied with
its error and not retried until central sends a new revision.

Test hook: PDM_FAULT_DOWNLINK_PAUSE_S=<seconds> pauses before each step (downloading, verifying, swapping) and
logs the step, so a fault-injection test can kill -9 the agent inside it. Never set it in production.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from model.bundle import BundleError, read_bundle, verify_installed, write_package
from model.manifest import PackageError
from model.package import Model
from sync.desired import Acknowledgement, Applied, BundleRef, DesiredState
from sync.outbox import FetchError
from sync.protocol import ModelRef, escape_controls
from sync.remote import AT_NEXT_START, OverrideError, apply

log = logging.getLogger(__name__)

FOLDER = "downlink"
STATE_FILE = "state.json"
RETRY_S = 30.0
FAULT_PAUSE_ENV = "PDM_FAULT_DOWNLINK_PAUSE_S"


@dataclass(frozen=True)
class DownlinkStats:
    applied: Applied  # what this gateway runs of central's desired state
    overrides: dict[str, Any]  # central's configuration overrides in force (the file holds the rest)


class Target(Protocol):
    """What the downlink changes (agent.service.Agent)."""

    def use_live(self, package: Path | None) -> Model: ...  # None: the configured package; PackageError if refused

    def use_shadow(self, package: Path | None) -> Model | None: ...  # None: stop shadow scoring

    def reconfigure(self, sections: Mapping[str, BaseModel]) -> None: ...

    def live_model(self) -> Model: ...


@dataclass
class State:
    """What state.json holds: the last desired state applied, and the folders it installed."""

    revision: int = 0
    live: str | None = None  # folder name under models/; None: the configured package
    shadow: str | None = None
    config_revision: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            data = json.loads(path.read_text())
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError) as exc:
            log.error("downlink: %s cannot be read (%s); starting from the configured model", path, exc)
            return cls()

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        with open(tmp, "w") as f:
            json.dump(self.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_name(ref: BundleRef) -> str:
    return f"{ref.name}-{ref.version}-{ref.sha256[:12]}"


def same(model: Model | None, ref: BundleRef | None) -> bool:
    if model is None or ref is None:
        return model is None and ref is None
    return (model.name, model.version, model.sha256) == (ref.name, ref.version, ref.sha256)


def model_ref(model: Model | None) -> ModelRef | None:
    if model is None:
        return None
    return ModelRef(name=model.name, version=model.version, sha256=model.sha256,
                    package_digest=model.package_digest or None)


class Downlink:
    def __init__(self, data_dir: Path, trusted: Mapping[str, Any], fetch: Callable[[str], bytes], pinned: bool,
                 base: Mapping[str, BaseModel],
                 acknowledgements: Callable[[Sequence[Acknowledgement]], None] | None = None) -> None:
        """`base`: the file's remotely configurable sections (name -> model); `fetch(path)`: a bundle's bytes from
        central, FetchError when it cannot be had now."""
        self.folder = data_dir / FOLDER
        self.models = self.folder / "models"
        self.models.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state_path = self.folder / STATE_FILE
        self.state = State.load(self._state_path)
        self._trusted = trusted
        self._fetch = fetch
        self._pinned = pinned
        self._base = base
        self._acknowledgements = acknowledgements
        self._target: Target | None = None
        self._shadow: Model | None = None
        self._desired: DesiredState | None = None
        self._done = self.state.revision  # the revision applied or refused; a fetch that failed leaves it behind
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="downlink", daemon=True)
        pause = os.environ.get(FAULT_PAUSE_ENV)
        self._pause = float(pause) if pause else 0.0
        self._remove_leftovers()

    # --- at start, before the pipeline (agent.service) ---
    def installed_live(self) -> Path | None:
        """The live package state.json names, verified again; None for the configured package."""
        return self._verified(self.state.live)

    def installed_shadow(self) -> Path | None:
        return self._verified(self.state.shadow)

    def start_overrides(self) -> dict[str, BaseModel]:
        """The sections as the remembered overrides make them (summary.window_s included); the file's when none."""
        try:
            return apply(self.state.overrides, self._base)
        except OverrideError as exc:
            log.error("downlink: remembered overrides refused, using the file's values: %s", exc)
            return {}

    def _verified(self, name: str | None) -> Path | None:
        if name is None:
            return None
        folder = self.models / name
        try:
            verify_installed(folder, self._trusted)
        except PackageError as exc:
            log.error("downlink: installed package %s no longer verifies, using the configured model: %s", name, exc)
            return None
        return folder

    def _remove_leftovers(self) -> None:
        for leftover in self.models.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.folder.glob(f".{STATE_FILE}.*"):
            leftover.unlink(missing_ok=True)

    # --- the sync thread ---
    def offer(self, desired: DesiredState) -> None:
        with self._lock:
            self._desired = desired
        self._wake.set()

    def applied(self) -> Applied:
        target, state = self._target, self.state
        live = target.live_model() if target is not None else None
        return Applied(revision=state.revision, live_model=model_ref(live), shadow_model=model_ref(self._shadow),
                       config_revision=state.config_revision, error=state.error)

    def stats(self) -> DownlinkStats:
        """For the status API (any thread)."""
        return DownlinkStats(self.applied(), dict(self.state.overrides))

    # --- lifecycle (agent.service) ---
    def start(self, target: Target, shadow: Model | None) -> None:
        self._target, self._shadow = target, shadow
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    # --- the downlink thread ---
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(RETRY_S)
            self._wake.clear()
            with self._lock:
                desired = self._desired
            if desired is None or self._stopping.is_set():
                continue
            if desired.revision == self._done:
                continue
            try:
                self._apply(desired)
            except FetchError as exc:
                log.warning("downlink: desired state %d not applied yet, retrying in %.0f s: %s", desired.revision,
                            RETRY_S, exc)
                self.state.error = _one_line(f"cannot fetch a bundle yet: {exc}")
            except Exception:  # a bug: the agent goes on with what it runs; the next revision is tried again
                log.exception("downlink: applying desired state %d failed unexpectedly", desired.revision)

    def _apply(self, desired: DesiredState) -> None:
        target = self._target
        if target is None:
            return
        errors: list[str] = []
        state = self.state
        live, shadow = state.live, state.shadow
        if self._pinned and (desired.model is not None or desired.shadow is not None):
            errors.append("pinned: this gateway keeps its configured model (model.pinned)")
        else:
            live = self._live(target, desired.model, live, errors)
            shadow = self._shadow_model(target, desired.shadow, shadow, errors)
        config_revision, overrides = state.config_revision, state.overrides
        if desired.config.revision != state.config_revision:
            try:
                sections = apply(desired.config.overrides, self._base)
                target.reconfigure({k: v for k, v in sections.items()})
                config_revision, overrides = desired.config.revision, dict(desired.config.overrides)
                later = [key for key in desired.config.overrides if key in AT_NEXT_START]
                if later:
                    log.info("downlink: %s applies at the agent's next start", ", ".join(later))
            except OverrideError as exc:
                errors.append(f"config revision {desired.config.revision} refused: {exc}")
        if desired.acknowledgements and self._acknowledgements is not None:
            self._acknowledgements(desired.acknowledgements)
        error = _one_line("; ".join(errors)) if errors else None
        self.state = State(desired.revision, live, shadow, config_revision, overrides, error)
        self.state.save(self._state_path)
        self._done = desired.revision
        if error:
            log.error("desired state %d applied with errors: %s", desired.revision, error)
        else:
            log.info("desired state %d applied: live %s, shadow %s, config revision %d", desired.revision,
                     _name(target.live_model()), _name(self._shadow), config_revision)

    def _live(self, target: Target, ref: BundleRef | None, current: str | None, errors: list[str]) -> str | None:
        if same(target.live_model(), ref) or (ref is None and current is None):
            return _installed_name(self.models, ref, current)
        try:
            folder = self._install(ref) if ref is not None else None
            self._step("swapping", ref)
            target.use_live(folder)
        except PackageError as exc:
            errors.append(f"live model {_ref_name(ref)} refused: {exc}")
            return current
        return folder.name if folder is not None else None

    def _shadow_model(self, target: Target, ref: BundleRef | None, current: str | None,
                      errors: list[str]) -> str | None:
        if same(self._shadow, ref):
            return _installed_name(self.models, ref, current)
        try:
            folder = self._install(ref) if ref is not None else None
            self._shadow = target.use_shadow(folder)
        except PackageError as exc:
            errors.append(f"shadow model {_ref_name(ref)} refused: {exc}")
            return current
        return folder.name if folder is not None else None

    def _install(self, ref: BundleRef) -> Path:
        """The verified package folder of `ref`, downloaded unless already installed."""
        final = self.models / folder_name(ref)
        if final.is_dir():
            try:
                verify_installed(final, self._trusted)
                return final
            except PackageError:
                shutil.rmtree(final, ignore_errors=True)
        self._step("downloading", ref)
        data = self._fetch(ref.bundle_url)
        self._step("verifying", ref)
        bundle = read_bundle(data, self._trusted)
        if (bundle.name, bundle.version, bundle.sha256) != (ref.name, ref.version, ref.sha256):
            raise BundleError(f"refused bundle: it holds {bundle.name} {bundle.version} ({bundle.sha256[:12]}), "
                              f"not the {ref.name} {ref.version} ({ref.sha256[:12]}) central named")
        tmp = self.models / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o700)
        write_package(bundle, tmp)
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.models)
        return final

    def _step(self, step: str, ref: BundleRef | None) -> None:
        if self._pause:
            log.warning("downlink fault hook: %s %s, pausing %.1f s", step, _ref_name(ref), self._pause)
            time.sleep(self._pause)


def _installed_name(models: Path, ref: BundleRef | None, current: str | None) -> str | None:
    """The folder already serving `ref`: its own when installed (a retry after a partial apply), else `current`."""
    if ref is not None and (models / folder_name(ref)).is_dir():
        return folder_name(ref)
    return current


def _one_line(text: str) -> str:
    return escape_controls(" ".join(text.split()))[:500]


def _name(model: Model | None) -> str:
    return "none" if model is None else f"{model.name} {model.version}"


def _ref_name(ref: BundleRef | None) -> str:
    return "the configured model" if ref is None else f"{ref.name} {ref.version}"

