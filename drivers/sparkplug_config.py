"""The `[mqtt.sparkplug]` table: which Sparkplug B edge nodes and devices are machines, and which metrics are which
model inputs. Imports no protobuf: loading the configuration does not load the schema.

    [mqtt]
    url = "mqtt://broker:1883"
    format = "sparkplug_b"
    default_machine_type = "M"

    [mqtt.sparkplug]
    group_id = "plant-1"
    edge_node_ids = ["line-3"]            # empty: every edge node of the group
    metrics = { "Temperatures/Air" = "air_temperature", "Spindle/Speed" = "rotational_speed" }

    [[mqtt.sparkplug.devices]]            # optional: a device whose machine id, type or metric names differ
    edge_node_id = "line-3"
    device_id = "Press 1"
    machine_id = "press-1"
    machine_type = "H"

A device's metrics map to inputs through its own `metrics`, else the shared one; a metric whose name is already a
model input needs no entry. With a map, the metrics it does not name are ignored. The machine id is the device id
unless a device entry maps it; an entry without `device_id` makes the edge node's own metrics (NBIRTH, NDATA) a
machine, whose id defaults to the edge node id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from drivers.base import MachineId, MachineType

# Sparkplug's ids: UTF-8 without the MQTT topic's separators and wildcards (specification 3.0, topic namespace).
SparkplugId = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^/+#]+$")]
_MACHINE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class SparkplugDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edge_node_id: SparkplugId
    device_id: SparkplugId | None = None  # None: the edge node's own metrics
    machine_id: MachineId | None = None  # default: the device id (the edge node id without device_id)
    machine_type: MachineType | None = None  # default: mqtt.machines, then mqtt.default_machine_type
    metrics: dict[str, str] = {}  # metric name -> model input; default: mqtt.sparkplug.metrics

    @model_validator(mode="after")
    def _valid_machine_id(self) -> SparkplugDevice:
        if self.machine_id is None and not _MACHINE_ID.fullmatch(self.device_id or self.edge_node_id):
            raise ValueError(f"{self.device_id or self.edge_node_id!r} is not a valid machine id (letters, digits, "
                             "'.', '_', '-', at most 64); set machine_id")
        return self

    @property
    def key(self) -> tuple[str, str | None]:
        return self.edge_node_id, self.device_id

    @property
    def machine(self) -> str:
        return self.machine_id or self.device_id or self.edge_node_id


class SparkplugConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group_id: SparkplugId
    edge_node_ids: list[SparkplugId] = []  # empty: every edge node of the group
    metrics: dict[str, str] = {}  # metric name -> model input, for every device without its own map
    devices: list[SparkplugDevice] = []
    # A sequence gap, or data from an edge node whose birth the agent has not seen, publishes an NCMD
    # "Node Control/Rebirth" to the node (at most once per rebirth_retry_s per node until its NBIRTH arrives).
    request_rebirth: bool = True
    rebirth_retry_s: float = Field(30.0, ge=1)

    @field_validator("group_id")
    @classmethod
    def _not_state(cls, group_id: str) -> str:
        if group_id == "STATE":
            raise ValueError("STATE is Sparkplug's topic for host applications, not a group")
        return group_id

    @model_validator(mode="after")
    def _consistent(self) -> SparkplugConfig:
        problems = []
        seen: dict[tuple[str, str | None], int] = {}
        machines: dict[str, int] = {}
        for index, device in enumerate(self.devices):
            if device.key in seen:
                problems.append(f"devices[{seen[device.key]}] and devices[{index}] are both {_where(device)}")
            seen.setdefault(device.key, index)
            if device.machine in machines:
                problems.append(f"devices[{machines[device.machine]}] and devices[{index}] are both machine "
                                f"{device.machine!r}; give each its own machine_id")
            machines.setdefault(device.machine, index)
            if self.edge_node_ids and device.edge_node_id not in self.edge_node_ids:
                problems.append(f"devices[{index}]: edge node {device.edge_node_id!r} is not in edge_node_ids")
        for where, metrics in (("metrics", self.metrics),
                               *((f"devices[{i}].metrics", d.metrics) for i, d in enumerate(self.devices))):
            targets: dict[str, str] = {}
            for name, target in metrics.items():
                if target in targets:
                    problems.append(f"{where}: metrics {targets[target]!r} and {name!r} both map to {target!r}")
                targets[target] = name
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def topics(self) -> list[str]:
        """The topic filters: every message of the group's listed edge nodes (or of the whole group)."""
        if not self.edge_node_ids:
            return [f"spBv1.0/{self.group_id}/#"]
        return [f"spBv1.0/{self.group_id}/+/{node}/#" for node in self.edge_node_ids]


def _where(device: SparkplugDevice) -> str:
    return f"device {device.device_id!r} of {device.edge_node_id!r}" if device.device_id \
        else f"edge node {device.edge_node_id!r}"


def input_problems(config: SparkplugConfig | None, input_names: Sequence[str]) -> list[str]:
    """Metric maps naming something that is not a model input."""
    if config is None:
        return []
    inputs = ", ".join(input_names)
    maps = [("mqtt.sparkplug.metrics", config.metrics),
            *((f"mqtt.sparkplug.devices[{i}].metrics", d.metrics) for i, d in enumerate(config.devices))]
    return [f"{where}.{name}: {target!r} is not a model input; map it to one of {inputs}"
            for where, metrics in maps for name, target in metrics.items() if target not in input_names]
