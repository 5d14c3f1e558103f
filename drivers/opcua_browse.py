"""`pdm-edge opcua browse`: walk a server's address space and show its variables, with their types, units
(EUInformation) and current values, and node-map entries to copy into `[opcua.machines.nodes]`.

    variables = browse(config, node="ns=2;s=Plant", depth=3)    # config: an OpcuaServer (url, security, user)
    print(format_variables(variables))

From the Objects folder by default; namespace 0 (the server's own diagnostics) is skipped there. At most
`limit` variables. Raises BrowseError, whose message says what to check, when the server cannot be read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.opcua_config import OpcuaMachine, OpcuaServer, node_problem

OBJECTS = "i=85"


class BrowseError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Variable:
    path: str  # browse path from Root, as a node map takes it
    node_id: str
    data_type: str
    unit: str | None
    value: Any
    status: str | None  # a bad status, when the value could not be read


def browse(config: OpcuaServer, node: str | None = None, depth: int = 4, limit: int = 1000) -> list[Variable]:
    if node is not None and not node.startswith("/") and node_problem(node):
        raise BrowseError(f"--node {node!r}: {node_problem(node)}")
    return asyncio.run(_browse(config, node, depth, limit))


async def _browse(config: OpcuaServer, start: str | None, depth: int, limit: int) -> list[Variable]:
    from asyncua import ua

    from drivers.opcua import quiet_library
    from drivers.opcua_config import browse_path_parts
    from drivers.opcua_session import connect, describe_failure, disconnect

    quiet_library()
    try:
        client = await connect(config)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line for the user
        raise BrowseError(describe_failure(exc, config)) from None
    try:
        if start is None:
            root, path = client.get_node(OBJECTS), "/Objects"
        elif start.startswith("/"):
            root, path = await client.nodes.root.get_child(browse_path_parts(start)), start.rstrip("/")
        else:
            root = client.get_node(start)
            path = await _path_of(root)
        found: list[Variable] = []
        await _walk(root, path, depth, found, limit, skip_ns0=start is None)
        return found
    except BrowseError:
        raise
    except (ua.uaerrors.BadNodeIdUnknown, ua.uaerrors.BadNoMatch):
        raise BrowseError(f"--node {start}: the server has no such node; browse from the Objects folder "
                          "(leave --node out) to find it") from None
    except Exception as exc:  # noqa: BLE001
        raise BrowseError(describe_failure(exc, config)) from None
    finally:
        await disconnect(client, config.timeout_s)


async def _path_of(node: Any) -> str:
    parts = await node.get_path(as_string=True)
    return "/" + "/".join(_qualified(part) for part in parts[1:]) if parts else "/"


def _qualified(text: str) -> str:
    ns, _, name = text.partition(":")
    return name if ns == "0" else text


async def _walk(node: Any, path: str, depth: int, found: list[Variable], limit: int, skip_ns0: bool) -> None:
    from asyncua import ua

    if len(found) >= limit:
        return
    node_class = await node.read_node_class()
    if node_class == ua.NodeClass.Variable:
        found.append(await _variable(node, path))
    if depth <= 0:
        return
    for child in await node.get_children():
        if skip_ns0 and child.nodeid.NamespaceIndex == 0:
            continue
        name = await child.read_browse_name()
        if name.Name == "EngineeringUnits":
            continue
        part = name.Name if name.NamespaceIndex == 0 else f"{name.NamespaceIndex}:{name.Name}"
        await _walk(child, f"{path}/{part}", depth - 1, found, limit, skip_ns0=False)


async def _variable(node: Any, path: str) -> Variable:
    from asyncua import ua

    try:
        data_type = (await node.read_data_type_as_variant_type()).name
    except Exception:  # noqa: BLE001 - a structure or a type the server describes only by NodeId
        data_type = "?"
    try:
        value, status = (await node.read_value()), None
    except ua.uaerrors.UaStatusCodeError as exc:
        value, status = None, type(exc).__name__
    unit = None
    try:
        units = await (await node.get_child("0:EngineeringUnits")).read_value()
        unit = units.DisplayName.Text
    except Exception:  # noqa: BLE001, S110 - no EngineeringUnits property: no unit shown
        pass
    return Variable(path, node.nodeid.to_string(), data_type, unit, value, status)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 30 else text[:27] + "..."


def format_variables(variables: list[Variable], inputs: tuple[str, ...] = ()) -> str:
    if not variables:
        return "no variables found (try another --node or a larger --depth)"
    rows = [("node", "browse path", "type", "unit", "value")]
    rows += [(v.node_id, v.path, v.data_type, v.unit or "", v.status or _show(v.value)) for v in variables]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    numeric = [v for v in variables if v.status is None and isinstance(v.value, int | float)
               and not isinstance(v.value, bool)]
    if numeric:
        lines += ["", ("node-map entries to copy into [opcua.machines.nodes] (name each after the model input it "
                      "feeds; add scale and offset to convert units):")]
        for v in numeric:
            name = v.path.rpartition("/")[2].partition(":")[2] or v.path.rpartition("/")[2]
            key = name if name in inputs or name.isidentifier() else f'"{name}"'
            note = f"  # {v.data_type}" + (f", {v.unit}" if v.unit else "") + f", now {_show(v.value)}"
            lines.append(f'{key} = "{v.node_id}"{note}')
    return "\n".join(lines)


def save_server_certificate(url: str, out: Path, timeout_s: float = 5.0) -> str:
    """Write the certificate the server presents (DER) to `out`; returns its SHA-1 thumbprint."""
    from drivers.opcua_security import thumbprint

    async def fetch() -> bytes:
        from asyncua.client.client import Client
        from asyncua.crypto import uacrypto

        client = Client(url, timeout=timeout_s)
        async with asyncio.timeout(timeout_s * 2):
            endpoints = await client.connect_and_get_server_endpoints()
        certs = [e.ServerCertificate for e in endpoints if e.ServerCertificate]
        if not certs:
            raise BrowseError(f"{url} presents no certificate (it offers security None only)")
        certificate = uacrypto.x509_from_der(certs[0])  # type: ignore[no-untyped-call]  # asyncua's, unannotated
        der: bytes = uacrypto.der_from_x509(certificate)  # type: ignore[no-untyped-call]
        return der

    try:
        der = asyncio.run(fetch())
    except BrowseError:
        raise
    except Exception as exc:  # noqa: BLE001
        config = OpcuaServer(url=url, machines=[
            OpcuaMachine.model_validate({"machine_id": "x", "machine_type": "L", "nodes": {"x": OBJECTS}})])
        from drivers.opcua_session import describe_failure

        raise BrowseError(describe_failure(exc, config)) from None
    out.write_bytes(der)
    return thumbprint(der)
