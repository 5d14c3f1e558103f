"""What the sync client (sync/client.py) reads and what it returns, without the HTTP client it sends with.

The agent's store, downlink, sync thread and status API import these from here: an agent without `[central]`
never loads requests (about 5 MB of RSS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sync.desired import Acknowledgement, DesiredState


class Record(Protocol):
    """One outbox record (agent.store.OutboxRecord), read only."""

    @property
    def kind(self) -> str: ...  # "event" | "summary"

    @property
    def record_id(self) -> str: ...

    @property
    def body(self) -> str: ...  # JSON of sync.protocol.Event or Summary


class ActionRecord(Protocol):
    """One pending gateway action (agent.actions.ActionRecord), read only."""

    @property
    def record_id(self) -> str: ...

    @property
    def body(self) -> str: ...  # JSON of sync.protocol.Acknowledgement or Label


class ActionOutbox(Protocol):
    def pending_actions(self, limit: int) -> Sequence[ActionRecord]: ...  # oldest first
    def mark_actions_synced(self, action_ids: Sequence[str]) -> None: ...
    # Every desired state's list (a new one comes with a new ETag): the acknowledged open episodes, kept for the page.
    def central_acknowledged(self, acknowledgements: Sequence[Acknowledgement]) -> None: ...


class Outbox(Protocol):
    def pending(self, limit: int) -> Sequence[Record]: ...  # events first, then summaries, oldest first
    def mark_synced(self, record_ids: Sequence[str]) -> None: ...
    def set_aside(self, records: Sequence[Record], reason: str) -> None: ...


class DesiredSink(Protocol):
    """Who takes central's desired state (agent.downlink.Downlink); offer() must return at once."""

    def offer(self, desired: DesiredState) -> None: ...


class FetchError(Exception):
    """A bundle could not be fetched now: retried later by the caller."""


class Outcome(StrEnum):
    SYNCED = "synced"  # the outbox is empty
    RETRY = "retry"  # transient failure: try again after `retry_after`
    REFUSED = "refused"  # 401/403: the gateway is not allowed


@dataclass(frozen=True, slots=True)
class Round:
    outcome: Outcome
    sent: int  # records central accepted or already had
    set_aside: int
    retry_after: float  # seconds until the next round
    error: str | None = None
