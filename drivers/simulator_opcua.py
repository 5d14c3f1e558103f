"""The plant simulator served over OPC UA (`pdm-edge simulate opcua`, and `pdm-edge demo --protocol opcua`).

One asyncua server (on 127.0.0.1 by default, security None: a lab tool) for the whole plant, stepped every
`interval_s` of wall-clock time. Address space, namespace `urn:pdm-edge:simulator` (index 2):

    Objects/Plant/<machine_id>                         an object per machine (m1..mN)
        machine_type          String                   L, M or H
        air_temperature       Double  K                NodeId ns=2;s=<machine_id>.air_temperature
        process_temperature   Double  K
        rotational_speed      Double  rpm
        torque                Double  Nm
        tool_wear             Double  min

Each variable has an EngineeringUnits property (EUInformation, UNECE codes), as `pdm-edge opcua browse` shows.
Values change only when the plant steps, with the step's time as their source timestamp. `node_config()` builds
the agent's `[[opcua]]` table for it (examples/simulator-opcua.toml spells it out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from drivers.opcua_config import OpcuaMachine, OpcuaServer
from drivers.simulator import INPUTS, Plant
from drivers.simulator_server import LOOPBACK, PlantServer

NAMESPACE = "urn:pdm-edge:simulator"
UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
UNITS = {"air_temperature": ("KEL", "K", "kelvin"), "process_temperature": ("KEL", "K", "kelvin"),
         "rotational_speed": ("RPM", "rpm", "revolutions per minute"), "torque": ("NU", "Nm", "newton metre"),
         "tool_wear": ("MIN", "min", "minute")}


def unece_id(code: str) -> int:
    """The UnitId of a UNECE common code, as OPC UA Part 8 computes it."""
    value = 0
    for char in code:
        value = (value << 8) | ord(char)
    return value


def node_id(machine_id: str, name: str, ns: int = 2) -> str:
    return f"ns={ns};s={machine_id}.{name}"


def node_config(plant_machines: Mapping[str, str], port: int, host: str = LOOPBACK, sampling_ms: int = 1000,
                **server: Any) -> OpcuaServer:
    """The agent's `[[opcua]]` table for a simulated plant: {machine_id: machine_type} served on host:port."""
    return OpcuaServer(url=f"opc.tcp://{host}:{port}", sampling_ms=sampling_ms, **server, machines=[
        OpcuaMachine.model_validate({"machine_id": machine_id, "machine_type": machine_type,
                                     "nodes": {name: node_id(machine_id, name) for name in INPUTS}})
        for machine_id, machine_type in plant_machines.items()])


async def build_server(host: str, port: int, machines: Mapping[str, str], initial: Mapping[str, Mapping[str, float]],
                       configure: Callable[[Any], Awaitable[None]] | None = None
                       ) -> tuple[Any, dict[tuple[str, str], Any]]:
    """An asyncua Server (not started) with the address space above; returns (server, {(machine, input): node})."""
    from asyncua import ua
    from asyncua.server.server import Server

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://{host}:{port}/")
    server.set_server_name("pdm-edge plant simulator")
    if configure is not None:
        await configure(server)
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(NAMESPACE)

    def string_node(text: str) -> ua.NodeId:
        return ua.NodeId(ua.String(text), ua.Int16(ns))

    plant = await server.nodes.objects.add_object(string_node("Plant"), ua.QualifiedName("Plant", ns))
    nodes: dict[tuple[str, str], Any] = {}  # asyncua Nodes
    for machine_id, machine_type in machines.items():
        obj = await plant.add_object(string_node(machine_id), ua.QualifiedName(machine_id, ns))
        await obj.add_property(string_node(f"{machine_id}.machine_type"), ua.QualifiedName("machine_type", ns),
                               machine_type)
        for name in INPUTS:
            variable = await obj.add_variable(string_node(f"{machine_id}.{name}"), ua.QualifiedName(name, ns),
                                              ua.Variant(float(initial[machine_id][name]), ua.VariantType.Double))
            code, symbol, description = UNITS[name]
            await variable.add_property(string_node(f"{machine_id}.{name}.EngineeringUnits"),
                                        ua.QualifiedName("EngineeringUnits", 0), ua.EUInformation(
                                            NamespaceUri=UNECE, UnitId=unece_id(code),
                                            DisplayName=ua.LocalizedText(symbol), Description=ua.LocalizedText(
                                                description)))
            nodes[(machine_id, name)] = variable
    return server, nodes


async def write(server: Any, node: Any, value: float, source_ts: datetime | None = None) -> None:
    from asyncua import ua

    stamp = source_ts or datetime.now(UTC)
    await server.write_attribute_value(node.nodeid, ua.DataValue(
        ua.Variant(float(value), ua.VariantType.Double),
        SourceTimestamp=stamp, ServerTimestamp=stamp))  # type: ignore[arg-type]  # ua.DateTime is a datetime


class OpcuaSimulator(PlantServer):
    """Serves a Plant over OPC UA (see PlantServer); `steps` counts the plant's steps served."""

    thread_name = "opcua-simulator"
    start_timeout_s = 30.0

    def __init__(self, plant: Plant, port: int, host: str = LOOPBACK, interval_s: float = 1.0) -> None:
        super().__init__(plant, port, host, interval_s)
        self.latest = plant.step(0.0)
        self.steps = 0
        self._nodes: dict[tuple[str, str], Any] = {}

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    def machines(self) -> dict[str, str]:
        return {machine_id: self.plant.machine_type(machine_id) for machine_id in self.plant.machines}

    async def _serve(self) -> None:
        from drivers.opcua import quiet_library

        quiet_library()
        self._server, self._nodes = await build_server(self.host, self.port, self.machines(), self.latest)
        await self._server.start()

    async def _step(self, dt: float) -> None:
        readings = self.plant.step(dt)
        stamp = datetime.now(UTC)
        for machine_id, values in readings.items():
            for name, value in values.items():
                await write(self._server, self._nodes[(machine_id, name)], value, stamp)
        with self.lock:
            self.latest = readings
            self.steps += 1

    async def _close(self) -> None:
        with contextlib.suppress(Exception):  # stopping anyway
            await self._server.stop()

    def describe(self) -> str:
        """Lines for the terminal: where each machine is served."""
        lines = [(f"OPC UA plant simulator on {self.url} (security None), stepping every {self.interval_s:g} s "
                  "(address space: drivers/simulator_opcua.py, agent config: examples/simulator-opcua.toml)")]
        lines += [f"  {machine_id} (type {self.plant.machine_type(machine_id)}): ns=2;s={machine_id}.<input>"
                  f"{self.plant.drift_note(machine_id)}" for machine_id in self.plant.machines]
        return "\n".join(lines)
