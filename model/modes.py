"""What each failure mode of the AI4I model means on the shop floor, and what to look at: the words the agent's
status page and central's dashboard show. A model with other modes is shown with its codes."""

from __future__ import annotations

MODE_WORDS: dict[str, dict[str, str]] = {
    "TWF": {"label": "tool wear failure", "meaning": "the tool is near the end of its life",
            "advice": "plan a tool change"},
    "HDF": {"label": "heat dissipation", "meaning": "process−air temperature difference too small at low speed",
            "advice": "check cooling and ventilation; a higher speed helps if the process allows"},
    "PWF": {"label": "power", "meaning": "torque × speed outside the safe band",
            "advice": "check the cutting parameters and the spindle drive"},
    "OSF": {"label": "overstrain", "meaning": "tool wear × torque near the limit",
            "advice": "change the tool or reduce the load"},
}


def mode_words(mode: str) -> dict[str, str]:
    """label, meaning and advice of a failure mode (its code, and nothing more, for a mode we have no words for)."""
    return MODE_WORDS.get(mode, {"label": mode, "meaning": "", "advice": ""})
