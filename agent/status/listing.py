"""The body of /api/v1/machines (`MachineListing`): each machine's row, a `MachineInfo`, is built and encoded once per
change of its reading, trend or saved alarm (agent/latest.py's version) or of the model, and the rows are joined at
each request with what depends on the request's time: `now`, each row's `last_reading_age_s`, which machines are
still heard. The body is, byte for byte, what pydantic encodes of `MachineList(now, machine_infos(snap))`. A row
whose numbers are all floats (any from this agent) is encoded from its fields without building the MachineInfo
(`floats`); one that holds another number goes through the model, which would turn an int into a float.

With the page open and no reading coming in, a request costs the join; during a flood every machine changes
between two refreshes, and each row is built once per request, as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from pydantic import TypeAdapter
from pydantic_core import to_json

from agent.latest import MachineView
from agent.roster import heard
from agent.snapshot import AgentSnapshot
from agent.status.gateway import at
from agent.status.machines import age_s, health_bands, row_fields
from agent.status.models import MachineInfo
from agent.store import StoredReading
from model.package import Model
from model.states import SEVERITY

ROW = TypeAdapter(MachineInfo)
NOW = TypeAdapter(datetime)
AGE = b',"last_reading_age_s":'
AFTER_AGE = b',"model_version":'  # the field after it: a row's JSON is cut there
AT_REQUEST = {"last_reading_age_s"}  # encoded apart from the rest of a row
FLOAT = {float}


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
        rows = [row for row in self._rows(snap) if heard(row.reading, forget_after_h, now)]
        # The ages in one call, then apart: a number holds no comma.
        ages = to_json([age_s(row.reading, now) for row in rows])[1:-1].split(b",")
        parts = [b'{"now":', NOW.dump_json(at(now)), b',"machines":[']
        for row, age in zip(rows, ages):
            parts += (row.head, age, row.tail, b",")
        if rows:
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
                row = _row(machine, model, bands)
            rows.append(row)
        rows.sort(key=lambda row: row.order)
        self._built = views, model, rows
        return rows


def _row(machine: MachineView, model: Model, bands: tuple[float, float]) -> Row:
    fields = row_fields(machine.reading, machine.alarm, model, machine.trend, bands)
    if floats(fields):  # building and validating a MachineInfo cost more than encoding it
        encoded = to_json(fields, inf_nan_mode="null")
    else:
        encoded = ROW.dump_json(MachineInfo(**fields, last_reading_age_s=0.0), exclude=AT_REQUEST)
    cut = encoded.rindex(AFTER_AGE)  # after it only model_version's string and the trend's numbers
    return Row(machine.version, model, machine.reading, encoded[:cut] + AGE, encoded[cut:],
               (-SEVERITY.get(fields["state"], 0), fields["machine_id"]))


def floats(fields: dict[str, Any]) -> bool:
    """Every number of a row's `fields` (row_fields's) is a float already. Then pydantic_core encodes the
    fields, in MachineInfo's order, as ROW encodes the MachineInfo they make, byte for byte (floats, times, strings;
    NaN as null): a model would only turn an int into a float, 1 into 1.0. The trend's are (agent/latest.py)."""
    return (type(fields["health"]) is type(fields["reading_health"]) is type(fields["p_failure"]) is float
            and set(map(type, fields["risk"].values())) <= FLOAT and set(map(type, fields["values"].values())) <= FLOAT)

