"""The agent's configuration: sources and their priority, secrets, and one clear message per problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel, SecretStr

from agent.config import AgentConfig, ConfigError, check_inputs, load_config, redacted
from agent.secrets import SECRET_KEYS, env_name
from drivers.modbus import ModbusRtuDevice, ModbusTcpDevice
from model.features import INPUT_NAMES, MACHINE_TYPE_INPUT

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "agent.toml"
ENV_EXAMPLE = REPO / ".env.example"

MINIMAL = 'gateway_id = "gw-1"\n'
REGISTERS = "".join(f"[modbus.registers.{name}]\naddress = {i}\n" for i, name in enumerate(INPUT_NAMES))
TCP_DEVICE = f"""
[[modbus]]
machine_id = "press-01"
machine_type = "M"
transport = "tcp"
host = "127.0.0.1"
{REGISTERS}"""
TORQUE = f"[modbus.registers.torque]\naddress = {INPUT_NAMES.index('torque')}\n"


pytestmark = pytest.mark.usefixtures("isolated_config")  # tests/conftest.py


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "agent.toml"

    def write(text: str = MINIMAL) -> Path:
        path.write_text(text)
        return path

    return write


def secret_file(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


def problem(config_path: Path | None) -> str:
    """The one problem loading reports."""
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert len(caught.value.problems) == 1, caught.value.problems
    return caught.value.problems[0]


# --- the shipped examples ---

def test_example_config_and_env_example_validate():
    shutil.copy(ENV_EXAMPLE, ".env")
    config = load_config(EXAMPLE_CONFIG)

    assert config.gateway_id == "plant-a-line-3"
    tcp, rtu = config.modbus
    assert isinstance(tcp, ModbusTcpDevice) and isinstance(rtu, ModbusRtuDevice)
    assert rtu.serial_port == "/dev/ttyUSB0"
    assert config.mqtt is not None and config.mqtt.client_id == "pdm-edge-plant-a-line-3"
    assert not config.central.enabled
    assert check_inputs(config, INPUT_NAMES, MACHINE_TYPE_INPUT) == []


def config_variables() -> set[str]:
    """Every variable the configuration reads, derived from the models."""
    names = {"PDM_CONFIG"} | {env_name(key) + "_FILE" for key in SECRET_KEYS}
    for name, field in AgentConfig.model_fields.items():
        section = None if get_origin(field.annotation) is list else next(  # a list of tables comes whole, as JSON
            (t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)), None)
        keys = [(name, sub) for sub in section.model_fields] if section else [(name,)]
        names |= {env_name(key) for key in keys}
    return names


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def test_env_example_documents_every_variable():
    documented = set(re.findall(r"^#? ?(PDM_\w+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert documented == config_variables()


def test_secret_keys_are_exactly_the_secret_fields():
    secret_fields = set()
    for name, field in AgentConfig.model_fields.items():
        for section in filter(_is_model, (field.annotation, *get_args(field.annotation))):
            fields = section.model_fields.items()
            secret_fields |= {(name, sub) for sub, f in fields if SecretStr in (f.annotation, *get_args(f.annotation))}
    assert secret_fields == set(SECRET_KEYS)


# --- sources and their priority ---

def test_defaults_are_safe_on_a_gateway(config_file):
    config = load_config(config_file())
    assert config.status.bind == "127.0.0.1:8080"
    assert config.status.cors_origins == []
    assert not config.central.enabled
    assert config.data_dir == Path("/var/lib/pdm-edge")
    assert config.mqtt is None and config.modbus == []


def test_data_dir_defaults_to_systemd_state_directory(config_file, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/pdm-edge-2:/var/lib/other")
    assert load_config(config_file()).data_dir == Path("/var/lib/pdm-edge-2")


def test_environment_overrides_toml_key_by_key(config_file, monkeypatch):
    path = config_file(MINIMAL + '[central]\nurl = "https://a.example"\ntimeout_s = 3\n')
    monkeypatch.setenv("PDM_GATEWAY_ID", "gw-env")
    monkeypatch.setenv("PDM_CENTRAL__URL", "https://b.example")
    monkeypatch.setenv("PDM_CENTRAL__TOKEN", "t")

    config = load_config(path)

    assert config.gateway_id == "gw-env"
    assert str(config.central.url) == "https://b.example/"
    assert config.central.timeout_s == 3  # the rest of [central] still comes from the file


def test_lists_and_tables_from_the_environment_are_json(config_file, monkeypatch):
    device = {"machine_id": "m-9", "machine_type": "H", "transport": "rtu", "serial_port": "/dev/ttyS1",
              "registers": {"torque": {"address": 3, "type": "float32"}}}
    monkeypatch.setenv("PDM_MODBUS", json.dumps([device]))
    monkeypatch.setenv("PDM_MQTT__URL", "mqtts://broker.example")
    monkeypatch.setenv("PDM_MQTT__TOPICS", '["site/+/data"]')

    config = load_config(config_file(MINIMAL + TCP_DEVICE))

    assert [d.machine_id for d in config.modbus] == ["m-9"]  # the variable replaces the file's list
    assert config.modbus[0].registers["torque"].type == "float32"
    assert config.mqtt is not None and config.mqtt.topics == ["site/+/data"]


LAYERS = ["toml", "credential", "dotenv", "environment", "argument"]  # lowest priority first


@pytest.mark.parametrize("highest", LAYERS)
def test_priority_of_sources(highest, config_file, tmp_path, monkeypatch):
    """status.token set in every layer up to `highest`: the value of `highest` wins."""
    setters = {
        "toml": lambda v: config_file(MINIMAL + f'[status]\ntoken = "{v}"\n'),
        "credential": lambda v: secret_file(tmp_path, "status.token", v),
        "dotenv": lambda v: Path(".env").write_text(f"PDM_STATUS__TOKEN={v}\n"),
        "environment": lambda v: monkeypatch.setenv("PDM_STATUS__TOKEN", v),
    }
    config_file()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for layer in LAYERS[: LAYERS.index(highest) + 1]:
        if layer in setters:
            setters[layer](f"token-from-{layer:-<16}Xq7vR2pL9sKd")
    overrides = {"status": {"token": "token-from-argument-----"}} if highest == "argument" else {}

    config = load_config(tmp_path / "agent.toml", **overrides)

    assert config.status.token is not None
    assert config.status.token.get_secret_value().startswith(f"token-from-{highest}")


def test_dotenv_overrides_toml(config_file):
    Path(".env").write_text("PDM_SUMMARY__WINDOW_S=30\nUNRELATED=ignored\n")
    assert load_config(config_file()).summary.window_s == 30


@pytest.mark.parametrize("where", ["environment", "dotenv"])
def test_config_file_chosen_by_pdm_config(where, tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.toml"
    path.write_text('gateway_id = "from-pdm-config"\n')
    if where == "environment":
        monkeypatch.setenv("PDM_CONFIG", str(path))
    else:
        Path(".env").write_text(f"PDM_CONFIG={path}\n")
    assert load_config().gateway_id == "from-pdm-config"


@pytest.mark.parametrize("chosen", ["argument", "PDM_CONFIG"])
def test_missing_config_file_names_path_and_fix(chosen, tmp_path, monkeypatch):
    missing = tmp_path / "nope.toml"
    if chosen == "PDM_CONFIG":
        monkeypatch.setenv("PDM_CONFIG", str(missing))
    message = problem(missing if chosen == "argument" else None)
    assert str(missing) in message and "--config" in message and "PDM_CONFIG" in message


def test_agent_config_alone_reads_no_environment(config_file, monkeypatch):
    monkeypatch.setenv("PDM_LOG_LEVEL", "DEBUG")
    with pytest.raises(ConfigError):
        load_config(config_file(""))  # a failed load leaves nothing behind
    assert AgentConfig(gateway_id="gw-1").log_level == "INFO"


# --- secrets ---

@pytest.mark.parametrize("where", ["environment", "dotenv"])
def test_secret_from_file_variable(where, config_file, tmp_path, monkeypatch):
    token = secret_file(tmp_path, "token", "s3cret-token\n")
    if where == "environment":
        monkeypatch.setenv("PDM_CENTRAL__TOKEN_FILE", str(token))
    else:
        Path(".env").write_text(f"PDM_CENTRAL__TOKEN_FILE={token}\n")

    config = load_config(config_file(MINIMAL + '[central]\nurl = "https://central.example"\n'))

    assert config.central.token is not None and config.central.token.get_secret_value() == "s3cret-token"


def test_secrets_from_systemd_credentials(config_file, tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, value in [("central.token", "c-token"), ("status.token", "status-token-0123456789"),
                        ("mqtt.password", "mqtt-pw\r\n")]:
        secret_file(credentials, name, value)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = config_file(MINIMAL + '[mqtt]\nurl = "mqtt://127.0.0.1"\nusername = "u"\n')

    config = load_config(path, central={"url": "https://central.example"})

    assert config.central.token is not None and config.central.token.get_secret_value() == "c-token"
    assert config.status.token is not None and config.status.token.get_secret_value() == "status-token-0123456789"
    assert config.mqtt is not None and config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "mqtt-pw"


def test_secret_and_its_file_variable_together_are_refused(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PDM_CENTRAL__TOKEN", "a")
    monkeypatch.setenv("PDM_CENTRAL__TOKEN_FILE", str(secret_file(tmp_path, "token", "b")))
    message = problem(config_file())
    assert message.startswith("central.token (PDM_CENTRAL__TOKEN_FILE") and "keep one" in message


SECRETS = {"central": "central-SECRET-1", "status": "status-SECRET-2-xxxxxx", "mqtt": "mqtt-SECRET-3"}


def test_secrets_never_appear_in_repr_or_redacted_dump(config_file, monkeypatch):
    monkeypatch.setenv("PDM_CENTRAL__TOKEN", SECRETS["central"])
    monkeypatch.setenv("PDM_STATUS__TOKEN", SECRETS["status"])
    monkeypatch.setenv("PDM_MQTT__PASSWORD", SECRETS["mqtt"])
    path = config_file(MINIMAL + '[central]\nurl = "https://c.example"\n[mqtt]\nurl = "mqtt://b"\nusername = "u"\n')

    config = load_config(path)
    dump = redacted(config)
    shown = repr(config) + str(config) + json.dumps(dump)

    assert not any(secret in shown for secret in SECRETS.values())
    assert (dump["central"]["token"], dump["status"]["token"], dump["mqtt"]["password"]) == ("***",) * 3
    assert config.central.token is not None and config.central.token.get_secret_value() == SECRETS["central"]


def test_unset_secret_is_null_in_redacted_dump(config_file):
    dump = redacted(load_config(config_file()))
    assert dump["status"]["token"] is None and dump["central"]["token"] is None and dump["mqtt"] is None


def test_secrets_never_appear_in_errors(config_file, monkeypatch):
    monkeypatch.setenv("PDM_STATUS__TOKEN", "short-SECRET")  # too short: an error about a secret
    monkeypatch.setenv("PDM_CENTRAL__TOKN", SECRETS["central"])  # misspelt: an unknown key holding a secret
    path = config_file(MINIMAL + f'[mqtt]\nurl = "mqtt://u:{SECRETS["mqtt"]}@broker"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    shown = str(caught.value) + repr(caught.value)
    assert len(caught.value.problems) == 3, caught.value.problems
    assert "SECRET" not in shown
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --- broken configurations: one clear message each ---

def case(name: str, toml: str, starts: str, mentions: str, dotenv: str = "", mkdir: str = "", **env: str):
    """A broken configuration: the TOML file, the .env file, a folder to create, variables; then what the one
    problem reported starts with (the key and where its value came from) and what else it says (the fix)."""
    return pytest.param(toml, dotenv, mkdir, env, starts, mentions, id=name)


MQTT = MINIMAL + "[mqtt]\nurl = 'mqtt://b'\n"
RTU_DEVICE = "[[modbus]]\nmachine_id = 'm'\nmachine_type = 'L'\ntransport = 'rtu'\n"

BROKEN = [
    case("missing gateway_id", "",
         "gateway_id: required", "add it to {file} or set PDM_GATEWAY_ID"),
    case("bad gateway_id", 'gateway_id = "gw 1"\n',
         "gateway_id ({file})", "pattern"),
    case("unknown key", MINIMAL + "[central]\ntokn = 'x'\n",
         "central.tokn ({file})", "unknown key; remove it or correct its spelling"),
    case("misspelt section", MINIMAL + "[centrl]\nurl = 'https://c'\n",
         "centrl ({file})", "unknown key"),
    case("misspelt variable in .env", MINIMAL, dotenv="PDM_CENTRL__URL=https://c\n",
         starts="centrl__url (PDM_CENTRL__URL in {tmp}/.env)", mentions="unknown key"),
    case("invalid TOML", "gateway_id = \n",
         "config file {file}: not valid TOML", "line 1"),
    case("bad URL scheme", MINIMAL + "[central]\nurl = 'ftp://c.example'\n",
         "central.url ({file})", "'http' or 'https'"),
    case("plain http beyond loopback", MINIMAL + "[central]\nurl = 'http://c.example'\ntoken = 't'\n",
         "central.url ({file})", "or set central.allow_insecure_http = true"),
    case("central url without token", MINIMAL + "[central]\nurl = 'https://c.example'\n",
         "central.token (not set)", "PDM_CENTRAL__TOKEN_FILE or the systemd credential central.token"),
    case("unreadable secret file", MINIMAL, PDM_CENTRAL__TOKEN_FILE="{tmp}/missing",
         starts="central.token (PDM_CENTRAL__TOKEN_FILE in the environment)", mentions="{tmp}/missing"),
    case("secret file is a folder", MINIMAL, PDM_MQTT__PASSWORD_FILE="{tmp}",
         starts="mqtt.password (PDM_MQTT__PASSWORD_FILE in the environment)", mentions="Is a directory"),
    case("empty secret file", MINIMAL, PDM_STATUS__TOKEN_FILE="{tmp}/empty",
         starts="status.token (PDM_STATUS__TOKEN_FILE in the environment)",
         mentions="cannot use {tmp}/empty as the secret: it is empty"),
    case("unreadable credential", MINIMAL, mkdir="mqtt.password", CREDENTIALS_DIRECTORY="{tmp}",
         starts="mqtt.password (systemd credential in {tmp})", mentions="{tmp}/mqtt.password"),
    case("status on 0.0.0.0 without token", MINIMAL + "[status]\nbind = '0.0.0.0:8080'\n",
         "status.bind ({file})", "set PDM_STATUS__TOKEN (or status.token), or bind to 127.0.0.1:8080"),
    case("status on [::] without token, from env", MINIMAL, PDM_STATUS__BIND="[::]:9000",
         starts="status.bind (PDM_STATUS__BIND in the environment)", mentions="bind to 127.0.0.1:9000"),
    case("status bind without port", MINIMAL + "[status]\nbind = '127.0.0.1'\n",
         "status.bind ({file})", '"host:port"'),
    case("weak status token", MINIMAL + "[status]\ntoken = 'short'\n",
         "status.token ({file})", "too weak (about"),
    # issue 22: 16 characters passed the length rule with no entropy at all
    case("long status token without entropy", MINIMAL + "[status]\ntoken = 'aaaaaaaaaaaaaaaa'\n",
         "status.token ({file})", "too weak (about 0 bits of entropy, needs 64); generate one with"),
    case("CORS wildcard", MINIMAL + "[status]\ncors_origins = ['*']\n",
         "status.cors_origins[0] ({file})", "pattern"),
    case("rtu device without serial_port", MINIMAL + RTU_DEVICE + TORQUE,
         "modbus[0].serial_port: required", "add it to modbus[0] ({file})"),
    case("device without transport", MINIMAL + RTU_DEVICE.replace("transport = 'rtu'\n", ""),
         "modbus[0].transport: required", "add it to modbus[0] ({file})"),
    case("unknown transport", MINIMAL + RTU_DEVICE.replace("'rtu'", "'udp'"),
         "modbus[0].transport ({file})", "'tcp', 'rtu'"),
    case("tcp device with serial settings", MINIMAL + TCP_DEVICE.replace("host = ", "baudrate = 9600\nhost = "),
         "modbus[0].baudrate ({file})", "unknown key for transport 'tcp'"),
    case("bad register type", MINIMAL + TCP_DEVICE.replace(TORQUE, TORQUE + "type = 'int8'\n"),
         "modbus[0].registers.torque.type ({file})", "'int16', 'uint16', 'int32', 'uint32', 'float32' or 'float64'"),
    case("register past the end",
         MINIMAL + TCP_DEVICE.replace(TORQUE, "[modbus.registers.torque]\naddress = 65535\ntype = 'float32'\n"),
         "modbus[0].registers.torque.type ({file})", "runs past register 65535"),
    case("scale 0", MINIMAL + TCP_DEVICE.replace(TORQUE, TORQUE + "scale = 0\n"),
         "modbus[0].registers.torque.scale ({file})", "use 1 for no scaling"),
    case("two devices for one machine", MINIMAL + TCP_DEVICE + TCP_DEVICE,
         "modbus ({file})", "modbus[0] and modbus[1] are both machine 'press-01'"),
    case("device list not JSON", MINIMAL, PDM_MODBUS="[{{",
         starts="modbus (PDM_MODBUS* in the environment)", mentions="write it as JSON"),
    case("qos 2", MQTT + "qos = 2\n",
         "mqtt.qos ({file})", "less than or equal to 1"),
    case("qos 2 from env", MQTT, PDM_MQTT__QOS="2",
         starts="mqtt.qos (PDM_MQTT__QOS in the environment)", mentions="less than or equal to 1"),
    case("topics not JSON", MQTT, dotenv="PDM_MQTT__TOPICS=pdm/+/x\n",
         starts="mqtt (PDM_MQTT* in {tmp}/.env)", mentions="write it as JSON"),
    case("bad topic filter", MQTT + "topics = ['pdm/#/x']\n",
         "mqtt.topics ({file})", "'#' must be the last level"),
    case("machine id segment beyond the topic", MQTT + "machine_id_segment = 3\n",
         "mqtt.machine_id_segment ({file})", "no level 3"),
    case("password without username", MQTT + "password = 'p'\n",
         "mqtt.password ({file})", "set mqtt.username"),
    case("MQTT URL without a host", MINIMAL + "[mqtt]\nurl = 'mqtt://:1883'\n",
         "mqtt.url ({file})", "empty host"),
    case("credentials in the URL", MINIMAL + "[mqtt]\nurl = 'mqtt://u:p@b'\n",
         "mqtt.url ({file})", "use mqtt.username and mqtt.password"),
    case("CA file without TLS", MQTT + "ca_file = 'agent.toml'\n",
         "mqtt.ca_file ({file})", "use an mqtts:// URL"),
    case("two payload keys for one input", MQTT + "payload_map = {a = 'torque', b = 'torque'}\n",
         "mqtt.payload_map ({file})", "'a' and 'b' both map to 'torque'"),
]


@pytest.mark.parametrize(("toml", "dotenv", "mkdir", "env", "starts", "mentions"), BROKEN)
def test_broken_config_gives_one_clear_message(
    toml, dotenv, mkdir, env, starts, mentions, config_file, tmp_path, monkeypatch
):
    path = config_file(toml)
    (tmp_path / "empty").write_text("\n")
    Path(".env").write_text(dotenv)
    if mkdir:
        (tmp_path / mkdir).mkdir()
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))

    message = problem(path)

    assert message.startswith(starts.format(file=path, tmp=tmp_path)), message
    assert mentions.format(file=path, tmp=tmp_path) in message, message


def test_every_problem_is_listed(config_file):
    path = config_file("[status]\nbind = '0.0.0.0:1'\n[mqtt]\nurl = 'mqtt://b'\nqos = 2\n[summary]\nwindow_s = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = [line.split(" ")[0].rstrip(":") for line in str(caught.value).splitlines()]
    assert sorted(keys) == ["gateway_id", "mqtt.qos", "status.bind", "summary.window_s"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost", "http://[::1]:8000"])
def test_plain_http_to_this_host_is_allowed(url, config_file):
    assert load_config(config_file(), central={"url": url, "token": "t"}).central.enabled


def test_plain_http_elsewhere_when_allowed(config_file):
    central = {"url": "http://c.example", "token": "t", "allow_insecure_http": True}
    assert load_config(config_file(), central=central).central.enabled


# --- devices against the model's inputs ---

def test_check_inputs_names_each_missing_or_unknown_input(config_file):
    toml = MINIMAL + TCP_DEVICE.replace("[modbus.registers.torque]", "[modbus.registers.torq]")
    toml += "[mqtt]\nurl = 'mqtt://b'\n[mqtt.payload_map]\nT = 'torque'\ntype = 'machine_type'\nrpm = 'speed'\n"
    config = load_config(config_file(toml))

    assert check_inputs(config, INPUT_NAMES, MACHINE_TYPE_INPUT) == [
        "modbus[0].registers: no register for model input torque; add a [modbus.registers.<input>] table for each",
        ("modbus[0].registers.torq: not a model input (the model reads air_temperature, process_temperature, "
        "rotational_speed, torque, tool_wear); remove it"),
        ("mqtt.payload_map.rpm: 'speed' is not a model input; map it to one of air_temperature, process_temperature, "
        "rotational_speed, torque, tool_wear or machine_type"),
    ]
