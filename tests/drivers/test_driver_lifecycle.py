"""Every driver keeps the `Driver` contract of drivers/base.py, against real sources (Mosquitto, pymodbus over TCP
and over a pty serial line, asyncua): `close()` is safe without `start()` and twice; `stats()` answers before
`start()`, while running and after `close()`, as a frozen `DriverStats` the status API reads without guessing;
a source that is down shows as not connected, with its errors counted by kind and the last one named; once
`close()` returned, nothing more reaches the sink."""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.base import Driver, DriverStats, RawReading
from drivers.modbus import ModbusDriver, ModbusRtuDevice, ModbusTcpDevice, Register
from drivers.mqtt import MqttConfig, MqttDriver
from testkit.modbus import ModbusServers, ModbusUnit
from testkit.mqtt import Publisher
from testkit.net import LOCALHOST, free_port
from tests.agent.test_status import wait_for as until

TYPE_KEY = "Type"
KINDS = ["mqtt", "modbus-tcp", "modbus-rtu", "opcua"]


class Recorder:
    def __init__(self) -> None:
        self.readings: list[RawReading] = []
        self._lock = threading.Lock()

    def put(self, reading: RawReading) -> None:
        with self._lock:
            self.readings.append(reading)
        if reading.ack is not None:
            reading.ack()

    def count(self) -> int:
        with self._lock:
            return len(self.readings)




@dataclass
class Case:
    driver: Driver
    devices: tuple[str, ...]  # the devices its stats list; () for a driver of one connection
    feed: Callable[[], None] = lambda: None  # makes the source send something (MQTT: publish a message)


def mqtt_case(host: str, port: int, tmp_path: Path) -> Case:
    topic = f"pdm-lifecycle-{uuid.uuid4().hex[:8]}"
    config = MqttConfig(url=f"mqtt://{host}:{port}", client_id=topic, topics=[f"{topic}/+/telemetry"],
                        default_machine_type="M", session_expiry_s=0)

    def feed() -> None:
        publisher = Publisher(f"mqtt://{host}:{port}")
        try:
            publisher.publish_all([(f"{topic}/m1/telemetry", b'{"x": 1}')])
        finally:
            publisher.close()

    return Case(MqttDriver(config, TYPE_KEY), (), feed)


def modbus_tcp_case(port: int) -> Case:
    device = ModbusTcpDevice(transport="tcp", machine_id="m1", machine_type="M", host=LOCALHOST, port=port,
                             interval_s=0.1, timeout_s=0.5, retries=0, backoff_max_s=0.4,
                             registers={"x": Register(address=0)})
    return Case(ModbusDriver([device], TYPE_KEY), ("m1",))


def modbus_rtu_case(line: str) -> Case:
    if importlib.util.find_spec("serial") is None:
        pytest.skip("Modbus RTU needs pyserial: install pymodbus[serial]")
    device = ModbusRtuDevice(transport="rtu", machine_id="m1", machine_type="M", serial_port=line, unit_id=1,
                             parity="N", interval_s=0.1, timeout_s=0.3, retries=0, backoff_max_s=0.4,
                             registers={"x": Register(address=0)})
    return Case(ModbusDriver([device], TYPE_KEY), ("m1",))


def opcua_case(port: int) -> Case:
    pytest.importorskip("asyncua", reason="the opcua extra: pip install 'pdm-edge[opcua]'")
    from drivers.opcua import OpcuaDriver
    from drivers.simulator_opcua import node_config

    config = node_config({"m1": "M"}, port, sampling_ms=50).model_copy(update={"timeout_s": 2.0,
                                                                               "backoff_max_s": 1.0})
    return Case(OpcuaDriver([config], TYPE_KEY), (config.label,))


@pytest.fixture
def live(request, mqtt_broker, tmp_path) -> Iterator[Case]:
    """A driver of each kind with its source up."""
    kind = request.param
    if kind == "mqtt":
        yield mqtt_case(mqtt_broker.host, mqtt_broker.port, tmp_path)
    elif kind == "opcua":
        pytest.importorskip("asyncua", reason="the opcua extra: pip install 'pdm-edge[opcua]'")
        from testkit.opcua import OpcuaServers

        with OpcuaServers() as servers:
            yield opcua_case(servers.serve({"m1": "M"}))
    else:
        with ModbusServers() as servers:
            units = {1: ModbusUnit(holding={0: 7})}
            yield modbus_tcp_case(servers.tcp(units)) if kind == "modbus-tcp" else modbus_rtu_case(servers.rtu(units))


@pytest.fixture
def down(request, tmp_path) -> Case:
    """A driver of each kind whose source does not exist: a closed port, a serial port that is not there."""
    kind, port = request.param, free_port()
    if kind == "mqtt":
        return mqtt_case(LOCALHOST, port, tmp_path)
    if kind == "modbus-tcp":
        return modbus_tcp_case(port)
    if kind == "modbus-rtu":
        return modbus_rtu_case(str(tmp_path / "no-such-tty"))
    return opcua_case(port)


def check_shape(stats: DriverStats, case: Case) -> None:
    assert isinstance(stats, DriverStats) and stats.name == case.driver.name
    assert all(isinstance(n, int) and n >= 0 for n in stats.errors.values()), stats.errors
    for device in stats.devices:
        assert all(isinstance(n, int) and n >= 0 for n in device.errors.values()), device
        assert set(device.errors) <= set(stats.errors)  # the driver's errors are its devices' added up
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.name = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("down", KINDS, indirect=True)
def test_close_is_safe_without_start_and_twice_and_stats_answer_all_along(down):
    driver = down.driver
    before = driver.stats()
    check_shape(before, down)
    assert not before.connected and sum(before.errors.values()) == 0 and before.last_error is None
    driver.close()
    driver.close()
    driver.stop()
    check_shape(driver.stats(), down)


@pytest.mark.parametrize("live", KINDS, indirect=True)
def test_a_live_source_is_connected_in_its_stats_and_nothing_arrives_after_close(live):
    driver, sink = live.driver, Recorder()
    driver.start(sink)
    try:
        until(lambda: driver.stats().connected, "the driver to connect")

        def arrived() -> bool:
            live.feed()  # again until one arrives: an MQTT subscription may be granted after the connection
            return sink.count() > 0

        until(arrived, "a reading")
        stats = driver.stats()
        check_shape(stats, live)
        assert [d.device for d in stats.devices] == list(live.devices)
        assert all(d.connected for d in stats.devices) and stats.last_error is None
        assert sum(stats.errors.values()) == 0, stats.errors
    finally:
        driver.stop()
        driver.close()
    received = sink.count()
    live.feed()
    time.sleep(0.5)  # what a driver still running would have put by now (a poll every 0.1 s)
    assert sink.count() == received
    driver.close()
    check_shape(driver.stats(), live)


@pytest.mark.parametrize("down", KINDS, indirect=True)
def test_a_source_that_is_down_is_not_connected_and_its_errors_are_counted_by_kind(down):
    driver = down.driver
    driver.start(Recorder())
    try:
        until(lambda: sum(driver.stats().errors.values()) > 0, "an error to be counted")
        stats = driver.stats()
        check_shape(stats, down)
        assert not stats.connected and stats.last_error
        assert [d.device for d in stats.devices] == list(down.devices)
        for device in stats.devices:
            assert not device.connected and device.last_error and sum(device.errors.values()) > 0
    finally:
        driver.close()
