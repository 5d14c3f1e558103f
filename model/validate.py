"""Validate raw readings against the manifest's declared inputs.

A raw reading is a mapping with one number per model input and the machine type. Each one is either accepted
(and flagged out-of-distribution for every input outside the training range) or rejected with one stable reason
code and a message naming the input and the value. Nothing a caller passes makes the validator raise, and one bad
reading never affects the others in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain, compress
from numbers import Real
from operator import itemgetter
from typing import Any

import numpy as np

from model.manifest import Input, Manifest


class Reason(StrEnum):
    # Found by the drivers and readers, before validation:
    MALFORMED = "malformed"  # the payload could not be parsed (JSON, CSV, a timestamp)
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_MACHINE = "unknown_machine"  # no machine id, or no machine type known for it
    # Found here:
    NOT_AN_OBJECT = "not_an_object"
    MISSING_INPUT = "missing_input"
    NOT_A_NUMBER = "not_a_number"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    UNKNOWN_MACHINE_TYPE = "unknown_machine_type"


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    message: str
    input: str | None = None


@dataclass(frozen=True, slots=True)
class ValidBatch:
    index: list[int]  # position of each accepted reading in the validated sequence
    values: np.ndarray  # float32 [accepted, inputs], in the manifest's input order
    machine_types: np.ndarray  # object [accepted, 1]
    ood: list[tuple[str, ...]]  # per accepted reading: the inputs outside their training range


_FAST_TYPES = frozenset((float, int))  # exact types; anything else (bool, str, numpy scalars...) takes the careful path
_NO_OOD: tuple[str, ...] = ()


# How a value's kind is named to a user: in JSON's words (the payloads' language), never a Python type name.
_KINDS = ((bool, "a boolean"), (type(None), "null"), (str, "a string"), (Real, "a number"),
          (Mapping, "an object"), ((list, tuple), "an array"))


def _kind(value: object) -> str:
    return next((name for kind, name in _KINDS if isinstance(value, kind)), "another kind of value")


def _show(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Validator:
    def __init__(self, manifest: Manifest) -> None:
        self._inputs = manifest.inputs
        self._names = manifest.input_names
        self._type_key = manifest.machine_type.name
        self._values_of = _getter(self._names)
        self._type_of = itemgetter(self._type_key)
        self._type_values = manifest.machine_type.values
        self._machine_types = frozenset(self._type_values)
        self._low = np.array([i.physical_range.min for i in self._inputs])
        self._high = np.array([i.physical_range.max for i in self._inputs])
        self._train_low = np.array([i.training_range.min for i in self._inputs])
        self._train_high = np.array([i.training_range.max for i in self._inputs])

    def check(self, reading: object) -> tuple[list[float], str] | Rejection:
        """One reading, carefully: (values, machine type) or the first problem found."""
        if not isinstance(reading, Mapping):
            return Rejection(Reason.NOT_AN_OBJECT, f"a reading must be an object, got {_kind(reading)}")
        missing = [name for name in (*self._names, self._type_key) if reading.get(name) is None]
        if missing:
            return Rejection(Reason.MISSING_INPUT, f"missing {', '.join(missing)}", missing[0])
        machine_type = reading[self._type_key]
        if not isinstance(machine_type, str) or machine_type not in self._machine_types:
            return Rejection(
                Reason.UNKNOWN_MACHINE_TYPE,
                f"{self._type_key} is {_show(machine_type)}, not one of {', '.join(self._type_values)}",
                self._type_key,
            )
        values = []
        for spec in self._inputs:
            raw = reading[spec.name]
            if isinstance(raw, bool) or not isinstance(raw, Real):
                return Rejection(Reason.NOT_A_NUMBER, f"{spec.name} is {_show(raw)}, not a number", spec.name)
            try:
                value = float(raw)
            except OverflowError:  # an integer beyond float range
                return self._out_of_range(spec, raw)
            if not math.isfinite(value):
                return Rejection(Reason.NOT_FINITE, f"{spec.name} is {value}, not a finite number", spec.name)
            if value not in spec.physical_range:
                return self._out_of_range(spec, value)
            values.append(value)
        return values, machine_type

    @staticmethod
    def _out_of_range(spec: Input, value: object) -> Rejection:
        r = spec.physical_range
        return Rejection(
            Reason.OUT_OF_RANGE,
            f"{spec.name} = {_show(value)} {spec.unit} is outside the physical range {r.min:g} to {r.max:g} {spec.unit}",
            spec.name,
        )

    def validate(self, readings: Sequence[Any]) -> tuple[ValidBatch, dict[int, Rejection]]:
        """A batch: the accepted readings as arrays, and the rejections by position. A reading may be anything
        (parsed JSON): the fast path tries it as a mapping, check() explains what it is not."""
        plain = self._plain_batch(readings)
        if plain is not None:
            rows, types = plain
            index, rejected = list(range(len(rows))), dict[int, Rejection]()
        else:
            rows, types, index, rejected = self._one_by_one(readings)
        values = self._as_array(rows)
        inside = ((values >= self._low) & (values <= self._high)).all(axis=1)  # NaN compares False
        if not inside.all():
            for position in np.flatnonzero(~inside):
                rejected[index[position]] = self._rejection(readings[index[position]])
            keep = np.flatnonzero(inside)
            values, index, types = values[keep], [index[k] for k in keep], [types[k] for k in keep]
        return ValidBatch(index, values.astype(np.float32), self._types_array(types), self._ood(values)), rejected

    def _plain_batch(self, readings: Sequence[Any]) -> tuple[list[Sequence[Any]], list[str]] | None:
        """The usual batch in a few C-level passes: every reading a mapping of plain numbers with a known machine
        type; None if any is not (the per-reading path then sorts them out)."""
        try:
            rows = list(map(self._values_of, readings))
            types = list(map(self._type_of, readings))
            plain = self._machine_types.issuperset(types) and _FAST_TYPES.issuperset(map(type, chain.from_iterable(rows)))
        # not a mapping, a missing key, an unhashable type...
        except Exception:  # noqa: BLE001
            return None
        return (rows, types) if plain else None

    def _one_by_one(self, readings: Sequence[Any]) -> tuple[list[Sequence[Any]], list[str], list[int],
                                                             dict[int, Rejection]]:
        rows, types, index, rejected = [], [], [], {}
        for i, reading in enumerate(readings):
            try:
                row = self._values_of(reading)
                machine_type = reading[self._type_key]
                plain = machine_type in self._machine_types and _FAST_TYPES.issuperset(map(type, row))
            except Exception:  # noqa: BLE001  (as in _plain_batch: check() explains)
                plain = False
            if not plain:
                checked = self.check(reading)
                if isinstance(checked, Rejection):
                    rejected[i] = checked
                    continue
                row, machine_type = checked
            rows.append(row)
            types.append(machine_type)
            index.append(i)
        return rows, types, index, rejected

    def _rejection(self, reading: object) -> Rejection:
        """check()'s rejection of a reading the array test found out of range (never accepted, whatever check says)."""
        checked = self.check(reading)
        if isinstance(checked, Rejection):
            return checked
        return Rejection(Reason.OUT_OF_RANGE, "an input is outside its physical range")

    def _as_array(self, rows: list[Sequence[Any]]) -> np.ndarray:
        width = len(self._names)
        try:
            return np.fromiter(chain.from_iterable(rows), np.float64, len(rows) * width).reshape(len(rows), width)
        except OverflowError:  # an int beyond float range: convert row by row, it becomes out of range
            return np.array([[_to_float(v) for v in row] for row in rows], dtype=np.float64).reshape(-1, len(self._names))

    @staticmethod
    def _types_array(types: list[str]) -> np.ndarray:
        array = np.empty((len(types), 1), dtype=object)
        array[:, 0] = types
        return array

    def _ood(self, values: np.ndarray) -> list[tuple[str, ...]]:
        outside = (values < self._train_low) | (values > self._train_high)
        ood = [_NO_OOD] * len(values)
        flagged = np.flatnonzero(outside.any(axis=1))
        for row, inputs in zip(flagged.tolist(), outside[flagged].tolist()):
            ood[row] = tuple(compress(self._names, inputs))
        return ood


def _to_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _getter(names: Sequence[str]) -> Callable[[Any], Sequence[Any]]:
    """reading -> its values of `names`, as a tuple even for one name (itemgetter's one C call)."""
    if len(names) == 1:
        name = names[0]
        return lambda reading: (reading[name],)
    return itemgetter(*names)
