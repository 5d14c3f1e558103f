"""/api/v1/status and /readyz from an `AgentSnapshot`: the gateway, its model, buffer, sync, pipeline and drivers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from agent import __version__
from agent.snapshot import AgentSnapshot
from agent.status.guard import ApiError
from agent.status.models import (
    BufferInfo,
    DeviceInfo,
    DownlinkInfo,
    DriverInfo,
    GatewayInfo,
    Health,
    ModelInfo,
    PipelineInfo,
    ReadingCounts,
    SyncInfo,
)
from drivers.base import DriverStats
from model.package import Model
from model.states import STATES


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def at_or_none(epoch: float | None) -> datetime | None:
    return None if epoch is None else at(epoch)


def ready(snap: AgentSnapshot) -> Health:
    """Health(ready) when every check passes; ApiError 503 naming the failing ones otherwise."""
    checks = snap.readiness()
    failing = [{"check": c.name, "message": c.why_not} for c in checks if not c.passed]
    if failing:
        raise ApiError(503, "not_ready", "not ready: " + "; ".join(f"{f['check']}: {f['message']}" for f in failing),
                       failing)
    return Health(status="ready", checks={c.name: c.passed for c in checks})


def gateway_info(snap: AgentSnapshot) -> GatewayInfo:
    config, now = snap.config, snap.taken_at
    buffer, pipeline, sync = snap.buffer, snap.pipeline, snap.sync
    counters, oldest = buffer.counters, buffer.oldest_pending_at
    states = {state.value: 0 for state in STATES}
    for state in snap.alarm_states.values():
        states[state] += 1
    last_success = sync.last_success if sync else None
    return GatewayInfo(
        gateway_id=config.gateway_id, agent_version=__version__, now=at(now), started_at=at(snap.started_at),
        uptime_s=round(now - snap.started_at, 3), model=model_info(snap.model), machines=states,
        buffer=BufferInfo(pending=buffer.pending, oldest_pending_at=at_or_none(oldest),
                          oldest_pending_age_s=None if oldest is None else round(max(0.0, now - oldest), 3),
                          used_bytes=buffer.used_bytes, max_bytes=buffer.max_bytes,
                          disk_free_bytes=buffer.disk_free_bytes, dropped=dict(counters.dropped),
                          dropped_total=counters.dropped_total),
        readings=ReadingCounts(accepted=counters.readings_accepted, duplicate=counters.readings_duplicate,
                               rejected=dict(counters.rejected), rejected_total=counters.rejected_total,
                               quarantine_evicted=counters.quarantine_evicted),
        downlink=None if snap.downlink is None else DownlinkInfo(applied=snap.downlink.applied,
                                                                 overrides=snap.downlink.overrides),
        sync=SyncInfo(enabled=config.central.enabled, url=str(config.central.url) if config.central.url else None,
                      last_success=last_success,
                      last_success_age_s=round(now - last_success.timestamp(), 3) if last_success else None,
                      last_error=sync.last_error if sync else None, set_aside=dict(counters.set_aside),
                      actions_error=sync.actions_error if sync else None),
        pipeline=PipelineInfo(queue_depth=pipeline.queue_depth, queue_max=pipeline.queue_max,
                              batches=pipeline.batches, errors=pipeline.errors,
                              last_commit_age_s=None if pipeline.last_commit_age_s is None
                              else round(pipeline.last_commit_age_s, 3),
                              database_up=pipeline.database_up, database_failures=pipeline.database_failures,
                              database_last_error=pipeline.database_last_error),
        drivers=[driver_info(driver) for driver in snap.drivers],
    )


def model_info(model: Model) -> ModelInfo:
    manifest = model.manifest
    points = dict(manifest.health.points)
    return ModelInfo(name=model.name, version=model.version, sha256=model.sha256,
                     package_digest=model.package_digest, package=str(model.package),
                     modes=list(manifest.outputs.modes), health_at_warning=points[manifest.thresholds.warning],
                     health_at_alarm=points[manifest.thresholds.alarm])


def driver_info(stats: DriverStats) -> DriverInfo:
    devices = [DeviceInfo(device=d.device, connected=d.connected, errors=sum(d.errors.values()),
                          last_error=d.last_error) for d in stats.devices]
    details = json.loads(json.dumps(stats.details, default=str))  # JSON-able, whatever a driver puts in it
    return DriverInfo(name=stats.name, connected=stats.connected, errors=dict(stats.errors),
                      last_error=stats.last_error, devices=devices, details=details)
