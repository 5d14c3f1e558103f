"""The plant simulator: the pure plant model, and the plant served over Modbus TCP (read by the real driver with
examples/simulator-modbus.toml's register map) and published over MQTT (read by the real MQTT driver).

Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import json
import math
import threading
import tomllib
from pathlib import Path

import pytest

from drivers.modbus import ModbusDriver, ModbusTcpDevice
from drivers.mqtt import MqttConfig, MqttDriver
from drivers.registers import decode, decode_raw
from drivers.simulator import INPUTS, RESOLUTION, Drift, Plant, failure_modes, power_w
from drivers.simulator_modbus import POWER, REGISTERS, TOOL_CHANGES_ADDRESS, ModbusSimulator, unit_words
from drivers.simulator_mqtt import MqttSimulator
from model.modes import MODES
from testkit.net import free_port, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(plant: Plant, seconds: float, dt: float = 1.0) -> list[dict[str, dict[str, float]]]:
    return [plant.step(dt) for _ in range(round(seconds / dt))]


# --- the plant model ------------------------------------------------------------------------------------------------

def test_a_healthy_plant_stays_clear_of_every_failure_condition_and_changes_tools():
    plant = Plant(6, seed=3)
    history = run(plant, 1800)
    for step in history:
        for machine_id, values in step.items():
            assert failure_modes(values, plant.machine_type(machine_id)) == set(), (machine_id, values)
    assert all(m.tool_changes >= 1 for m in plant.machines.values())  # wear grows and resets
    wear = [step["m1"]["tool_wear"] for step in history]
    assert max(wear) <= 200 and min(wear) == 0
    for name in INPUTS:  # values move, within the data's usual ranges
        series = [step["m2"][name] for step in history]
        assert max(series) > min(series), name
    air = [step[m]["air_temperature"] for step in history for m in step]
    diff = [step[m]["process_temperature"] - step[m]["air_temperature"] for step in history for m in step]
    speed = [step[m]["rotational_speed"] for step in history for m in step]
    torque = [step[m]["torque"] for step in history for m in step]
    assert 296 < min(air) and max(air) < 304
    assert 8.9 < min(diff) and max(diff) < 11.2
    assert 1300 < min(speed) and max(speed) < 1800
    assert 25 < min(torque) and max(torque) < 55


def test_readings_are_at_sensor_resolution_and_reproducible():
    first, second = run(Plant(3, seed=7), 50), run(Plant(3, seed=7), 50)
    assert first == second
    assert first != run(Plant(3, seed=8), 50)
    for step in first:
        for values in step.values():
            for name, value in values.items():
                steps = value / RESOLUTION[name]
                assert abs(steps - round(steps)) < 1e-6, (name, value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("machine_id", ["m1", "m2", "m4"])  # types L, M, H
def test_the_drift_reaches_the_modes_documented_condition(mode, machine_id):
    plant = Plant(5, seed=11, drift=Drift(machine_id, mode, minutes=1.0))
    history = run(plant, 75)
    machine_type = plant.machine_type(machine_id)
    assert failure_modes(history[0][machine_id], machine_type) == set()  # starts healthy
    reached = [i for i, step in enumerate(history) if mode in failure_modes(step[machine_id], machine_type)]
    assert reached, f"{mode} never reached"
    assert 30 <= reached[0] <= 60  # after the approach, before the drift's end
    assert all(mode in failure_modes(step[machine_id], machine_type) for step in history[62:])  # and stays
    others = [failure_modes(v, plant.machine_type(m)) for step in history for m, v in step.items() if m != machine_id]
    assert not any(others)  # only the chosen machine drifts


def test_the_conditions_are_the_documented_rules():
    base = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
            "tool_wear": 100.0}
    assert failure_modes(base, "L") == set()
    assert failure_modes({**base, "process_temperature": 308.5, "rotational_speed": 1379.0}, "L") == {"HDF"}
    assert failure_modes({**base, "process_temperature": 308.5}, "L") == set()  # speed too high for HDF
    assert failure_modes({**base, "torque": 60.0}, "L") == {"PWF"}  # 9425 W
    assert failure_modes({**base, "torque": 20.0, "rotational_speed": 1600.0}, "L") == {"PWF"}  # 3351 W
    assert failure_modes({**base, "tool_wear": 180.0, "torque": 62.0, "rotational_speed": 1300.0}, "L") == {"OSF"}
    assert failure_modes({**base, "tool_wear": 180.0, "torque": 62.0, "rotational_speed": 1300.0}, "H") == set()
    assert failure_modes({**base, "tool_wear": 210.0}, "M") == {"TWF"}
    assert power_w(40.0, 1500.0) == pytest.approx(6283.2, abs=0.1)


@pytest.mark.parametrize("text, problem", [("m3", "MACHINE:MODE"), ("m3:XYZ", "unknown failure mode"),
                                           (":OSF", "MACHINE:MODE")])
def test_a_bad_drift_is_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        Drift.parse(text)


def test_a_drift_of_a_machine_the_plant_lacks_is_refused():
    with pytest.raises(ValueError, match="m1..m3"):
        Plant(3, drift=("m9", "OSF"))


# --- Modbus -------------------------------------------------------------------------------------------------------

def test_the_register_layout_decodes_to_the_plants_values():
    values = {"air_temperature": 301.3, "process_temperature": 311.9, "rotational_speed": 1388.0, "torque": 52.7,
              "tool_wear": 187.0}
    tables = unit_words(values, tool_changes=70_000)
    for name, register in REGISTERS.items():
        words = [tables[register.table][register.address + i] for i in range(2 if register.type == "float32" else 1)]
        assert decode(words, register) == pytest.approx(values[name], abs=1e-6), name
    torque = [tables["input"][3], tables["input"][4]]
    assert decode_raw(torque, "float32") != pytest.approx(52.7, abs=1)  # CDAB: read as ABCD it is another number
    power = decode([tables["input"][5], tables["input"][6]], POWER)
    assert power == pytest.approx(power_w(52.7, 1388.0), abs=0.1)
    changes = [tables["holding"][TOOL_CHANGES_ADDRESS], tables["holding"][TOOL_CHANGES_ADDRESS + 1]]
    assert decode_raw(changes, "uint32") == 70_000


def example_devices(port: int) -> list[ModbusTcpDevice]:
    config = tomllib.loads((EXAMPLES / "simulator-modbus.toml").read_text())
    return [ModbusTcpDevice(**{**device, "port": port, "interval_s": 0.2}) for device in config["modbus"]]


class Collect:
    def __init__(self) -> None:
        self.readings = []
        self.lock = threading.Lock()

    def put(self, reading) -> None:
        with self.lock:
            self.readings.append(reading)


def test_the_modbus_simulator_is_read_by_the_driver_with_the_example_register_map():
    plant = Plant(5, seed=5)
    port = free_port()
    devices = example_devices(port)
    assert [(d.machine_id, d.unit_id, d.machine_type) for d in devices] == \
        [(m, i + 1, plant.machine_type(m)) for i, m in enumerate(plant.machines)]
    # a step a day: every read answers the first step's values
    with ModbusSimulator(plant, port, interval_s=86_400) as simulator:
        expected = simulator.latest
        sink = Collect()
        driver = ModbusDriver(devices, "machine_type")
        driver.start(sink)
        try:
            assert wait_until(lambda: {r.machine_id for r in sink.readings} == set(plant.machines), 10)
        finally:
            driver.close()
    for reading in sink.readings:
        assert reading.fields["machine_type"] == plant.machine_type(reading.machine_id)
        for name in INPUTS:
            assert reading.fields[name] == pytest.approx(expected[reading.machine_id][name], abs=1e-6), name


def test_the_modbus_simulator_steps_the_plant_and_stops_cleanly():
    plant = Plant(2, seed=1, drift=("m2", "OSF"))
    port = free_port()
    before = set(threading.enumerate())
    simulator = ModbusSimulator(plant, port, interval_s=0.05).start()
    try:
        assert wait_until(lambda: plant.t >= 0.3, 5)
    finally:
        simulator.stop()
        simulator.stop()  # idempotent
    assert set(threading.enumerate()) <= before  # its thread is gone: nothing steps the plant any more


def test_a_taken_port_is_an_os_error():
    port = free_port()
    with ModbusSimulator(Plant(1), port), pytest.raises(OSError):
        ModbusSimulator(Plant(1), port).start()


# --- MQTT ---------------------------------------------------------------------------------------------------------

def test_the_mqtt_simulator_feeds_the_mqtt_driver_with_the_example_config(private_broker):
    config = tomllib.loads((EXAMPLES / "simulator-mqtt.toml").read_text())["mqtt"]
    config = MqttConfig(**{**config, "url": private_broker.url, "client_id": "test-simulator-agent"})

    class Acking(Collect):
        def put(self, reading) -> None:
            super().put(reading)
            if reading.ack is not None:
                reading.ack()

    sink = Acking()
    driver = MqttDriver(config, "machine_type")
    driver.start(sink)
    simulator = MqttSimulator(Plant(3, seed=2), private_broker.url, interval_s=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=simulator.run, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: {r.machine_id for r in sink.readings} >= {"m1", "m2", "m3"}, 10)
    finally:
        stop.set()
        thread.join(5)
        simulator.close()
        driver.stop()
        driver.close()
    reading = next(r for r in sink.readings if r.machine_id == "m2")
    assert reading.rejection is None
    assert reading.fields["machine_type"] == "M"
    assert set(INPUTS) <= set(reading.fields)
    assert math.isfinite(json.loads(reading.payload)["ts"])
