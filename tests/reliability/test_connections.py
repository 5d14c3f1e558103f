"""Links that come and go under load: the MQTT broker restarted while readings stream in, and a Modbus device
flapping up and down. The agent reconnects by itself every time, keeps everything it accepted, counts and logs
each outage once, and leaks neither threads nor file descriptors.

A broker restart with the agent idle is tests/drivers/test_mqtt_broker.py; a device switched off once, dead, slow
or closing connections mid-request are tests/drivers/test_modbus_driver.py.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time

from drivers.modbus import ModbusDriver, Register
from testkit.modbus import ModbusServers, ModbusUnit
from testkit.mqtt import Publisher
from testkit.net import ServiceError
from tests.agent.test_run import AgentProcess, reading, wait_for
from tests.drivers.test_modbus_driver import TYPE_KEY, Recorder, device_status, log_lines, tcp, until
from tests.reliability.plant import error_lines, readings
from tests.scale import scaled


def publish_until(broker_url: str, stop: threading.Event, start: int, rate: float = 400) -> list[int]:
    """Publish readings start, start+1, ... at `rate`/s from a thread until `stop`; broker restarts are expected,
    so failures end the publishing quietly. Returns the list the thread appends the sent indexes to."""
    sent: list[int] = []

    def publish() -> None:
        try:
            with Publisher(broker_url) as publisher:
                i = start
                while not stop.is_set():
                    publisher.client.publish(*reading(i % 20, i), qos=1)
                    sent.append(i)
                    i += 1
                    time.sleep(1 / rate)
        except (ServiceError, OSError):  # the broker went away under it: the point of the test
            return

    threading.Thread(target=publish, daemon=True).start()
    return sent


def test_the_broker_restarted_mid_load_the_agent_reconnects_and_keeps_everything_it_accepted(
        tmp_path, private_broker):
    rng = random.Random(int(os.environ.get("PDM_CRASH_SEED", "37")))
    restarts = scaled(3, 30)
    agent = AgentProcess(tmp_path, private_broker.url)
    try:
        agent.start()
        pid, start = agent.process.pid, 0
        for restart in range(1, restarts + 1):
            stop = threading.Event()
            sent = publish_until(private_broker.url, stop, start)
            wait_for(lambda sent=sent: agent.count("readings") > 0 and len(sent) > 100, 30, "readings flowing")
            time.sleep(rng.uniform(0.2, 1.0))  # a random moment under load
            accepted = readings(agent)
            private_broker.restart()  # persistence is off: what the broker held for the agent is gone with it
            stop.set()
            start += 100_000
            wait_for(lambda n=restart + 1: agent.count_log("subscribed to") >= n, 30, "the agent to subscribe again")
            assert accepted <= readings(agent), f"restart {restart} lost accepted readings"

        with Publisher(private_broker.url) as publisher:  # after the last restart, everything arrives
            publisher.publish_all([reading(i % 20, i) for i in range(start, start + 2_000)], qos=1)
        wait_for(lambda: agent.count(f"readings WHERE ts >= {1_790_000_000 + start}") == 2_000, 60,
                 "the readings published after the last restart")
        print(f"\nbroker restarted {restarts} times under load: {agent.count('readings')} readings stored")
        assert agent.process.pid == pid and agent.starts == 1  # never restarted, never exited
        assert agent.count_log("unavailable") == restarts == agent.count_log("available again")
        assert agent.signal(signal.SIGTERM) == 0
        assert not error_lines(agent), error_lines(agent)[:3]
    finally:
        agent.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_flapping_modbus_device_is_reconnected_every_time_counted_and_leaks_nothing(caplog):
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    flaps = scaled(15, 300)
    unit = ModbusUnit(holding={0: 0})
    with ModbusServers() as servers:
        port = servers.tcp({1: unit})
        driver = ModbusDriver([tcp("press", port, {"x": Register(address=0)}, backoff_max_s=0.2)], TYPE_KEY)
        sink = Recorder()
        driver.start(sink)
        try:
            until(lambda: sink.of("press"), what="a first reading")
            for flap in range(1, flaps + 1):
                servers.stop(port)  # switched off: connections close, the port refuses
                until(lambda: not device_status(driver, "press")["available"], what=f"flap {flap} noticed")
                unit.tables["holding"][0] = flap
                servers.tcp({1: unit}, port)  # and on again
                until(lambda flap=flap: any(r.fields["x"] == flap for r in sink.of("press")), what=f"a reading after flap {flap}")
                if flap == 3:  # past the first connections' one-time allocations
                    threads, fds = threading.active_count(), open_fds()
            status = device_status(driver, "press")
            figures = (threading.active_count(), open_fds())
        finally:
            driver.close()
    print(f"\nModbus device flapped {flaps} times: threads {threads} -> {figures[0]}, fds {fds} -> {figures[1]}; "
          f"{status['connect_failures']} refused connections, {status['connection_losses']} lost")
    assert status["available"]
    assert len(log_lines(caplog, "press", "unavailable")) == flaps
    assert len(log_lines(caplog, "press", "available again")) == flaps
    assert status["connect_failures"] + status["connection_losses"] + status["timeouts"] >= flaps
    assert figures[0] <= threads and figures[1] <= fds + 2  # no thread or descriptor per outage
