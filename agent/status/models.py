"""The status API's response models: what its OpenAPI document describes (the status schema tests hold it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from sync.protocol import Applied
from web.http import ErrorBody, ErrorResponse

__all__ = ["ErrorBody", "ErrorResponse"]  # the error envelope, web/http.py's: documented on every route


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = {}


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str  # the ONNX file's
    package_digest: str  # the whole package's, manifest included (README: the model package)
    package: str
    modes: list[str]
    health_at_warning: float  # health at the warning threshold: below it a reading is in warning
    health_at_alarm: float


class BufferInfo(BaseModel):
    pending: int  # summaries and events central has not accepted yet
    oldest_pending_at: datetime | None
    oldest_pending_age_s: float | None
    used_bytes: int
    max_bytes: int
    disk_free_bytes: int | None
    dropped: dict[str, int]  # what the buffer cap forced out unsynced, by kind
    dropped_total: int


class ReadingCounts(BaseModel):
    accepted: int
    duplicate: int
    rejected: dict[str, int]  # by reason
    rejected_total: int
    quarantine_evicted: int


class SyncInfo(BaseModel):
    enabled: bool
    url: str | None
    last_success: datetime | None
    last_success_age_s: float | None
    last_error: str | None  # the latest failure, kept after later successes: compare with last_success
    set_aside: dict[str, int]  # records central refused as invalid, by kind
    actions_error: str | None = None  # why acknowledgements and labels are kept back (a central older than them)


class PipelineInfo(BaseModel):
    queue_depth: int
    queue_max: int
    batches: int
    errors: int
    last_commit_age_s: float | None
    database_up: bool
    database_failures: int
    database_last_error: str | None


class DeviceInfo(BaseModel):
    device: str
    connected: bool
    errors: int
    last_error: str | None


class DriverInfo(BaseModel):
    name: str
    connected: bool | None  # every device or the broker connection is up; None: unknown
    errors: dict[str, int]  # error counters since start, by kind
    last_error: str | None
    devices: list[DeviceInfo] = []  # per device, for drivers that poll devices
    details: dict[str, Any] = {}  # the driver's own status, as it reports it


class DownlinkInfo(BaseModel):
    """Central's desired state as this gateway applied it (SPEC §9)."""

    applied: Applied
    overrides: dict[str, Any]  # central's configuration overrides in force; the file holds the rest


class GatewayInfo(BaseModel):
    gateway_id: str
    agent_version: str
    now: datetime
    started_at: datetime
    uptime_s: float
    model: ModelInfo
    machines: dict[str, int]  # machines by state
    buffer: BufferInfo
    readings: ReadingCounts
    sync: SyncInfo
    pipeline: PipelineInfo
    drivers: list[DriverInfo]
    downlink: DownlinkInfo | None = None  # None: sync to central is off


class ModeRisk(BaseModel):
    mode: str
    label: str
    meaning: str
    advice: str
    risk: float
    threshold: float | None  # the model's threshold for this mode
    elevated: bool  # risk at or above the threshold


class MachineInfo(BaseModel):
    machine_id: str
    machine_type: str
    state: str  # the alarm state, after the hysteresis: what events report
    reading_state: str  # the latest reading's own state
    health: float  # health, p_failure, dominant and risk: of the reading that holds the state (agent/alarms.py)
    reading_health: float  # the latest reading's own health
    p_failure: float
    dominant: ModeRisk | None  # the mode with the highest risk
    risk: dict[str, float]
    ood: list[str]  # inputs of the latest reading outside the training range
    values: dict[str, float]
    last_reading_at: datetime  # when it was measured
    last_received_at: datetime
    last_reading_age_s: float  # since it was received
    model_version: str
    trend: list[float] = []  # health of the latest readings (to 0.1), oldest first


class InputValue(BaseModel):
    name: str
    unit: str
    description: str
    value: float | None
    training_min: float
    training_max: float
    physical_min: float
    physical_max: float
    ood: bool


class HistoryPoint(BaseModel):
    ts: datetime
    health: float
    p_failure: float
    state: str


class EventInfo(BaseModel):
    event_id: str
    machine_id: str
    ts: datetime
    from_state: str
    to_state: str
    health: float
    p_failure: float
    dominant_mode: str
    dominant_label: str
    mode_risk: dict[str, float]
    reading: dict[str, float]
    model_version: str
    synced: bool  # central has it


class MachineDetail(MachineInfo):
    inputs: list[InputValue]
    modes: list[ModeRisk]
    history: list[HistoryPoint]
    events: list[EventInfo]


class MachineList(BaseModel):
    now: datetime
    machines: list[MachineInfo]


class EventList(BaseModel):
    events: list[EventInfo]


class AlarmInfo(BaseModel):
    """An alarm episode of a machine (SPEC §10), named by the event that opened it, as central names it too."""

    episode_id: str  # the event_id of the event that opened it
    machine_id: str
    open: bool
    state: str  # the machine's state now: warning or alarm while open, ok once closed
    opened_at: datetime
    closed_at: datetime | None  # the machine's return to ok
    age_s: float  # since it opened: to now while open, to its close once closed
    health: float | None  # of the reading that holds the state (agent/alarms.py)
    dominant: ModeRisk | None  # the mode with the highest risk
    acknowledged_at: datetime | None
    acknowledged_by: str | None  # the name given, if any
    acknowledged_where: Literal["gateway", "central"] | None
    label: Literal["failure", "false_alarm", "unsure"] | None  # the latest label given at this gateway
    label_mode: str | None  # of a failure
    labelled_at: datetime | None
    labelled_by: str | None
    pending_sync: int  # acknowledgements and labels central has not taken yet


class ModeChoice(BaseModel):
    mode: str
    label: str  # in the shop floor's words


class AlarmList(BaseModel):
    now: datetime
    alarms: list[AlarmInfo]  # open ones, the worst first, then the oldest
    closed: list[AlarmInfo]  # recently closed ones (still labelled here after the repair), the latest closed first
    modes: list[ModeChoice]  # the failure modes a `failure` label may name: the model's
    actions_pending: int  # acknowledgements and labels of this gateway central has not taken yet
    actions_error: str | None  # why they are kept back (a central older than them), if they are
    can_act: bool  # acknowledging and labelling are on: status.token is set

