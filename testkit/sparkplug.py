"""A Sparkplug B edge node for tests and benchmarks: builds payloads with the schema the agent decodes with
(drivers/sparkplug_b_pb2.py) and keeps the node's sequence number and bdSeq as a real edge node does.

    node = EdgeNode("plant-1", "line-3")
    publisher.publish_all([node.nbirth(), node.dbirth("press-1", {"torque": 40.0}), node.ddata("press-1", ...)])

Metrics are (name, value) with the datatype chosen from the Python type (float: Double, int: Int64, bool: Boolean,
str: String); a device's metrics get aliases 1, 2, ... in birth order, and DATA sends aliases only unless
`by_name=True`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drivers.sparkplug_b_pb2 import Payload

DATATYPES = {bool: 11, float: 10, int: 4, str: 12}
VALUE_FIELDS = {11: "boolean_value", 10: "double_value", 4: "long_value", 12: "string_value", 3: "int_value",
                9: "float_value", 1: "int_value", 2: "int_value", 5: "int_value", 6: "int_value", 7: "int_value",
                8: "long_value"}
SIGNED_WIDTH = {1: 32, 2: 32, 3: 32, 4: 64}  # two's complement in the unsigned field, as Eclipse Tahu sends them

Message = tuple[str, bytes]


def set_value(metric: Any, value: Any, datatype: int | None = None) -> None:
    datatype = datatype or DATATYPES[type(value)]
    metric.datatype = datatype
    if value is None:
        metric.is_null = True
        return
    if datatype in SIGNED_WIDTH and value < 0:
        value += 1 << SIGNED_WIDTH[datatype]
    setattr(metric, VALUE_FIELDS[datatype], value)


class EdgeNode:
    def __init__(self, group_id: str, edge_node_id: str, bd_seq: int = 0) -> None:
        self.group_id = group_id
        self.edge_node_id = edge_node_id
        self.bd_seq = bd_seq
        self.seq = 0
        self.aliases: dict[str | None, dict[str, int]] = {}  # device (None: the node) -> metric name -> alias

    def topic(self, message_type: str, device_id: str | None = None) -> str:
        device = f"/{device_id}" if device_id else ""
        return f"spBv1.0/{self.group_id}/{message_type}/{self.edge_node_id}{device}"

    def _payload(self, ts_ms: int | None, sequenced: bool = True) -> Any:
        payload = Payload()
        if ts_ms is not None:
            payload.timestamp = ts_ms
        if sequenced:
            payload.seq = self.seq
            self.seq = (self.seq + 1) % 256
        return payload

    def nbirth(self, metrics: Mapping[str, Any] | None = None, ts_ms: int | None = None) -> Message:
        self.seq = 0
        payload = self._payload(ts_ms)
        bd = payload.metrics.add(name="bdSeq")
        set_value(bd, self.bd_seq, 8)
        rebirth = payload.metrics.add(name="Node Control/Rebirth")
        set_value(rebirth, False)
        self._birth_metrics(payload, None, metrics or {})
        return self.topic("NBIRTH"), payload.SerializeToString()

    def ndeath(self, bd_seq: int | None = None) -> Message:
        payload = self._payload(None, sequenced=False)
        set_value(payload.metrics.add(name="bdSeq"), self.bd_seq if bd_seq is None else bd_seq, 8)
        return self.topic("NDEATH"), payload.SerializeToString()

    def dbirth(self, device_id: str, metrics: Mapping[str, Any], ts_ms: int | None = None) -> Message:
        payload = self._payload(ts_ms)
        self._birth_metrics(payload, device_id, metrics)
        return self.topic("DBIRTH", device_id), payload.SerializeToString()

    def ddeath(self, device_id: str) -> Message:
        return self.topic("DDEATH", device_id), self._payload(None).SerializeToString()

    def ndata(self, metrics: Mapping[str, Any], ts_ms: int | None = None, by_name: bool = False) -> Message:
        return self.topic("NDATA"), self._data(None, metrics.items(), ts_ms, by_name)

    def ddata(self, device_id: str, metrics: Mapping[str, Any] | list[tuple[str, Any]], ts_ms: int | None = None,
              by_name: bool = False, metric_ts_ms: int | None = None) -> Message:
        items = metrics.items() if isinstance(metrics, Mapping) else metrics
        return self.topic("DDATA", device_id), self._data(device_id, items, ts_ms, by_name, metric_ts_ms)

    def skip(self, count: int = 1) -> None:
        """Lose `count` messages: the next one's sequence number jumps."""
        self.seq = (self.seq + count) % 256

    def _birth_metrics(self, payload: Any, device_id: str | None, metrics: Mapping[str, Any]) -> None:
        aliases = self.aliases[device_id] = {}
        for alias, (name, value) in enumerate(metrics.items(), start=100 if device_id is None else 1):
            aliases[name] = alias
            metric = payload.metrics.add(name=name, alias=alias)
            set_value(metric, value)

    def _data(self, device_id: str | None, items, ts_ms: int | None, by_name: bool,
              metric_ts_ms: int | None = None) -> bytes:
        payload = self._payload(ts_ms)
        aliases = self.aliases.get(device_id, {})
        for name, value in items:
            metric = payload.metrics.add()
            if by_name or name not in aliases:
                metric.name = name
            else:
                metric.alias = aliases[name]
            if metric_ts_ms is not None:
                metric.timestamp = metric_ts_ms
            set_value(metric, value)
            if not by_name and name in aliases:
                metric.ClearField("datatype")  # DATA messages need not repeat it: the birth gave it
        return payload.SerializeToString()


def decode(payload: bytes) -> Any:
    return Payload.FromString(payload)
