"""`pdm-edge demo` and `pdm-edge simulate modbus|mqtt|opcua`: the plant simulator, alone or with the agent on it.

The demo runs in one process: the Modbus simulator (drivers/simulator_modbus.py; with `--protocol opcua` the OPC UA
one, drivers/simulator_opcua.py, and one `[[opcua]]` server) on a free loopback port, and an
Agent (agent/service.py) whose configuration is built here in memory: one `[[modbus]]` device per machine, data in
a temporary folder (deleted at the end) unless --data-dir is given, the status page on 127.0.0.1:8080 or the next
free port, sync only with --central (the token from PDM_CENTRAL__TOKEN or PDM_CENTRAL__TOKEN_FILE). Every 2 s it
prints the machines' table (the one `pdm-edge status` prints). SIGINT or SIGTERM stops the agent (which commits
what is queued), then the simulator; exit 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.simulator import Drift, Plant

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.service import Agent
    from drivers.simulator_modbus import ModbusSimulator
    from drivers.simulator_opcua import OpcuaSimulator

REFRESH_S = 2.0
STATUS_PORTS = 20  # 8080, else the next free one of this many
DEMO_GATEWAY = "demo"


def parse_drift(text: str | None, minutes: float) -> Drift | None:
    if text is None or text.lower() in ("", "none", "off"):
        return None
    return Drift.parse(text, minutes)


def free_port(host: str = "127.0.0.1", first: int = 0, tries: int = 1) -> int:
    """`first` if nobody listens there, else the next free one of `tries`; 0: any free port."""
    for port in range(first, first + tries) if first else (0,):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise OSError(f"ports {first}-{first + tries - 1} on {host} are all in use: pass --status-port")


def _stop_event() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _start_server(protocol: str, plant: Plant, port: int, host: str,
                  interval_s: float) -> ModbusSimulator | OpcuaSimulator:
    if protocol == "modbus":  # each imported only when asked for: OPC UA needs the `opcua` extra
        from drivers.simulator_modbus import ModbusSimulator

        return ModbusSimulator(plant, port, host, interval_s).start()
    from drivers.simulator_opcua import OpcuaSimulator

    return OpcuaSimulator(plant, port, host, interval_s).start()


def simulate_server(protocol: str, machines: int, port: int, host: str, drift: Drift | None, seed: int | None,
                    interval_s: float) -> int:
    """`pdm-edge simulate modbus|opcua`: the plant served as a Modbus TCP or OPC UA server until Ctrl-C."""

    try:
        plant = Plant(machines, seed, drift)
    except ValueError as exc:
        print(f"pdm-edge simulate {protocol}: {exc}", file=sys.stderr)
        return 2
    try:
        simulator = _start_server(protocol, plant, port, host, interval_s)
    except OSError as exc:
        print(f"pdm-edge simulate {protocol}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = _stop_event()
    print(simulator.describe() + "\nCtrl-C to stop", flush=True)
    stop.wait()
    simulator.stop()
    return 0


def simulate_mqtt(machines: int, url: str, drift: Drift | None, seed: int | None, interval_s: float) -> int:
    from drivers.simulator_mqtt import MqttSimulator, PublishError

    try:
        plant = Plant(machines, seed, drift)
    except ValueError as exc:
        print(f"pdm-edge simulate mqtt: {exc}", file=sys.stderr)
        return 2
    try:
        simulator = MqttSimulator(plant, url, interval_s)
    except PublishError as exc:
        print(f"pdm-edge simulate mqtt: {exc}", file=sys.stderr)
        return 1
    stop = _stop_event()
    note = f"; {drift.machine_id} drifts towards {drift.mode} over {drift.minutes:g} min" if drift else ""
    print(f"publishing {machines} machines to {url} on pdm/<machine_id>/telemetry every {interval_s:g} s{note}; "
          "Ctrl-C to stop", flush=True)
    try:
        simulator.run(stop)
    finally:
        simulator.close()
    return 0




def demo_config(plant: Plant, modbus_port: int, data_dir: Path, status_port: int, central: str | None,
                interval_s: float = 1.0, protocol: str = "modbus") -> AgentConfig:
    """The agent's configuration for the demo, in memory; `modbus_port` is the OPC UA server's with opcua."""
    from agent.config import AgentConfig
    from drivers.simulator_modbus import device_config

    values: dict[str, Any] = {
        "gateway_id": DEMO_GATEWAY, "data_dir": data_dir, "log_level": "WARNING", "log_format": "text",
        "status": {"bind": f"127.0.0.1:{status_port}"},
        "buffer": {"synchronous": "NORMAL"},
    }
    if protocol == "opcua":
        from drivers.simulator_opcua import node_config

        machines = {machine_id: plant.machine_type(machine_id) for machine_id in plant.machines}
        values["opcua"] = [node_config(machines, modbus_port, sampling_ms=int(interval_s * 1000)).model_dump()]
    else:
        values["modbus"] = [device_config(machine_id, plant.machine_type(machine_id), unit, modbus_port,
                                          interval_s=interval_s).model_dump()
                            for unit, machine_id in enumerate(plant.machines, start=1)]
    if central:
        token = os.environ.get("PDM_CENTRAL__TOKEN")
        token_file = os.environ.get("PDM_CENTRAL__TOKEN_FILE")
        if not token and token_file:
            token = Path(token_file).read_text().strip()
        values["central"] = {"url": central, "token": token}
    return AgentConfig(**values)


def demo(machines: int, drift: Drift | None, seed: int | None, central: str | None, data_dir: Path | None,
         status_port: int, interval_s: float = 1.0, protocol: str = "modbus") -> int:
    from pydantic import ValidationError

    from agent.service import Agent
    from agent.snapshot import snapshot
    from agent.status.machines import machine_infos
    from agent.status_cli import table
    from drivers.simulator_modbus import ModbusSimulator
    from web import logs

    try:
        plant = Plant(machines, seed, drift)
    except ValueError as exc:
        print(f"pdm-edge demo: {exc}", file=sys.stderr)
        return 2
    logs.setup("WARNING", "text")
    stop = _stop_event()
    temporary = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="pdm-edge-demo-")) if data_dir is None else Path(data_dir)
    simulator: ModbusSimulator | OpcuaSimulator | None = None
    agent: Agent | None = None
    try:
        if protocol == "opcua":
            from drivers.simulator_opcua import OpcuaSimulator

            simulator = OpcuaSimulator(plant, free_port(), interval_s=interval_s).start()
        else:
            simulator = ModbusSimulator(plant, free_port(), interval_s=interval_s).start()
        status_port = free_port(first=status_port, tries=STATUS_PORTS)
        try:
            config = demo_config(plant, simulator.port, data_dir, status_port, central, interval_s, protocol)
        except ValidationError as exc:
            print(f"pdm-edge demo: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", file=sys.stderr)
            return 2
        agent = Agent(config)
        agent.start()
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        drifting = f"{drift.machine_id} drifts towards {drift.mode} over {drift.minutes:g} min" if drift \
            else "no machine drifts"
        where = f"OPC UA opc.tcp://127.0.0.1:{simulator.port}" if protocol == "opcua" \
            else f"Modbus TCP 127.0.0.1:{simulator.port}"
        header = (f"pdm-edge demo: {machines} simulated machines on {where}; "
                  f"{drifting}; sync {'to ' + central if central else 'off'}\n"
                  f"status page http://127.0.0.1:{status_port}  ·  data in {data_dir}  ·  Ctrl-C to stop")
        print(header, flush=True)
        started = time.monotonic()
        while not stop.wait(REFRESH_S - (time.monotonic() - started) % REFRESH_S):
            rows = [m.model_dump(mode="json") for m in machine_infos(snapshot(agent))]
            clock = datetime.now(UTC).strftime("%H:%M:%S")
            text = f"{clock} UTC, {time.monotonic() - started:.0f} s after start\n{table(rows, color)}"
            if color:
                print("\033[H\033[2J" + header + "\n\n" + text, flush=True)
            else:
                print("\n" + text, flush=True)
    except Exception as exc:  # noqa: BLE001 - anything that keeps the demo from starting: one line, exit 1
        print(f"pdm-edge demo: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.stop()
        if simulator is not None:
            simulator.stop()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    print("stopped", flush=True)
    return 0
