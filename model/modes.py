"""The failure modes of the AI4I model, defined once: their codes, what each means on the shop floor and what to look
at — the words the agent's status page and central's dashboard show. A model with other modes is shown with its
codes."""

from __future__ import annotations

from collections.abc import Mapping

from model.states import Words

MODES: tuple[str, ...] = ("TWF", "HDF", "PWF", "OSF")  # in the shipped model's output order

MODE_WORDS: Mapping[str, Words] = {
    "TWF": Words("tool wear failure", "the tool is near the end of its life", "plan a tool change"),
    "HDF": Words("heat dissipation", "process−air temperature difference too small at low speed",
                 "check cooling and ventilation; a higher speed helps if the process allows"),
    "PWF": Words("power", "torque × speed outside the safe band", "check the cutting parameters and the spindle drive"),
    "OSF": Words("overstrain", "tool wear × torque near the limit", "change the tool or reduce the load"),
}


def mode_words(mode: str) -> dict[str, str]:
    """label, meaning and advice of a failure mode (its code, and nothing more, for a mode we have no words for)."""
    words = MODE_WORDS.get(mode)
    return words.as_dict() if words else {"label": mode, "meaning": "", "advice": ""}
