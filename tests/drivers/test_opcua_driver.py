"""The OPC UA driver against real asyncua servers on 127.0.0.1 (testkit/opcua.py), each started by the test.

- Readings on change: one per machine per publish with every input's latest value, exactly the values written.
- Several servers, one dead and one slow (behind a proxy that delays every chunk): the live ones deliver.
- A server restarted mid-run: readings resume; none duplicated, none lost for the values written while connected.
- Security: Basic256Sha256 with a trusted server certificate; an untrusted one (the error names the file to
  trust); a rotated server certificate (refused until trusted, then accepted without a restart); a wrong password.
- A node map naming a node the server does not have: a counted per-node error, logged once; the server's other
  machines go on.

Every wait is on a condition with a deadline; no timing assertions.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("asyncua", reason="the opcua extra: pip install 'pdm-edge[opcua]'")

from drivers.base import RawReading
from drivers.opcua import OpcuaDriver, _release_when_queued, _share_one_node, backoff_s
from drivers.opcua_config import OpcuaServer
from drivers.simulator import INPUTS
from drivers.simulator_opcua import node_config
from testkit.net import free_port
from testkit.opcua import HEALTHY, OpcuaServers, make_cert

TYPE_KEY = "Type"


class Recorder:
    def __init__(self) -> None:
        self.readings: list[RawReading] = []
        self._lock = threading.Lock()

    def put(self, reading: RawReading) -> None:
        with self._lock:
            self.readings.append(reading)

    def of(self, machine_id: str) -> list[RawReading]:
        with self._lock:
            return [r for r in self.readings if r.machine_id == machine_id]


def until(condition: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def servers():
    with OpcuaServers() as s:
        yield s


@pytest.fixture
def driver_for():
    started: list[OpcuaDriver] = []

    def make(configs: list[OpcuaServer]) -> tuple[OpcuaDriver, Recorder]:
        driver, sink = OpcuaDriver(configs, TYPE_KEY), Recorder()
        driver.start(sink)
        started.append(driver)
        return driver, sink

    yield make
    for driver in started:
        driver.close()


def fast(config: OpcuaServer, **changes) -> OpcuaServer:
    return config.model_copy(update={"sampling_ms": 50, "timeout_s": 2.0, "backoff_max_s": 1.0, **changes})


def device(driver: OpcuaDriver, label: str) -> dict:
    return driver.status()["devices"][label]


def values(reading: RawReading) -> dict[str, float]:
    return {name: reading.fields[name] for name in INPUTS}


def test_each_change_makes_a_reading_with_the_latest_values_exactly_as_written(servers, driver_for, caplog):
    port = servers.serve({"m1": "L", "m2": "H"})
    driver, sink = driver_for([fast(node_config({"m1": "L", "m2": "H"}, port))])
    until(lambda: sink.of("m1") and sink.of("m2"), what="the initial readings")
    first = sink.of("m1")[0]
    assert values(first) == HEALTHY and first.fields[TYPE_KEY] == "L" and first.rejection is None
    assert first.source == f"opcua:127.0.0.1:{port}"

    stamp = servers.write(port, "m1", {"torque": 55.5, "tool_wear": 120.0})
    until(lambda: len(sink.of("m1")) == 2, what="the reading of the change")
    changed = sink.of("m1")[1]
    assert values(changed) == {**HEALTHY, "torque": 55.5, "tool_wear": 120.0}  # one reading for one publish
    assert changed.ts == pytest.approx(stamp.timestamp())  # the source timestamp
    assert len(sink.of("m2")) == 1  # m2 did not change
    status = device(driver, f"127.0.0.1:{port}")
    assert status["connected"] and status["monitored_items"] == 10 and status["readings"] == 3
    # The publish responses emptied once queued, one Node for all items: on with the asyncua installed (2.1).
    assert "memory trims are off" not in caplog.text


def test_the_memory_trims_step_aside_where_asyncua_keeps_its_state_otherwise():
    other = SimpleNamespace(uaclient=SimpleNamespace(), _monitored_items=[])  # another asyncua's shapes
    assert not _release_when_queued(other, SimpleNamespace(subscription_id=1), None)
    assert not _share_one_node(other, other)


def test_scale_and_offset_apply_and_a_text_value_is_rejected_with_its_reason(servers, driver_for):
    port = servers.serve({"m1": "M"}, extra_nodes={"label": "press seven"})
    config = node_config({"m1": "M"}, port).model_dump()
    nodes = config["machines"][0]["nodes"]
    nodes["air_temperature"].update(scale=0.5, offset=100.0)
    nodes["rotational_speed"]["node"] = "ns=2;s=label"
    _, sink = driver_for([fast(OpcuaServer(**config))])
    until(lambda: sink.of("m1"), what="the first reading")
    reading = sink.of("m1")[0]
    assert reading.fields["air_temperature"] == 300.0 * 0.5 + 100.0
    assert reading.fields["rotational_speed"] is None
    assert reading.rejection.reason == "not_a_number" and reading.rejection.input == "rotational_speed"
    assert reading.rejection.message == "rotational_speed (ns=2;s=label): not a number: str 'press seven'"
    assert json.loads(reading.payload) == {  # kept for the quarantine: every input, the unusable one as it was
        **values(reading), "rotational_speed": "not a number: str 'press seven'", TYPE_KEY: "M"}


def test_a_node_the_server_does_not_have_is_a_counted_per_node_error_and_the_other_machines_go_on(
        servers, driver_for, caplog):
    port = servers.serve({"m1": "L", "m2": "L"})
    config = node_config({"m1": "L", "m2": "L"}, port).model_dump()
    config["machines"][0]["nodes"]["torque"]["node"] = "ns=2;s=m1.no_such_node"
    config["machines"][1]["nodes"]["tool_wear"]["node"] = "/Objects/2:Plant/2:m2/2:tool_wear"  # a browse path
    caplog.set_level(logging.WARNING, "drivers.opcua")
    driver, sink = driver_for([fast(OpcuaServer(**config))])
    until(lambda: sink.of("m2"), what="m2's reading")
    status = device(driver, f"127.0.0.1:{port}")
    assert status["node_errors"] == 1 and status["connected"]
    assert status["failing_nodes"] == {"m1.torque": "ns=2;s=m1.no_such_node: BadNodeIdUnknown"}
    assert "ns=2;s=m1.no_such_node" in status["last_error"]
    servers.write(port, "m2", {"tool_wear": 77.0})
    until(lambda: len(sink.of("m2")) == 2, what="m2's change, through the browse path")
    assert sink.of("m2")[1].fields["tool_wear"] == 77.0
    assert sink.of("m1") == []  # an input is missing: no reading
    warnings = [r.getMessage() for r in caplog.records if "cannot be monitored" in r.getMessage()]
    assert len(warnings) == 1 and "machine m1 input torque" in warnings[0] and "opcua browse" in warnings[0]


def test_items_are_created_a_few_per_call_as_servers_limit_it_and_a_failure_in_a_later_call_is_named(
        servers, driver_for, monkeypatch):
    from asyncua.common.subscription import Subscription

    calls: list[int] = []
    create = Subscription.create_monitored_items

    async def counted(self, items):
        calls.append(len(items))
        return await create(self, items)

    monkeypatch.setattr(Subscription, "create_monitored_items", counted)
    monkeypatch.setattr("drivers.opcua.ITEMS_PER_CALL", 4)
    machines = {"m1": "L", "m2": "M", "m3": "H"}
    port = servers.serve(machines)
    config = node_config(machines, port).model_dump()
    config["machines"][2]["nodes"]["tool_wear"]["node"] = "ns=2;s=m3.no_such_node"  # in the last call
    driver, sink = driver_for([fast(OpcuaServer(**config))])
    until(lambda: sink.of("m1") and sink.of("m2"), what="the readings of m1 and m2")
    assert calls == [4, 4, 4, 3]
    status = device(driver, f"127.0.0.1:{port}")
    assert status["monitored_items"] == 14
    assert status["failing_nodes"] == {"m3.tool_wear": "ns=2;s=m3.no_such_node: BadNodeIdUnknown"}
    assert values(sink.of("m2")[0]) == HEALTHY and sink.of("m3") == []


def test_several_servers_one_dead_one_slow_the_live_ones_deliver(servers, driver_for, caplog):
    caplog.set_level(logging.WARNING, "drivers.opcua")
    live = servers.serve({"m1": "L"})
    slow_server = servers.serve({"m2": "M"})
    slow = servers.slow_proxy(slow_server, delay_s=0.2)
    dead = free_port()
    configs = [fast(node_config({"m1": "L"}, live)), fast(node_config({"m2": "M"}, slow), timeout_s=5.0),
               fast(node_config({"m3": "H"}, dead))]
    driver, sink = driver_for(configs)
    until(lambda: sink.of("m1") and sink.of("m2"), what="readings from the live and the slow server")
    for n in range(1, 4):
        servers.write(live, "m1", {"tool_wear": float(n)})
        servers.write(slow_server, "m2", {"tool_wear": float(n)})
    until(lambda: [r.fields["tool_wear"] for r in sink.of("m1")][-1] == 3.0, what="every change from the live one")
    until(lambda: [r.fields["tool_wear"] for r in sink.of("m2")][-1] == 3.0, what="every change from the slow one")
    assert [r.fields["tool_wear"] for r in sink.of("m1")] == [10.0, 1.0, 2.0, 3.0]
    assert [r.fields["tool_wear"] for r in sink.of("m2")] == [10.0, 1.0, 2.0, 3.0]
    dead_status = device(driver, f"127.0.0.1:{dead}")
    until(lambda: device(driver, f"127.0.0.1:{dead}")["connect_failures"] >= 2, what="retries of the dead one")
    assert not dead_status["available"] and "refused" in dead_status["last_error"]
    assert sink.of("m3") == []
    status = driver.status()
    assert status["available"] == 2 and status["total"] == 3
    down = [r for r in caplog.records if f"127.0.0.1:{dead} unavailable" in r.getMessage()]
    assert len(down) == 1  # logged once, however many attempts


def test_a_restarted_server_resumes_with_none_duplicated_and_none_lost(servers, driver_for, caplog):
    caplog.set_level(logging.INFO, "drivers.opcua")
    machines = {"m1": "L"}
    port = servers.serve(machines)
    driver, sink = driver_for([fast(node_config(machines, port))])
    label = f"127.0.0.1:{port}"
    until(lambda: sink.of("m1"), what="the first reading")
    written = [10.0]

    def write_and_see(n: float) -> None:
        servers.write(port, "m1", {"tool_wear": n})
        written.append(n)
        until(lambda: sink.of("m1")[-1].fields["tool_wear"] == n, what=f"tool wear {n}")

    for n in range(1, 6):
        write_and_see(float(n))
    for restart in range(2):
        servers.stop(port)
        until(lambda: not device(driver, label)["connected"], what="the loss seen")
        servers.serve(machines, port=port, keep=True)  # the PLC kept its values and their timestamps
        until(lambda: device(driver, label)["connected"], what="the reconnection")
        for n in range(6 + restart * 5, 11 + restart * 5):
            write_and_see(float(n))
    seen = [r.fields["tool_wear"] for r in sink.of("m1")]
    assert seen == written  # in order, each once: the values sent again at each reconnect were not readings
    status = device(driver, label)
    assert status["connection_losses"] == 2 and status["connects"] == 3
    assert status["duplicates_skipped"] >= 2 * len(INPUTS)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(f"{label} unavailable" in m for m in messages) == 2
    assert sum(f"{label} available again" in m for m in messages) == 2


def test_backoff_doubles_up_to_the_cap_with_jitter():
    assert backoff_s(1, 30, 0.0) == 0.25 and backoff_s(1, 30, 0.999) < 0.5
    assert backoff_s(3, 30, 0.0) == 1.0
    assert backoff_s(20, 30, 0.0) == 15.0 and backoff_s(10_000, 30, 0.999) < 30


# --- security ---

@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    trusted = tmp_path / "pki" / "trusted"
    trusted.mkdir(parents=True)
    client_cert, client_key = make_cert(tmp_path / "client", "client", server=False)
    server_cert, server_key = make_cert(tmp_path / "server", "server")
    return {"trusted": trusted, "client_cert": client_cert, "client_key": client_key, "server_cert": server_cert,
            "server_key": server_key, "root": tmp_path}


def secure(config: OpcuaServer, pki: dict[str, Path], **changes) -> OpcuaServer:
    return fast(config, security_policy="Basic256Sha256", certificate=pki["client_cert"],
                private_key=pki["client_key"], trusted_server_certs=pki["trusted"], **changes)


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
def test_basic256sha256_with_a_trusted_server_certificate_and_a_password(servers, driver_for, pki, mode):
    shutil.copy(pki["server_cert"], pki["trusted"])
    port = servers.serve({"m1": "L"}, cert=(pki["server_cert"], pki["server_key"]), users={"pdm": "s3cret"})
    password = pki["root"] / "password"
    password.write_text("s3cret\n")
    config = secure(node_config({"m1": "L"}, port), pki, security_mode=mode, username="pdm", password_file=password)
    driver, sink = driver_for([config])
    until(lambda: sink.of("m1"), what="a reading over a secure channel")
    assert device(driver, f"127.0.0.1:{port}")["security"] == f"Basic256Sha256 {mode}"


def test_an_untrusted_server_certificate_is_refused_naming_the_file_to_trust(servers, driver_for, pki, caplog):
    caplog.set_level(logging.WARNING, "drivers.opcua")
    port = servers.serve({"m1": "L"}, cert=(pki["server_cert"], pki["server_key"]))
    driver, sink = driver_for([secure(node_config({"m1": "L"}, port), pki)])
    label = f"127.0.0.1:{port}"
    until(lambda: device(driver, label)["connect_failures"] >= 1, what="the refusal")
    error = device(driver, label)["last_error"]
    rejected = list((pki["root"] / "pki" / "rejected").iterdir())
    assert len(rejected) == 1 and rejected[0].read_bytes() == pki["server_cert"].read_bytes()
    assert "not trusted" in error and str(rejected[0]) in error and str(pki["trusted"]) in error
    assert sink.of("m1") == []
    shutil.copy(rejected[0], pki["trusted"])  # what the message says to do
    until(lambda: sink.of("m1"), what="a reading once the certificate is trusted")


def test_a_rotated_server_certificate_is_refused_until_trusted_then_used_without_a_restart(
        servers, driver_for, pki):
    shutil.copy(pki["server_cert"], pki["trusted"])
    port = servers.serve({"m1": "L"}, cert=(pki["server_cert"], pki["server_key"]))
    driver, sink = driver_for([secure(node_config({"m1": "L"}, port), pki)])
    label = f"127.0.0.1:{port}"
    until(lambda: sink.of("m1"), what="a reading with the first certificate")
    new_cert, new_key = make_cert(pki["root"] / "server2", "server-rotated")
    servers.stop(port)
    servers.serve({"m1": "L"}, port=port, keep=True, cert=(new_cert, new_key))
    until(lambda: "not trusted" in (device(driver, label)["last_error"] or ""), what="the new certificate refused")
    shutil.copy(new_cert, pki["trusted"])
    until(lambda: device(driver, label)["connected"], what="the reconnection with the new certificate")
    servers.write(port, "m1", {"tool_wear": 99.0})
    until(lambda: sink.of("m1")[-1].fields["tool_wear"] == 99.0, what="a reading after the rotation")


def test_a_wrong_password_is_a_clear_error_and_retried(servers, driver_for, pki):
    shutil.copy(pki["server_cert"], pki["trusted"])
    port = servers.serve({"m1": "L"}, cert=(pki["server_cert"], pki["server_key"]), users={"pdm": "right"})
    password = pki["root"] / "password"
    password.write_text("wrong\n")
    driver, sink = driver_for([secure(node_config({"m1": "L"}, port), pki, username="pdm", password_file=password)])
    label = f"127.0.0.1:{port}"
    until(lambda: device(driver, label)["connect_failures"] >= 2, what="refused attempts")
    error = device(driver, label)["last_error"]
    assert error.startswith("user 'pdm' refused by the server (Bad") and "password_file" in error
    assert "right" not in error and "wrong" not in error
    password.write_text("right\n")  # read again at each attempt
    until(lambda: sink.of("m1"), what="a reading with the right password")


class FailingOnce(Recorder):
    """A sink whose first put raises: a bug behind the driver, injected."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def put(self, reading: RawReading) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected")
        super().put(reading)


def test_a_task_that_dies_is_logged_counted_shown_down_and_restarted_losing_nothing(servers, caplog):
    caplog.set_level(logging.WARNING, "drivers.opcua")
    port = servers.serve({"m1": "L"})
    driver, sink = OpcuaDriver([fast(node_config({"m1": "L"}, port))], TYPE_KEY), FailingOnce()
    driver.start(sink)
    try:
        until(lambda: sink.of("m1"), what="a reading after the restart")
        assert values(sink.of("m1")[0]) == HEALTHY  # the reading the failed put held, handed again
        status = device(driver, f"127.0.0.1:{port}")
        assert status["task_restarts"] == 1
        assert f"127.0.0.1:{port} unavailable: internal error: RuntimeError('injected')" in caplog.text
        assert [r.exc_info is not None for r in caplog.records if "task failed" in r.getMessage()] == [True]
        servers.write(port, "m1", {"tool_wear": 5.0})
        until(lambda: sink.of("m1")[-1].fields["tool_wear"] == 5.0, what="readings go on")
    finally:
        driver.close()


def test_a_flapping_server_is_reconnected_every_time_and_leaks_no_thread_or_descriptor(servers, driver_for):
    import os

    machines = {"m1": "L"}
    port = servers.serve(machines)
    driver, _ = driver_for([fast(node_config(machines, port))])
    label = f"127.0.0.1:{port}"
    until(lambda: device(driver, label)["connected"], what="the first connection")

    def resources() -> tuple[int, int]:
        return threading.active_count(), len(os.listdir("/proc/self/fd"))

    flaps = 6
    for flap in range(flaps):
        servers.stop(port)
        until(lambda: not device(driver, label)["connected"], what="the loss")
        servers.serve(machines, port=port, keep=True)
        until(lambda: device(driver, label)["connected"], what="the reconnection")
        if flap == 0:
            before = resources()
    after = resources()
    assert after[0] <= before[0] and after[1] <= before[1] + 2, (before, after)
    assert device(driver, label)["connection_losses"] == flaps


def test_a_network_cut_is_detected_by_the_watchdog_and_the_subscription_recreated(servers, driver_for, caplog):
    caplog.set_level(logging.WARNING, "drivers.opcua")
    machines = {"m1": "L"}
    port = servers.serve(machines)
    proxy = servers.slow_proxy(port)
    driver, sink = driver_for([fast(node_config(machines, proxy), timeout_s=1.0)])
    label = f"127.0.0.1:{proxy}"
    until(lambda: sink.of("m1"), what="the first reading")
    servers.cut(proxy)  # the connection stays open; nothing gets through, no FIN, no RST
    until(lambda: not device(driver, label)["connected"], what="the cut detected")
    assert "the server stopped answering" in device(driver, label)["last_error"] or \
        "no answer" in device(driver, label)["last_error"]
    servers.write(port, "m1", {"tool_wear": 42.0})  # changed while cut: the server keeps it
    servers.cut(proxy, False)
    until(lambda: device(driver, label)["connected"], what="the reconnection")
    until(lambda: sink.of("m1")[-1].fields["tool_wear"] == 42.0, what="the value changed during the cut")
    assert [r.fields["tool_wear"] for r in sink.of("m1")] == [10.0, 42.0]


def test_a_session_the_server_dropped_is_replaced_and_the_readings_resume(servers, driver_for):
    machines = {"m1": "L"}
    port = servers.serve(machines)
    driver, sink = driver_for([fast(node_config(machines, port), timeout_s=1.0)])
    label = f"127.0.0.1:{port}"
    until(lambda: sink.of("m1"), what="the first reading")
    assert servers.expire_sessions(port) == 1  # as a session timeout on the server would
    until(lambda: device(driver, label)["connection_losses"] == 1, what="the lost session seen")
    until(lambda: device(driver, label)["connected"], what="a new session")
    servers.write(port, "m1", {"tool_wear": 7.0})
    until(lambda: sink.of("m1")[-1].fields["tool_wear"] == 7.0, what="readings on the new session")
    assert [r.fields["tool_wear"] for r in sink.of("m1")] == [10.0, 7.0]


def test_a_deadband_keeps_small_moves_from_making_readings(servers, driver_for):
    port = servers.serve({"m1": "L"})
    config = node_config({"m1": "L"}, port).model_dump()
    config["machines"][0]["nodes"]["torque"]["deadband"] = 1.0
    _, sink = driver_for([fast(OpcuaServer(**config))])
    until(lambda: sink.of("m1"), what="the first reading")
    servers.write(port, "m1", {"torque": 40.5})  # within the deadband of 40.0: not reported
    servers.write(port, "m1", {"tool_wear": 11.0})  # no deadband on tool wear
    until(lambda: sink.of("m1")[-1].fields["tool_wear"] == 11.0, what="the tool wear change")
    servers.write(port, "m1", {"torque": 41.6})  # beyond it
    until(lambda: sink.of("m1")[-1].fields["torque"] == 41.6, what="the torque change beyond the deadband")
    assert [(r.fields["torque"], r.fields["tool_wear"]) for r in sink.of("m1")] == [
        (40.0, 10.0), (40.0, 11.0), (41.6, 11.0)]


def test_a_password_file_that_went_missing_is_named_not_taken_for_a_network_error(servers, driver_for, tmp_path):
    port = servers.serve({"m1": "L"}, users={"pdm": "right"})
    password = tmp_path / "password"
    password.write_text("right\n")
    config = fast(node_config({"m1": "L"}, port), username="pdm", password_file=password)  # validated: it exists
    password.unlink()
    driver, sink = driver_for([config])
    label = f"127.0.0.1:{port}"
    until(lambda: device(driver, label)["connect_failures"] >= 1, what="the failed attempt")
    assert device(driver, label)["last_error"] == f"cannot read password_file {password}: No such file or directory"
    password.write_text("right\n")
    until(lambda: sink.of("m1"), what="a reading once the file is back")


class Blockable(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()

    def put(self, reading: RawReading) -> None:
        self.open.wait()
        super().put(reading)


def test_changes_beyond_the_queue_while_the_pipeline_is_full_drop_the_connection_counted_then_resume(
        servers, caplog):
    caplog.set_level(logging.WARNING, "drivers.opcua")
    port = servers.serve({"m1": "L"})
    driver, sink = OpcuaDriver([fast(node_config({"m1": "L"}, port))], TYPE_KEY), Blockable()
    driver.queue_max = 5
    driver.start(sink)
    label = f"127.0.0.1:{port}"
    try:
        until(lambda: sink.of("m1"), what="the first reading")
        sink.open.clear()  # the pipeline is full: put() blocks
        for n in range(1, 31):
            servers.write(port, "m1", {"tool_wear": float(n)})
            time.sleep(0.06)  # about one publish each
        until(lambda: device(driver, label)["overflows"] == 1, what="the overflow counted while the sink blocks")
        sink.open.set()
        until(lambda: sink.of("m1")[-1].fields["tool_wear"] == 30.0, what="the current value after the reconnect")
        assert "more than 5 changes waited for the pipeline: reconnecting" in caplog.text
        assert device(driver, label)["connects"] == 2
        seen = [r.fields["tool_wear"] for r in sink.of("m1")]
        assert seen[0] == 10.0 and seen[1:] == sorted(set(seen[1:]))  # in order, none twice
        assert len(seen) < 31  # the changes dropped with the queue are missing: counted, not hidden
    finally:
        sink.open.set()
        driver.close()
