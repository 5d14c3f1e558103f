"""Sparkplug B ingest (`[mqtt] format = "sparkplug_b"`): the MQTT driver hands every message here and gets readings.

Topics are `spBv1.0/<group>/<type>/<edge node>[/<device>]`; payloads are protobuf (drivers/sparkplug_b.proto).
What a host application must do, and what this one does:
- NBIRTH starts an edge node's session: its bdSeq, its sequence number, its own metrics' aliases. Every device of
  the node is forgotten until its DBIRTH, which binds the device's metric names to aliases and carries every
  metric's current value.
- NDATA / DDATA carry changed metrics, by alias or by name. Each message makes one reading of the machine with the
  latest value of every mapped metric (a metric reported twice in one message first flushes the reading with the
  earlier value: every reported value is in some reading). Births make a reading too: they carry current values.
- Every message of a session but NDEATH carries `seq`, one more than the previous (mod 256). A gap (a lost
  message) is counted, logged once per session, and answered with an NCMD `Node Control/Rebirth` to the node; the
  message itself is used. Data from an edge node whose NBIRTH the agent has not seen (after an agent restart) asks
  for a rebirth too.
- NDEATH (the node's MQTT will) ends the session when its bdSeq is the session's; an older will, delivered after the
  node reconnected, is counted as stale and ignored. DDEATH forgets the device until its next DBIRTH.
- A payload that is not protobuf of the schema, a topic that is not Sparkplug's, an alias no birth defined, a
  device that maps to no machine: a quarantined reading with the reason (and the payload, base64), ingest goes on.

`SparkplugDecoder` is pure: no I/O, no clock (the driver passes the arrival time). The driver publishes
`requests()` (rebirth commands) and acknowledges a message once its last reading is committed (a message without
a reading at once).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from drivers.base import SOURCE_MAX_CHARS, RawReading, cut
from drivers.sparkplug_b_pb2 import Payload
from drivers.sparkplug_config import SparkplugConfig, SparkplugDevice
from model.validate import Reason, Rejection

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"
BOOLEAN = 11
EARLIEST_MS, LATEST_MS = 946_684_800_000, 4_102_444_800_000  # 2000-01-01 .. 2100-01-01
PAYLOAD_KEPT_BYTES = 3072  # of a payload, base64 in the quarantine (4 KiB of text)
# A publisher inventing edge node or device ids must not grow the decoder's memory without end (the roster bounds
# machines further on, but the decoder keeps a session per node and values per device first).
MAX_EDGE_NODES, MAX_DEVICES_PER_NODE = 10_000, 10_000
_MACHINE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MESSAGE_TYPES = frozenset({"NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA", "NCMD", "DCMD"})
_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8 .. Int64: sent two's complement in an unsigned field
_DESCRIBED = {"bytes_value": "bytes", "dataset_value": "a DataSet", "template_value": "a Template",
              "extension_value": "an extension value"}


class Refused(Exception):
    """A message that makes no reading; the message says why (one line)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Topic:
    message_type: str
    edge_node_id: str
    device_id: str | None

    @property
    def node_level(self) -> bool:
        return self.message_type[0] == "N"


def parse_topic(topic: str, group_id: str) -> Topic:
    levels = topic.split("/")
    if len(levels) not in (4, 5) or levels[0] != NAMESPACE or levels[1] != group_id \
            or levels[2] not in MESSAGE_TYPES or not all(levels[3:]):
        raise Refused(Reason.MALFORMED, f"not a Sparkplug B topic of group {group_id!r} "
                                        f"(spBv1.0/{group_id}/<message type>/<edge node>[/<device>])")
    message_type = levels[2]
    if (len(levels) == 5) != (message_type[0] == "D"):
        raise Refused(Reason.MALFORMED, f"a {message_type} topic {'needs a' if message_type[0] == 'D' else 'has no'} "
                                        "device level")
    return Topic(message_type, levels[3], levels[4] if len(levels) == 5 else None)


def metric_value(metric: Any, datatype: int | None) -> Any:
    """A metric's value as Python: signed integers restored, None for null, a short description for what is no
    scalar (the pipeline then rejects it as not a number, saying what it was)."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    if kind in _DESCRIBED:
        return f"<{_DESCRIBED[kind]}>"
    value = getattr(metric, kind)
    bits = _SIGNED_BITS.get(datatype or 0)
    if bits and kind in ("int_value", "long_value"):
        if bits < 32 and value < 1 << bits:  # an Int8 or Int16 sent in its own width
            return value - (1 << bits) if value >= 1 << (bits - 1) else value
        width = 32 if kind == "int_value" else 64
        return value - (1 << width) if value >= 1 << (width - 1) else value
    return value


@dataclass(slots=True)
class Device:
    """What a birth told about one device (or the edge node's own metrics) and the latest values since."""

    aliases: dict[int, str] = field(default_factory=dict)  # alias -> metric name
    datatypes: dict[str, int] = field(default_factory=dict)  # metric name -> datatype
    values: dict[str, Any] = field(default_factory=dict)  # model input -> latest value
    born: bool = False


@dataclass(slots=True)
class Session:
    """One edge node, from its NBIRTH (or its first message the agent saw) to its NDEATH."""

    bd_seq: int | None = None
    seq: int | None = None
    born: bool = False  # an NBIRTH was seen
    gap_logged: bool = False
    devices: dict[str | None, Device] = field(default_factory=dict)  # None: the node's own metrics


class SparkplugDecoder:
    """Sparkplug B messages -> readings, with the state of every edge node's session. Lives on paho's network
    thread (one message at a time)."""

    def __init__(self, config: SparkplugConfig, machines: Mapping[str, str], default_machine_type: str | None,
                 type_key: str, max_payload_bytes: int) -> None:
        self.config = config
        self._machines = machines
        self._default_type = default_machine_type
        self._type_key = type_key
        self._max_bytes = max_payload_bytes
        self._listed: dict[tuple[str, str | None], SparkplugDevice] = {d.key: d for d in config.devices}
        self._sessions: dict[str, Session] = {}
        self._rebirth_asked: dict[str, float] = {}  # edge node -> when a rebirth was last requested
        self._requests: list[tuple[str, bytes]] = []
        self.counts = {"births": 0, "deaths": 0, "stale_deaths": 0, "sequence_gaps": 0, "rebirth_requests": 0,
                       "unknown_aliases": 0, "ignored": 0}

    # --- the driver's interface (drivers/mqtt.py) ---
    def topics(self) -> list[str]:
        return self.config.topics()

    def readings(self, topic: str, payload: bytes, received_at: float) -> list[RawReading]:
        source = cut(f"mqtt:{topic}", SOURCE_MAX_CHARS)
        try:
            return self._handle(topic, payload, received_at, source)
        except Refused as refused:
            return [_rejected(None, source, payload, received_at, refused.reason, str(refused))]

    def undecodable(self, topic: str, payload: bytes, received_at: float) -> RawReading:
        return _rejected(None, cut(f"mqtt:{topic}", SOURCE_MAX_CHARS), payload, received_at, Reason.MALFORMED,
                         "could not be decoded: an error in the agent (logged)")

    def requests(self) -> list[tuple[str, bytes]]:
        """Messages to publish (rebirth requests, QoS 0), each returned once."""
        requests, self._requests = self._requests, []
        return requests

    def stats(self) -> dict[str, int]:
        """Called from other threads: tuple() copies the sessions in one step, as paho's thread may change them."""
        return {**self.counts, "edge_nodes_online": sum(s.born for s in tuple(self._sessions.values()))}

    # --- one message ---
    def _handle(self, topic: str, payload: bytes, received_at: float, source: str) -> list[RawReading]:
        where = parse_topic(topic, self.config.group_id)
        if len(payload) > self._max_bytes:
            raise Refused(Reason.PAYLOAD_TOO_LARGE,
                          f"{len(payload)} bytes, more than mqtt.max_payload_bytes = {self._max_bytes}")
        if where.message_type in ("NCMD", "DCMD"):  # commands to nodes (our own rebirth requests among them)
            self.counts["ignored"] += 1
            return []
        message = _parse(payload)
        node = where.edge_node_id
        if node not in self._sessions and len(self._sessions) >= MAX_EDGE_NODES:
            raise Refused(Reason.UNKNOWN_MACHINE, f"more than {MAX_EDGE_NODES} edge nodes in group "
                                                  f"{self.config.group_id!r}; list the ones to read in edge_node_ids")
        if where.message_type == "NDEATH":
            self._death(node, message)
            return []
        if where.message_type == "NBIRTH":
            self._sessions[node] = Session(bd_seq=_bd_seq(message), seq=_seq(message), born=True)
            self._rebirth_asked.pop(node, None)
            self.counts["births"] += 1
            log.info("Sparkplug B edge node %s/%s born", self.config.group_id, node)
        else:
            self._check_sequence(node, message, received_at)
        session = self._sessions[node]
        if where.message_type == "DDEATH":
            session.devices.pop(where.device_id, None)
            self.counts["deaths"] += 1
            return []
        if where.device_id not in session.devices and len(session.devices) >= MAX_DEVICES_PER_NODE:
            raise Refused(Reason.UNKNOWN_MACHINE, f"more than {MAX_DEVICES_PER_NODE} devices on edge node {node!r}")
        device = session.devices.setdefault(where.device_id, Device())
        if where.message_type.endswith("BIRTH"):
            device.aliases.clear()
            device.datatypes.clear()
            device.born = True
            if where.message_type == "DBIRTH":
                self.counts["births"] += 1
        return self._apply(where, device, message, received_at, source, payload)

    def _death(self, node: str, message: Any) -> None:
        session = self._sessions.get(node)
        bd_seq = _bd_seq(message)
        if session is not None and session.bd_seq is not None and bd_seq is not None and bd_seq != session.bd_seq:
            self.counts["stale_deaths"] += 1  # the will of an earlier connection, published after the new birth
            return
        self.counts["deaths"] += 1
        self._rebirth_asked.pop(node, None)
        if self._sessions.pop(node, None) is not None:
            log.info("Sparkplug B edge node %s/%s died (NDEATH)", self.config.group_id, node)

    def _check_sequence(self, node: str, message: Any, received_at: float) -> None:
        session = self._sessions.get(node)
        seq = _seq(message)
        if session is None:  # no birth seen since the agent started (or since the node's death)
            self._sessions[node] = Session(seq=seq)
            self._ask_rebirth(node, received_at)
            return
        expected = None if session.seq is None else (session.seq + 1) % 256
        session.seq = seq
        if expected is None or seq is None or seq == expected:
            return
        self.counts["sequence_gaps"] += 1
        if not session.gap_logged:
            session.gap_logged = True
            log.warning("Sparkplug B edge node %s/%s: sequence number %d where %d was due (a message was lost); "
                        "rebirth requested (further gaps counted until its next birth)", self.config.group_id, node,
                        seq, expected)
        self._ask_rebirth(node, received_at)

    def _ask_rebirth(self, node: str, now: float) -> None:
        if not self.config.request_rebirth:
            return
        last = self._rebirth_asked.get(node)
        if last is not None and now - last < self.config.rebirth_retry_s:
            return
        self._rebirth_asked[node] = now
        self.counts["rebirth_requests"] += 1
        self._requests.append((f"{NAMESPACE}/{self.config.group_id}/NCMD/{node}", rebirth_request(now)))

    # --- metrics to readings ---
    def _apply(self, where: Topic, device: Device, message: Any, received_at: float, source: str,
               payload: bytes) -> list[RawReading]:
        listed = self._listed.get((where.edge_node_id, where.device_id))
        if where.device_id is None and listed is None:  # the node's own metrics make no machine unless listed
            if where.message_type == "NBIRTH":
                _learn(device, message)
            return []
        metric_map = (listed.metrics if listed and listed.metrics else None) or self.config.metrics
        birth = where.message_type.endswith("BIRTH")
        if birth:
            _learn(device, message)
        names: list[str | None] = [metric.name if metric.HasField("name") else device.aliases.get(metric.alias)
                                   for metric in message.metrics]
        if None in names:
            nameless = message.metrics[names.index(None)]
            if not nameless.HasField("alias"):
                raise Refused(Reason.MALFORMED, "a metric has neither a name nor an alias")
            alias = nameless.alias
            self.counts["unknown_aliases"] += 1
            self._ask_rebirth(where.edge_node_id, received_at)
            what = f"device {where.device_id!r}" if where.device_id else "the edge node"
            raise Refused(Reason.MALFORMED, f"metric alias {alias} is not in the birth certificate of {what} of "
                                            f"{where.edge_node_id!r} (rebirth requested)")
        machine = self._machine(where, listed)
        pending: set[str] = set()
        stamps: list[int] = []
        out: list[RawReading] = []
        for name, metric in zip(names, message.metrics):
            if name is None:  # refused above; the check tells the type checker
                continue
            target = metric_map.get(name, None if metric_map else name)
            if target is None or name == BDSEQ_METRIC:
                continue
            if target in pending:  # the same metric twice in one message: a reading for each value
                out.append(self._reading(machine, device, stamps, message, received_at, source, payload))
                pending.clear()
                stamps = []
            datatype = metric.datatype if metric.HasField("datatype") else device.datatypes.get(name)
            device.values[target] = metric_value(metric, datatype)
            pending.add(target)
            if metric.HasField("timestamp"):
                stamps.append(metric.timestamp)
        if pending:
            out.append(self._reading(machine, device, stamps, message, received_at, source, payload))
        return out

    def _machine(self, where: Topic, listed: SparkplugDevice | None) -> tuple[str, str] | Rejection:
        if listed is not None:
            machine_id = listed.machine
        else:
            machine_id = where.device_id or where.edge_node_id
            if not _MACHINE_ID.fullmatch(machine_id):
                return Rejection(Reason.UNKNOWN_MACHINE, f"device id {machine_id[:80]!r} is not a valid machine id: "
                                                         "map it in [[mqtt.sparkplug.devices]] with a machine_id")
        machine_type = (listed.machine_type if listed else None) or self._machines.get(machine_id) \
            or self._default_type
        if machine_type is None:
            return Rejection(Reason.UNKNOWN_MACHINE, f"no machine type for {machine_id}: add it to mqtt.machines or "
                                                     "[[mqtt.sparkplug.devices]], or set mqtt.default_machine_type")
        return machine_id, machine_type

    def _reading(self, machine: tuple[str, str] | Rejection, device: Device, stamps: list[int], message: Any,
                 received_at: float, source: str, payload: bytes) -> RawReading:
        if isinstance(machine, Rejection):
            return _rejected(None, source, payload, received_at, machine.reason, machine.message)
        machine_id, machine_type = machine
        stamp = max(stamps) if stamps else (message.timestamp if message.HasField("timestamp") else None)
        if stamp is None:
            ts = received_at
        elif EARLIEST_MS <= stamp <= LATEST_MS:
            ts = stamp / 1000
        else:
            return _rejected(machine_id, source, payload, received_at, Reason.MALFORMED,
                             f"timestamp {stamp} is not epoch milliseconds between 2000 and 2100")
        fields = {**device.values, self._type_key: machine_type}
        return RawReading(machine_id, ts, fields, source, received_at)


def _parse(payload: bytes) -> Any:
    try:
        return Payload.FromString(payload)
    except DecodeError as exc:  # "Error parsing message with type '...': <why>"
        why = str(exc).rpartition(": ")[2][:120] or "it does not parse"
        raise Refused(Reason.MALFORMED, f"not a Sparkplug B payload (protobuf): {why}") from None
    except RecursionError:
        raise Refused(Reason.MALFORMED, "not a Sparkplug B payload (protobuf): nested too deeply") from None


def _learn(device: Device, message: Any) -> None:
    for metric in message.metrics:
        if metric.HasField("name"):
            if metric.HasField("alias"):
                device.aliases[metric.alias] = metric.name
            if metric.HasField("datatype"):
                device.datatypes[metric.name] = metric.datatype


def _seq(message: Any) -> int | None:
    return message.seq if message.HasField("seq") else None


def _bd_seq(message: Any) -> int | None:
    for metric in message.metrics:
        if metric.name == BDSEQ_METRIC:
            value = metric_value(metric, metric.datatype if metric.HasField("datatype") else None)
            return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


def rebirth_request(now: float) -> bytes:
    """The NCMD payload that asks an edge node to publish its births again."""
    stamp = int(now * 1000)
    message = Payload(timestamp=stamp)
    message.metrics.add(name=REBIRTH_METRIC, timestamp=stamp, datatype=BOOLEAN, boolean_value=True)
    serialized: bytes = message.SerializeToString()
    return serialized


def _rejected(machine_id: str | None, source: str, payload: bytes, received_at: float, reason: Reason,
              message: str) -> RawReading:
    kept = "base64:" + base64.b64encode(payload[:PAYLOAD_KEPT_BYTES]).decode()
    return RawReading(machine_id, received_at, {}, source, received_at, kept, Rejection(reason, message))
