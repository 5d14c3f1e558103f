"""OPC UA value conversion and reading assembly (drivers/opcua_values.py), fuzzed; the `[[opcua]]` configuration's
validation (drivers/opcua_config.py, through the agent's config). No server needed."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, ConfigError, check_inputs, load_config
from drivers.opcua_config import NODE_FORMS, browse_path_parts, node_problem
from drivers.opcua_values import MachineReadings, Unusable, convert
from drivers.simulator import INPUTS

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=200),
    st.binary(max_size=100), st.lists(st.floats(), max_size=5), st.datetimes(), st.dictionaries(st.text(), st.integers()),
    st.integers(min_value=10**300, max_value=10**400))
FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@settings(max_examples=500, deadline=None)
@given(ANY_VALUE, FINITE.filter(lambda s: s != 0), FINITE, st.one_of(st.none(), st.sampled_from(
    ["BadSensorFailure", "BadCommunicationError"])))
def test_convert_never_raises_and_yields_a_finite_number_or_a_reason(value, scale, offset, status):
    result = convert(value, scale, offset, status)
    if isinstance(result, Unusable):
        assert result.why and len(result.why) < 120 and "\n" not in result.why
        if status is not None:
            assert status in result.why
        return
    assert isinstance(result, float) and math.isfinite(result)
    assert status is None and isinstance(value, int | float) and not isinstance(value, bool)
    assert result == float(value) * scale + offset


@pytest.mark.parametrize(("value", "why"), [
    (True, "not a number: a value of type bool"), ("12.5", "not a number: str '12.5'"), (None, "not a number: no value"),
    (float("nan"), "not finite: nan"), ([1.0, 2.0], "not a number: list [1.0, 2.0]"),
    (datetime(2026, 1, 1), "not a number: a value of type datetime"), (10**400, "a number beyond the float range"),
])
def test_what_is_not_a_model_input_says_what_it_was(value, why):
    assert convert(value) == Unusable(why)


def test_scale_and_offset_and_a_bad_status():
    assert convert(2150, 0.1, 273.15) == pytest.approx(488.15)
    assert convert(1e308, 10.0) == Unusable("not finite: inf")
    assert convert(300.0, status="BadSensorFailure") == Unusable("the server reported status BadSensorFailure")


# --- readings: one per publish per machine, every reported value in some reading, none after a reconnect alone

def assembler():
    out: list[tuple[dict, float | None]] = []
    readings = MachineReadings(("a", "b"), lambda values, ts: out.append((values, ts)))
    return readings, out


def test_no_reading_before_every_input_has_a_value_then_one_per_flush():
    readings, out = assembler()
    readings.update("a", 1.0, 1.0, 100.0)
    readings.flush()
    assert out == []
    readings.update("b", 2.0, 2.0, 101.0)
    readings.update("a", 3.0, 3.0, 102.0)
    readings.flush()
    assert out == [({"a": 3.0, "b": 2.0}, 102.0)]  # one publish, one reading, stamped with its newest change
    readings.update("a", 4.0, 4.0, 103.0)
    readings.update("a", 5.0, 5.0, 104.0)  # a changed twice in one publish: a reading for each value
    readings.flush()
    assert out[1:] == [({"a": 4.0, "b": 2.0}, 103.0), ({"a": 5.0, "b": 2.0}, 104.0)]


def test_a_value_sent_again_with_its_source_timestamp_is_not_a_change():
    readings, out = assembler()
    for name, value in (("a", 1.0), ("b", 2.0)):
        readings.update(name, value, value, 100.0)
    readings.flush()
    for name, value in (("a", 1.0), ("b", 2.0)):  # a reconnect: the server sends its current values again
        readings.update(name, value, value, 100.0)
    readings.flush()
    assert len(out) == 1 and readings.duplicates == 2
    readings.update("a", 1.0, 1.0, 105.0)  # the same value measured again later is a reading
    readings.flush()
    assert len(out) == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5), st.booleans()), max_size=60))
def test_every_reported_change_is_in_some_reading_in_order(changes):
    readings, out = assembler()
    readings.update("a", -1, -1.0, 0.0)
    readings.update("b", -1, -1.0, 0.0)
    reported = {"a": [-1.0], "b": [-1.0]}
    for t, (name, value, flush) in enumerate(changes, start=1):
        readings.update(name, value, float(value), float(t))
        reported[name].append(float(value))
        if flush:
            readings.flush()
    readings.flush()
    for name in ("a", "b"):
        seen = iter([values[name] for values, _ in out])
        # every reported value appears, in order: a subsequence of the readings' values
        assert all(any(v == x for x in seen) for v in reported[name])


# --- configuration

def server(**changes) -> dict:
    return {"url": "opc.tcp://127.0.0.1:4840", "machines": [
        {"machine_id": "m1", "machine_type": "L", "nodes": {name: f"ns=2;s=m1.{name}" for name in INPUTS}}],
        **changes}


@pytest.mark.parametrize("node", ["ns=2;s=Press 1.Torque", "i=2258", "nsu=urn:x:y;s=A", "ns=1;b=AAEC",
                                  "ns=3;g=09087e75-8e5e-499b-954f-f2a9603db28a", "/Objects/2:Plant/2:m1", "/Objects"])
def test_node_references_as_written(node):
    assert node_problem(node) is None


@pytest.mark.parametrize("node", ["torque", "ns=2;x=1", "/Objects//2:x", "ns=two;i=1", "/"])
def test_a_node_reference_that_is_neither_is_refused_with_an_example(node):
    assert "e.g." in node_problem(node)


def test_browse_paths_default_to_namespace_0():
    assert browse_path_parts("/Objects/2:Plant/Press") == ["0:Objects", "2:Plant", "0:Press"]


def problems(tmp_path, text: str, monkeypatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text(f'gateway_id = "gw"\ndata_dir = "{tmp_path}"\n' + text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    return error.value.problems


def test_a_bad_node_names_its_key_and_source(tmp_path, monkeypatch):
    text = ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n[[opcua.machines]]\nmachine_id = "m1"\nmachine_type = "L"\n'
            '[opcua.machines.nodes]\ntorque = "Torque"\n')
    [problem] = problems(tmp_path, text, monkeypatch)
    assert problem.startswith(f"opcua[0].machines[0].nodes.torque ({tmp_path / 'agent.toml'}): neither a NodeId")


def test_a_node_table_with_an_unknown_key_or_a_node_neither_string_nor_table_is_refused(tmp_path, monkeypatch):
    text = ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n[[opcua.machines]]\nmachine_id = "m1"\nmachine_type = "L"\n'
            '[opcua.machines.nodes]\ntorque = { node = "i=1", scael = 0.1 }\ntool_wear = 7\n')
    where = tmp_path / "agent.toml"
    assert problems(tmp_path, text, monkeypatch) == [
        f"opcua[0].machines[0].nodes.torque.scael ({where}): unknown key; remove it or correct its spelling",
        f"opcua[0].machines[0].nodes.tool_wear ({where}): " + NODE_FORMS]


def test_a_node_table_keeps_its_scale_offset_and_deadband():
    config = AgentConfig(gateway_id="gw", opcua=[server(machines=[{
        "machine_id": "m1", "machine_type": "L", "nodes": {"torque": {"node": "i=1", "scale": 0.1, "offset": 2,
                                                                     "deadband": 0.5}, "tool_wear": "i=2"}}])])
    nodes = config.opcua[0].machines[0].nodes
    assert (nodes["torque"].node, nodes["torque"].scale, nodes["torque"].offset, nodes["torque"].deadband) == (
        "i=1", 0.1, 2.0, 0.5)
    assert (nodes["tool_wear"].scale, nodes["tool_wear"].offset, nodes["tool_wear"].deadband) == (1.0, 0.0, None)


def test_basic256sha256_needs_certificates_and_username_needs_password_file(tmp_path, monkeypatch):
    text = ('[[opcua]]\nurl = "opc.tcp://plc:4840"\nsecurity_policy = "Basic256Sha256"\nusername = "pdm"\n'
            '[[opcua.machines]]\nmachine_id = "m1"\nmachine_type = "L"\n[opcua.machines.nodes]\ntorque = "i=1"\n')
    [problem] = problems(tmp_path, text, monkeypatch)
    assert "needs certificate, private_key, trusted_server_certs" in problem and "make-cert" in problem


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ValueError, match="password_file"):
        AgentConfig(gateway_id="gw", opcua=[server(url="opc.tcp://user:pw@plc:4840")])


def test_a_machine_on_two_servers_is_refused():
    with pytest.raises(ValueError, match="both machine 'm1'"):
        AgentConfig(gateway_id="gw", opcua=[server(), server(url="opc.tcp://127.0.0.1:4841")])


def test_each_machine_maps_every_model_input_and_nothing_else():
    config = server()
    config["machines"][0]["nodes"].pop("torque")
    config["machines"][0]["nodes"]["spindle"] = "i=1"
    found = check_inputs(AgentConfig(gateway_id="gw", opcua=[config]), INPUTS, "Type")
    assert found == ["opcua[0].machines[0].nodes: no node for model input torque; add one for each",
                     ("opcua[0].machines[0].nodes.spindle: not a model input (the model reads air_temperature, "
                     "process_temperature, rotational_speed, torque, tool_wear); remove it")]


def test_without_the_opcua_extra_the_cli_says_which_extra_to_install(monkeypatch, capsys):
    import importlib.util

    from agent.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "asyncua" else real(name, *a))
    assert main(["opcua", "browse", "--url", "opc.tcp://127.0.0.1:4840"]) == 2
    assert capsys.readouterr().err == "pdm-edge opcua browse: needs the opcua extra: pip install 'pdm-edge[opcua]'\n"
