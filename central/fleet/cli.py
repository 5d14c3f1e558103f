"""`pdm-central keys|model|rollout|config|pin`: the fleet commands (issue 17). Registered by central/cli.py.

  keys new --out DIR [--name NAME]     an Ed25519 key pair: NAME.key (private, 0600, for uploads) and NAME.pub
                                       (copy it to gateways, list it in [model] trusted_keys); no database needed
  model upload PACKAGE --signing-key FILE [--signer WHO]   sign and store a model package as a bundle
  model list [--json]
  rollout start NAME VERSION --cohort SPEC [--cohort SPEC ...] [gates]   SPEC: gw-a,gw-b | 25% | rest
  rollout status [--json] | promote | abort [--reason TEXT]
  config set GATEWAY KEY=VALUE ... | config clear GATEWAY | config show GATEWAY   remote overrides (sync/remote.py)
  pin GATEWAY [--off]                  rollouts leave a pinned gateway alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from central.settings import Settings
from sync.protocol import escape_controls

if TYPE_CHECKING:
    import psycopg  # the central extra: imported where used, so that --help needs none


def _say(text: str, file: Any = None) -> None:
    """print(), control characters escaped (as central/cli.py's `say`)."""
    print("\n".join(escape_controls(line) for line in str(text).split("\n")), file=file or sys.stdout)


class FleetError(Exception):
    """A fleet command that cannot be done: one line for the operator."""


def _keys_new(settings: Settings | None, args: argparse.Namespace) -> int:
    from model.bundle import new_key_pair

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{args.name}.key", out / f"{args.name}.pub"
    try:
        key = new_key_pair(private, public)
    except FileExistsError as exc:
        raise FleetError(f"{exc.filename} exists: choose another --name or --out (keys are never overwritten)") \
            from None
    _say(f"key {key}: private {private} (keep it with whoever uploads models), public {public} (copy it to the "
         "gateways and list it in [model] trusted_keys)")
    return 0


def _gateway_id(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT id FROM gateways WHERE name = %s AND revoked_at IS NULL", [name]).fetchone()
    if row is None:
        raise FleetError(f"no active gateway {name!r}")
    return int(row[0])


def _model_upload(settings: Settings | None, args: argparse.Namespace) -> int:
    from central import db
    from central.fleet import bundles
    from model.manifest import PackageError

    assert settings is not None
    try:
        with db.connect(settings) as conn:
            stored = bundles.upload(conn, Path(args.package), Path(args.signing_key), args.signer)
    except PackageError as exc:
        raise FleetError(str(exc)) from None
    _say(f"uploaded {stored.name} {stored.version} (onnx sha256 {stored.sha256[:12]}, {stored.size:,} bytes), "
         f"signed by key {stored.key_id} ({stored.signer})")
    return 0


def _model_list(settings: Settings | None, args: argparse.Namespace) -> int:
    from central import db
    from central.fleet import bundles

    assert settings is not None
    with db.connect(settings) as conn:
        found = bundles.list_bundles(conn)
    if args.json:
        _say(json.dumps([b.__dict__ for b in found], default=str, indent=2))
        return 0
    _say(f"{'name':<24}{'version':<12}{'sha256':<14}{'key':<18}{'signer':<20}uploaded")
    for b in found:
        _say(f"{b.name:<24}{b.version:<12}{b.sha256[:12]:<14}{b.key_id:<18}{b.signer:<20}"
             f"{b.uploaded_at.isoformat(timespec='seconds')}")
    return 0


async def _async_conn(settings: Settings) -> psycopg.AsyncConnection[Any]:
    import psycopg

    from central import db

    url, extra = db.conninfo_kwargs(settings)
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, **extra)
    except psycopg.OperationalError as exc:
        raise db.unavailable(exc) from exc


def _rollout(settings: Settings | None, args: argparse.Namespace) -> int:
    from central.fleet import rollout

    assert settings is not None

    async def run() -> rollout.RolloutStatus | None:
        conn = await _async_conn(settings)
        try:
            if args.action == "start":
                gates = rollout.Gates(min_readings=args.min_readings, min_minutes=args.min_minutes,
                                      min_agreement=args.min_agreement,
                                      max_alarm_rate_change=args.max_alarm_rate_change)
                return await rollout.start(conn, args.name, args.version, args.cohort, gates)
            if args.action == "promote":
                return await rollout.promote(conn)
            if args.action == "abort":
                return await rollout.abort(conn, f"aborted by the operator: {args.reason}")
            return await rollout.advance(conn)
        finally:
            await conn.close()

    try:
        found = asyncio.run(run())
    except rollout.RolloutError as exc:
        raise FleetError(str(exc)) from None
    if found is None:
        _say("no rollout was ever started")
        return 0
    if getattr(args, "json", False):
        _say(found.model_dump_json(indent=2))
        return 0
    _show(found)
    return 0


def _show(status: Any) -> None:
    cohort = f"cohort {status.cohort + 1} of {len(status.cohorts)}, {status.phase}" if status.state == "running" \
        else status.state.replace("_", " ")
    _say(f"rollout {status.id}: {status.model}: {cohort}")
    if status.reason:
        _say(f"reason: {status.reason}")
    g = status.gates
    _say(f"gates: >= {g.min_readings} readings and {g.min_minutes:g} min in shadow, agreement >= {g.min_agreement}, "
         f"alarm rate change <= {g.max_alarm_rate_change}")
    _say(f"{'gateway':<24}{'cohort':<8}{'live':<24}{'shadow':<24}{'readings':>9}{'agree':>7}{'alarm':>7}"
         f"{'live':>7}  error")
    for row in status.gateways:
        def rate(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"
        _say(f"{row.gateway:<24}{row.cohort + 1:<8}{row.live_model or 'own':<24}{row.shadow_model or '-':<24}"
             f"{row.readings:>9}{rate(row.agreement):>7}{rate(row.alarm_rate):>7}{rate(row.live_alarm_rate):>7}  "
             f"{row.error or ''}")


def _config(settings: Settings | None, args: argparse.Namespace) -> int:
    from central import db
    from central.fleet import desired
    from sync.remote import OverrideError

    assert settings is not None
    with db.connect(settings) as conn:
        gateway_id = _gateway_id(conn, args.gateway)
        if args.action == "show":
            row = conn.execute("SELECT config_revision, overrides FROM gateway_desired WHERE gateway_id = %s",
                               [gateway_id]).fetchone()
            revision, overrides = row if row is not None else (0, {})
            _say(json.dumps({"gateway": args.gateway, "config_revision": revision, "overrides": overrides}, indent=2))
            return 0
        overrides = {} if args.action == "clear" else _parse_pairs(args.pairs)
        try:
            revision = desired.set_overrides(conn, gateway_id, overrides)
        except OverrideError as exc:
            raise FleetError("refused: " + "; ".join(exc.problems)) from None
    _say(f"gateway {args.gateway}: config revision {revision}: {json.dumps(overrides) if overrides else 'no overrides'}")
    return 0


def _parse_pairs(pairs: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise FleetError(f"{pair!r}: write KEY=VALUE, e.g. alarms.enter_after=5")
        try:
            found[key.strip()] = json.loads(text)
        except ValueError:
            found[key.strip()] = text
    return found


def _pin(settings: Settings | None, args: argparse.Namespace) -> int:
    from central import db
    from central.fleet import desired

    assert settings is not None
    with db.connect(settings) as conn:
        desired.set_pinned(conn, _gateway_id(conn, args.gateway), not args.off)
    _say(f"gateway {args.gateway} {'released: rollouts may include it' if args.off else 'pinned: rollouts leave it alone'}")
    return 0


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="signing keys for model bundles").add_subparsers(dest="action",
                                                                                           required=True)
    new = keys.add_parser("new", help="make an Ed25519 key pair (NAME.key private, NAME.pub for gateways)")
    new.add_argument("--out", default=".", help="folder for the two files (default: here)")
    new.add_argument("--name", default="pdm-signing", help="file name stem (default: pdm-signing)")
    new.set_defaults(handler=_keys_new, without_settings=True)

    model = commands.add_parser("model", help="signed model bundles").add_subparsers(dest="action", required=True)
    upload = model.add_parser("upload", help="sign a model package and store it as a bundle")
    upload.add_argument("package", help="the package folder (model.onnx + manifest.json)")
    upload.add_argument("--signing-key", required=True, help="the private key file from `pdm-central keys new`")
    upload.add_argument("--signer", default="pdm-central", help="who signs, as shown to gateways")
    upload.set_defaults(handler=_model_upload)
    listing = model.add_parser("list", help="the uploaded bundles")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_model_list)

    rollout = commands.add_parser("rollout", help="staged rollouts of a model").add_subparsers(dest="action",
                                                                                              required=True)
    start = rollout.add_parser("start", help="start a rollout: cohort by cohort, shadow first, live after its gates")
    start.add_argument("name")
    start.add_argument("version")
    start.add_argument("--cohort", action="append", default=[], help="gw-a,gw-b | 25%% | rest; in order, repeatable")
    start.add_argument("--min-readings", type=int, default=500, help="shadow readings per gateway (500)")
    start.add_argument("--min-minutes", type=float, default=0.0, help="minutes in shadow at least (0)")
    start.add_argument("--min-agreement", type=float, default=0.95, help="state agreement at least (0.95)")
    start.add_argument("--max-alarm-rate-change", type=float, default=0.02,
                       help="alarm rate change at most, absolute (0.02)")
    status = rollout.add_parser("status", help="the running (or last) rollout; advances it one step")
    status.add_argument("--json", action="store_true")
    rollout.add_parser("promote", help="skip the current cohort's wait and gates")
    abort = rollout.add_parser("abort", help="stop and send every gateway it reached back to its previous model")
    abort.add_argument("--reason", default="no reason given")
    for sub in (start, status, abort):
        sub.set_defaults(handler=_rollout)
    rollout.choices["promote"].set_defaults(handler=_rollout)

    config = commands.add_parser("config", help="remote configuration overrides of a gateway") \
        .add_subparsers(dest="action", required=True)
    set_ = config.add_parser("set", help="replace the gateway's overrides, e.g. alarms.enter_after=5")
    set_.add_argument("gateway")
    set_.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    for name, text in (("clear", "remove the gateway's overrides"), ("show", "the gateway's overrides")):
        sub = config.add_parser(name, help=text)
        sub.add_argument("gateway")
    for sub in config.choices.values():
        sub.set_defaults(handler=_config)

    pin = commands.add_parser("pin", help="keep a gateway out of rollouts (--off: release it)")
    pin.add_argument("gateway")
    pin.add_argument("--off", action="store_true")
    pin.set_defaults(handler=_pin)


def run_without_settings(args: argparse.Namespace) -> int | None:
    """The commands that need no settings (keys new); None for the others."""
    if not getattr(args, "without_settings", False):
        return None
    try:
        code: int = args.handler(None, args)
        return code
    except FleetError as exc:
        _say(f"pdm-central: {exc}", file=sys.stderr)
        return 1
