"""The agent's configuration (SPEC §3): typed models, where each value comes from, and every problem at once.

Sources, highest priority first:
  1. keyword arguments of `load_config` (tests, the demo);
  2. environment variables `PDM_<KEY>` and `PDM_<SECTION>__<KEY>`, e.g. PDM_GATEWAY_ID, PDM_CENTRAL__URL; lists
     and tables as JSON, e.g. PDM_MODBUS='[{...}]'; a secret also as `<variable>_FILE` (see agent/secrets.py);
  3. the same variables in the `.env` file of the working directory;
  4. systemd credentials `central.token`, `status.token`, `mqtt.password` in `$CREDENTIALS_DIRECTORY`;
  5. the TOML file: `load_config(path)` (the `--config` option), else `PDM_CONFIG` from the environment or the
     .env file, else /etc/pdm-edge/agent.toml;
  6. the defaults below.
Tables merge key by key across sources; a list (`[[modbus]]`, `mqtt.topics`) comes whole from one source.
Validation reads local files only (the TOML file, secrets, CA files, the model folder): no network I/O.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from agent.secrets import (
    CONFIG_ENV,
    CREDENTIALS_ENV,
    ENV_PREFIX,
    SECRET_KEYS,
    CredentialsSource,
    DotEnvSource,
    EnvSource,
    Key,
    dotted,
    env_name,
)
from drivers.modbus import TRANSPORTS, ModbusDevice, check_lines
from drivers.mqtt import MqttConfig
from drivers.opcua_config import OpcuaServer, check_servers, input_problems
from drivers.sparkplug_config import input_problems as sparkplug_input_problems
from sync.config import CentralConfig, is_loopback
from sync.remote import AlarmsConfig, SummaryConfig  # defined neutrally: central checks remote overrides with them
from web.tokens import weakness

DEFAULT_CONFIG_FILE = Path("/etc/pdm-edge/agent.toml")
DOTENV_FILE = Path(".env")  # relative to the working directory
DEFAULT_DATA_DIR = Path("/var/lib/pdm-edge")
# The status token guards read-only plant data on a LAN, behind a limit of a few guesses a minute per address
# (web/throttle.py): 64 bits is out of reach online. Central's ops token (128) is reachable from anywhere and guards
# writes and every gateway's data.
STATUS_TOKEN_BITS = 64

# The sources load_config built, while it validates an AgentConfig in this context; see settings_customise_sources.
_loading: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar("_loading", default=())

GatewayId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem, naming the key, source and fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [_one_line(problem) for problem in problems]
        super().__init__("\n".join(self.problems))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _one_line(problem: str) -> str:
    """A problem quotes keys and values as written, which may hold newlines or other control characters (a TOML
    key "a\nb", a variable's JSON): escaped, each problem stays on its one line."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], problem)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number finite, e.g. grace_s


class ModelConfig(_Section):
    path: DirectoryPath | None = None  # a model package folder; None: the package shipped with the agent
    # Public keys (PEM files, `pdm-central keys new`) whose signed bundles central may send (SPEC §9). None listed:
    # the gateway takes no model from central.
    trusted_keys: list[FilePath] = []
    # True: this gateway keeps its configured model whatever central asks (an operator's pin, e.g. during a
    # commissioning); central's rollouts report it as pinned.
    pinned: bool = False


class BufferConfig(_Section):
    max_db_mb: int = Field(512, ge=16)  # at the cap the oldest raw readings are dropped first, and counted
    reading_retention_h: float = Field(72, gt=0)  # raw readings, once summarised
    synced_retention_h: float = Field(24, gt=0)  # summaries and events, once central has them
    synchronous: Literal["NORMAL", "FULL"] = "FULL"  # FULL: an accepted reading survives a power loss
    quarantine_max_rows: int = Field(10_000, ge=1)  # rejected readings kept with their reason; the oldest go first
    quarantine_max_mb: int | None = Field(None, ge=1)  # and at most this much of them; None: a tenth of max_db_mb

    @property
    def quarantine_max_bytes(self) -> int:
        return (self.quarantine_max_mb or max(1, self.max_db_mb // 10)) * 2**20


class MachinesConfig(_Section):
    """Which machines readings are taken from (agent/roster.py): a publisher must not create machines without end."""

    max_machines: int = Field(1000, ge=1, le=100_000)  # known at once, besides the listed ones; more are quarantined
    # Machine ids, or patterns such as "press-*": when set, only these machines (and the Modbus devices,
    # mqtt.machines, the OPC UA machines and Sparkplug devices, always) are taken; the rest are quarantined as
    # unknown_machine.
    allowed: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._*?\[\]!-]{1,64}$")]] = []
    forget_after_h: float = Field(72, gt=0)  # a machine silent this long leaves the status API, /metrics, the count


class PipelineConfig(_Section):
    batch_max: int = Field(500, ge=1)  # readings scored and stored per transaction
    batch_max_age_ms: int = Field(100, ge=1)  # a partial batch waits no longer than this
    queue_max: int = Field(10_000, ge=1)  # readings waiting for the pipeline; drivers wait when it is full


class StatusConfig(_Section):
    token: SecretStr | None = None  # declared before `bind`, whose validator needs it
    bind: str = "127.0.0.1:8080"
    cors_origins: list[Annotated[str, StringConstraints(pattern=r"^https?://[^/\s]+$")]] = []

    @property
    def host(self) -> str:
        return split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return split_bind(self.bind)[1]

    @field_validator("token")
    @classmethod
    def _strong(cls, token: SecretStr | None) -> SecretStr | None:
        problem = weakness(token.get_secret_value(), min_bits=STATUS_TOKEN_BITS) if token is not None else None
        if problem:
            raise ValueError(problem)
        return token

    @field_validator("bind")
    @classmethod
    def _token_beyond_loopback(cls, bind: str, info: ValidationInfo) -> str:
        host, port = split_bind(bind)
        if not is_loopback(host) and "token" in info.data and info.data["token"] is None:
            raise ValueError(
                f"{host} is reachable from the network, so the status API needs a token: "
                f"set PDM_STATUS__TOKEN (or status.token), or bind to 127.0.0.1:{port}"
            )
        return bind


def split_bind(bind: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port)."""
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8080"')
    return host.strip("[]"), int(port)


def _default_data_dir() -> Path:
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=; may list several, first is ours
    return Path(state.split(":")[0]) if state else DEFAULT_DATA_DIR


class AgentConfig(BaseSettings):
    """The whole configuration. `load_config()` reads it from every source; `AgentConfig(**values)` validates
    `values` alone, which suits tests of other parts."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_ignore_empty=True,  # PDM_X= counts as unset, as docker compose's ${X:-} produces
        dotenv_filtering="match_prefix",  # a misspelt PDM_ name in .env is an error; other variables are ignored
    )

    gateway_id: GatewayId
    data_dir: Path = Field(default_factory=_default_data_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, else JSON
    model: ModelConfig = Field(default_factory=ModelConfig)
    modbus: list[ModbusDevice] = []
    mqtt: MqttConfig | None = None
    opcua: list[OpcuaServer] = []  # drivers/opcua_config.py
    central: CentralConfig = Field(default_factory=CentralConfig)
    summary: SummaryConfig = Field(default_factory=SummaryConfig)
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    machines: MachinesConfig = Field(default_factory=MachinesConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_config builds the other sources: only it knows which TOML file to read (a run-time argument, which
        # this class method cannot receive), and it keeps them to tell where a bad value came from.
        return (init_settings, *_loading.get())

    @field_validator("modbus")
    @classmethod
    def _one_device_per_machine(cls, devices: list[ModbusDevice]) -> list[ModbusDevice]:
        first: dict[str, int] = {}
        for index, device in enumerate(devices):
            if device.machine_id in first:
                raise ValueError(
                    f"modbus[{first[device.machine_id]}] and modbus[{index}] are both machine "
                    f"{device.machine_id!r}; give each device its own machine_id"
                )
            first[device.machine_id] = index
        problems = check_lines(devices)
        if problems:
            raise ValueError("; ".join(problems))
        return devices

    @field_validator("opcua")
    @classmethod
    def _opcua_servers(cls, servers: list[OpcuaServer]) -> list[OpcuaServer]:
        problems = check_servers(servers)
        if problems:
            raise ValueError("; ".join(problems))
        return servers

    @model_validator(mode="after")
    def _default_client_id(self) -> AgentConfig:
        if self.mqtt is not None and self.mqtt.client_id is None:
            self.mqtt.client_id = f"pdm-edge-{self.gateway_id}"
        return self


@dataclass(frozen=True)
class _Layer:
    source: PydanticBaseSettingsSource
    origin: Callable[[Key], str]  # where the value of a key in this source came from


_Found = Sequence[tuple[_Layer, dict[str, Any]]]  # each source with what it holds


def load_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """Read, merge and validate every source (see the module docstring); raise ConfigError listing every problem."""
    env = EnvSource(AgentConfig)
    dotenv_file = Path.cwd() / DOTENV_FILE
    try:
        dotenv = DotEnvSource(AgentConfig, dotenv_file)
    except OSError as exc:
        problem = f"{dotenv_file}: cannot read it: {exc.strerror}; fix its permissions or delete it"
        raise ConfigError([problem]) from None
    config_file, chosen_by = _choose_config_file(path, env, dotenv)
    toml = _read_toml(config_file, chosen_by)
    credentials = CredentialsSource(AgentConfig, os.environ.get(CREDENTIALS_ENV))
    layers = (  # by priority; the first is what AgentConfig(**overrides) reads itself
        _Layer(InitSettingsSource(AgentConfig, overrides), lambda key: "load_config() argument"),
        _Layer(env, env.origin),
        _Layer(dotenv, dotenv.origin),
        _Layer(credentials, credentials.origin),
        _Layer(toml, lambda key: str(config_file)),
    )
    problems = env.problems + dotenv.problems + credentials.problems
    loading = _loading.set(tuple(layer.source for layer in layers[1:]))
    try:
        config = AgentConfig(**overrides)
    except ValidationError as exc:
        # `from None`: the pydantic error quotes input values, secrets included
        raise ConfigError(problems + _describe(exc, layers, config_file)) from None
    except SettingsError as exc:  # a list or table in a variable that is not JSON
        raise ConfigError([*problems, str(exc.__cause__ or exc)]) from None
    finally:
        _loading.reset(loading)
    if problems:
        raise ConfigError(problems)
    return config


def _choose_config_file(path: Path | None, env: EnvSource, dotenv: DotEnvSource) -> tuple[Path, str]:
    """The TOML file to read, and what chose it."""
    if path is not None:
        return Path(path), "--config"
    if env.config_file:
        return Path(env.config_file), f"{CONFIG_ENV} in the environment"
    if dotenv.config_file:
        return Path(dotenv.config_file), f"{CONFIG_ENV} in {dotenv.place}"
    return DEFAULT_CONFIG_FILE, "the default"


def _read_toml(path: Path, chosen_by: str) -> TomlConfigSettingsSource:
    fix = f"pass --config FILE or set {CONFIG_ENV}=FILE"
    if not path.is_file():
        raise ConfigError([f"config file {path} (from {chosen_by}): not found; {fix}"])
    try:
        return TomlConfigSettingsSource(AgentConfig, toml_file=path)
    except OSError as exc:
        raise ConfigError([f"config file {path} (from {chosen_by}): cannot read it: {exc.strerror}; {fix}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8"]) from None
    except RecursionError:
        raise ConfigError([f"config file {path}: not valid TOML: arrays or tables nested too deeply"]) from None


def _describe(exc: ValidationError, layers: Sequence[_Layer], config_file: Path) -> list[str]:
    found = [(layer, layer.source()) for layer in layers]
    return [_problem(error, found, config_file) for error in exc.errors()]


def _problem(error: ErrorDetails, found: _Found, config_file: Path) -> str:
    key, transport = _key(error)
    if error["type"] in ("missing", "union_tag_not_found"):
        if all(isinstance(part, str) for part in key):
            return f"{dotted(key)}: required; add it to {config_file} or set {env_name(key)}"
        parent = key[:-1]  # in a list: say which item, and where the list was given
        return f"{dotted(key)}: required; add it to {dotted(parent)} ({_origin(found, parent, str(config_file))})"
    origin = _origin(found, key, "not set" if error["input"] is None else "default")
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's, a dataclass's
        scope = f" for transport {transport!r}" if transport else ""
        message = f"unknown key{scope}; remove it or correct its spelling"
    elif error["type"] == "union_tag_invalid":
        message = f"Input should be one of {error['ctx']['expected_tags']}"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return f"{dotted(key)} ({origin}): {message}"


def _key(error: ErrorDetails) -> tuple[Key, str | None]:
    """The key as written in the file, and the transport of the Modbus device it is in. pydantic adds a level for
    the tag of a tagged union (the device's transport, right after its index); the file has no such level."""
    loc = error["loc"]
    is_tag = [isinstance(before, int) and part in TRANSPORTS for before, part in zip((None, *loc), loc)]
    key = tuple(part for part, tag in zip(loc, is_tag) if not tag)
    if error["type"].startswith("union_tag"):
        key = (*key, "transport")
    return key, next((str(part) for part, tag in zip(loc, is_tag) if tag), None)


def _origin(found: _Found, key: Key, unset: str) -> str:
    """Where the value at `key` came from: the first source, by priority, that has it."""
    return next((layer.origin(key) for layer, values in found if _contains(values, key)), unset)


def _contains(values: Any, key: Key) -> bool:
    for part in key:
        try:
            values = values[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def redacted(config: AgentConfig) -> dict[str, Any]:
    """The effective configuration as JSON-able data, each secret replaced by "***" (null when unset)."""
    data = config.model_dump(mode="json")
    for section, name in SECRET_KEYS:
        if data[section] is not None and data[section][name] is not None:
            data[section][name] = "***"
    return data


def check_inputs(config: AgentConfig, input_names: Sequence[str], machine_type_key: str) -> list[str]:
    """Problems in how the devices feed a model with these inputs: each Modbus device reads every input and
    nothing else; MQTT payload keys map to inputs or to the machine type (`machine_type_key`)."""
    problems = []
    inputs = ", ".join(input_names)
    for index, device in enumerate(config.modbus):
        missing = [name for name in input_names if name not in device.registers]
        if missing:
            problems.append(
                f"modbus[{index}].registers: no register for model input {', '.join(missing)}; "
                f"add a [modbus.registers.<input>] table for each"
            )
        problems += [
            f"modbus[{index}].registers.{name}: not a model input (the model reads {inputs}); remove it"
            for name in device.registers
            if name not in input_names
        ]
    problems += input_problems(config.opcua, input_names)
    if config.mqtt is not None:
        problems += [
            f"mqtt.payload_map.{key}: {name!r} is not a model input; map it to one of {inputs} or {machine_type_key}"
            for key, name in config.mqtt.payload_map.items()
            if name not in input_names and name != machine_type_key
        ]
        problems += sparkplug_input_problems(config.mqtt.sparkplug, input_names)
    return problems
