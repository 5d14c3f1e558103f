"""What technicians do about alarm episodes at this gateway, kept durably until central has it (SPEC §10).

An episode is named by the event that opened it (its `event_id`, which central's episode also holds: see
central/gateway_actions.py). Acknowledging and labelling through the status API write an action here, in the agent's
SQLite, with a deterministic id (sync.protocol.action_id): one acknowledgement per episode, each label by the time it
was given. The sync client sends the pending ones in the ingest body (`actions`) and marks them synced only when
central's answer says it took them, so an action made while central is down, or while a central older than actions
refuses them, is kept and sent later, once. Acknowledgements made at central come down in the desired state and are
kept here too (`central_acknowledgements`), so the technician's page shows them.

Who calls it: the status API's worker threads (record, read) and the sync thread (pending, mark synced), through one
`Store`, whose lock serialises them.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import TypeAdapter, ValidationError

from sync import desired
from sync.protocol import Acknowledgement, GatewayAction, Label, LabelName, action_id

# The store's schema version 6 (agent/store.py applies it).
ACTION_TABLES: tuple[str, ...] = (
    """CREATE TABLE actions (
        id INTEGER PRIMARY KEY,
        action_id TEXT NOT NULL UNIQUE,
        episode_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('acknowledge', 'label')),
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        synced_at REAL
    )""",
    "CREATE INDEX actions_pending ON actions (id) WHERE synced_at IS NULL",
    "CREATE INDEX actions_episode ON actions (episode_id, id)",
    # Acknowledgements made at central, as the desired state last listed them.
    """CREATE TABLE central_acknowledgements (
        episode_id TEXT PRIMARY KEY,
        acknowledged_at REAL NOT NULL,
        acknowledged_by TEXT,
        received_at REAL NOT NULL
    )""",
)
_ACTION = TypeAdapter[GatewayAction](GatewayAction)


class Database(Protocol):
    """agent.store.Store, as far as actions need it."""

    def reading(self, action: str) -> AbstractContextManager[sqlite3.Connection]: ...

    def transaction(self, action: str) -> AbstractContextManager[sqlite3.Connection]: ...


@dataclass(frozen=True, slots=True)
class EpisodeRef:
    """An alarm episode as both ends name it: the event that opened it."""

    episode_id: str  # that event's id
    machine_id: str
    opened_at: float  # that event's ts, epoch seconds


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """A pending action as the sync client sends it (sync.client.ActionRecord)."""

    record_id: str
    body: str  # JSON of sync.protocol.Acknowledgement or Label


@dataclass(slots=True)
class EpisodeActions:
    """What was done about one episode: its acknowledgement (the first, here or at central) and its latest label."""

    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    acknowledged_where: Literal["gateway", "central"] | None = None
    label: LabelName | None = None
    label_mode: str | None = None
    labelled_at: float | None = None
    labelled_by: str | None = None
    pending: int = 0  # actions on it central has not taken yet


class ActionLog:
    def __init__(self, database: Database, gateway_id: str) -> None:
        self._db = database
        self._gateway_id = gateway_id

    def find(self, episode_id: str) -> EpisodeRef | None:
        """The episode that event opened, while the outbox still holds the event (until retention forgets it)."""
        with self._db.reading("looking up an event in") as connection:
            row = connection.execute("SELECT machine_id, at, body FROM outbox WHERE kind = 'event' AND record_id = ?",
                                     (episode_id,)).fetchone()
        if row is None:
            return None
        try:
            opened = json.loads(row[2])["from_state"] == "ok"
        except (ValueError, KeyError, TypeError):
            return None
        return EpisodeRef(episode_id, row[0], row[1]) if opened else None

    def acknowledge(self, episode: EpisodeRef, at: float, by: str | None = None, note: str | None = None,
                    client: str | None = None) -> bool:
        """Record the acknowledgement; False when the episode was already acknowledged (here or at central)."""
        record = Acknowledgement.model_validate(
            {"action": "acknowledge", "note": note, **self._common(episode, "acknowledge", 0, at, by, client)})
        with self._db.transaction("recording an acknowledgement in") as connection:
            if connection.execute("SELECT 1 FROM central_acknowledgements WHERE episode_id = ?",
                                  (episode.episode_id,)).fetchone():
                return False
            return self._insert(connection, episode, record, at)

    def label(self, episode: EpisodeRef, label: LabelName, mode: str | None, at: float, by: str | None = None,
              client: str | None = None) -> bool:
        """Record a label; False when it is the episode's latest label already (a second click changes nothing)."""
        with self._db.transaction("recording a label in") as connection:
            rows = connection.execute("SELECT body FROM actions WHERE episode_id = ? AND kind = 'label' ORDER BY id",
                                      (episode.episode_id,)).fetchall()
            latest = _parse(rows[-1][0]) if rows else None
            if isinstance(latest, Label) and (latest.label, latest.mode) == (label, mode):
                return False
            record = Label.model_validate({"action": "label", "label": label, "mode": mode,
                                           **self._common(episode, "label", round(at * 1e6), at, by, client)})
            return self._insert(connection, episode, record, at)

    def of_episodes(self, episode_ids: Iterable[str]) -> dict[str, EpisodeActions]:
        """What was done about each of these episodes (those with nothing done are left out)."""
        ids = list(episode_ids)
        marks = ",".join("?" * len(ids))
        with self._db.reading("reading actions from") as connection:
            rows = connection.execute(f"SELECT episode_id, body, synced_at FROM actions WHERE episode_id IN ({marks})"
                                      " ORDER BY id", ids).fetchall()
            central = connection.execute(
                "SELECT episode_id, acknowledged_at, acknowledged_by FROM central_acknowledgements"
                f" WHERE episode_id IN ({marks})", ids).fetchall()
        found: dict[str, EpisodeActions] = {}
        for episode_id, body, synced_at in rows:
            done = found.setdefault(episode_id, EpisodeActions())
            done.pending += synced_at is None
            action = _parse(body)
            if isinstance(action, Acknowledgement) and done.acknowledged_at is None:
                done.acknowledged_at, done.acknowledged_by = action.at.timestamp(), action.by
                done.acknowledged_where = "gateway"
            elif isinstance(action, Label):
                done.label, done.label_mode, done.labelled_by = action.label, action.mode, action.by
                done.labelled_at = action.at.timestamp()
        # The first acknowledgement stands: central's when it came first (this gateway's own comes back from central
        # at the same time, and stays this gateway's).
        for episode_id, acknowledged_at, acknowledged_by in central:
            done = found.setdefault(episode_id, EpisodeActions())
            if done.acknowledged_at is None or acknowledged_at < done.acknowledged_at:
                done.acknowledged_at, done.acknowledged_by = acknowledged_at, acknowledged_by
                done.acknowledged_where = "central"
        return found

    # The sync client's side (sync.client.ActionOutbox).

    def pending_actions(self, limit: int) -> list[ActionRecord]:
        """Actions central has not taken yet, oldest first."""
        with self._db.reading("reading pending actions from") as connection:
            rows = connection.execute("SELECT action_id, body FROM actions WHERE synced_at IS NULL ORDER BY id LIMIT ?",
                                      (limit,)).fetchall()
        return [ActionRecord(*row) for row in rows]

    def mark_actions_synced(self, action_ids: Sequence[str], at: float | None = None) -> None:
        at = datetime.now(UTC).timestamp() if at is None else at
        with self._db.transaction("marking synced actions in") as connection:
            connection.executemany("UPDATE actions SET synced_at = ? WHERE action_id = ?",
                                   [(at, action_id) for action_id in action_ids])

    def pending_count(self) -> int:
        with self._db.reading("counting pending actions in") as connection:
            count: int = connection.execute("SELECT count(*) FROM actions WHERE synced_at IS NULL").fetchone()[0]
        return count

    def central_acknowledged(self, acknowledgements: Sequence[desired.Acknowledgement],
                             at: float | None = None) -> None:
        """Central's acknowledgements as its desired state lists them now (the list replaces the one kept)."""
        at = datetime.now(UTC).timestamp() if at is None else at
        with self._db.transaction("keeping central's acknowledgements in") as connection:
            connection.execute("DELETE FROM central_acknowledgements")
            connection.executemany(
                "INSERT INTO central_acknowledgements (episode_id, acknowledged_at, acknowledged_by, received_at)"
                " VALUES (?,?,?,?) ON CONFLICT (episode_id) DO NOTHING",
                [(str(a.episode_id), a.acknowledged_at.timestamp(), a.acknowledged_by, at) for a in acknowledgements])

    def delete_synced_before(self, at: float) -> int:
        """Forget actions central took before `at`."""
        with self._db.transaction("deleting synced actions from") as connection:
            return connection.execute("DELETE FROM actions WHERE synced_at < ?", (at,)).rowcount

    def _common(self, episode: EpisodeRef, kind: str, sequence: int, at: float, by: str | None,
                client: str | None) -> dict[str, object]:
        episode_id = uuid.UUID(episode.episode_id)
        return {"action_id": action_id(self._gateway_id, episode_id, kind, sequence), "episode_id": episode_id,
                "machine_id": episode.machine_id, "opened_at": datetime.fromtimestamp(episode.opened_at, UTC),
                "at": datetime.fromtimestamp(at, UTC), "by": by, "client": client}

    @staticmethod
    def _insert(connection: sqlite3.Connection, episode: EpisodeRef, record: GatewayAction, at: float) -> bool:
        return connection.execute(
            "INSERT INTO actions (action_id, episode_id, kind, body, created_at) VALUES (?,?,?,?,?)"
            " ON CONFLICT (action_id) DO NOTHING",
            (str(record.action_id), episode.episode_id, record.action, record.model_dump_json(exclude_none=True),
             at)).rowcount == 1


def _parse(body: str) -> GatewayAction | None:
    try:
        return _ACTION.validate_json(body)
    except ValidationError:
        return None
