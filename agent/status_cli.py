"""`pdm-edge status [--url URL] [--json]`: the technician's view in a terminal, from a running agent's status API.

Prints one line per machine (the worst first: alarm, warning, ok), the open alarm episodes (acknowledged or not,
labelled or not) and a line about the gateway; `--json` prints `{"status": <GET /api/v1/status>, "machines":
[<GET /api/v1/machines>...], "alarms": <GET /api/v1/alarms>}` instead. The token, when the agent has
one, comes from PDM_STATUS__TOKEN or the file named by PDM_STATUS__TOKEN_FILE (never from the command line, where
`ps` would show it). Exit codes: 0 the agent answered; 1 it could not be reached or refused the request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from model.states import State
from sync.protocol import escape_controls

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "PDM_STATUS_URL"
TOKEN_ENV = "PDM_STATUS__TOKEN"
TIMEOUT_S = 5.0
STALE_S = 120  # as on the page: a machine silent this long is shown as stale
COLORS = {State.ALARM: "\033[1;31m", State.WARNING: "\033[1;33m", State.OK: "\033[32m", "stale": "\033[2m"}
RESET = "\033[0m"

if TYPE_CHECKING:
    import requests


class Unreachable(Exception):
    """The agent did not answer, or answered with an error: the message says which and what to do."""


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `status` on the `pdm-edge` command line."""
    status = commands.add_parser("status", help="the technician's view: machines, health, state, top risk")
    status.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                        help=f"the agent's status API (default ${URL_ENV} or %(default)s)")
    status.add_argument("--json", action="store_true", help="print the status and the machines as JSON")
    status.set_defaults(handler=lambda args: main(args.url, token_from_env(), args.json))


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    variables: Mapping[str, str] = os.environ if environ is None else environ
    if variables.get(TOKEN_ENV):
        return variables[TOKEN_ENV].strip()
    path = variables.get(f"{TOKEN_ENV}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as exc:
            print(f"pdm-edge status: cannot read {TOKEN_ENV}_FILE {path}: {exc.strerror}", file=sys.stderr)
    return None


def main(url: str, token: str | None, as_json: bool, out: TextIO | None = None) -> int:
    import requests  # this command's alone: `pdm-edge run` builds the same parser and never needs it

    out = out or sys.stdout
    base = url.rstrip("/")
    try:
        with requests.Session() as session:
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            status = _get(session, base, "/api/v1/status")
            machines = _get(session, base, "/api/v1/machines")["machines"]
            alarms = _get(session, base, "/api/v1/alarms")
    except Unreachable as exc:
        print(f"pdm-edge status: {exc}", file=sys.stderr)
        return 1
    if as_json:  # ASCII: a name with a bidi override or a C1 escape reaches the terminal as \u escapes
        json.dump({"status": status, "machines": machines, "alarms": alarms}, out, indent=2)
        out.write("\n")
    else:
        color = out.isatty() and not os.environ.get("NO_COLOR")
        status, machines, alarms = _escaped(status), _escaped(machines), _escaped(alarms)
        out.write(table(machines, color) + "\n\n" + episodes(alarms) + "\n\n" + gateway_line(status) + "\n")
    return 0


def _escaped(value: Any) -> Any:
    """Every string in `value` with its control and format characters escaped (sync.protocol.escape_controls): what
    the agent answers was typed by people and devices, and a terminal obeys escape sequences."""
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value


def _get(session: requests.Session, base: str, path: str) -> Any:
    import requests

    try:
        response = session.get(base + path, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise Unreachable(f"the agent is not reachable at {base} ({_reason(exc)}); is it running "
                          f"(systemctl status pdm-edge)? Use --url if it listens elsewhere") from None
    if response.status_code == 401:
        hint = ("the token was refused" if "Authorization" in session.headers
                else f"it needs the status token: set {TOKEN_ENV} or {TOKEN_ENV}_FILE")
        raise Unreachable(f"{base} answered 401: {hint}")
    try:
        body = response.json()
    except ValueError:
        raise Unreachable(f"{base}{path} answered {response.status_code} without JSON: is this a pdm-edge "
                          "agent's status API?") from None
    if response.status_code != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise Unreachable(f"{base}{path} answered {response.status_code}: {message or response.reason}")
    return body


def _reason(exc: requests.RequestException) -> str:
    import requests

    if isinstance(exc, requests.ConnectionError):
        return "connection refused or no route"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {TIMEOUT_S:g} s"
    if isinstance(exc, (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                        requests.exceptions.InvalidURL)):
        return "not a URL such as http://127.0.0.1:8080"
    return "the request failed"


def table(machines: list[dict[str, Any]], color: bool = False) -> str:
    if not machines:
        return "no machines yet: no reading has been stored (check the drivers on the gateway line)"
    headers = ("MACHINE", "STATE", "HEALTH", "TOP RISK", "LAST READING", "NOTES")
    rows = []
    for m in machines:
        stale = m["last_reading_age_s"] > STALE_S
        notes = []
        if m["ood"]:
            notes.append("outside training range: " + ", ".join(m["ood"]))
        if m.get("reading_state") and m["reading_state"] != m["state"]:
            alone = f", health {m['reading_health']:.0f}" if "reading_health" in m else ""
            notes.append(f"latest reading alone: {m['reading_state']}{alone}")
        if stale:
            notes.append("stale")
        rows.append((m["machine_id"], m["state"], f"{m['health']:.0f}", _risk(m),
                     f"{_age(m['last_reading_age_s'])} ago", "; ".join(notes)))
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for m, row in zip(machines, rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        if color:
            state = "stale" if m["last_reading_age_s"] > STALE_S else m["state"]
            cells[1] = COLORS.get(state, "") + cells[1] + RESET
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def episodes(alarms: dict[str, Any]) -> str:
    """The open alarm episodes, a line each: what the technician should look at, and whether someone has."""
    open_ = alarms["alarms"]
    if not open_:
        return "no open alarm episodes"
    lines = [f"open alarm episodes: {len(open_)}"]
    for a in open_:
        risk = f"{a['dominant']['label']} ({_pct(a['dominant']['risk'])})" if a.get("dominant") else "-"
        if a["acknowledged_at"]:
            by = f" by {a['acknowledged_by']}" if a["acknowledged_by"] else ""
            ack = f"acknowledged{by} at the {a['acknowledged_where']}"
        else:
            ack = "NOT acknowledged"
        label = f", labelled {a['label']}" + (f" {a['label_mode']}" if a["label_mode"] else "") if a["label"] else ""
        lines.append(f"  {a['machine_id']}  {a['state']}  open {_age(a['age_s'])}  {risk}  {ack}{label}  "
                     f"[{a['episode_id']}]")
    if alarms["actions_pending"]:
        lines.append(f"  {alarms['actions_pending']} acknowledgement(s)/label(s) not yet at central"
                     + (f": {alarms['actions_error']}" if alarms["actions_error"] else ""))
    return "\n".join(lines)


def _risk(machine: dict[str, Any]) -> str:
    dominant = machine.get("dominant")
    if not dominant:
        return "-"
    if machine["state"] == State.OK and not dominant["elevated"]:
        return "none elevated"
    return f"{dominant['label']} ({dominant['mode']} {_pct(dominant['risk'])})"


def _pct(p: float) -> str:
    return "<0.1%" if p < 0.001 else f"{100 * p:.1f}%" if p < 0.1 else f"{100 * p:.0f}%"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def gateway_line(status: dict[str, Any]) -> str:
    model, buffer, sync = status["model"], status["buffer"], status["sync"]
    parts = [f"gateway {status['gateway_id']}", f"agent {status['agent_version']}",
             f"model {model['name']} {model['version']}", f"up {_age(status['uptime_s'])}"]
    if buffer["pending"]:
        parts.append(f"buffer {buffer['pending']} to send (oldest {_age(buffer['oldest_pending_age_s'])})")
    else:
        parts.append("buffer empty")
    if buffer["dropped_total"]:
        parts.append(f"DROPPED {buffer['dropped_total']} at the buffer cap")
    if not sync["enabled"]:
        parts.append("sync off")
    else:
        last = f"last {_age(sync['last_success_age_s'])} ago" if sync["last_success"] else "never synced"
        parts.append(f"sync {last}" + (f", last error: {sync['last_error']}" if sync["last_error"] else ""))
    drivers = [f"{d['name']} {'connected' if d['connected'] else 'DOWN' if d['connected'] is False else 'unknown'}"
               + (f" ({d['last_error']})" if d["last_error"] and not d["connected"] else "")
               for d in status["drivers"]]
    parts.append("drivers: " + (", ".join(drivers) if drivers else "none"))
    return " · ".join(parts)
