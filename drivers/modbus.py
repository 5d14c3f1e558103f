"""Modbus devices (TCP and RTU): their configuration, one `[[modbus]]` table per device.

A device is one machine; its register map says where each model input is read and how the registers decode to a
number: value = decoded raw value * scale + offset.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from drivers.base import MachineId, MachineType

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]

REGISTER_WORDS: dict[str, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4,
}
TRANSPORTS = ("tcp", "rtu")


class Register(BaseModel):
    """Where one model input is read: `[modbus.registers.<input name>]`."""

    model_config = ConfigDict(extra="forbid")

    address: int = Field(ge=0, le=65535)
    table: Literal["holding", "input"] = "holding"
    type: RegisterType = "uint16"
    word_order: Literal["big", "little"] = "big"  # for multi-register types: which register holds the high word
    byte_order: Literal["big", "little"] = "big"  # within each register
    scale: float = 1.0
    offset: float = 0.0

    @field_validator("type")
    @classmethod
    def _fits_register_space(cls, value: str, info: ValidationInfo) -> str:
        address = info.data.get("address")
        if address is not None and address + REGISTER_WORDS[value] > 65536:
            raise ValueError(f"{value} at address {address} runs past register 65535; check the address")
        return value

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("a scale of 0 turns every reading into the offset; use 1 for no scaling")
        return value


class _Device(BaseModel):
    model_config = ConfigDict(extra="forbid")

    machine_id: MachineId
    machine_type: MachineType
    unit_id: int = Field(1, ge=0, le=247)
    interval_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    retries: int = Field(2, ge=0)
    registers: dict[str, Register] = Field(min_length=1)  # model input name -> register


class ModbusTcpDevice(_Device):
    transport: Literal["tcp"]
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)


class ModbusRtuDevice(_Device):
    """A device on a serial line; the defaults are the Modbus serial line standard's (19200 baud, 8E1)."""

    transport: Literal["rtu"]
    serial_port: str = Field(min_length=1)
    baudrate: int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "E"
    stopbits: int = Field(1, ge=1, le=2)


ModbusDevice = Annotated[ModbusTcpDevice | ModbusRtuDevice, Field(discriminator="transport")]
