"""What the reliability tests share: Modbus devices for a `pdm-edge run` subprocess, its status API, and what the
kernel says about a process (RSS, open file descriptors, threads)."""

from __future__ import annotations

import os
import re
import sqlite3
import statistics
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from typing import Self

import requests

from drivers.modbus import Register
from drivers.registers import encode
from testkit.modbus import ModbusUnit
from tests.agent.test_run import AgentProcess

# The simulator's register layout (README, examples/simulator-modbus.toml): (register, a healthy machine's value).
LAYOUT = {
    "air_temperature": (Register(address=0, table="input", type="int16", scale=0.01, offset=273.15), 300.0),
    "process_temperature": (Register(address=1, table="input", type="int16", scale=0.01, offset=273.15), 310.0),
    "rotational_speed": (Register(address=2, table="input", type="uint16"), 1500),
    "torque": (Register(address=3, table="input", type="float32", word_order="little"), 40.0),
    "tool_wear": (Register(address=100, table="holding", type="uint16"), 10),
}


ALARMING = {"torque": 68.0, "rotational_speed": 1400}  # about 10 kW: a power failure (PWF) alarm


def set_values(unit: ModbusUnit, **values: float) -> None:
    for name, value in values.items():
        register = LAYOUT[name][0]
        unit.set(register.table, register.address, encode(value, register))


def healthy_unit() -> ModbusUnit:
    unit = ModbusUnit()
    set_values(unit, **{name: value for name, (_, value) in LAYOUT.items()})
    return unit


class Replay:
    """A plant whose readings change: every `period_s`, each unit gets the next row of `rows` (name -> value of
    LAYOUT), round and round, unit k starting k/len(units) of the way in; on a thread, while in a `with` block."""

    def __init__(self, units: Sequence[ModbusUnit], rows: Sequence[dict[str, float]], period_s: float) -> None:
        self.units, self.rows, self.period_s = units, rows, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        offsets = [k * len(self.rows) // len(self.units) for k in range(len(self.units))]
        step = 0
        while not self._stop.wait(self.period_s):
            for unit, offset in zip(self.units, offsets, strict=True):
                set_values(unit, **self.rows[(offset + step) % len(self.rows)])
            step += 1


def modbus_devices(port: int, machines: int, interval_s: float) -> str:
    """`[[modbus]]` tables for machines m1..mN, unit ids 1..N on one Modbus TCP server."""
    lines = []
    for k in range(1, machines + 1):
        lines += ["[[modbus]]", f'machine_id = "m{k}"', 'machine_type = "M"', 'transport = "tcp"',
                  'host = "127.0.0.1"', f"port = {port}", f"unit_id = {k}", f"interval_s = {interval_s}",
                  "timeout_s = 0.5", "retries = 0", "backoff_max_s = 0.5"]
        for name, (register, _) in LAYOUT.items():
            lines += [f"[modbus.registers.{name}]", f"address = {register.address}", f'table = "{register.table}"',
                      f'type = "{register.type}"', f'word_order = "{register.word_order}"',
                      f"scale = {register.scale}", f"offset = {register.offset}"]
    return "\n".join(lines) + "\n"


def add_modbus(agent: AgentProcess, port: int, machines: int, interval_s: float) -> None:
    agent.config.write_text(agent.config.read_text() + modbus_devices(port, machines, interval_s))


def status_base(agent: AgentProcess) -> str:
    return "http://" + re.search(r'bind = "([^"]+)"', agent.config.read_text()).group(1)


def agent_status(agent: AgentProcess) -> dict:
    return requests.get(status_base(agent) + "/api/v1/status", timeout=5).json()


def integrity(agent: AgentProcess) -> str:
    with closing(agent.db()) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def readings(agent: AgentProcess) -> set[tuple[str, float]]:
    with closing(agent.db()) as db:
        return set(db.execute("SELECT machine_id, ts FROM readings"))


def accepted(agent: AgentProcess) -> int:
    """Readings accepted since the database was created (retention and the buffer cap do not lower it)."""
    with closing(agent.db()) as db:
        row = db.execute("SELECT value FROM counters WHERE name = 'readings_accepted'").fetchone()
    return row[0] if row else 0


def outbox_ids(agent: AgentProcess) -> set[str]:
    try:
        with closing(agent.db()) as db:
            return {r for (r,) in db.execute("SELECT record_id FROM outbox")}
    except sqlite3.OperationalError:  # not created yet
        return set()


def process_figures(pid: int) -> dict[str, int]:
    """RSS (kB), open file descriptors and threads of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def growth(samples: list[dict], key: str, level: Callable[[Iterable[float]], float]) -> tuple[float, float, float]:
    """(early, late, relative growth): `level` of the first and last fifth of the samples after the warm-up."""
    fifth = max(3, len(samples) // 5)
    early = level(s[key] for s in samples[:fifth])
    late = level(s[key] for s in samples[-fifth:])
    return early, late, late / early - 1


# RSS by its median. File descriptors and threads by their floor: a connection open at the moment of a sample (the
# sync's, a scrape's) comes and goes, and with 18 descriptors in all one of them is 5.6 %; a leak raises the floor.
LEVEL: dict[str, Callable[[Iterable[float]], float]] = {"rss_kb": statistics.median, "fds": min, "threads": min}


def error_lines(agent: AgentProcess) -> list[dict]:
    """The agent's log lines at error level or above (its log is JSON lines)."""
    import json

    entries = [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("level") in ("error", "critical")]
