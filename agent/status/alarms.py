"""The open alarm episodes of this gateway's machines, and what a technician does about them (SPEC §10):
  GET  /api/v1/alarms                            open episodes, the worst first, then the oldest; and recently closed
                                                 ones (to label after the repair), the latest closed first
  POST /api/v1/alarms/{episode_id}/acknowledge   {by?, note?}: the first acknowledgement stands (here or at central)
  POST /api/v1/alarms/{episode_id}/label         {label: failure, mode} | {label: false_alarm|unsure}, by?
An episode is named by the event that opened it (`episode_id`), as central's episode holds it. The POSTs answer the
episode as it is now; acting again the same way changes nothing (200 all the same). They need `status.token`
(the guard checks the bearer token before any route): without one the API is loopback-only and unauthenticated, and
any web page the gateway's browser opens could post to it, so acknowledging and labelling are off (403).
What is recorded goes to agent/actions.py's outbox, and up with the sync to central, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Body, FastAPI, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from agent.actions import EpisodeActions, EpisodeRef
from agent.alarms import saved_alarm
from agent.config import StatusConfig
from agent.snapshot import AgentSnapshot
from agent.status.gateway import at, at_or_none
from agent.status.guard import ERRORS, ApiError, documented
from agent.status.machines import mode_risk
from agent.status.models import AlarmInfo, AlarmList, ModeChoice
from model.modes import mode_words
from sync.protocol import Printable

API = "/api/v1"
EpisodeId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
                                 description="the event_id of the event that opened the episode")]
# As central's free text (sync.protocol.Text): no control or format characters (C1 escapes, bidi overrides), which
# central would refuse and a terminal would obey.
Person = Annotated[Printable, Field(min_length=1, max_length=100)]
Note = Annotated[Printable, Field(min_length=1, max_length=200)]
Mode = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")]
ACTED = {**ERRORS, **documented(403)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Person | None = None  # the technician, as they name themselves


class Acknowledge(_Body):
    note: Note | None = None


class FailureLabel(_Body):
    label: Literal["failure"]  # a confirmed failure, of this mode
    mode: Mode


class OtherLabel(_Body):
    label: Literal["false_alarm", "unsure"]


Label = Annotated[FailureLabel | OtherLabel, Body(discriminator="label")]


def routes(app: FastAPI, read: Callable[[], AgentSnapshot], status: StatusConfig) -> None:
    can_act = status.token is not None

    @app.get(f"{API}/alarms", response_model=AlarmList, responses=ERRORS, tags=["alarms"])
    def alarms() -> AlarmList:
        """The open alarm episodes of this gateway's machines, with their acknowledgement and label."""
        snap = read()
        episodes, closed = snap.open_episodes, snap.closed_episodes
        done = snap.actions.of_episodes([e.ref.episode_id for e in episodes] + [e.ref.episode_id for e in closed])
        sync = snap.sync
        return AlarmList(now=at(snap.taken_at), can_act=can_act, actions_pending=snap.actions.pending_count(),
                         actions_error=sync.actions_error if sync else None,
                         modes=[ModeChoice(mode=m, label=mode_words(m)["label"])
                                for m in snap.model.manifest.outputs.modes],
                         alarms=[_info(snap, e.ref, e.state, done.get(e.ref.episode_id)) for e in episodes],
                         closed=[_info(snap, e.ref, "ok", done.get(e.ref.episode_id), e.closed_at) for e in closed])

    @app.post(f"{API}/alarms/{{episode_id}}/acknowledge", response_model=AlarmInfo, responses=ACTED,
              tags=["alarms"])
    def acknowledge(request: Request, episode_id: EpisodeId, body: Acknowledge | None = None) -> AlarmInfo:
        """Acknowledge the episode ("seen, on it"): the first acknowledgement stands, here or at central."""
        snap, ref, state, closed_at = _episode(read, episode_id, can_act)
        given = body or Acknowledge()
        snap.actions.acknowledge(ref, time.time(), given.by, given.note, _client(request))
        return _info(snap, ref, state, snap.actions.of_episodes([episode_id]).get(episode_id), closed_at)

    @app.post(f"{API}/alarms/{{episode_id}}/label", response_model=AlarmInfo, responses=ACTED, tags=["alarms"])
    def label(request: Request, episode_id: EpisodeId, body: Label) -> AlarmInfo:
        """Say what the alarm was: a failure (of which mode), a false alarm, or unsure. The latest label stands."""
        snap, ref, state, closed_at = _episode(read, episode_id, can_act)
        mode = body.mode if isinstance(body, FailureLabel) else None
        modes = snap.model.manifest.outputs.modes if mode is not None else ()
        if mode is not None and mode not in modes:
            raise ApiError(422, "invalid_request", f"mode {mode!r} is not one of the model's: {', '.join(modes)}")
        snap.actions.label(ref, body.label, mode, time.time(), body.by, _client(request))
        return _info(snap, ref, state, snap.actions.of_episodes([episode_id]).get(episode_id), closed_at)


def _episode(read: Callable[[], AgentSnapshot], episode_id: str,
             can_act: bool) -> tuple[AgentSnapshot, EpisodeRef, str, float | None]:
    """The snapshot, the episode and the machine's state now (ok once the episode closed); 403 without a token,
    404 for an episode this gateway does not know (or no longer: retention forgot its event)."""
    if not can_act:
        raise ApiError(403, "forbidden", "acknowledging and labelling need status.token: set it in [status] and "
                                         "give it on the page")
    snap = read()
    for episode in snap.open_episodes:
        if episode.ref.episode_id == episode_id:
            return snap, episode.ref, episode.state, None
    for closed in snap.closed_episodes:
        if closed.ref.episode_id == episode_id:
            return snap, closed.ref, "ok", closed.closed_at
    ref = snap.actions.find(episode_id)
    if ref is None:
        raise ApiError(404, "not_found", f"no alarm episode {episode_id} on this gateway (or its event is no "
                                         "longer kept)")
    return snap, ref, "ok", None


def _info(snap: AgentSnapshot, ref: EpisodeRef, state: str, done: EpisodeActions | None,
          closed_at: float | None = None) -> AlarmInfo:
    done = done or EpisodeActions()
    is_open = state != "ok"
    shown = (saved_alarm(snap.saved_alarms.get(ref.machine_id)) or {}).get("shown") if is_open else None
    health = dominant = None
    if isinstance(shown, dict) and isinstance(shown.get("risk"), dict) and shown["risk"]:
        risk: dict[str, float] = shown["risk"]
        top = max(risk, key=risk.__getitem__)
        health, dominant = float(shown.get("health", 0.0)), mode_risk(top, risk[top], snap.model)
    return AlarmInfo(
        episode_id=ref.episode_id, machine_id=ref.machine_id, open=is_open, state=state,
        opened_at=at(ref.opened_at), closed_at=at_or_none(closed_at),
        age_s=round(max(0.0, (closed_at or snap.taken_at) - ref.opened_at), 3), health=health,
        dominant=dominant, acknowledged_at=at_or_none(done.acknowledged_at), acknowledged_by=done.acknowledged_by,
        acknowledged_where=done.acknowledged_where, label=done.label, label_mode=done.label_mode,
        labelled_at=at_or_none(done.labelled_at), labelled_by=done.labelled_by, pending_sync=done.pending)


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None
