"""The fleet dashboard: one page for the operations team, served by the central API at `/`.

Routes (added to the API by `routes()`):
  GET  /                 the page (central/static/dashboard.html) with a session; else 303 to /login
  GET  /login            the login form (no script)
  POST /login            form field `token` = the ops token -> a session cookie, 303 to /; a wrong token: 401 form
  POST /logout           ends the session (deleted server-side), expires the cookie, 303 to /login
  GET  /api/v1/dashboard/fleet     machines in alarm, then warning, then ok (?gateway=&state=&mode=&limit=), counts,
                                   the first `gateways` (200) gateways by attention with last-seen age, backlog and
                                   drops, and how many gateways there are, silent and never connected
  GET  /api/v1/dashboard/gateways/{gateway}/machines/{machine_id}   ?since=&until=&points=: health and per-mode
                                   risk in at most `points` buckets, the events of the range, the latest inputs
                                   against the model's normal (training) ranges
The two data routes are ops routes: the bearer ops token or a session cookie (central/app.py, require_ops).

Sessions are server-side: the cookie holds 256 random bits, PostgreSQL holds their HMAC keyed by the ops token and
the expiry (dashboard_sessions): a new ops token ends every session at once, since no cookie issued under the old
one matches a row any more (a rotation after a leak must lock out whoever signed in with it). Chosen over an HMAC-signed cookie because logout really ends the session (a copied cookie
dies with it), no extra server secret has to be managed, and every gunicorn worker sees the same sessions.
The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure unless
PDM_CENTRAL_SESSION_COOKIE_SECURE=false (refused in production and off loopback), and named `__Host-...` when
Secure (the browser then refuses it from a sub-domain or on another path). The ops token is posted once by a
plain HTML form and never stored by the page. CSRF: besides SameSite, the login and logout POSTs must carry an
Origin header equal to the page's own origin (browsers send it on every POST).

Indexes the queries use (migration 0002):
  fleet page             machines_fleet_order (state rank, health, ...) or machines_mode_order with a mode filter:
                         the first `limit` rows of an index, no sort; with a gateway filter the primary key
  "since"                events_machine_ts, one backward probe per shown machine
  counts, gateways       machine_states (per gateway and state, kept by triggers on machines); with a mode filter,
                         the counts from machines_mode_order
  machine chart          summaries_machine_chart, index-only (the chart's columns are INCLUDEd), for buckets under an
                         hour; else summaries_hourly's primary key (a roll-up kept by a trigger on summaries)
  machine events         events_machine_ts
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import SplitResult, parse_qs, urlsplit

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

import model.manifest
from central import guard, ingest
from central.auth import same_secret
from central.db import Connection, one_row
from central.errors import ApiError
from central.fleet import rollout as fleet_rollout
from central.params import Mode, Name, NameInPath, Time
from central.replica import ReadConnection
from central.settings import Settings
from model.modes import mode_words
from model.states import WORST_FIRST, StateName
from web.http import Page, load_page, page_csp
from web.throttle import FailedAuth

JSON = "application/json"
SILENT_AFTER = timedelta(minutes=10)  # a gateway syncs every few seconds; 10 minutes without a batch is silent
GATEWAYS_LISTED = 200  # the fleet view lists the gateways needing attention first; the counts cover them all
DEFAULT_SPAN = timedelta(hours=24)
MAX_SPAN = timedelta(days=400)
HOUR = 3600  # buckets this long or longer come from the hourly roll-up
# A gap this long in a machine's windows is drawn as "unchanged": summaries on change (sync/onchange.py) hold back
# alike windows up to max_interval_s, 300 by default.
UNCHANGED_S = 300
MAX_FORM_BYTES = 4096
Statement = tuple[str, dict[str, Any]]  # SQL and its parameters
# "no-referrer" (the API's default) makes browsers send `Origin: null` on the page's own form POSTs.
PAGE_HEADERS = {"Referrer-Policy": "same-origin"}
FORM_ACTION = "'self'"  # the sign-in and sign-out forms post to this origin


# --- the model's words and ranges ------------------------------------------------------------------------------------

@cache
def manifest() -> model.manifest.Manifest:
    """The shipped model's manifest: the normal (training) range of each input, each mode's threshold."""
    return model.manifest.Manifest.load(Path(model.manifest.__file__).resolve().parent / "shipped")


def health_at(p_failure: float) -> float:
    """The manifest's health for a failure probability (piecewise linear)."""
    points = manifest().health.points
    for (p0, h0), (p1, h1) in pairwise(points):
        if p0 <= p_failure <= p1:
            return h0 + (h1 - h0) * (p_failure - p0) / ((p1 - p0) or 1)
    return points[-1][1]


def mode_of(mode: str) -> dict[str, str]:
    return {"mode": mode, **mode_words(mode)}


# --- the page ---------------------------------------------------------------------------------------------------------

@cache
def page() -> Page:
    """The dashboard: its one inline <script> and <style> are allowed by their sha256 (web.http); nothing else may
    run, load or be fetched but from this origin. The login form reuses its <style>."""
    return load_page("central", "static/dashboard.html")


LOGIN = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>pdm-central · sign in</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header><h1>pdm-central <span class="gw">fleet dashboard</span></h1></header>
<main>
<form class="login" method="post" action="/login">
<h2>Sign in</h2>
<p class="muted">Enter the central ops token (PDM_CENTRAL_OPS_TOKEN). It is exchanged for a session cookie and
never stored by this page.</p>
{message}
<input type="password" name="token" id="token" autocomplete="off" required aria-label="ops token" autofocus>
<button type="submit" id="sign-in">Sign in</button>
</form>
</main>
</body>
</html>
"""


def login_page(message: str = "", status: int = 200) -> HTMLResponse:
    style = page().style
    note = f'<p class="bad" id="login-error">{html.escape(message)}</p>' if message else ""
    return HTMLResponse(LOGIN.format(style=style, message=note), status_code=status,
                        headers={"Content-Security-Policy": page_csp(None, style, form_action=FORM_ACTION),
                                 **PAGE_HEADERS})


# --- sessions ---------------------------------------------------------------------------------------------------------

def cookie_name(settings: Settings) -> str:
    # The __Host- prefix is only accepted by browsers with Secure (and Path=/, no Domain).
    return "__Host-pdm-session" if settings.session_cookie_secure else "pdm-session"


def _digest(session_id: str, settings: Settings) -> bytes:
    key = settings.ops_token.get_secret_value().encode("utf-8", "surrogatepass") if settings.ops_token else b""
    return hmac.new(key, session_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


NEW_SESSION = """
WITH expired AS (DELETE FROM dashboard_sessions WHERE expires_at < now())
INSERT INTO dashboard_sessions (id_hash, expires_at, client_addr) VALUES (%s, now() + %s, %s)
"""
VALID_SESSION = "SELECT 1 FROM dashboard_sessions WHERE id_hash = %s AND expires_at > now()"
END_SESSION = "DELETE FROM dashboard_sessions WHERE id_hash = %s"


async def session_valid(conn: psycopg.AsyncConnection, request: Request, settings: Settings) -> bool:
    session_id = request.cookies.get(cookie_name(settings))
    if not session_id or len(session_id) > 128:
        return False
    return await (await conn.execute(VALID_SESSION, [_digest(session_id, settings)])).fetchone() is not None


def cross_site(request: Request, action: str) -> ApiError | None:
    """None when the POST came from a page of this site: its Origin is our scheme://host[:port], or, where a browser
    says "null" (a no-referrer policy) or nothing, its Sec-Fetch-Site (which no page can set) says same-origin."""
    origin = request.headers.get("origin")
    if origin in (None, "null"):
        if request.headers.get("sec-fetch-site") == "same-origin":
            return None
    else:
        parts = urlsplit(origin)
        if _same_host(parts, urlsplit("//" + request.headers.get("host", ""))):
            if parts.scheme == request.url.scheme:
                return None
            return ApiError(403, "forbidden", f"{action} came over {parts.scheme} but reached central as "
                            f"{request.url.scheme}: behind a TLS proxy, list it in PDM_CENTRAL_TRUSTED_PROXIES")
    return ApiError(403, "forbidden", f"{action} must come from this site's own page")


def _same_host(origin: SplitResult, host: SplitResult) -> bool:
    """The Origin names the host the request was sent to. nginx passes `Host: $host`, which drops the port: the port
    is compared only when the Host header has one."""
    try:
        if not origin.hostname or origin.hostname != host.hostname:
            return False
        return host.port is None or host.port == (origin.port or {"https": 443, "http": 80}.get(origin.scheme))
    except ValueError:  # a port that is not a number
        return False


# --- data -------------------------------------------------------------------------------------------------------------

# The fleet's first page: chosen and ordered from an index (the WHERE clause holds only the filters given, so the
# plan is the one for those filters), then the gateway's name and "since" for those rows only.
FLEET_PAGE = """
WITH page AS (
    SELECT m.gateway_id, m.machine_id, m.worst_state, m.health_last, m.p_failure_max, m.mode_risk_max,
           m.dominant_mode, m.window_end, m.first_seen_at, pdm_state_rank(m.worst_state) AS rank
    FROM machines m
    WHERE {where}
    ORDER BY pdm_state_rank(m.worst_state), m.health_last, m.gateway_id, m.machine_id
    LIMIT %(limit)s
)
SELECT coalesce(json_agg(json_build_object(
           'gateway', g.name, 'machine_id', p.machine_id, 'state', p.worst_state, 'health', p.health_last,
           'p_failure', p.p_failure_max, 'dominant_mode', p.dominant_mode,
           'dominant_risk', (p.mode_risk_max->>p.dominant_mode)::double precision, 'window_end', p.window_end,
           'since', coalesce(ev.ts, p.first_seen_at))
       ORDER BY p.rank, p.health_last, p.gateway_id, p.machine_id), '[]')::text, count(*)
FROM page p
JOIN gateways g ON g.id = p.gateway_id
LEFT JOIN LATERAL (
    SELECT e.ts FROM events e
    WHERE e.gateway_id = p.gateway_id AND e.machine_id = p.machine_id AND e.to_state = p.worst_state
    ORDER BY e.ts DESC LIMIT 1
) ev ON true
"""

FLEET_COUNTS = "SELECT m.worst_state, count(*) FROM machines m WHERE {where} GROUP BY m.worst_state"
# Without a mode filter, from the counts the triggers keep (migration 0002): no pass over every machine.
FLEET_STATE_COUNTS = ("SELECT c.worst_state, sum(c.machines)::bigint FROM machine_states c WHERE {where} "
                      "GROUP BY c.worst_state")

# The gateways that need attention first (silent, never connected, most alarms, most warnings), at most
# %(gateways)s of them, and how many there are of each kind: the page polls this every few seconds, and a fleet of
# 10,000 gateways listed whole was 2.6 MB of JSON per poll. Every gateway is ranked and counted on the few columns
# that decide its rank; only the rows listed read their status and age (10,000 gateways, idle database: 20.5 ->
# 14.4 ms; at 1,000 no gain shows).
FLEET_GATEWAYS = """
WITH x AS (
    SELECT g.id, g.name, g.revoked_at IS NULL AND coalesce(g.last_seen_at < now() - %(silent)s, false) AS silent,
           g.revoked_at IS NULL AND g.last_seen_at IS NULL AS never_connected,
           coalesce(c.machines, 0) AS machines, coalesce(c.alarm, 0) AS alarm, coalesce(c.warning, 0) AS warning
    FROM gateways g
    LEFT JOIN (
        SELECT gateway_id, sum(machines) AS machines, sum(machines) FILTER (WHERE worst_state = 'alarm') AS alarm,
               sum(machines) FILTER (WHERE worst_state = 'warning') AS warning
        FROM machine_states GROUP BY gateway_id
    ) c ON c.gateway_id = g.id
)
SELECT (SELECT coalesce(json_agg(y), '[]') FROM (
            SELECT t.name, g.revoked_at, g.last_seen_at, g.agent_version,
                   extract(epoch FROM now() - g.last_seen_at)::double precision AS last_seen_age_s,
                   t.silent, t.never_connected, g.last_status->'buffer_pending' AS buffer_pending,
                   g.last_status->'dropped_total' AS dropped_total, t.machines, t.alarm, t.warning
            FROM (SELECT * FROM x ORDER BY silent DESC, never_connected DESC, alarm DESC, warning DESC, name
                  LIMIT %(gateways)s) t
            JOIN gateways g ON g.id = t.id
            ORDER BY t.silent DESC, t.never_connected DESC, t.alarm DESC, t.warning DESC, t.name) y)::text,
       count(*), count(*) FILTER (WHERE silent), count(*) FILTER (WHERE never_connected)
FROM x
"""

MACHINE = """
SELECT g.id, m.worst_state, m.health_last, m.p_failure_max, m.dominant_mode, m.window_start, m.window_end,
       m.model_name, m.model_version, s.inputs,
       (SELECT e.ts FROM events e WHERE e.gateway_id = m.gateway_id AND e.machine_id = m.machine_id
          AND e.to_state = m.worst_state ORDER BY e.ts DESC LIMIT 1),
       m.first_seen_at, m.mode_risk_max
FROM gateways g
JOIN machines m ON m.gateway_id = g.id AND m.machine_id = %(machine_id)s
LEFT JOIN summaries s ON s.gateway_id = m.gateway_id AND s.summary_id = m.summary_id
                     AND s.window_start = m.window_start  -- the one partition that holds it
WHERE g.name = %(gateway)s
"""

# One row per bucket of the range: the worst of its windows (lowest health, highest risks, worst state).
SERIES = """
SELECT coalesce(json_agg(b ORDER BY b.t), '[]')::text FROM (
    SELECT date_bin(%(bucket)s, s.window_start, %(since)s) AS t, count(*) AS windows,
           min(s.health_min) AS health_min, avg(s.health_mean) AS health_mean, max(s.p_failure_max) AS p_failure,
           (ARRAY['alarm', 'warning', 'ok'])[min(pdm_state_rank(s.worst_state)) + 1] AS state,
           json_build_object({modes}) AS modes
    FROM summaries s
    WHERE s.gateway_id = %(gateway_id)s AND s.machine_id = %(machine_id)s
      AND s.window_start >= %(since)s AND s.window_start < %(until)s
    GROUP BY 1
) b
"""

# Buckets of whole hours, from the hourly roll-up (migration 0002): a month is 720 rows of it.
HOURLY_SERIES = """
SELECT coalesce(json_agg(b ORDER BY b.t), '[]')::text FROM (
    SELECT date_bin(%(bucket)s, h.hour, %(since)s) AS t, sum(h.windows) AS windows,
           min(h.health_min) AS health_min, sum(h.health_mean_sum) / sum(h.windows) AS health_mean,
           max(h.p_failure_max) AS p_failure, (ARRAY['alarm', 'warning', 'ok'])[min(h.worst_rank) + 1] AS state,
           json_build_object({modes}) AS modes
    FROM summaries_hourly h
    WHERE h.gateway_id = %(gateway_id)s AND h.machine_id = %(machine_id)s
      AND h.hour >= %(since)s AND h.hour < %(until)s
    GROUP BY 1
) b
"""

EVENTS = """
SELECT coalesce(json_agg(json_build_object(
           'ts', e.ts, 'from_state', e.from_state, 'to_state', e.to_state, 'health', e.health,
           'p_failure', e.p_failure, 'dominant_mode', e.dominant_mode) ORDER BY e.ts), '[]')::text
FROM (SELECT * FROM events e
      WHERE e.gateway_id = %(gateway_id)s AND e.machine_id = %(machine_id)s
        AND e.ts >= %(since)s AND e.ts < %(until)s
      ORDER BY e.ts DESC LIMIT %(limit)s) e
"""
MAX_EVENTS = 500


def _filters(gateway: str | None, state: str | None, mode: str | None, table: str = "m") -> Statement:
    params: dict[str, Any]
    where, params = ["true"], {}
    if gateway is not None:
        where.append(f"{table}.gateway_id = (SELECT id FROM gateways WHERE name = %(gateway)s)")
        params["gateway"] = gateway
    if state is not None:
        where.append("pdm_state_rank(m.worst_state) = %(rank)s")
        params["rank"] = WORST_FIRST.index(state)  # pdm_state_rank() in SQL: alarm 0
    if mode is not None:
        where.append("m.dominant_mode = %(mode)s")
        params["mode"] = mode
    return " AND ".join(where), params


def fleet_queries(gateway: str | None, state: str | None, mode: str | None,
                  limit: int, gateways: int = GATEWAYS_LISTED) -> dict[str, Statement]:
    """The fleet view's statements with their parameters (the bench EXPLAINs the same ones)."""
    where, params = _filters(gateway, state, mode)
    if mode is None:
        counts_where, counts_params = _filters(gateway, None, None, "c")
        counts = FLEET_STATE_COUNTS.format(where=counts_where), counts_params
    else:
        counts_where, counts_params = _filters(gateway, None, mode)
        counts = FLEET_COUNTS.format(where=counts_where), counts_params
    return {"page": (FLEET_PAGE.format(where=where), {**params, "limit": limit}), "counts": counts,
            "gateways": (FLEET_GATEWAYS, {"silent": SILENT_AFTER, "gateways": gateways})}


async def fleet(conn: psycopg.AsyncConnection, gateway: str | None, state: str | None, mode: str | None,
                limit: int, reads: dict[str, Any] | None = None, gateways: int = GATEWAYS_LISTED) -> str:
    queries = fleet_queries(gateway, state, mode, limit, gateways)
    rows, shown = await one_row(conn, *queries["page"])
    by_state: dict[str, int] = dict(await (await conn.execute(*queries["counts"])).fetchall())
    listed, total, silent, never = await one_row(conn, *queries["gateways"])
    counts = {s.value: by_state.get(s, 0) for s in WORST_FIRST}
    modes = [mode_of(m) for m in manifest().outputs.modes]
    gateway_counts = {"total": total, "silent": silent, "never_connected": never}
    return (f'{{"counts":{_json(counts)},"shown":{shown},'
            f'"machines":{rows},"gateways":{listed},"gateway_counts":{_json(gateway_counts)},'
            f'"modes":{_json(modes)},'
            f'"silent_after_s":{int(SILENT_AFTER.total_seconds())},"reads":{_json(reads)}}}')


def machine_range(since: datetime | None, until: datetime | None, points: int,
                  raw_kept_since: datetime | None = None) -> dict[str, Any]:
    """[since, until) in at most `points` buckets; buckets of an hour or more are whole hours from a whole hour
    (UTC), drawn from the hourly roll-up (`hourly`): the range then starts at the hour `since` falls in. So is a
    range that starts before `raw_kept_since` (the raw summaries' retention dropped those days; the roll-up is kept
    for years), with buckets of at least an hour."""
    until = until or datetime.now(UTC)
    since = since or until - DEFAULT_SPAN
    if since >= until:
        raise ApiError(422, "invalid_request", "since must be before until")
    if until - since > MAX_SPAN:
        raise ApiError(422, "invalid_request", f"the range is at most {MAX_SPAN.days} days")
    seconds = max(1, math.ceil((until - since).total_seconds() / points))
    hourly = seconds >= HOUR or (raw_kept_since is not None and since < raw_kept_since)
    if hourly:
        seconds = math.ceil(seconds / HOUR) * HOUR
        try:
            since = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        except OverflowError:  # e.g. 0001-01-01T00:00+05:00
            raise ApiError(422, "invalid_request", "since is out of the representable range once in UTC") from None
    return {"since": since, "until": until, "bucket": timedelta(seconds=seconds), "hourly": hourly}


def series_query(hourly: bool) -> str:
    """SERIES or HOURLY_SERIES, with a maximum per failure mode of the model."""
    column = "h" if hourly else "s"
    modes = ", ".join(f"'{m}', max(({column}.mode_risk_max->'{m}')::double precision)"
                      for m in manifest().outputs.modes if re.fullmatch(r"[A-Za-z0-9_]+", m))
    return (HOURLY_SERIES if hourly else SERIES).format(modes=modes)


async def machine(conn: psycopg.AsyncConnection, gateway: str, machine_id: str, since: datetime | None,
                  until: datetime | None, points: int, raw_kept_since: datetime | None = None) -> str:
    row = await (await conn.execute(MACHINE, {"gateway": gateway, "machine_id": machine_id})).fetchone()
    if row is None:
        raise ApiError(404, "not_found", f"no machine {machine_id!r} on a gateway named {gateway!r}")
    (gateway_id, state, health, p_failure, dominant, window_start, window_end, model_name, model_version, inputs,
     entered, first_seen, risk) = row
    span = machine_range(since, until, points, raw_kept_since)
    params = {"gateway_id": gateway_id, "machine_id": machine_id, **span}
    series = (await one_row(conn, series_query(span["hourly"]), params))[0]
    events = (await one_row(conn, EVENTS, {**params, "limit": MAX_EVENTS}))[0]
    thresholds = manifest().thresholds
    head = {
        "gateway": gateway, "machine_id": machine_id, "state": state, "health": health, "p_failure": p_failure,
        "since": (entered or first_seen).isoformat(), "window_start": window_start.isoformat(),
        "window_end": window_end.isoformat(), "model": {"name": model_name, "version": model_version},
        "dominant": {**mode_of(dominant), "risk": risk.get(dominant)} if dominant else None,
        "range": {"since": span["since"].isoformat(), "until": span["until"].isoformat(),
                  "bucket_s": span["bucket"].total_seconds(), "unchanged_s": UNCHANGED_S},
        "health_bands": {"warning": health_at(thresholds.warning), "alarm": health_at(thresholds.alarm)},
        "modes": [{**mode_of(m), "threshold": thresholds.modes.get(m), "latest": risk.get(m)}
                  for m in manifest().outputs.modes],
        "inputs": _inputs(inputs or {}),
    }
    return f'{_json(head)[:-1]},"series":{series},"events":{events}}}'


def _inputs(stats: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    """The latest window's per-input min/mean/max against the model's normal (training) range."""
    known = {i.name: i for i in manifest().inputs}
    rows = []
    for name in [*known, *sorted(set(stats) - set(known))]:
        if name not in stats:
            continue
        value, spec = stats[name], known.get(name)
        low, high = value.get("min"), value.get("max")
        row: dict[str, Any] = {"name": name, "min": low, "mean": value.get("mean"), "max": high,
               "unit": spec.unit if spec else "", "description": spec.description if spec else "",
               "normal_min": spec.training_range.min if spec else None,
               "normal_max": spec.training_range.max if spec else None}
        row["out"] = spec is not None and any(
            v is not None and v not in spec.training_range for v in (low, high))
        rows.append(row)
    return rows


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


# --- routes -----------------------------------------------------------------------------------------------------------

def routes(api: FastAPI, settings: Settings, connection: Connection,
           require_ops: Callable[[Request], Awaitable[None]], throttle: FailedAuth,
           read_connection: ReadConnection) -> None:
    """Add the page, login/logout and the dashboard's data routes to `api`; `throttle` limits refused sign-ins.
    Sessions use `connection` (the primary); the data routes `read_connection` (a replica when configured)."""
    ops_token = settings.ops_token.get_secret_value() if settings.ops_token else None
    name = cookie_name(settings)
    lifetime = timedelta(seconds=settings.session_lifetime_s)

    def see_other(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)

    @api.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        async with connection(request) as conn:
            if not await session_valid(conn, request, settings):
                return see_other("/login")
        dashboard = page()
        return HTMLResponse(dashboard.html, headers={"Content-Security-Policy": dashboard.csp(form_action=FORM_ACTION),
                                                     **PAGE_HEADERS})

    @api.get("/login", include_in_schema=False)
    async def login_form() -> Response:
        return login_page()

    @api.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if refusal := cross_site(request, "a sign-in"):
            raise refusal
        address = guard.client_address(request)
        if (wait := throttle.retry_after(address)) is not None:
            page_ = login_page(f"Too many refused sign-ins from this address: try again in {wait} s.", 429)
            page_.headers["Retry-After"] = str(wait)
            return page_
        raw = await _form(request)
        token = parse_qs(raw.decode("utf-8", "replace")).get("token", [""])[0].strip()
        if ops_token is None:
            return login_page("The dashboard is off: no PDM_CENTRAL_OPS_TOKEN is configured.", 401)
        if not token or not same_secret(token, ops_token):
            throttle.failed(address)
            return login_page("That token was refused.", 401)
        session_id = secrets.token_urlsafe(32)
        client = request.client.host if request.client else None
        async with connection(request) as conn:
            await conn.execute(NEW_SESSION, [_digest(session_id, settings), lifetime, _address(client)])
        response = see_other("/")
        response.set_cookie(name, session_id, max_age=settings.session_lifetime_s, path="/",
                            secure=settings.session_cookie_secure, httponly=True, samesite="strict")
        return response

    @api.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        if refusal := cross_site(request, "a sign-out"):
            raise refusal
        session_id = request.cookies.get(name)
        if session_id:
            async with connection(request) as conn:
                await conn.execute(END_SESSION, [_digest(session_id, settings)])
        response = see_other("/login")
        response.delete_cookie(name, path="/", secure=settings.session_cookie_secure, httponly=True,
                               samesite="strict")
        return response

    data = APIRouter(prefix="/api/v1/dashboard", dependencies=[Depends(require_ops)])

    @data.get("/fleet")
    async def fleet_view(request: Request, gateway: Name | None = None, state: StateName | None = None,
                         mode: Mode | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 200,
                         gateways: Annotated[int, Query(ge=1, le=100_000)] = GATEWAYS_LISTED) -> Response:
        async with read_connection(request) as (conn, source):
            reads = await request.app.state.reads.status(conn, source)
            body = await fleet(conn, gateway, state, mode, limit, reads, gateways)
            rollout = await fleet_rollout.status(conn)  # the running model rollout, or the last (issue 17)
        shown = rollout.model_dump_json() if rollout is not None else "null"
        return Response(f'{{"rollout":{shown},{body[1:]}', media_type=JSON)

    @data.get("/gateways/{gateway}/machines/{machine_id}")
    async def machine_view(request: Request, gateway: NameInPath, machine_id: NameInPath, since: Time | None = None,
                           until: Time | None = None,
                           points: Annotated[int, Query(ge=10, le=2000)] = 400) -> Response:
        async with read_connection(request) as (conn, _):
            kept = datetime.now(UTC) - timedelta(days=settings.retain_summaries_days)
            return Response(await machine(conn, gateway, machine_id, since, until, points, kept), media_type=JSON)

    api.include_router(data)


async def _form(request: Request) -> bytes:
    """The sign-in form's body: a Content-Length over MAX_FORM_BYTES is refused before reading, a body without one
    is read only up to it (issue 22: reading it all first let one request grow central by the body's size)."""
    try:
        return await ingest.read_body(request, MAX_FORM_BYTES)
    except ApiError as exc:
        if exc.status == 413:
            raise ApiError(413, "payload_too_large", "the login form is larger than any token") from None
        raise


def _address(host: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(host)) if host else None
    except ValueError:
        return None
