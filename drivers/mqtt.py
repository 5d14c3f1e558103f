"""MQTT telemetry subscription: its configuration, the `[mqtt]` table.

The default payload is `{"ts": <ISO-8601 or epoch seconds>, "<input name>": <number>, ...}` published on
`pdm/<machine_id>/telemetry`.
"""

from __future__ import annotations

from typing import Annotated

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
)

from drivers.modbus import MachineId, MachineType

MqttUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["mqtt", "mqtts"])]


class MqttConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: MqttUrl
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


def is_topic_filter(topic: str) -> bool:
    """MQTT's rule: '+' fills a whole level, '#' fills the last one."""
    levels = topic.split("/")
    wildcards_whole = all(level in ("+", "#") or not {"+", "#"} & set(level) for level in levels)
    return bool(topic) and wildcards_whole and "#" not in levels[:-1]
