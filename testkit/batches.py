"""Ingest batches as a gateway would send them (SPEC §6): JSON-able dicts, valid unless a test spoils them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sync import protocol

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
MODEL = {"name": "ai4i-gbt", "version": "1.0.0", "sha256": "ab" * 32}


def summary(gateway_id: str, machine_id: str = "press-01", minute: int = 0, state: str = "ok",
            p_failure_max: float = 0.02, t0: datetime = T0, **overrides) -> dict:
    start = t0 + timedelta(minutes=minute)
    item = {
        "summary_id": str(protocol.summary_id(gateway_id, machine_id, start)),
        "machine_id": machine_id,
        "window_start": start.isoformat(),
        "window_end": (start + timedelta(minutes=1)).isoformat(),
        "model": MODEL,
        "readings": 60,
        "rejected": 1,
        "out_of_distribution": 2,
        "health_min": 81.5,
        "health_mean": 90.25,
        "health_last": 92.0,
        "p_failure_max": p_failure_max,
        "p_failure_mean": p_failure_max / 2,
        "mode_risk_max": {"TWF": 0.01, "HDF": 0.002, "PWF": 0.0, "OSF": p_failure_max},
        "worst_state": state,
        "inputs": {"air_temperature": {"min": 298.1, "mean": 298.4, "max": 298.9},
                   "torque": {"min": 38.5, "mean": 40.1, "max": 44.75}},
    }
    item.update(overrides)
    return item


def event(gateway_id: str, machine_id: str = "press-01", minute: int = 0, to_state: str = "warning",
          from_state: str = "ok", t0: datetime = T0, **overrides) -> dict:
    ts = t0 + timedelta(minutes=minute, seconds=30)
    item = {
        "event_id": str(protocol.event_id(gateway_id, machine_id, ts, to_state)),
        "machine_id": machine_id,
        "ts": ts.isoformat(),
        "from_state": from_state,
        "to_state": to_state,
        "p_failure": 0.41,
        "health": 58.5,
        "dominant_mode": "OSF",
        "mode_risk": {"TWF": 0.01, "HDF": 0.02, "PWF": 0.03, "OSF": 0.41},
        "reading": {"air_temperature": 298.7, "torque": 61.25, "tool_wear": 212.0},
        "model": MODEL,
    }
    item.update(overrides)
    return item


def batch(gateway_id: str, summaries: list[dict] | None = None, events: list[dict] | None = None,
          **overrides) -> dict:
    item = {
        "gateway_id": gateway_id,
        "batch_id": str(uuid.uuid4()),
        "sent_at": datetime.now(UTC).isoformat(),
        "agent_version": "0.1.0",
        "summaries": summaries if summaries is not None else [summary(gateway_id, minute=m) for m in range(3)],
        "events": events if events is not None else [event(gateway_id)],
        "gateway": {"buffer_pending": 12, "dropped_total": 0, "dropped": {}, "uptime_s": 3600.5},
    }
    item.update(overrides)
    return item


def many(gateway_id: str, machines: int, windows: int, first_minute: int = 0) -> list[dict]:
    """Summaries of `machines` machines over `windows` consecutive minutes."""
    return [summary(gateway_id, f"m-{m:03d}", first_minute + w) for m in range(machines) for w in range(windows)]
