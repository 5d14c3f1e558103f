"""The states (ok, warning, alarm) and the failure modes (TWF, HDF, PWF, OSF) are defined once, in model/states.py
and model/modes.py: every other module imports them. A module that spells out its own list, ranking or words of
them drifts the day a state or a mode changes, so this test reads every module outside model/ (and outside the
tests, which spell out what they expect) and fails on such a literal."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from model.modes import MODE_WORDS, MODES
from model.states import SEVERITY, STATE_WORDS, STATES, WORST_FIRST, State, StateName

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("agent", "drivers", "sync", "central", "web", "testkit", "bench")
VOCABULARIES = {"state": frozenset(STATES), "mode": frozenset(MODES)}


def own_vocabulary(node: ast.AST) -> str | None:
    """"state" or "mode" when `node` is a literal list, tuple, set or Literal[...] of all of a vocabulary's words,
    or a dict keyed by all of them whose values are not measurements (a ranking, words, colours)."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    elif isinstance(node, ast.Dict):
        keyed = [(k.value, v) for k, v in zip(node.keys, node.values, strict=True)
                 if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        words = {word for word, value in keyed if not (isinstance(value, ast.Constant) and type(value.value) is float)
                 and not isinstance(value, ast.BinOp)}
    else:
        return None
    return next((name for name, vocabulary in VOCABULARIES.items() if vocabulary <= words), None)


def definitions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)} defines its own {kind} words"
            for node in ast.walk(tree) if (kind := own_vocabulary(node))]


@pytest.mark.parametrize("package", SCANNED)
def test_no_module_outside_model_defines_its_own_states_or_modes(package):
    found = [line for path in sorted((ROOT / package).rglob("*.py")) for line in definitions(path)]
    assert found == [], "import them from model.states and model.modes instead"


def test_the_scan_finds_lists_rankings_and_words_but_not_measurements():
    sources = {
        'LEVELS = ("ok", "warning", "alarm")': "state",
        'State = Literal["ok", "warning", "alarm"]': "state",
        'RANK = {"ok": 0, "warning": 1, "alarm": 2}': "state",
        'COLORS = {"alarm": "red", "warning": "amber", "ok": "green", "stale": "grey"}': "state",
        'MODES = ["HDF", "PWF", "OSF", "TWF"]': "mode",
        'from_state: Literal["warning", "alarm"] = "warning"': None,  # a choice among states, not the vocabulary
        'risk = {"TWF": 0.01, "HDF": 0.002, "PWF": 0.0, "OSF": 0.41}': None,  # a measurement per mode
        'STRESS = {"HDF": 8.6 / 7.8, "PWF": 1.1, "OSF": 1.12, "TWF": 235 / 200}': None,
    }
    for source, expected in sources.items():
        found = {own_vocabulary(node) for node in ast.walk(ast.parse(source))} - {None}
        assert found == ({expected} if expected else set()), source


def test_the_vocabulary_is_consistent():
    assert typing.get_args(StateName) == tuple(state.value for state in State) == STATES
    assert [SEVERITY[s] for s in STATES] == [0, 1, 2] and WORST_FIRST == (State.ALARM, State.WARNING, State.OK)
    assert set(STATE_WORDS) == set(STATES) and set(MODE_WORDS) == set(MODES)
    assert all(words.label and words.meaning and words.advice for words in [*STATE_WORDS.values(),
                                                                             *MODE_WORDS.values()])
