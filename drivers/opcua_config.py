"""OPC UA servers as inputs: one `[[opcua]]` table per server (SPEC §11), typed and validated without network I/O.

    [[opcua]]
    url = "opc.tcp://10.0.0.5:4840"
    sampling_ms = 1000
    security_policy = "Basic256Sha256"          # or "None" (labs only)
    security_mode = "SignAndEncrypt"            # or "Sign"
    certificate = "/etc/pdm-edge/opcua/client-cert.der"   # `pdm-edge opcua make-cert` writes both
    private_key = "/etc/pdm-edge/opcua/client-key.pem"
    trusted_server_certs = "/etc/pdm-edge/opcua/trusted"  # the server certificates this gateway trusts
    username = "pdm"
    password_file = "/etc/pdm-edge/opcua/password"

    [[opcua.machines]]
    machine_id = "press-1"
    machine_type = "M"
    [opcua.machines.nodes]
    air_temperature = "ns=2;s=Press1.AirTemp"                  # a NodeId...
    tool_wear = "/Objects/2:Press1/2:ToolWear"                 # ...or a browse path from the Root folder
    torque = { node = "ns=2;i=1007", scale = 0.1, deadband = 0.5 }

A node's value is read as value * scale + offset; `deadband` (absolute, in the node's own units) asks the server to
report a change only when the value moved by more than that. Whether a node exists is only known once connected:
a node the server does not have is a counted per-node error (logged once), see drivers/opcua.py.

This module imports no OPC UA library: the gateway's configuration loads without the `opcua` extra installed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    field_validator,
    model_validator,
)

from drivers.base import MachineId, MachineType, Scale

# ns=2;s=Press1.Torque, i=2258, nsu=urn:x;s=A, ns=3;g=<guid>, ns=1;b=<base64>
NODE_ID = re.compile(r"^(ns=\d{1,5};|nsu=[^;]+;)?(i=\d{1,10}|s=.+|g=[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
                     r"|b=[A-Za-z0-9+/]+=*)$", re.DOTALL)
# /Objects/2:Plant/2:m1/2:torque: qualified names (namespace index, colon, name; index 0 when left out) from Root
BROWSE_PATH = re.compile(r"^(/((\d{1,5}):)?[^/:]+)+$")


def node_problem(node: str) -> str | None:
    """What is wrong with a node reference as written, or None."""
    if node.startswith("/"):
        if BROWSE_PATH.match(node):
            return None
        return ("not a browse path: write qualified names from the Root folder, e.g. /Objects/2:Plant/2:Torque "
                "(namespace index, colon, browse name)")
    if NODE_ID.match(node):
        return None
    return ("neither a NodeId (e.g. ns=2;s=Press1.Torque or ns=2;i=1007) nor a browse path (e.g. "
            "/Objects/2:Plant/2:Torque); `pdm-edge opcua browse --url URL` lists the nodes")


def browse_path_parts(node: str) -> list[str]:
    """'/Objects/2:Plant/2:T' -> ['0:Objects', '2:Plant', '2:T'], as asyncua's Node.get_child takes them."""
    return [part if ":" in part else f"0:{part}" for part in node.strip("/").split("/")]


def _node(node: str) -> str:
    problem = node_problem(node)
    if problem:
        raise ValueError(problem)
    return node


# A frozen slotted dataclass, not a BaseModel: pydantic validates it all the same (the same messages, unknown keys
# refused), and each of a large plant's nodes then costs 64 bytes instead of a model's dict and fields-set (about
# 5 MB at 10,000 nodes).
@dataclass(frozen=True, slots=True)
class OpcuaNode:
    """Where one model input is read: `[opcua.machines.nodes.<input>]`, or just the node as a string."""

    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    node: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_node)]
    scale: Scale = 1.0
    offset: float = 0.0
    deadband: Annotated[float | None, Field(gt=0)] = None  # absolute, in the node's units (before scale and offset)


NODE_FORMS = 'write the node as a string, e.g. torque = "ns=2;s=T", or as a table: { node = "...", scale = 0.1 }'


def _shorthand(value: Any) -> Any:
    """`torque = "ns=2;s=T"` for `torque = { node = "ns=2;s=T" }`; a bad node is reported at `torque` itself."""
    if isinstance(value, str):
        problem = node_problem(value)
        if problem:
            raise ValueError(problem)
        return {"node": value}
    if not isinstance(value, dict | OpcuaNode):
        raise ValueError(NODE_FORMS)  # noqa: TRY004 - pydantic reports a ValueError, a TypeError would escape
    return value


class OpcuaMachine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    machine_id: MachineId
    machine_type: MachineType
    nodes: dict[str, Annotated[OpcuaNode, BeforeValidator(_shorthand)]] = Field(min_length=1)  # input -> node

    @field_validator("nodes")
    @classmethod
    def _shared_names(cls, nodes: dict[str, OpcuaNode]) -> dict[str, OpcuaNode]:
        # The input names are the same few on every machine: one string each, not one per node (and the driver's
        # per-machine state keys on them).
        return {sys.intern(name): node for name, node in nodes.items()}


class OpcuaServer(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    url: str = Field(pattern=r"^opc\.tcp://[^/\s]+", max_length=2048)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")  # in logs and status; default host:port
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: FilePath | None = None  # this client's certificate (DER or PEM)
    private_key: FilePath | None = None  # its private key (PEM or DER), unencrypted
    trusted_server_certs: DirectoryPath | None = None  # the server certificates to trust (.der or .pem files)
    username: str | None = Field(None, min_length=1, max_length=256)
    password_file: FilePath | None = None
    sampling_ms: int = Field(1000, ge=10, le=3_600_000)  # the server samples each node this often
    # the server sends changes this often; default sampling_ms
    publishing_ms: int | None = Field(None, ge=10, le=3_600_000)
    queue_size: int = Field(10, ge=1, le=10_000)  # changes a node may queue between two publishes (none lost)
    timeout_s: float = Field(5.0, gt=0, le=300)  # for each request, and for the server's answer to the watchdog
    backoff_max_s: float = Field(30.0, gt=0, le=3600)  # longest wait between attempts to reach a server
    machines: list[OpcuaMachine] = Field(min_length=1)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parsed = urlparse(self.url)
        return parsed.netloc.rpartition("@")[2] or self.url

    @property
    def publishing_interval_ms(self) -> int:
        return self.publishing_ms or self.sampling_ms

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        if "@" in urlparse(url).netloc:
            raise ValueError("user and password do not belong in the URL (it is logged); use username and "
                             "password_file")
        return url

    @model_validator(mode="after")
    def _security(self) -> OpcuaServer:
        if self.security_policy == "Basic256Sha256":
            missing = [key for key in ("certificate", "private_key", "trusted_server_certs")
                       if getattr(self, key) is None]
            if missing:
                raise ValueError(f"security_policy Basic256Sha256 needs {', '.join(missing)}: "
                                 "`pdm-edge opcua make-cert --out DIR` writes a client certificate and key")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: set both, or neither for anonymous access")
        return self

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()


def check_servers(servers: Sequence[OpcuaServer]) -> list[str]:
    """Problems across servers: each machine fed by one server, each server named once."""
    problems = []
    machines: dict[str, str] = {}
    labels: dict[str, int] = {}
    for index, server in enumerate(servers):
        if server.label in labels:
            problems.append(f"opcua[{labels[server.label]}] and opcua[{index}] are both named {server.label!r}; "
                            "set a distinct name on each")
        labels.setdefault(server.label, index)
        for m, machine in enumerate(server.machines):
            where = f"opcua[{index}].machines[{m}]"
            if machine.machine_id in machines:
                problems.append(f"{machines[machine.machine_id]} and {where} are both machine "
                                f"{machine.machine_id!r}; give each machine its own machine_id")
            machines.setdefault(machine.machine_id, where)
    return problems


def input_problems(servers: Sequence[OpcuaServer], input_names: Sequence[str]) -> list[str]:
    """Each machine maps every model input and nothing else."""
    problems = []
    inputs = ", ".join(input_names)
    for index, server in enumerate(servers):
        for m, machine in enumerate(server.machines):
            where = f"opcua[{index}].machines[{m}].nodes"
            missing = [name for name in input_names if name not in machine.nodes]
            if missing:
                problems.append(f"{where}: no node for model input {', '.join(missing)}; add one for each")
            problems += [f"{where}.{name}: not a model input (the model reads {inputs}); remove it"
                         for name in machine.nodes if name not in input_names]
    return problems
