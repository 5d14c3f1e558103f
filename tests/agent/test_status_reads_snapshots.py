"""The status API reads the agent through snapshots only (agent/snapshot.py), never its parts: read from the source,
every import statement of agent/status/, in functions and under TYPE_CHECKING too. (No import cycle and no module
over 600 lines: tests/test_layout.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

STATUS = Path(__file__).resolve().parents[2] / "agent" / "status"
# What the status API may take from the modules of the agent's parts: record types, no part.
PARTS = {"agent.service": set(), "agent.pipeline": set(), "agent.sync_loop": set(), "agent.machines": set(),
         "agent.store": {"StoredReading"}}


def part_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PARTS:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name not in PARTS[node.module]]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("drivers.") \
                and node.module != "drivers.base":
            found.append(node.module or "")
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in PARTS or a.name.startswith("drivers.")]
    return found


def test_the_status_api_imports_no_part_of_the_agent():
    found = {path.name: part_imports(ast.parse(path.read_text(), str(path))) for path in sorted(STATUS.glob("*.py"))}
    assert len(found) >= 9 and {name: parts for name, parts in found.items() if parts} == {}


def test_the_scan_sees_a_part_imported_late():
    tree = ast.parse("from agent.store import StoredReading\ndef f():\n    from agent.store import Store\n"
                     "    import drivers.modbus\n    from drivers.base import DriverStats\n")
    assert part_imports(tree) == ["agent.store.Store", "drivers.modbus"]
