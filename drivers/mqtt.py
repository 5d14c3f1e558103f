"""MQTT telemetry: the `[mqtt]` table, the payload decoder and the driver.

The default payload is `{"ts": <ISO-8601 or epoch seconds>, "<input name>": <number>, ...}` published on
`pdm/<machine_id>/telemetry`; `format = "sparkplug_b"` reads Sparkplug B instead (drivers/sparkplug.py).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import re
import struct
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Concatenate, Literal, ParamSpec, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    UrlConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import from_json

from drivers.base import (
    SOURCE_MAX_CHARS,
    Availability,
    BatchAck,
    DriverStats,
    MachineId,
    MachineType,
    RawReading,
    Sink,
    cut,
)
from drivers.mqtt_client import BufferedClient
from drivers.sparkplug_config import SparkplugConfig
from model.validate import Reason, Rejection

log = logging.getLogger(__name__)
P = ParamSpec("P")

MqttUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["mqtt", "mqtts"], host_required=True)]


class MqttConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: MqttUrl
    format: Literal["json", "sparkplug_b"] = "json"
    sparkplug: SparkplugConfig | None = None  # for format = "sparkplug_b": drivers/sparkplug_config.py
    username: str | None = None
    password: SecretStr | None = None
    ca_file: FilePath | None = None
    client_id: str | None = Field(None, min_length=1)  # None until the agent fills in "pdm-edge-<gateway_id>"
    qos: int = Field(1, ge=0, le=1)
    topics: list[str] = Field(["pdm/+/telemetry"], min_length=1)
    machine_id_from: str = Field("topic", min_length=1)  # "topic", or the name of a payload field
    machine_id_segment: int = Field(1, ge=0)  # which level of the topic, counted from 0, when machine_id_from = "topic"
    payload_map: dict[str, str] = {}  # payload key -> model input name; keys not listed are used as they are
    machines: dict[MachineId, MachineType] = {}
    default_machine_type: MachineType | None = None  # for machines not listed in `machines`
    max_payload_bytes: int = Field(65536, gt=0)
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: int = Field(30, ge=5)
    # How long the broker keeps the agent's session (subscriptions and queued QoS 1 messages) while it is away:
    # readings published during a restart or an upgrade arrive afterwards. MQTT 5 only; 3.1.1 sessions never expire.
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)

    @property
    def host(self) -> str:
        return self.url.host or ""  # never empty: MqttUrl requires a host

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: AnyUrl) -> AnyUrl:
        if url.username or url.password:
            raise ValueError("credentials in the URL would be logged; use mqtt.username and mqtt.password")
        return url

    @field_validator("password")
    @classmethod
    def _needs_username(cls, password: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if password is not None and info.data.get("username") is None:
            raise ValueError("MQTT sends a password only with a username; set mqtt.username")
        return password

    @field_validator("ca_file")
    @classmethod
    def _needs_tls(cls, ca_file: FilePath | None, info: ValidationInfo) -> FilePath | None:
        url = info.data.get("url")
        if ca_file is not None and url is not None and url.scheme != "mqtts":
            raise ValueError("a CA file is only used with TLS; use an mqtts:// URL or remove mqtt.ca_file")
        return ca_file

    @field_validator("topics")
    @classmethod
    def _topic_filters(cls, topics: list[str]) -> list[str]:
        for topic in topics:
            if not is_topic_filter(topic):
                raise ValueError(
                    f"{topic!r} is not a topic filter: '+' must fill a whole level and '#' must be the last level"
                )
        return topics

    @field_validator("machine_id_segment")
    @classmethod
    def _segment_in_topics(cls, segment: int, info: ValidationInfo) -> int:
        if info.data.get("machine_id_from") != "topic":
            return segment
        for topic in info.data.get("topics", ()):
            levels = topic.split("/")
            if segment >= len(levels) and levels[-1] != "#":
                raise ValueError(f"topic {topic!r} has no level {segment} (levels count from 0)")
        return segment

    @field_validator("payload_map")
    @classmethod
    def _one_key_per_input(cls, payload_map: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for key, name in payload_map.items():
            if name in seen:
                raise ValueError(f"payload keys {seen[name]!r} and {key!r} both map to {name!r}")
            seen[name] = key
        return payload_map


    @model_validator(mode="after")
    def _format_keys(self) -> MqttConfig:
        if self.format == "json":
            if self.sparkplug is not None:
                raise ValueError('mqtt.sparkplug is read only with format = "sparkplug_b"')
            return self
        if self.sparkplug is None:
            raise ValueError('format = "sparkplug_b" needs a [mqtt.sparkplug] table with group_id')
        json_only = sorted({"topics", "machine_id_from", "machine_id_segment", "payload_map"} & self.model_fields_set)
        if json_only:
            raise ValueError(f"{', '.join(json_only)}: for JSON payloads only; Sparkplug B subscribes to "
                             "spBv1.0/<group_id>/... and maps metrics in [mqtt.sparkplug]")
        return self

    def listed_machines(self) -> list[str]:
        """The machines the configuration names (always admitted by the roster)."""
        devices = self.sparkplug.devices if self.sparkplug else []
        return [*self.machines, *(device.machine for device in devices)]


def is_topic_filter(topic: str) -> bool:
    """MQTT's rule: '+' fills a whole level, '#' fills the last one."""
    levels = topic.split("/")
    wildcards_whole = all(level in ("+", "#") or not {"+", "#"} & set(level) for level in levels)
    return bool(topic) and wildcards_whole and "#" not in levels[:-1]


# --- the driver ---------------------------------------------------------------------------------------------------

PAYLOAD_KEPT_BYTES = 4096  # of a payload, for the quarantine
TOPICS_CACHED, TOPIC_CACHED_CHARS = 4096, 128  # the decoder remembers what it read of up to 4,096 short topics
# What a PUBLISH packet holds besides its payload, at most: fixed header (5), topic (2 + 65,535), packet id (2) and
# room for properties. A payload within max_payload_bytes always fits; one a little over arrives and is quarantined.
PACKET_OVERHEAD_BYTES = 5 + 2 + 65_535 + 2 + 16_384
EARLIEST_TS, LATEST_TS = 946_684_800.0, 4_102_444_800.0  # 2000-01-01 .. 2100-01-01: anything else is a unit error
_MACHINE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def max_packet_bytes(config: MqttConfig) -> int:
    """The Maximum Packet Size the agent announces in CONNECT (MQTT 5)."""
    return min(config.max_payload_bytes + PACKET_OVERHEAD_BYTES, 268_435_455)  # MQTT's largest packet


def parse_ts(value: Any, received_at: float) -> float:
    """A payload's `ts`: ISO-8601 (naive means UTC) or epoch seconds; absent means when it was received."""
    if value is None:
        return received_at
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            ts = float(value)
        except OverflowError:  # an integer beyond float range
            ts = math.inf
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"ts {value[:40]!r} is not an ISO-8601 time") from None
        ts = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    else:
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        raise ValueError(f"ts is {kind}, not a time")  # noqa: TRY004 - the decoder catches ValueError
    if not EARLIEST_TS <= ts <= LATEST_TS:
        hint = "; it looks like milliseconds, send seconds" if EARLIEST_TS * 1000 <= ts <= LATEST_TS * 1000 else ""
        raise ValueError(f"ts {value!r} is not epoch seconds between 2000 and 2100{hint}")
    return ts


class MessageFormat(Protocol):
    """What the driver asks of a payload format, from paho's network thread, one message at a time."""

    def topics(self) -> list[str]: ...  # the topic filters to subscribe to

    def readings(self, topic: str, payload: bytes, received_at: float) -> list[RawReading]: ...  # none, one or more

    def undecodable(self, topic: str, payload: bytes, received_at: float) -> RawReading: ...  # after a decoder bug

    def requests(self) -> list[tuple[str, bytes]]: ...  # (topic, payload) to publish at QoS 0, each returned once

    def stats(self) -> dict[str, int]: ...


def message_format(config: MqttConfig, type_key: str) -> MessageFormat:
    if config.format == "sparkplug_b" and config.sparkplug is not None:  # the config's rule: one needs the other
        from drivers.sparkplug import SparkplugDecoder  # the schema is loaded only where it is used

        return SparkplugDecoder(config.sparkplug, config.machines, config.default_machine_type, type_key,
                                config.max_payload_bytes)
    return PayloadDecoder(config, type_key)


class PayloadDecoder:
    """One MQTT message -> one RawReading, rejected with a reason when it cannot be one. Pure: no I/O."""

    def __init__(self, config: MqttConfig, type_key: str) -> None:
        self._config = config
        self._type_key = type_key
        self._skip = ("ts", config.machine_id_from)
        self._topics: dict[str, tuple[str | None, str]] = {}  # topic -> its machine id and the readings' source

    def topics(self) -> list[str]:
        return self._config.topics

    def readings(self, topic: str, payload: bytes, received_at: float) -> list[RawReading]:
        return [self.decode(topic, payload, received_at)]

    def requests(self) -> list[tuple[str, bytes]]:
        return []

    def stats(self) -> dict[str, int]:
        return {}

    def decode(self, topic: str, payload: bytes | bytearray, received_at: float) -> RawReading:
        config = self._config
        kept = payload[:PAYLOAD_KEPT_BYTES].decode("utf-8", "replace")
        machine_id, source = self._topic(topic)

        def rejected(reason: Reason, message: str) -> RawReading:
            return RawReading(machine_id, received_at, {}, source, received_at, kept, Rejection(reason, message))

        if len(payload) > config.max_payload_bytes:
            return rejected(Reason.PAYLOAD_TOO_LARGE,
                            f"{len(payload)} bytes, more than mqtt.max_payload_bytes = {config.max_payload_bytes}")
        try:
            data = _loads(payload)
        except ValueError as exc:  # UnicodeDecodeError is one
            return rejected(Reason.MALFORMED, f"not JSON: {exc}")
        except RecursionError:  # nesting deeper than the interpreter's stack: nobody's telemetry
            return rejected(Reason.MALFORMED, "not JSON: nested too deeply")
        if not isinstance(data, dict):
            return rejected(Reason.NOT_AN_OBJECT, f"the payload is {_JSON_TYPES.get(type(data), 'a number')}, "
                                                  "not a JSON object")
        if config.machine_id_from != "topic":
            machine_id = data.get(config.machine_id_from)
        if not isinstance(machine_id, str) or not _MACHINE_ID.fullmatch(machine_id):
            machine_id = None
            where = f"topic level {config.machine_id_segment}" if config.machine_id_from == "topic" \
                else f"payload field {config.machine_id_from!r}"
            return rejected(Reason.UNKNOWN_MACHINE, f"no valid machine id in the {where}")
        try:
            ts = parse_ts(data.get("ts"), received_at)
        except ValueError as exc:
            return rejected(Reason.MALFORMED, str(exc))
        fields: dict[str, Any] = data  # a JSON object's keys are strings; the object is this reading's alone
        for key in self._skip:
            fields.pop(key, None)
        if config.payload_map:
            fields = {config.payload_map.get(k, k): v for k, v in fields.items()}
        machine_type = config.machines.get(machine_id) or fields.get(self._type_key) or config.default_machine_type
        if machine_type is None:
            return rejected(Reason.UNKNOWN_MACHINE, f"no machine type for {machine_id}: add it to mqtt.machines, "
                                                    f"send {self._type_key} or set mqtt.default_machine_type")
        fields[self._type_key] = machine_type
        return RawReading(machine_id, ts, fields, source, received_at, kept)

    def undecodable(self, topic: str, payload: bytes | bytearray, received_at: float) -> RawReading:
        """The quarantined stand-in for a message `decode` failed on (a bug): kept, so nothing is lost unseen."""
        kept = payload[:PAYLOAD_KEPT_BYTES].decode("utf-8", "replace")
        return RawReading(None, received_at, {}, cut(f"mqtt:{topic}", SOURCE_MAX_CHARS), received_at, kept,
                          Rejection(Reason.MALFORMED, "could not be decoded: an error in the agent (logged)"))

    def _topic(self, topic: str) -> tuple[str | None, str]:
        """The topic's machine id (see _topic_machine_id) and the source of its readings, remembered for the
        usual short topics of a bounded number of machines."""
        known = self._topics.get(topic)
        if known is None:
            known = (self._topic_machine_id(topic), cut(f"mqtt:{topic}", SOURCE_MAX_CHARS))  # a topic may be 65 kB
            if len(topic) <= TOPIC_CACHED_CHARS:
                if len(self._topics) >= TOPICS_CACHED:
                    self._topics.clear()
                self._topics[topic] = known
        return known

    def _topic_machine_id(self, topic: str) -> str | None:
        """The machine id in the topic; None when there is none or it is not a valid id."""
        if self._config.machine_id_from != "topic":
            return None
        levels = topic.split("/")
        segment = self._config.machine_id_segment
        level = levels[segment] if segment < len(levels) else None
        return level if level is not None and _MACHINE_ID.fullmatch(level) else None


def _loads(payload: bytes | bytearray) -> Any:
    """pydantic-core's JSON parser, a fraction of json.loads's time on a telemetry payload; what it refuses is read
    by json.loads, which has the last word (it reads UTF-16 and a BOM too) and words the error."""
    try:
        return from_json(payload, cache_strings="keys")
    except ValueError:
        return json.loads(payload)


_PUBACK = struct.Struct("!BBH")  # a PUBACK without reason code or properties: MQTT 3.1.1 and 5 (success)


def puback_all(client: mqtt.Client, mids: list[int]) -> None:
    """Acknowledge QoS 1 messages by id, all in one write to the broker. client.ack() queues one packet per message
    and each queued packet wakes paho's network thread (a write to its socketpair) and costs it a send(): for a
    committed batch of 500 readings, 500 of each. These PUBACKs go through the same queue as one packet."""
    packet = b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids])
    client._packet_queue(PUBACK, packet, 0, 0)


def _never_raises(callback: Callable[Concatenate[MqttDriver, P], None]) -> Callable[Concatenate[MqttDriver, P], None]:
    """paho's network thread ends with the first exception a callback raises, and all MQTT ingest with it, while
    the driver would still look connected. A bug that reaches here is logged with its traceback (once per distinct
    error), counted as an internal error, and the thread goes on; a message whose hand-off failed is not
    acknowledged, so the broker delivers it again in the next session."""

    def guarded(self: MqttDriver, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            callback(self, *args, **kwargs)
        except Exception as exc:  # see the docstring
            self.internal_errors += 1
            key = f"{callback.__name__}: {exc!r}"
            if key not in self._logged_errors:
                if len(self._logged_errors) < 100:
                    self._logged_errors.add(key)
                log.exception("MQTT driver: unexpected error in %s (counted as internal_errors; ingest goes on)",
                              callback.__name__.lstrip("_"))

    return guarded


class MqttDriver:
    """Subscribes to the telemetry topics with a persistent session; acknowledges each QoS 1 message only once the
    pipeline committed its reading (manual ack), so a crash before the commit means the broker sends it again.

    paho's network thread runs the callbacks; `sink.put()` blocking there is the back-pressure on the broker.
    """

    name = "mqtt"

    def __init__(self, config: MqttConfig, type_key: str, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._decoder = message_format(config, type_key)
        self._client: mqtt.Client | None = None
        self._puback: Callable[[list[int]], None] = lambda mids: None  # replaced by start()
        self._sink: Sink | None = None
        self._receiving = threading.Lock()  # held while a message is being handed to the sink
        self._stopped = False
        self.messages = 0
        self.rejected = 0
        self.internal_errors = 0
        self.connected = False  # a session with the broker is up
        self._logged_errors: set[str] = set()
        self.link = Availability(f"MQTT broker {config.url.host}:{config.url.port or 1883}", log)

    def start(self, sink: Sink) -> None:
        config = self.config
        v5 = config.protocol == "5"
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if config.username:
            client.username_pw_set(config.username, config.password.get_secret_value() if config.password else None)
        if config.url.scheme == "mqtts":
            client.tls_set(ca_certs=str(config.ca_file) if config.ca_file else None)
        # paho doubles the delay without jitter: spread each gateway's bounds so a fleet does not reconnect in step.
        client.reconnect_delay_set(min_delay=1 + random.random(),  # type: ignore[arg-type]  # paho takes floats
                                   max_delay=45 + 30 * random.random())  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho's, unannotated
            properties.SessionExpiryInterval = config.session_expiry_s
            # paho reads a whole message into memory before we see its size: a 100 MB message would cost 300 MB
            # and, redelivered after the OOM kill, crash-loop the agent. An MQTT 5 broker must not send a packet
            # beyond this; Mosquitto drops it for this client (logged by the broker, invisible to the agent).
            properties.MaximumPacketSize = max_packet_bytes(config)
        self._sink, self._client, self._stopped = sink, client, False
        self._puback = functools.partial(puback_all, client)
        port = config.url.port or (8883 if config.url.scheme == "mqtts" else 1883)
        client.connect_async(config.host, port, keepalive=config.keepalive_s,
                             clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties)
        client.loop_start()

    def stop(self) -> None:
        """Hand nothing more to the sink. The connection stays up so that acknowledgements still go out; a message
        that arrives from now on is not acknowledged, so the broker keeps it for the next session."""
        self._stopped = True
        with self._receiving:
            pass

    def close(self) -> None:
        self.stop()
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected = False

    def status(self) -> dict[str, Any]:
        """Everything the driver counts, for people and tests: `stats()` is what the agent reads."""
        return {"driver": self.name, "broker": str(self.config.url), "connected": self.connected and self.link.up,
                "messages": self.messages, "rejected": self.rejected, "connection_failures": self.link.failures_total,
                "internal_errors": self.internal_errors,
                "last_error": self.link.last_error, **self._decoder.stats()}

    def stats(self) -> DriverStats:
        return DriverStats(name=self.name, connected=self.connected and self.link.up,
                           errors={"rejected": self.rejected, "connection_failures": self.link.failures_total,
                                   "internal_errors": self.internal_errors},
                           last_error=self.link.last_error, details=self.status())

    @_never_raises
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            self.link.failed(f"connection refused: {reason_code}")
            return
        self.link.succeeded()
        self.connected = True
        client.subscribe([(topic, self.config.qos) for topic in self._decoder.topics()])

    @_never_raises
    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            self.link.failed(f"subscription to {self._decoder.topics()} refused: {', '.join(refused)}")
        else:
            log.info("subscribed to %s on %s", ", ".join(self._decoder.topics()), self.link.name)

    @_never_raises
    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError`: the error says why (refused, TLS verification, timeout).
        error = sys.exc_info()[1]
        self.link.failed(f"cannot connect: {error}" if error else "cannot connect")

    @_never_raises
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self.connected = False
        if not self._stopped:
            self.link.failed(f"disconnected: {reason_code}")

    @_never_raises
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._receiving:
            sink = self._sink
            if self._stopped or sink is None:
                return
            received_at = self._clock()
            payload = bytes(message.payload)
            try:
                readings = self._decoder.readings(message.topic, payload, received_at)
            except Exception:  # a decoder bug costs this message its reading, kept in the quarantine
                self.internal_errors += 1
                log.exception("MQTT driver: unexpected error decoding a message on %s (quarantined as malformed)",
                              cut(message.topic, 200))
                readings = [self._decoder.undecodable(message.topic, payload, received_at)]
            for topic, request in self._decoder.requests():
                client.publish(topic, request, qos=0)
            self.messages += 1
            self.rejected += sum(reading.rejection is not None for reading in readings)
            ack = BatchAck(self._puback, message.mid) if message.qos else None  # subscribed at QoS <= 1
            if readings:
                readings[-1].ack = ack  # the pipeline commits in order: once the last is committed, all are
            elif ack is not None:  # nothing to commit (a birth or death certificate): acknowledged now
                ack()
            for reading in readings:
                sink.put(reading)
