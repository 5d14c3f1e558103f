"""The plant simulator served over Modbus TCP (`pdm-edge simulate modbus`, and the demo).

One TCP server (pymodbus, on 127.0.0.1 by default) for the whole plant; machine m<k> is unit id k. The plant is
stepped every `interval_s` of wall-clock time, and every read answers the latest values. The agent's config for it
is examples/simulator-modbus.toml; `device_config()` builds the same `[[modbus]]` table in code.

Register layout, the same for every unit (addresses 0-based, as on the wire):

    table    address  type     order        unit / scale                    value
    input    0        int16    -            0.01 °C, offset 273.15 -> K      air temperature
    input    1        int16    -            0.01 °C, offset 273.15 -> K      process temperature
    input    2        uint16   -            rpm                              rotational speed
    input    3-4      float32  CDAB         Nm                               torque (word order little: low word first)
    input    5-6      float32  CDAB         W                                mechanical power (not a model input)
    holding  100      uint16   -            min                              tool wear (0 after a tool change)
    holding  101-102  uint32   ABCD         count                            tool changes since start

Writes are accepted and ignored: the plant decides its values. Unit ids that are not machines get no answer
(pymodbus drops the request), so a client times out, as with a real gateway's missing device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.base import MachineType
from drivers.modbus import ModbusTcpDevice, Register
from drivers.registers import encode, encode_raw
from drivers.simulator import Plant, power_w
from drivers.simulator_server import LOOPBACK, PlantServer

if TYPE_CHECKING:
    from pymodbus.simulator import SimData, SimDevice

REGISTERS: dict[str, Register] = {
    "air_temperature": Register(address=0, table="input", type="int16", scale=0.01, offset=273.15),
    "process_temperature": Register(address=1, table="input", type="int16", scale=0.01, offset=273.15),
    "rotational_speed": Register(address=2, table="input", type="uint16"),
    "torque": Register(address=3, table="input", type="float32", word_order="little", byte_order="big"),
    "tool_wear": Register(address=100, table="holding", type="uint16"),
}
POWER = Register(address=5, table="input", type="float32", word_order="little", byte_order="big")
TOOL_CHANGES_ADDRESS = 101  # uint32, ABCD


def unit_words(values: dict[str, float], tool_changes: int) -> dict[str, dict[int, int]]:
    """One machine's reading -> {table: {address: word}} in the layout above."""
    tables: dict[str, dict[int, int]] = {"input": {}, "holding": {}}

    def put(register: Register, words: list[int]) -> None:
        for i, word in enumerate(words):
            tables[register.table][register.address + i] = word

    for name, register in REGISTERS.items():
        put(register, encode(values[name], register))
    put(POWER, encode(round(power_w(values["torque"], values["rotational_speed"]), 1), POWER))
    for i, word in enumerate(encode_raw(tool_changes, "uint32")):
        tables["holding"][TOOL_CHANGES_ADDRESS + i] = word
    return tables


def device_config(machine_id: str, machine_type: MachineType, unit_id: int, port: int, host: str = LOOPBACK,
                  interval_s: float = 1.0) -> ModbusTcpDevice:
    """The agent's `[[modbus]]` table for one simulated machine (what examples/simulator-modbus.toml spells out)."""
    return ModbusTcpDevice(machine_id=machine_id, machine_type=machine_type, transport="tcp", host=host, port=port,
                           unit_id=unit_id, interval_s=interval_s, timeout_s=1.0, retries=1,
                           registers=dict(REGISTERS))


class ModbusSimulator(PlantServer):
    """Serves a Plant over Modbus TCP (see PlantServer)."""

    thread_name = "modbus-simulator"

    def __init__(self, plant: Plant, port: int, host: str = LOOPBACK, interval_s: float = 1.0) -> None:
        super().__init__(plant, port, host, interval_s)
        self.units = {machine_id: index + 1 for index, machine_id in enumerate(plant.machines)}
        self._words: dict[int, dict[str, dict[int, int]]] = {}
        self._advance(0.0)

    def _advance(self, dt: float) -> None:
        readings = self.plant.step(dt)
        words = {self.units[machine_id]: unit_words(values, self.plant.machines[machine_id].tool_changes)
                 for machine_id, values in readings.items()}
        with self.lock:
            self.latest, self._words = readings, words

    async def _serve(self) -> None:
        from pymodbus.server import ModbusTcpServer

        self._server = ModbusTcpServer([self._device(unit) for unit in self.units.values()],
                                       address=(self.host, self.port))
        await self._server.serve_forever(background=True)

    async def _step(self, dt: float) -> None:
        self._advance(dt)

    async def _close(self) -> None:
        await self._server.shutdown()

    def _device(self, unit: int) -> SimDevice:
        from pymodbus.simulator import DataType, SimData, SimDevice

        layout = unit_words({name: 0.0 for name in REGISTERS} | {"air_temperature": 273.15,
                                                                  "process_temperature": 273.15}, 0)

        def blocks(table: str) -> list[SimData]:
            addresses = sorted(layout[table])
            runs, start, count = [], addresses[0], 1
            for address in addresses[1:]:
                if address == start + count:
                    count += 1
                    continue
                runs.append(SimData(start, values=[0] * count, datatype=DataType.REGISTERS))
                start, count = address, 1
            runs.append(SimData(start, values=[0] * count, datatype=DataType.REGISTERS))
            return runs

        async def action(function_code: int, start_address: int, address: int, count: int, registers: list[int],
                         set_values: list[int] | list[bool] | None) -> None:
            if set_values:  # a write: accepted, ignored
                return
            with self.lock:
                table = self._words[unit]["holding" if function_code == 3 else "input"]
                for a in range(address, address + count):
                    registers[a - start_address] = table.get(a, 0)

        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        return SimDevice(unit, simdata=(bits, list(bits), blocks("holding"), blocks("input")), action=action)

    def describe(self) -> str:
        """Lines for the terminal: where each machine is served."""
        lines = [(f"Modbus TCP plant simulator on {self.host}:{self.port}, stepping every {self.interval_s:g} s "
                  "(register layout: drivers/simulator_modbus.py, agent config: examples/simulator-modbus.toml)")]
        lines += [f"  unit {unit}: {machine_id} (type {self.plant.machine_type(machine_id)})"
                  f"{self.plant.drift_note(machine_id)}" for machine_id, unit in self.units.items()]
        return "\n".join(lines)
