"""A machine's state, defined once for the agent, the sync protocol and central: the words, their order of
severity and what each means on the shop floor.

The scorer maps a failure probability to a state with the manifest's thresholds; the alarm hysteresis, the
summaries' worst state, central's episodes and both pages rank states by SEVERITY.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class State(StrEnum):
    OK = "ok"
    WARNING = "warning"
    ALARM = "alarm"


# A state as JSON and SQL carry it, for pydantic models and FastAPI parameters (a Literal keeps the documents'
# inline `enum`); tests/test_vocabulary.py checks that it names exactly the members of State.
StateName = Literal["ok", "warning", "alarm"]

STATES: tuple[State, ...] = tuple(State)  # mildest first
WORST_FIRST: tuple[State, ...] = STATES[::-1]
SEVERITY: Mapping[str, int] = {state.value: rank for rank, state in enumerate(STATES)}  # ok 0, warning 1, alarm 2


@dataclass(frozen=True, slots=True)
class Words:
    """What a state or a failure mode means, in the words of the people at the machine."""

    label: str
    meaning: str
    advice: str

    def as_dict(self) -> dict[str, str]:
        return {"label": self.label, "meaning": self.meaning, "advice": self.advice}


STATE_WORDS: Mapping[State, Words] = {
    State.OK: Words("ok", "no failure expected", "nothing to do"),
    State.WARNING: Words("warning", "the failure risk is rising", "plan maintenance at the next stop"),
    State.ALARM: Words("alarm", "a failure is likely soon", "act now: inspect the machine"),
}


def severity(state: str) -> int:
    """0 for ok, 1 for warning, 2 for alarm; KeyError for a word that is not a state."""
    return SEVERITY[state]


def worst(states: Iterable[str]) -> State:
    """The most severe of `states` (ok for none)."""
    return STATES[max((SEVERITY[s] for s in states), default=0)]
