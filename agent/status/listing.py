"""The body of /api/v1/machines (`MachineListing`): each machine's row, a `MachineInfo`, is built and encoded once per
change of its reading, trend or saved alarm (agent/latest.py's version) or of the model, and the rows are joined at
each request with what depends on the request's time: `now`, each row's `last_reading_age_s`, which machines are
still heard. The body is, byte for byte, what pydantic encodes of `MachineList(now, machine_infos(snap))`.

With the page open and no reading coming in, a request costs the join; during a flood every machine changes
between two refreshes, and each row is built once per request, as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from pydantic import TypeAdapter
from pydantic_core import to_json

from agent.latest import MachineView
from agent.roster import heard
from agent.snapshot import AgentSnapshot
from agent.status.gateway import at
from agent.status.machines import age_s, health_bands, machine_fields
from agent.status.models import MachineInfo
from agent.store import StoredReading
from model.package import Model
from model.states import SEVERITY

ROW = TypeAdapter(MachineInfo)
NOW = TypeAdapter(datetime)
AGE = b',"last_reading_age_s":'
AFTER_AGE = b',"model_version":'  # the field after it: a row's JSON is cut there
APART = {"last_reading_age_s", "trend"}  # encoded apart from the rest of a row


class Row(NamedTuple):
    """A machine's row, encoded but for its age: `head` + the age + `tail` is its JSON."""

    version: int
    model: Model
    reading: StoredReading
    head: bytes  # up to and including AGE
    tail: bytes
    order: tuple[int, str]  # the worst first, then by id


class MachineListing:
    """Who calls it: the status API's worker threads, any number at once. Two of them may build the same row; the
    rows of the last to finish are kept for the next request."""

    def __init__(self) -> None:
        self._built: tuple[tuple[MachineView, ...], Model, list[Row]] | None = None  # the views, the model, the rows

    def body(self, snap: AgentSnapshot) -> bytes:
        """Every machine heard within `forget_after_h`, the worst first (alarm, warning, ok), then by id."""
        now, forget_after_h = snap.taken_at, snap.config.machines.forget_after_h
        parts = [b'{"now":', NOW.dump_json(at(now)), b',"machines":[']
        for row in self._rows(snap):
            if heard(row.reading, forget_after_h, now):
                parts += (row.head, to_json(age_s(row.reading, now)), row.tail, b",")
        if parts[-1] == b",":
            parts.pop()
        parts.append(b"]}")
        return b"".join(parts)

    def _rows(self, snap: AgentSnapshot) -> list[Row]:
        """Every machine's row, sorted; built again only for the machines that changed since the last request."""
        views, model, built = snap.latest.machines(snap.records), snap.model, self._built
        if built is not None and built[0] is views and built[1] is model:
            return built[2]
        before = {row.reading.machine_id: row for row in built[2]} if built is not None else {}
        bands, rows = health_bands(model), []
        for machine in views:
            row = before.get(machine.reading.machine_id)
            if row is None or row.version != machine.version or row.model is not model:
                row = _row(machine, model, snap.taken_at, bands)
            rows.append(row)
        rows.sort(key=lambda row: row.order)
        self._built = views, model, rows
        return rows


def _row(machine: MachineView, model: Model, now: float, bands: tuple[float, float]) -> Row:
    # The trend, the last field, is encoded apart as the floats it holds (agent/latest.py rounds them), not
    # validated again: of the row's cost, the share its 60 numbers took.
    info = MachineInfo(**machine_fields(machine.reading, machine.alarm, model, now, [], bands))
    encoded = ROW.dump_json(info, exclude=APART)
    cut = encoded.rindex(AFTER_AGE)  # after it only model_version's string
    tail = encoded[cut:-1] + b',"trend":' + to_json(machine.trend) + b"}"
    return Row(machine.version, model, machine.reading, encoded[:cut] + AGE, tail,
               (-SEVERITY.get(info.state, 0), info.machine_id))
