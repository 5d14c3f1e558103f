"""`pdm-edge opcua browse|make-cert`: the OPC UA tools (the `opcua` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

EXTRA_MISSING = "needs the opcua extra: pip install 'pdm-edge[opcua]'"


def missing_extra(command: str) -> bool:
    """Say in one line which extra to install when asyncua is missing."""
    if importlib.util.find_spec("asyncua") is None:
        print(f"pdm-edge {command}: {EXTRA_MISSING}", file=sys.stderr)
        return True
    return False


def _browse(args: argparse.Namespace) -> int:
    if missing_extra("opcua browse"):
        return 2
    from pydantic import ValidationError

    from drivers.opcua_browse import BrowseError, browse, format_variables, save_server_certificate
    from drivers.opcua_config import OpcuaMachine, OpcuaServer
    from drivers.simulator import INPUTS

    try:
        if args.save_cert:
            print(f"saved the server certificate to {args.save_cert} (SHA-1 "
                  f"{save_server_certificate(args.url, args.save_cert, args.timeout)}); review it, then copy it "
                  "into the trusted_server_certs folder to trust it")
            return 0
        config = OpcuaServer(
            url=args.url, security_policy=args.security_policy, security_mode=args.security_mode,
            certificate=args.certificate, private_key=args.private_key, trusted_server_certs=args.trusted,
            username=args.username, password_file=args.password_file, timeout_s=args.timeout,
            machines=[OpcuaMachine.model_validate({"machine_id": "browse", "machine_type": "L",
                                                   "nodes": {"any": "i=85"}})])
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "options"
        print(f"pdm-edge opcua browse: {where}: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    except BrowseError as exc:
        print(f"pdm-edge opcua browse: {exc}", file=sys.stderr)
        return 1
    try:
        variables = browse(config, args.node, args.depth, args.limit)
    except BrowseError as exc:
        print(f"pdm-edge opcua browse: {exc}", file=sys.stderr)
        return 1
    print(format_variables(variables, INPUTS))
    return 0


def _make_cert(args: argparse.Namespace) -> int:
    if missing_extra("opcua make-cert"):
        return 2
    from drivers.opcua_security import make_client_certificate

    try:
        made = make_client_certificate(args.out, args.hostname, args.days)
    except (FileExistsError, OSError) as exc:
        print(f"pdm-edge opcua make-cert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {made.certificate} and {made.private_key} (application URI {made.uri}, SHA-1 {made.thumbprint})\n"
          f"set certificate and private_key in [[opcua]], and have the server trust {made.certificate}")
    return 0


def _depth(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 20:
        raise argparse.ArgumentTypeError("0 to 20")
    return value


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    opcua = commands.add_parser("opcua", help="OPC UA tools (extra `opcua`)")
    sub = opcua.add_subparsers(dest="opcua_command", required=True)
    browse = sub.add_parser("browse", help="list a server's variables with types, units and values, and node-map "
                                           "entries to copy")
    browse.add_argument("--url", required=True, help="the server, e.g. opc.tcp://10.0.0.5:4840")
    browse.add_argument("--node", help="start here (a NodeId or a browse path; default the Objects folder)")
    browse.add_argument("--depth", type=_depth, default=4, help="levels below the start node (default %(default)s)")
    browse.add_argument("--limit", type=int, default=1000, help="at most this many variables (default %(default)s)")
    browse.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default %(default)s)")
    browse.add_argument("--security-policy", choices=("None", "Basic256Sha256"), default="None")
    browse.add_argument("--security-mode", choices=("Sign", "SignAndEncrypt"), default="SignAndEncrypt")
    browse.add_argument("--certificate", type=Path, help="this client's certificate (make-cert writes one)")
    browse.add_argument("--private-key", type=Path, help="its private key")
    browse.add_argument("--trusted", type=Path, help="the folder of trusted server certificates")
    browse.add_argument("--username")
    browse.add_argument("--password-file", type=Path)
    browse.add_argument("--save-cert", type=Path, metavar="FILE",
                        help="only save the certificate the server presents to FILE (to review and trust it)")
    browse.set_defaults(handler=_browse)
    cert = sub.add_parser("make-cert", help="write a client certificate and key for Basic256Sha256")
    cert.add_argument("--out", type=Path, required=True, help="folder for client-cert.der and client-key.pem")
    cert.add_argument("--hostname", help="host name in the certificate (default this host's)")
    cert.add_argument("--days", type=int, default=730, help="validity (default %(default)s)")
    cert.set_defaults(handler=_make_cert)
