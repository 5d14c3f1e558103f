"""Fuzzing the agent's configuration: any file content, any TOML values under the real keys, any PDM_ variables.
Loading gives a valid configuration or a ConfigError of one-line problems, and `pdm-edge check-config` prints
them and exits 1: never a traceback."""

from __future__ import annotations

import copy
import itertools
import json
import math
from datetime import date, datetime, time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main
from agent.config import AgentConfig, ConfigError, load_config
from model.features import INPUT_NAMES
from tests.fuzz.strategies import bad_utf8, fuzz_settings, spoil_utf8

BASE = {
    "gateway_id": "gw-1",
    "mqtt": {"url": "mqtt://127.0.0.1:1883", "default_machine_type": "M", "payload_map": {"air": "air_temperature"},
             "machines": {"lathe-07": "L"}},
    "modbus": [{"machine_id": "press-01", "machine_type": "M", "transport": "tcp", "host": "127.0.0.1",
                "registers": {name: {"address": i, "type": "uint16", "scale": 0.1} for i, name in
                              enumerate(INPUT_NAMES)}}],
    "central": {"url": "https://central.example", "token": "0123456789abcdef0123"},
    "status": {"bind": "127.0.0.1:8080"},
    "buffer": {"max_db_mb": 64}, "pipeline": {}, "summary": {}, "alarms": {}, "model": {},
}


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def toml_value(value) -> str:
    """`value` as TOML (inline tables and arrays; the quoted string forms; nan and inf)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, datetime, date, time)):
        return str(value) if isinstance(value, int) else value.isoformat()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(config: dict) -> str:
    """Top-level keys first, then one table per section; a list of tables as [[name]]."""
    lines, tables = [], []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            tables.append(f"[{toml_key(key)}]\n" + "".join(f"{toml_key(k)} = {toml_value(v)}\n"
                                                            for k, v in value.items()))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables += [f"[[{toml_key(key)}]]\n" + "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in v.items())
                       for v in value]
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}\n")
    return "".join(lines) + "\n".join(tables)


toml_scalars = st.one_of(
    st.booleans(), st.integers(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "0", "-1", "127.0.0.1:0", "0.0.0.0:8080", "[::1]:8080", "mqtt://user:pw@h", "http://x",
                     "https://", "/nonexistent", "\x00", "L", "M", "tcp", "rtu", "float32", "little", "FULL",
                     "pdm/#/x", "+", "#", "a" * 70, "١٢٣", "127.0.0.1:٨٠"]),
    st.datetimes(max_value=datetime(9999, 1, 1)), st.dates(), st.times(),
)
toml_values = st.recursive(toml_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=8), c, max_size=3), max_leaves=8)

SECTIONS = [name for name in AgentConfig.model_fields if name not in ("modbus",)]
KEYS = sorted({*AgentConfig.model_fields, *(k for v in BASE.values() if isinstance(v, dict) for k in v),
               "url", "token", "bind", "cors_origins", "window_s", "grace_s", "enter_after", "leave_margin",
               "max_db_mb", "synchronous", "queue_max", "batch_max", "path", "qos", "topics", "machine_id_from",
               "machine_id_segment", "max_payload_bytes", "protocol", "keepalive_s", "ca_file", "username",
               "password", "allow_insecure_http", "sync_interval_s", "batch_size", "timeout_s", "port", "unit_id",
               "interval_s", "largest_gap", "serial_port", "baudrate", "address", "table", "type", "word_order",
               "byte_order", "scale", "offset"})
# Where a fuzzed value goes: a top-level key, a section's key, a device's key, a register's key.
paths = st.one_of(
    st.tuples(st.sampled_from(KEYS)),
    st.tuples(st.sampled_from(SECTIONS), st.sampled_from(KEYS) | st.text(max_size=6)),
    st.tuples(st.just("modbus"), st.just(0), st.sampled_from(KEYS)),
    st.tuples(st.just("modbus"), st.just(0), st.just("registers"), st.sampled_from(INPUT_NAMES),
              st.sampled_from(KEYS)),
)


def with_value(config: dict, path: tuple, value) -> dict:
    """A copy of `config` with `value` at `path`, making tables (or a list of one table, for an index) on the way
    where a change before left something else."""
    config = copy.deepcopy(config)
    node = config
    for part, next_part in itertools.pairwise(path):
        child = node.get(part) if isinstance(node, dict) else node[part]
        if isinstance(next_part, int):
            if not isinstance(child, list) or len(child) <= next_part:
                child = [{} for _ in range(next_part + 1)]
        elif not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[path[-1]] = value
    return config


def mutated_configs():
    return st.builds(lambda changes: _apply(changes), st.lists(st.tuples(paths, toml_values), max_size=4))


def _apply(changes) -> str:
    config = BASE
    for path, value in changes:
        config = with_value(config, path, value)
    return toml_document(config)


texts = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from(list('[]{}="\'.,#\n =abc01-:_')), max_size=200),
    st.builds(lambda depth: "a = " + "[" * depth + "]" * depth, st.integers(min_value=1, max_value=5_000)),
    st.builds(lambda depth: "a = " + "{b = " * depth + "1" + "}" * depth, st.integers(min_value=1, max_value=5_000)),
    mutated_configs(),
)
files = st.one_of(
    texts.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.builds(spoil_utf8, mutated_configs().map(str.encode), st.integers(min_value=0), bad_utf8),
    st.binary(max_size=200),
)


pytestmark = pytest.mark.usefixtures("isolated_config")  # tests/conftest.py


def load(path) -> AgentConfig | list[str]:
    """The configuration, or its problems, each one line naming what is wrong."""
    try:
        return load_config(path)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError without a problem"
        for problem in exc.problems:
            assert problem.strip() and "\n" not in problem and "\r" not in problem, problem
        return exc.problems


@fuzz_settings(short=150, long=15_000)
@given(content=files)
def test_any_config_file_loads_or_gives_one_line_problems(tmp_path, content):
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    load(path)


@fuzz_settings(short=150, long=15_000)
@given(document=mutated_configs())
def test_any_values_under_the_real_keys_load_or_give_one_line_problems(tmp_path, document):
    path = tmp_path / "agent.toml"
    path.write_text(document, encoding="utf-8", errors="surrogatepass")
    loaded = load(path)
    if isinstance(loaded, AgentConfig):  # what was accepted is what a gateway can run with
        assert_sane(loaded)


def assert_sane(config: AgentConfig) -> None:
    dumped = config.model_dump(mode="python")

    def finite(value, where):
        if isinstance(value, float):
            assert math.isfinite(value), f"{where} = {value} was accepted"
        elif isinstance(value, dict):
            for k, v in value.items():
                finite(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                finite(v, f"{where}[{i}]")
    finite(dumped, "config")
    assert 0 < config.status.port < 65536


@fuzz_settings(short=60, long=5_000)
@given(variables=st.dictionaries(
    st.sampled_from(["PDM_GATEWAY_ID", "PDM_MODBUS", "PDM_MQTT", "PDM_MQTT__TOPICS", "PDM_CENTRAL__URL",
                     "PDM_STATUS__BIND", "PDM_BUFFER__MAX_DB_MB", "PDM_MQTT__MACHINES", "PDM_SUMMARY", "PDM_X",
                     "PDM_CENTRAL__TOKEN", "PDM_CONFIG"]),
    st.one_of(st.text(max_size=40), toml_values.map(lambda v: json.dumps(v, default=str))), max_size=4))
def test_any_environment_variables_load_or_give_one_line_problems(tmp_path, monkeypatch, variables):
    path = tmp_path / "agent.toml"
    path.write_text(toml_document(BASE))
    with monkeypatch.context() as env:
        for name, value in variables.items():
            env.setenv(name, value.replace("\x00", ""))
        load(path)


@fuzz_settings(short=25, long=2_000)
@given(content=files)
def test_check_config_prints_problems_and_exits_1_never_a_traceback(tmp_path, capsys, content):
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    capsys.readouterr()
    code = main(["check-config", "--config", str(path)])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    if code != 0:
        assert code == 1 and err.startswith("pdm-edge: ") and "configuration problem" in err


def only_problem(tmp_path, content: bytes) -> str:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    problems = load(path)
    assert isinstance(problems, list) and len(problems) == 1, problems
    return problems[0]


def test_a_config_file_that_is_not_utf8_is_one_problem(tmp_path):
    """Regression: tomllib's UnicodeDecodeError escaped load_config as a traceback."""
    assert "not UTF-8 text (byte 14)" in only_problem(tmp_path, b'gateway_id = "\xff"\n')


@pytest.mark.parametrize("nesting", ["a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 5000 + "1" + "}" * 5000])
def test_deeply_nested_toml_is_one_problem(tmp_path, nesting):
    """Regression: tomllib's RecursionError escaped load_config as a traceback."""
    assert "nested too deeply" in only_problem(tmp_path, nesting.encode())


def test_a_key_with_a_newline_stays_on_one_line(tmp_path):
    """Regression: a quoted key holding a newline split its problem over two lines."""
    problem = only_problem(tmp_path, toml_document(with_value(BASE, ("mqtt", "machines", "a\nb"), "L")).encode())
    assert problem.startswith("mqtt.machines.a\\nb")


FLOAT_KEYS = [("summary", "grace_s"), ("buffer", "reading_retention_h"), ("central", "sync_interval_s"),
              ("central", "timeout_s"), ("modbus", 0, "interval_s"), ("modbus", 0, "registers", "torque", "scale"),
              ("modbus", 0, "registers", "torque", "offset")]


@pytest.mark.parametrize(("path", "value"), [(path, value) for path in FLOAT_KEYS for value in (math.nan, math.inf)]
                         + [(path, -math.inf) for path in FLOAT_KEYS[-2:]])  # the others have a lower bound
def test_infinite_and_nan_numbers_are_refused(tmp_path, path, value):
    """Regression: nan and inf (valid TOML floats) were accepted: a register scale of nan turned every reading into
    NaN, central.sync_interval_s = inf made the sync thread's wait() overflow and end it."""
    document = toml_document(with_value(BASE, path, value))
    assert "Input should be a finite number" in only_problem(tmp_path, document.encode())
