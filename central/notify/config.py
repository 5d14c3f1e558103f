"""Notification routes and channels: the TOML file named by PDM_CENTRAL_NOTIFY_CONFIG (SPEC §10).

    [channels.ops-hook]                      # a name of your choosing
    type = "webhook"
    url = "https://hooks.example.com/pdm"    # production: https, or plain http to a loopback address only
    secret_file = "/etc/pdm-central/webhook-secret"   # HMAC-SHA256 key of X-PDM-Signature
    timeout_s = 10

    [channels.maintenance]
    type = "email"
    host = "smtp.example.com"
    port = 587
    starttls = true                          # production: true unless the host is loopback
    from = "pdm@example.com"
    to = ["maintenance@example.com"]
    username = "pdm"                         # optional, with password_file
    password_file = "/etc/pdm-central/smtp-password"

    [[routes]]
    name = "line-1"
    gateways = ["gw-line-1"]                 # absent or empty: every gateway
    machines = []                            # absent or empty: every machine
    from_state = "warning"                   # warning: every transition; alarm: only episodes that reach alarm
    channels = ["ops-hook", "maintenance"]
    escalate_after_min = 30                  # optional: one escalation when unacknowledged that long
    digest_after = 10                        # more transitions than this within digest_window_s: one digest
    digest_window_s = 300

Every problem is one line naming where it is (`routes[0].channels: ...`); secrets are read from their files at load
and never shown (`repr` of a channel hides them).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from sync.config import is_loopback

NAME = r"^[A-Za-z0-9._-]{1,64}$"
Name = Annotated[str, Field(pattern=NAME)]


class NotifyConfigError(ValueError):
    """The configuration cannot be used; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Webhook(_Strict):
    type: Literal["webhook"]
    url: str
    secret_file: Path
    timeout_s: float = Field(10.0, gt=0, le=120)
    secret: SecretStr = Field(SecretStr(""), exclude=True)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url


class Email(_Strict):
    type: Literal["email"]
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = True
    ca_file: Path | None = None  # a private CA for the server's certificate; default: the system's
    sender: Annotated[str, Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$")]
    to: Annotated[list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]], Field(min_length=1)]
    username: str | None = None
    password_file: Path | None = None
    timeout_s: float = Field(30.0, gt=0, le=300)
    password: SecretStr = Field(SecretStr(""), exclude=True)

    @model_validator(mode="after")
    def _login(self) -> Email:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: give both or neither")
        return self


Channel = Annotated[Webhook | Email, Field(discriminator="type")]


class Route(_Strict):
    name: Name
    gateways: list[Name] = []
    machines: list[Name] = []
    from_state: Literal["warning", "alarm"] = "warning"
    channels: Annotated[list[Name], Field(min_length=1)]
    escalate_after_min: float | None = Field(None, gt=0, le=7 * 24 * 60)
    digest_after: int = Field(20, ge=1, le=100_000)
    digest_window_s: float = Field(300.0, ge=1, le=24 * 3600)

    def matches(self, gateway: str, machine_id: str) -> bool:
        return (not self.gateways or gateway in self.gateways) and (not self.machines or machine_id in self.machines)


class NotifyConfig(_Strict):
    channels: dict[Name, Channel] = {}
    routes: list[Route] = []


def _where(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in ("webhook", "email"):  # the discriminator's branch, not a key of the file
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", part):
                text += f"[{part!r}]"  # a key as typed, control characters escaped
            else:
                text += f".{part}" if text else part
    return text


def _lines(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        where = _where(error["loc"])
        lines.append(f"{where}: {' '.join(message.splitlines())}" if where else " ".join(message.splitlines()))
    return lines


def parse(data: dict[str, Any], production: bool = False, base: Path | None = None) -> NotifyConfig:
    """The validated configuration of a parsed TOML document, its secrets read; NotifyConfigError listing every
    problem (the schema's, the references between routes and channels, the secret files, production's rules).
    Relative secret paths are relative to `base` (the file's folder)."""
    problems: list[str] = []
    try:
        config: NotifyConfig | None = NotifyConfig.model_validate(data)
    except ValidationError as exc:
        config = None
        problems += _lines(exc)
    given = data.get("channels")
    raw_channels: dict[str, Any] = given if isinstance(given, dict) else {}
    problems += _references(data.get("routes"), raw_channels)
    secrets: dict[str, str] = {}
    for name, channel in raw_channels.items():
        if isinstance(channel, dict):
            secrets[name] = _channel_problems(name, channel, production, base, problems)
    if problems or config is None:
        raise NotifyConfigError(problems)
    channels: dict[str, Webhook | Email] = {}
    for name, validated in config.channels.items():
        field = "secret" if isinstance(validated, Webhook) else "password"
        channels[name] = validated.model_copy(update={field: SecretStr(secrets.get(name, ""))})
    return config.model_copy(update={"channels": channels})


def _references(routes: object, channels: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if not isinstance(routes, list):
        return problems
    names: list[str] = [r["name"] for r in routes if isinstance(r, dict) and isinstance(r.get("name"), str)]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"route name {name!r} is used twice; give each route its own name")
    for i, route in enumerate(routes):
        wanted = route.get("channels") if isinstance(route, dict) else None
        for channel in wanted if isinstance(wanted, list) else []:
            if isinstance(channel, str) and channel not in channels:
                known = ", ".join(sorted(str(c) for c in channels)) or "none"
                problems.append(f"routes[{i}].channels: unknown channel {channel!r} (known: {known})")
    return problems


def _channel_problems(name: str, channel: dict[str, Any], production: bool, base: Path | None,
                      problems: list[str]) -> str:
    """The channel's secret (read from its file), adding what is wrong with it or, in production, with its
    transport to `problems`."""
    where = f"channels.{name}" if re.fullmatch(NAME, name) else f"channels[{name!r}]"
    secret = ""
    if channel.get("type") == "webhook":
        if isinstance(channel.get("secret_file"), str):
            secret = _secret(Path(channel["secret_file"]), base, f"{where}.secret_file", problems)
        url = channel.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if production and parts is not None and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            problems.append(f"{where}.url: plain http to {parts.hostname} would send alarms readable and forgeable "
                            "on the way; production needs https (or a loopback address)")
    elif channel.get("type") == "email":
        if isinstance(channel.get("password_file"), str):
            secret = _secret(Path(channel["password_file"]), base, f"{where}.password_file", problems)
        host = channel.get("host")
        if production and channel.get("starttls", True) is False and isinstance(host, str) and not is_loopback(host):
            problems.append(f"{where}.starttls: false sends mail and the SMTP password in clear to {host}; "
                            "production needs STARTTLS (or a loopback relay)")
    return secret


def load(path: Path, production: bool = False) -> NotifyConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NotifyConfigError([f"{path}: cannot read it: {exc.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NotifyConfigError([f"{path}: not valid TOML: {exc}"]) from None
    try:
        return parse(data, production, path.parent)
    except NotifyConfigError as exc:
        raise NotifyConfigError([f"{path}: {line}" for line in exc.problems]) from None


def _secret(path: Path, base: Path | None, where: str, problems: list[str]) -> str:
    full = path if path.is_absolute() or base is None else base / path
    try:
        secret = full.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        problems.append(f"{where}: cannot read {full}: {exc.strerror}")
        return ""
    except UnicodeDecodeError:
        problems.append(f"{where}: {full} is not UTF-8 text")
        return ""
    if not secret:
        problems.append(f"{where}: {full} is empty")
    return secret
