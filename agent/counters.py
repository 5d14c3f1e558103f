"""The store's durable counters (agent/store.py): their names in the `counters` table are made and parsed here
and nowhere else; everything else reads `BufferCounters`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ACCEPTED, DUPLICATE, EVICTED = "readings_accepted", "readings_duplicate", "quarantine_evicted"
_REJECTED, _DROPPED, _SET_ASIDE = "rejected_", "dropped_", "set_aside_"


def rejected(reason: str) -> str:
    return _REJECTED + reason


def dropped(kind: str) -> str:
    return _DROPPED + kind


def set_aside(kind: str) -> str:
    return _SET_ASIDE + kind


@dataclass(frozen=True)
class BufferCounters:
    """Counted since the database was created, in the same transactions as the data they count."""

    readings_accepted: int = 0
    readings_duplicate: int = 0  # redelivered readings stored once
    quarantine_evicted: int = 0  # rejected readings the quarantine's cap deleted
    rejected: Mapping[str, int] = field(default_factory=dict)  # by rejection reason
    dropped: Mapping[str, int] = field(default_factory=dict)  # unsynced records the buffer cap deleted, by kind
    set_aside: Mapping[str, int] = field(default_factory=dict)  # records central refused as invalid, by kind

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @classmethod
    def parse(cls, rows: Iterable[tuple[str, int]]) -> BufferCounters:
        plain: dict[str, int] = {}
        by_prefix: dict[str, dict[str, int]] = {_REJECTED: {}, _DROPPED: {}, _SET_ASIDE: {}}
        for name, value in rows:
            prefix = next((p for p in by_prefix if name.startswith(p)), None)
            if prefix is None:
                plain[name] = value
            else:
                by_prefix[prefix][name.removeprefix(prefix)] = value
        return cls(readings_accepted=plain.get(ACCEPTED, 0), readings_duplicate=plain.get(DUPLICATE, 0),
                   quarantine_evicted=plain.get(EVICTED, 0), rejected=by_prefix[_REJECTED],
                   dropped=by_prefix[_DROPPED], set_aside=by_prefix[_SET_ASIDE])


def as_rows(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """The non-zero counts, as rows to add to the table."""
    return [(name, n) for name, n in counts.items() if n]
