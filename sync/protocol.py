"""The sync protocol (SPEC §6): what a gateway posts to `POST /api/v1/ingest`, shared by the agent and central.

Every id is deterministic (UUIDv5 of what identifies the record), so a batch sent twice — after a timeout, a crash
or a restart — is harmless: central stores each summary and event once and counts the rest as duplicates.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    model_validator,
    with_config,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from model.states import StateName as State

NAMESPACE = uuid.UUID("5b0f2f0e-8f53-4c1e-9a53-2b1f6a3c9d10")  # pdm-edge's namespace for UUIDv5 ids
MAX_SUMMARIES = 5_000
MAX_EVENTS = 5_000
MAX_ACTIONS = 1_000
MAX_DROPPED_KINDS = 16  # the agent drops readings and summaries; the bound keeps a status object small

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Health = Annotated[float, Field(ge=0.0, le=100.0)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]  # per summary: PostgreSQL's integer
Total = Annotated[int, Field(ge=0)]  # gateway-wide totals, kept as JSON: no upper bound


# What a terminal or a page would obey rather than show: C0 and C1 controls with DEL, line and paragraph separators,
# and the format characters of the Basic Multilingual Plane (bidi overrides, zero-width characters, the soft hyphen).
# One rule, written as a pattern so every API documents exactly what it enforces; outside the BMP only Unicode's
# tag and notation characters are "format" (a flag emoji uses tags), and nothing there moves a cursor or text.
_UNSAFE_FORMAT = (r"\u007f-\u009f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
                  r"\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb")
UNSAFE_CHARACTERS = r"\u0000-\u001f" + _UNSAFE_FORMAT
PRINTABLE = f"^[^{UNSAFE_CHARACTERS}]*$"
_PRINTABLE = re.compile(f"[^{UNSAFE_CHARACTERS}]*")
# A note of several lines (central's alarm notes): the same rule, with tabs and line feeds allowed.
PRINTABLE_LINES = rf"^[^\u0000-\u0008\u000b-\u001f{_UNSAFE_FORMAT}]*$"


def require_printable(text: str) -> str:
    """Free text is shown on terminals (`pdm-central list-gateways`) and pages: no control or format characters
    (ESC sequences rewrite lines and window titles, bidi overrides reorder what is shown), no line breaks."""
    if text.isascii() and text.isprintable():  # the usual case, without the pattern: ASCII's unsafe are \0-\x1f, \x7f
        return text
    if not _PRINTABLE.fullmatch(text):
        raise PydanticCustomError("printable_text", "must be printable text: no control characters, line breaks or "
                                  "invisible format characters")
    return text


class _DocumentedAs:
    """Documents the pattern require_printable enforces (its own error names the rule, a pattern's would not)."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), "pattern": PRINTABLE}


Printable = Annotated[str, AfterValidator(require_printable), _DocumentedAs()]
# The length first: checked by pydantic-core itself (after a Python validator it would be a Python check too).
Text = Annotated[str, StringConstraints(max_length=200), AfterValidator(require_printable), _DocumentedAs()]


def escape_controls(text: str) -> str:
    """`text` with every non-printable character shown as a Python escape (\\x1b, \\n, \\u202e): safe to print on a
    terminal, whatever a gateway or central sent before the protocol refused it."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ModelRef(_Strict):
    name: Text
    version: Text
    sha256: Sha256  # the ONNX file's
    # The whole package's, manifest included (model/package.py). Optional: records an older agent buffered before
    # it was upgraded still validate.
    package_digest: Sha256 | None = None


@with_config(ConfigDict(extra="forbid", allow_inf_nan=False))
class Spread(TypedDict):
    """An input's range over a window. A dict, not a model: a summary has one per input, and validating them as
    models was a third of central's validation of a batch."""

    min: float
    mean: float
    max: float


class ShadowFigures(_Strict):
    """A candidate model scored in shadow beside the live one over a summary's readings (the live model decided)."""

    model: ModelRef
    readings: Count  # scored by both
    agreed: Count  # of those, the candidate's state was the live model's
    live_warning: Count  # readings the live model put in warning
    live_alarm: Count
    warning: Count  # readings the candidate put in warning
    alarm: Count
    out_of_distribution: Count  # outside the candidate's training range
    score_s: Annotated[float, Field(ge=0)]  # the candidate's scoring time for these readings


class Summary(_Strict):
    """One machine over one window: [window_start, window_end)."""

    summary_id: uuid.UUID
    machine_id: Name
    window_start: AwareDatetime
    window_end: AwareDatetime
    model: ModelRef
    readings: Count  # scored in the window
    rejected: Count
    out_of_distribution: Count
    health_min: Health
    health_mean: Health
    health_last: Health
    p_failure_max: Probability
    p_failure_mean: Probability
    mode_risk_max: dict[Name, Probability]
    worst_state: State
    inputs: dict[Name, Spread]
    shadow: ShadowFigures | None = None  # a candidate scored in shadow (SPEC §9); absent when none


class Event(_Strict):
    """A machine's state changed (after the hysteresis): the reading that did it and the dominant failure mode."""

    event_id: uuid.UUID
    machine_id: Name
    ts: AwareDatetime
    from_state: State
    to_state: State
    p_failure: Probability
    health: Health
    dominant_mode: Name
    mode_risk: dict[Name, Probability]
    reading: dict[Name, float]
    model: ModelRef


ErrorText = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")]
Revision = Annotated[int, Field(ge=0, le=2**62)]


class Applied(_Strict):
    """What the gateway runs of central's desired state (SPEC §9, sync/desired.py): in every ingest."""

    revision: Revision  # the desired state's revision last applied (or refused: see error)
    live_model: ModelRef | None = None
    shadow_model: ModelRef | None = None
    config_revision: Revision = 0
    error: ErrorText | None = None  # why the last desired state could not be applied in full; None: it was


class GatewayStatus(_Strict):
    buffer_pending: Total  # summaries and events not yet accepted by central
    dropped_total: Total  # everything the buffer cap ever forced the agent to delete unsynced
    dropped: Annotated[dict[Name, Total], Field(max_length=MAX_DROPPED_KINDS)] = {}  # the same, by kind
    uptime_s: Annotated[float, Field(ge=0)]
    applied: Applied | None = None  # what the gateway runs of central's desired state (SPEC §9)


class _Action(_Strict):
    """What a technician did about an alarm episode at the gateway (SPEC §10). The episode is named by the event
    that opened it (its id and time), which both ends know: central finds its episode from that event."""

    action_id: uuid.UUID  # deterministic: `action_id()`; central applies each id once
    episode_id: uuid.UUID  # the event_id of the event that opened the episode
    machine_id: Name
    opened_at: AwareDatetime  # that event's ts
    at: AwareDatetime  # when the technician acted, by the gateway's clock
    by: Text | None = None  # the name the technician gave, if any
    client: Text | None = None  # the address the technician's browser came from, as the gateway saw it


class Acknowledgement(_Action):
    action: Literal["acknowledge"]
    note: Text | None = None


LabelName = Literal["failure", "false_alarm", "unsure"]


class Label(_Action):
    action: Literal["label"]
    label: LabelName
    mode: Name | None = None  # the failure mode, for `failure` only (and required there)

    @model_validator(mode="after")
    def _mode_with_failure(self) -> Label:
        if (self.label == "failure") != (self.mode is not None):
            raise ValueError("a failure label names its mode; false_alarm and unsure name none")
        return self


GatewayAction = Annotated[Acknowledgement | Label, Field(discriminator="action")]


class IngestBatch(_Strict):
    gateway_id: Name
    batch_id: uuid.UUID
    sent_at: AwareDatetime
    agent_version: Text
    summaries: Annotated[list[Summary], Field(max_length=MAX_SUMMARIES)] = []
    events: Annotated[list[Event], Field(max_length=MAX_EVENTS)] = []
    # Gateway-side actions on alarm episodes. The agent sends the key only when it has actions: a central older than
    # them refuses it (422, extra_forbidden) and the agent keeps its actions for later.
    actions: Annotated[list[GatewayAction], Field(max_length=MAX_ACTIONS)] = []
    gateway: GatewayStatus


class Counts(_Strict):
    summaries: Count = 0
    events: Count = 0


class ActionResult(_Strict):
    accepted: Count = 0  # applied now
    duplicates: Count = 0  # applied before: sent again
    # Of episodes central does not know yet (their opening event has not reached it): the gateway keeps them and
    # sends them again later.
    unknown: Annotated[list[uuid.UUID], Field(max_length=MAX_ACTIONS)] = []


class IngestResult(_Strict):
    accepted: Counts  # newly stored
    duplicates: Counts  # already stored: sent again, ignored
    # Only when the batch carried actions (an older agent's strict model would refuse an answer with this key).
    actions: ActionResult | None = None


def summary_id(gateway_id: str, machine_id: str, window_start: datetime) -> uuid.UUID:
    """The same instant gives the same id whatever its UTC offset."""
    return uuid.uuid5(NAMESPACE, f"summary/{gateway_id}/{machine_id}/{window_start.astimezone(UTC).isoformat()}")


def event_id(gateway_id: str, machine_id: str, ts: datetime, to_state: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"event/{gateway_id}/{machine_id}/{ts.astimezone(UTC).isoformat()}/{to_state}")


def action_id(gateway_id: str, episode_id: uuid.UUID, action: str, sequence: int = 0) -> uuid.UUID:
    """An acknowledgement is one per episode (sequence 0); a label is told apart by when it was given (`sequence`:
    its time in microseconds), so a label given after the gateway forgot the earlier ones still gets a new id."""
    return uuid.uuid5(NAMESPACE, f"action/{gateway_id}/{episode_id}/{action}/{sequence}")
