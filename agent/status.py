"""The local status API and the technician's page (SPEC §5): `create_app(agent)`, served by `StatusServer`.

Routes (JSON unless said otherwise; errors are `{"error": {"code", "message", "details"?}}`):
  GET /healthz                       liveness: the process answers; never needs the token
  GET /readyz                        the model is loaded and the store takes writes; 503 `not_ready` otherwise
  GET /api/v1/status                 the gateway: versions, model, uptime, buffer, sync, pipeline, drivers
  GET /api/v1/machines               each machine: latest values, state, health, per-mode risk, ood, a health trend
  GET /api/v1/machines/{machine_id}  the same with the inputs against their ranges, recent history and events; 404
  GET /api/v1/events                 alarm transitions, newest first: ?since=<ISO-8601 or epoch>&machine_id=&limit=
  GET /api/v1/openapi.json           the OpenAPI document
  GET /metrics                       Prometheus text, read from the agent's state at scrape time
  GET /                              the page (agent/static/status.html): one offline document, inline CSS and JS

Layers, outermost first: `_Guard` (security headers on every response, 500s included; the Host check; the bearer
token), CORS (only with `status.cors_origins`; a 401 from the guard carries no CORS headers), FastAPI (routes, JSON
error handlers).

Auth: with `status.token` set every route needs `Authorization: Bearer <token>` except `/healthz` and `/`: the page
is a static shell holding no data, and a browser cannot send a bearer header when it opens a URL, so the page asks
for the token and sends it with each request it makes. Without a token (config validation allows that on loopback
only) only requests naming a loopback host are answered, so a web page cannot reach the API by DNS rebinding.

Threads: uvicorn runs its event loop in a thread of its own; the routes are plain functions run in its worker
threads and only read the agent's state (the store is thread-safe; counters are read without locks, a value may be
one batch old). The status API never writes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from pydantic import BaseModel, BeforeValidator, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.alarms import Shown, saved_alarm, technician_view
from agent.http_server import ConnectionLimits, limited_h11
from agent.roster import heard, labelled
from agent.store import Store, StoredReading, StoreError
from model.modes import mode_words
from sync.client import Outcome
from sync.config import is_loopback
from sync.protocol import Event
from web.throttle import FailedAuth

if TYPE_CHECKING:
    from agent.pipeline import Pipeline
    from agent.service import Agent
    from model.package import Model

log = logging.getLogger(__name__)

API = "/api/v1"
TREND_POINTS = 60  # readings in each machine's trend on /api/v1/machines
CATCH_UP_MAX = 50_000  # readings /api/v1/machines reads since the previous request; beyond, it reads each trend
HISTORY_DEFAULT, HISTORY_MAX = 300, 5000
EVENTS_DEFAULT, EVENTS_MAX = 100, 1000
MACHINE_EVENTS = 20
PIPELINE_STALL_S = 10.0  # /readyz: the pipeline thread must have gone round its loop within this
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
LEVELS = {"ok": 0, "warning": 1, "alarm": 2}
EPOCH_MAX_S = 2e10  # pydantic reads a larger number as milliseconds; in seconds it is the year 2603
# What `since` takes, documented by hand: FastAPI would document a datetime as a date-time string only.
SINCE_SCHEMA = [{"type": "string", "format": "date-time"}, {"type": "number", "minimum": 0, "maximum": EPOCH_MAX_S}]

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 422: "invalid_request", 429: "too_many_requests", 503: "not_ready"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


# --- the page -------------------------------------------------------------------------------------------------------

def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: its one inline <script> and <style> are allowed by their sha256,
    nothing else may run, load or be fetched except from this origin."""
    html = resources.files("agent").joinpath("static/status.html").read_text(encoding="utf-8")
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        if len(blocks) != 1:
            raise RuntimeError(f"agent/static/status.html must hold exactly one inline <{tag}>, not {len(blocks)}")
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        hashes[tag] = f"'sha256-{digest}'"
    csp = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; connect-src 'self'; "
           "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


# --- response models: what the OpenAPI document describes -----------------------------------------------------------

class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = {}


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str  # the ONNX file's
    package_digest: str  # the whole package's, manifest included (README: the model package)
    package: str
    modes: list[str]
    health_at_warning: float  # health at the warning threshold: below it a reading is in warning
    health_at_alarm: float


class BufferInfo(BaseModel):
    pending: int  # summaries and events central has not accepted yet
    oldest_pending_at: datetime | None
    oldest_pending_age_s: float | None
    used_bytes: int
    max_bytes: int
    disk_free_bytes: int | None
    dropped: dict[str, int]  # what the buffer cap forced out unsynced, by kind
    dropped_total: int


class ReadingCounts(BaseModel):
    accepted: int
    duplicate: int
    rejected: dict[str, int]  # by reason
    rejected_total: int
    quarantine_evicted: int


class SyncInfo(BaseModel):
    enabled: bool
    url: str | None
    last_success: datetime | None
    last_success_age_s: float | None
    last_error: str | None  # the latest failure, kept after later successes: compare with last_success
    set_aside: dict[str, int]  # records central refused as invalid, by kind


class PipelineInfo(BaseModel):
    queue_depth: int
    queue_max: int
    batches: int
    errors: int
    last_commit_age_s: float | None
    database_up: bool
    database_failures: int
    database_last_error: str | None


class DeviceInfo(BaseModel):
    device: str
    connected: bool
    errors: int
    last_error: str | None


class DriverInfo(BaseModel):
    name: str
    connected: bool | None  # every device or the broker connection is up; None: unknown
    errors: dict[str, int]  # error counters since start, by kind
    last_error: str | None
    devices: list[DeviceInfo] = []  # per device, for drivers that poll devices
    details: dict[str, Any] = {}  # the driver's own status, as it reports it


class GatewayInfo(BaseModel):
    gateway_id: str
    agent_version: str
    now: datetime
    started_at: datetime
    uptime_s: float
    model: ModelInfo
    machines: dict[str, int]  # machines by state
    buffer: BufferInfo
    readings: ReadingCounts
    sync: SyncInfo
    pipeline: PipelineInfo
    drivers: list[DriverInfo]


class ModeRisk(BaseModel):
    mode: str
    label: str
    meaning: str
    advice: str
    risk: float
    threshold: float | None  # the model's threshold for this mode
    elevated: bool  # risk at or above the threshold


class MachineInfo(BaseModel):
    machine_id: str
    machine_type: str
    state: str  # the alarm state, after the hysteresis: what events report
    reading_state: str  # the latest reading's own state
    health: float  # health, p_failure, dominant and risk: of the reading that holds the state (agent/alarms.py)
    reading_health: float  # the latest reading's own health
    p_failure: float
    dominant: ModeRisk | None  # the mode with the highest risk
    risk: dict[str, float]
    ood: list[str]  # inputs of the latest reading outside the training range
    values: dict[str, float]
    last_reading_at: datetime  # when it was measured
    last_received_at: datetime
    last_reading_age_s: float  # since it was received
    model_version: str
    trend: list[float] = []  # health of the latest readings (to 0.1), oldest first


class InputValue(BaseModel):
    name: str
    unit: str
    description: str
    value: float | None
    training_min: float
    training_max: float
    physical_min: float
    physical_max: float
    ood: bool


class HistoryPoint(BaseModel):
    ts: datetime
    health: float
    p_failure: float
    state: str


class EventInfo(BaseModel):
    event_id: str
    machine_id: str
    ts: datetime
    from_state: str
    to_state: str
    health: float
    p_failure: float
    dominant_mode: str
    dominant_label: str
    mode_risk: dict[str, float]
    reading: dict[str, float]
    model_version: str
    synced: bool  # central has it


class MachineDetail(MachineInfo):
    inputs: list[InputValue]
    modes: list[ModeRisk]
    history: list[HistoryPoint]
    events: list[EventInfo]


class MachineList(BaseModel):
    now: datetime
    machines: list[MachineInfo]


class EventList(BaseModel):
    events: list[EventInfo]


MACHINE_LIST = TypeAdapter(MachineList)


# --- errors ---------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def _error(status: int, code: str, message: str, details: list | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


RETRY_AFTER = {"Retry-After": {"description": "seconds until this address may present a token again",
                               "schema": {"type": "integer", "minimum": 1}}}


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, **({"headers": RETRY_AFTER} if status == 429 else {})}
            for status in statuses}


# The guard answers any route with 400 (a Host not this machine's, without a token), 401 and 429 (with a token,
# except /healthz and /) or 500: each route documents those it can give.
ERRORS = _documented(400, 401, 404, 422, 429, 500, 503)


# --- the outermost layer --------------------------------------------------------------------------------------------

class _Guard:
    """Security headers on every response; the Host check without a token; the bearer token, with at most
    `FailedAuth`'s few refused tokens a minute per client address (then 429 with Retry-After, and warnings naming
    the address, never the token); JSON 500s.

    It sits inside Starlette's ServerErrorMiddleware, which would answer an unhandled exception with a plain-text
    500 without our headers: so an exception is answered here, and never reaches it."""

    def __init__(self, app: ASGIApp, token: str | None, bind_host: str, cors: bool) -> None:
        self.app = app
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self.failed_auth = FailedAuth("status token")
        self._hosts = {"localhost", "127.0.0.1", "::1", bind_host.lower()}
        self._cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in SECURITY_HEADERS if h[0] not in present)]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("status API: %s %s failed", scope.get("method"), scope.get("path"))
            if started:  # the response is half sent: nothing better to do than to drop the connection
                raise
            response = _error(500, "internal", "internal error; the agent's log has the details")
            await response(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        path = scope["path"]
        if self._token_digest is None:
            host = _hostname(headers.get("host", ""))
            if host not in self._hosts and not is_loopback(host):
                return _error(400, "bad_host", f"Host {host!r} is not this machine's loopback address: without "
                              "status.token the status API answers on loopback only; set status.token to serve "
                              "other names")
            return None
        if path in ("/healthz", "/"):
            return None
        if self._cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return None  # a CORS preflight carries no credentials; CORSMiddleware answers it
        address = scope["client"][0] if scope.get("client") else "an unknown address"
        wait = self.failed_auth.retry_after(address)
        if wait is not None:
            return _error(429, "too_many_requests", f"too many wrong tokens from {address}; try again in {wait} s",
                          headers={"Retry-After": str(wait)})
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if not given.strip():  # no credential at all: nothing guessed, nothing counted
            return _error(401, "unauthorized", "this endpoint needs Authorization: Bearer <status.token>",
                          headers={"WWW-Authenticate": "Bearer"})
        # Compare digests: constant time, and independent of the length of what was sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                hashlib.sha256(given.strip().encode("utf-8", "surrogatepass")).digest(), self._token_digest):
            self.failed_auth.failed(address)
            return _error(401, "unauthorized", "wrong token" if scheme.lower() == "bearer" else
                          "this endpoint needs Authorization: Bearer <status.token>",
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None


def _hostname(host: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:8080' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


# --- the app --------------------------------------------------------------------------------------------------------

def create_app(agent: Agent) -> FastAPI:
    """The status API for `agent`. It may be created before the agent starts: until then the data routes and
    /readyz answer 503."""
    status = agent.config.status
    token = status.token.get_secret_value() if status.token else None
    page, page_csp = _page()
    app = FastAPI(title="pdm-edge status API", version=__version__, openapi_url=f"{API}/openapi.json",
                  docs_url=None, redoc_url=None,  # their pages load assets from a CDN: not on a gateway
                  description="The gateway agent's local status: machines, their health and risk, alarm "
                              "transitions, the gateway itself. Errors are {\"error\": {\"code\", \"message\"}}.")
    if status.cors_origins:  # inside the guard (the last added is the outermost): preflights get its headers too
        app.add_middleware(CORSMiddleware, allow_origins=status.cors_origins, allow_methods=["GET"],
                           allow_headers=["Authorization"], max_age=600)
    app.add_middleware(_Guard, token=token, bind_host=status.host, cors=bool(status.cors_origins))
    _handlers(app)
    trends = Trends()
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)

    @app.get("/healthz", response_model=Health, responses=_documented(400, 500), tags=["probes"])
    def healthz() -> Health:
        """Liveness: the process answers. Open without the token."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses=ERRORS, tags=["probes"])
    def readyz() -> Health:
        """Readiness: a model is loaded, the store answers and takes writes, the pipeline goes round."""
        checks = _readiness(agent)
        if not all(ok for ok, _ in checks.values()):
            failing = [{"check": name, "message": why} for name, (ok, why) in checks.items() if not ok]
            raise ApiError(503, "not_ready", "not ready: " + "; ".join(f"{f['check']}: {f['message']}"
                                                                       for f in failing), failing)
        return Health(status="ready", checks={name: ok for name, (ok, _) in checks.items()})

    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD too, for probes that send it
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get(f"{API}/status", response_model=GatewayInfo, responses=ERRORS, tags=["gateway"])
    def gateway_status() -> GatewayInfo:
        """The gateway: versions, model, uptime, buffer, sync, pipeline, drivers."""
        return _gateway(agent, time.time())

    @app.get(f"{API}/machines", response_model=MachineList, responses=ERRORS, tags=["machines"])
    def machines() -> Response:
        """Every machine that sent a reading, the worst first (alarm, warning, ok), then by id."""
        now = time.time()
        listed = MachineList(now=_at(now), machines=machine_infos(agent, trends, now))
        # Encoded here by pydantic, not validated again and encoded by FastAPI: with 500 machines, half the time.
        return Response(MACHINE_LIST.dump_json(listed), media_type="application/json")

    @app.get(f"{API}/machines/{{machine_id}}", response_model=MachineDetail, responses=ERRORS, tags=["machines"])
    def machine(machine_id: str,
                history: Annotated[int, Query(ge=1, le=HISTORY_MAX, description="readings of history")]
                = HISTORY_DEFAULT) -> MachineDetail:
        """One machine: its latest reading against the model's ranges, recent history and alarm transitions."""
        return _machine(agent, machine_id, history, time.time())

    @app.get(f"{API}/events", response_model=EventList, responses=ERRORS, tags=["machines"])
    def events(since: Annotated[datetime | None, BeforeValidator(_epoch_seconds), Query(
                   description="ISO-8601 (UTC if no offset) or epoch seconds; events at or after it",
                   json_schema_extra={"anyOf": SINCE_SCHEMA})] = None,
               machine_id: Annotated[str | None, Query(max_length=64)] = None,
               limit: Annotated[int, Query(ge=1, le=EVENTS_MAX)] = EVENTS_DEFAULT) -> EventList:
        """Alarm state transitions from the outbox (synced or not, until retention forgets them), newest first."""
        store, _ = _running(agent)
        return EventList(events=_events(store, machine_id, _aware(since) if since else None, limit))

    @app.get("/metrics", response_class=Response, tags=["gateway"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **_documented(400, 401, 429, 500)})
    def metrics() -> Response:
        """Prometheus metrics, read from the agent at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_csp})

    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), message,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        where = ", ".join(".".join(map(str, e["loc"][1:] or e["loc"])) for e in exc.errors())
        return _error(422, "invalid_request", f"invalid {where}", details)


# --- reading the agent ----------------------------------------------------------------------------------------------

def _running(agent: Agent) -> tuple[Store, Pipeline]:
    if agent.store is None or agent.pipeline is None:
        raise ApiError(503, "not_ready", "the agent is not running (yet)")
    return agent.store, agent.pipeline


def _readiness(agent: Agent) -> dict[str, tuple[bool, str]]:
    """Each check: (passed, why not)."""
    if agent.store is None or agent.pipeline is None:
        return {"started": (False, "the agent has not started")}
    pipeline, store = agent.pipeline, agent.store
    checks = {"model": (pipeline.scorer is not None and pipeline.scorer.model is not None, "no model loaded")}
    try:
        store.counters()
        checks["store"] = (True, "")
    except StoreError as exc:
        checks["store"] = (False, str(exc))
    database = pipeline.database
    checks["database_writes"] = (database.up, f"the last write failed: {database.last_error}")
    directory = agent.config.data_dir
    checks["data_dir_writable"] = (os.access(directory, os.W_OK), f"{directory} is not writable")
    checks["pipeline"] = (pipeline.progressing(within_s=PIPELINE_STALL_S),
                          f"the pipeline made no progress for {PIPELINE_STALL_S:g} s")
    return checks


def _epoch_seconds(value: object) -> object:
    """A number given for a time is epoch seconds within [0, EPOCH_MAX_S] (not NaN, not milliseconds); anything
    else goes on to be parsed as ISO-8601."""
    if not isinstance(value, str):
        return value
    try:
        seconds = float(value)
    except ValueError:
        return value
    if not 0 <= seconds <= EPOCH_MAX_S:
        raise ValueError(f"epoch seconds must be from 0 to {EPOCH_MAX_S:.0f}, not {value}")
    return seconds


def _at(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _gateway(agent: Agent, now: float) -> GatewayInfo:
    store, pipeline = _running(agent)
    config = agent.config
    counters = store.counters()
    pending, oldest = store.outbox_backlog()
    dropped = _prefixed(counters, "dropped_")
    rejected = _prefixed(counters, "rejected_")
    try:
        disk_free = shutil.disk_usage(config.data_dir).free
    except OSError:
        disk_free = None
    sync = agent.sync
    last_success = sync.last_success if sync else None
    database = pipeline.database
    states = {level: 0 for level in LEVELS}
    for state in _alarm_states(store).values():
        states[state] = states.get(state, 0) + 1
    return GatewayInfo(
        gateway_id=config.gateway_id, agent_version=__version__, now=_at(now), started_at=_at(agent.started_at),
        uptime_s=round(now - agent.started_at, 3),
        model=_model_info(pipeline.scorer.model),
        machines=states,
        buffer=BufferInfo(pending=pending, oldest_pending_at=_at(oldest),
                          oldest_pending_age_s=None if oldest is None else round(max(0.0, now - oldest), 3),
                          used_bytes=store.used_bytes(), max_bytes=config.buffer.max_db_mb * 2**20,
                          disk_free_bytes=disk_free, dropped=dropped, dropped_total=sum(dropped.values())),
        readings=ReadingCounts(accepted=counters.get("readings_accepted", 0),
                               duplicate=counters.get("readings_duplicate", 0), rejected=rejected,
                               rejected_total=sum(rejected.values()),
                               quarantine_evicted=counters.get("quarantine_evicted", 0)),
        sync=SyncInfo(enabled=config.central.enabled, url=str(config.central.url) if config.central.url else None,
                      last_success=last_success,
                      last_success_age_s=round(now - last_success.timestamp(), 3) if last_success else None,
                      last_error=sync.last_error if sync else None, set_aside=_prefixed(counters, "set_aside_")),
        pipeline=PipelineInfo(queue_depth=pipeline.depth, queue_max=config.pipeline.queue_max,
                              batches=pipeline.batches, errors=pipeline.errors,
                              last_commit_age_s=None if pipeline.last_commit is None
                              else round(time.monotonic() - pipeline.last_commit, 3),
                              database_up=database.up, database_failures=database.failures_total,
                              database_last_error=database.last_error),
        drivers=[_driver(driver) for driver in agent.drivers],
    )


def _prefixed(counters: dict[str, int], prefix: str) -> dict[str, int]:
    return {name.removeprefix(prefix): n for name, n in counters.items() if name.startswith(prefix)}


def _model_info(model: Model) -> ModelInfo:
    manifest = model.manifest
    points = dict(manifest.health.points)
    return ModelInfo(name=model.name, version=model.version, sha256=model.sha256,
                     package_digest=model.package_digest, package=str(model.package),
                     modes=list(manifest.outputs.modes), health_at_warning=points[manifest.thresholds.warning],
                     health_at_alarm=points[manifest.thresholds.alarm])


# Counters in a driver's status() that count errors. Drivers report different things; see `_driver`.
ERROR_COUNTERS = ("connection_failures", "rejected", "failed_polls", "timeouts", "connect_failures",
                  "connection_losses", "internal_errors")


def _driver(driver: Any) -> DriverInfo:
    """A driver's status() in one shape: an MQTT-like driver reports `connected` itself; a polling driver reports
    `devices`, each with `available` or `connected`."""
    name = getattr(driver, "name", type(driver).__name__)
    try:
        raw = driver.status()
    except Exception as exc:  # noqa: BLE001 - one driver's broken status() must not take the status API down
        log.warning("status of driver %s unavailable: %s", name, exc)
        return DriverInfo(name=name, connected=None, errors={}, last_error=f"status unavailable: {exc}")
    raw = json.loads(json.dumps(raw, default=str))  # JSON-able, whatever a driver puts in it
    if isinstance(raw.get("devices"), dict):
        devices = [DeviceInfo(device=device_id, connected=bool(d.get("available", d.get("connected"))),
                              errors=sum(_counts(d).values()), last_error=d.get("last_error"))
                   for device_id, d in raw["devices"].items()]
        errors: dict[str, int] = {}
        for d in raw["devices"].values():
            for kind, n in _counts(d).items():
                errors[kind] = errors.get(kind, 0) + n
        return DriverInfo(name=raw.get("driver", name), connected=bool(devices) and all(d.connected for d in devices),
                          errors=errors, last_error=next((d.last_error for d in devices if d.last_error), None),
                          devices=devices, details=raw)
    connected = raw.get("connected")
    return DriverInfo(name=raw.get("driver", name), connected=None if connected is None else bool(connected),
                      errors=_counts(raw), last_error=raw.get("last_error"), details=raw)


def _counts(status: dict) -> dict[str, int]:
    return {k: int(v) for k, v in status.items() if k in ERROR_COUNTERS and isinstance(v, int | float)}


def _alarm_states(store: Store) -> dict[str, str]:
    """Each machine's alarm state (after the hysteresis), as the pipeline last committed it."""
    states = {}
    for machine_id, state in store.machines("$.alarm.state").items():
        if state in LEVELS:
            states[machine_id] = state
        else:
            log.warning("machine %s: saved state unreadable", machine_id)
    return states


def _mode(mode: str, risk: float, model: Model) -> ModeRisk:
    words = mode_words(mode)
    threshold = model.manifest.thresholds.modes.get(mode)
    return ModeRisk(mode=mode, **words, risk=risk, threshold=threshold,
                    elevated=threshold is not None and risk >= threshold)


def _alarms(store: Store) -> dict[str, object]:
    """Each machine's saved alarm (MachineAlarm.to_json()), as the pipeline last committed it."""
    alarms = {machine_id: saved_alarm(text) for machine_id, text in store.machines("$.alarm").items()}
    for machine_id in [m for m, alarm in alarms.items() if alarm is None]:
        log.warning("machine %s: saved state unreadable", machine_id)
    return alarms


def _machine_info(reading: StoredReading, alarm: object, model: Model, now: float,
                  trend: list[float], cls: type[MachineInfo] = MachineInfo, **extra: Any) -> MachineInfo:
    points = dict(model.manifest.health.points)
    thresholds = model.manifest.thresholds
    state, shown = technician_view(alarm, reading.state, Shown(reading.health, reading.p_failure, reading.risk),
                                   points[thresholds.warning], points[thresholds.alarm])
    dominant = max(shown.risk, key=shown.risk.__getitem__) if shown.risk else None
    return cls(
        machine_id=reading.machine_id, machine_type=reading.machine_type, state=state,
        reading_state=reading.state, health=shown.health, reading_health=reading.health, p_failure=shown.p_failure,
        dominant=_mode(dominant, shown.risk[dominant], model) if dominant else None, risk=shown.risk,
        ood=list(reading.ood), values=reading.values, last_reading_at=_at(reading.ts),
        last_received_at=_at(reading.received_at), last_reading_age_s=round(max(0.0, now - reading.received_at), 3),
        model_version=reading.model_version, trend=trend, **extra,
    )


class Trends:
    """Each machine's health trend (the health of its newest TREND_POINTS readings), kept from one request to the
    next. A request reads what was stored since the previous one, four columns a reading (`Store.healths_after`),
    rather than every machine's history; a machine it knows nothing of, or whose newest reading it missed (more than
    CATCH_UP_MAX readings since, or deleted ones), is read again whole (`Store.trend`). So the page of an idle gateway
    costs no reading and that of a busy one the readings stored since its last refresh. A reading older than the
    newest one known of its machine (late) stays out of the trend; it is in the machine's history."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._after_id = 0  # the newest reading read
        self._known: dict[str, tuple[float, deque[float]]] = {}  # machine: (ts of its newest reading read, healths)

    def latest(self, store: Store) -> list[tuple[StoredReading, list[float]]]:
        """Each machine's newest reading and its trend, oldest first."""
        with self._lock:
            latest = store.latest_by_machine()
            rows = store.healths_after(self._after_id, CATCH_UP_MAX)
            if len(rows) == CATCH_UP_MAX:
                self._known.clear()  # too far behind: some machine may have missed readings
            for _, machine_id, ts, health in rows:
                newest, healths = self._known.get(machine_id, (math.inf, None))
                if ts > newest:
                    healths.append(_rounded(health))
                    self._known[machine_id] = (ts, healths)
            self._after_id = rows[-1][0] if rows else self._after_id
            for machine_id, reading in latest.items():
                if self._known.get(machine_id, (-math.inf,))[0] < reading.ts:
                    trend = store.trend(machine_id, TREND_POINTS)
                    self._known[machine_id] = (trend[-1][0] if trend else reading.ts,
                                               deque((_rounded(h) for _, h in trend), maxlen=TREND_POINTS))
            for machine_id in self._known.keys() - latest.keys():
                del self._known[machine_id]
            return [(reading, list(self._known[machine_id][1])) for machine_id, reading in latest.items()]


def _rounded(health: float) -> float:
    return round(health, 1)  # plenty for a sparkline, and a third of the bytes of a full float


def machine_infos(agent: Agent, trends: Trends, now: float) -> list[MachineInfo]:
    """Every machine with its latest reading, alarm state and trend, the worst first (the page's and `pdm-edge demo`'s
    list)."""
    store, pipeline = _running(agent)
    model = pipeline.scorer.model
    alarms = _alarms(store)
    forget_after_h = agent.config.machines.forget_after_h
    machines = [_machine_info(reading, alarms.get(reading.machine_id), model, now, trend)
                for reading, trend in trends.latest(store) if heard(reading, forget_after_h, now)]
    machines.sort(key=lambda m: (-LEVELS.get(m.state, 0), m.machine_id))
    return machines


def _machine(agent: Agent, machine_id: str, history: int, now: float) -> MachineDetail:
    store, pipeline = _running(agent)
    readings = store.history(machine_id, 0.0, history)
    if not readings:
        raise ApiError(404, "not_found", f"no machine {machine_id!r} on this gateway (none of its readings is stored)")
    latest = readings[-1]
    model = pipeline.scorer.model
    inputs = [
        InputValue(name=i.name, unit=i.unit, description=i.description, value=latest.values.get(i.name),
                   training_min=i.training_range.min, training_max=i.training_range.max,
                   physical_min=i.physical_range.min, physical_max=i.physical_range.max, ood=i.name in latest.ood)
        for i in model.manifest.inputs
    ]
    detail = _machine_info(
        latest, _alarms(store).get(machine_id), model, now, [r.health for r in readings[-TREND_POINTS:]],
        cls=MachineDetail, inputs=inputs, modes=[],
        history=[HistoryPoint(ts=_at(r.ts), health=r.health, p_failure=r.p_failure, state=r.state) for r in readings],
        events=_events(store, machine_id, None, MACHINE_EVENTS),
    )
    return detail.model_copy(update={"modes": [_mode(mode, risk, model) for mode, risk in detail.risk.items()]})


def _events(store: Store, machine_id: str | None, since: datetime | None, limit: int) -> list[EventInfo]:
    """Newest first (by the time of the reading that caused them). `since` is compared at the microsecond
    resolution the API shows times in, so an event's own `ts` passed back as `since` finds it: the store is asked
    from a microsecond earlier and the few in between, the oldest of the answer, are dropped here."""
    found = store.events(machine_id, None if since is None else since.timestamp() - 1e-6, limit)
    events = []
    for record, synced in found:
        if since is not None and _at(record.at) < since:
            continue
        try:
            event = Event.model_validate_json(record.body)
        except ValueError as exc:
            log.warning("outbox event %s unreadable: %s", record.record_id, exc)
            continue
        events.append(EventInfo(
            event_id=str(event.event_id), machine_id=event.machine_id, ts=event.ts, from_state=event.from_state,
            to_state=event.to_state, health=event.health, p_failure=event.p_failure,
            dominant_mode=event.dominant_mode, dominant_label=mode_words(event.dominant_mode)["label"],
            mode_risk=event.mode_risk, reading=event.reading,
            model_version=f"{event.model.name}@{event.model.version}", synced=synced,
        ))
    return events


# --- /metrics -------------------------------------------------------------------------------------------------------

class AgentCollector:
    """Prometheus metrics computed from the agent's state at each scrape (nothing is counted twice: the store's
    counters are the durable truth). A part that cannot be read is left out and counted in
    `pdm_status_scrape_errors`; the scrape itself does not fail.

    Scoring latency: when the pipeline has a `score_seconds` prometheus_client Histogram, it is exported too."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        errors = 0
        yield _gauge("pdm_agent_start_time_seconds", "When the agent started (epoch seconds).", agent.started_at)
        info = InfoMetricFamily("pdm_agent", "The agent.")
        info.add_metric([], {"version": __version__, "gateway_id": agent.config.gateway_id})
        yield info
        if agent.store is None or agent.pipeline is None:
            yield _gauge("pdm_agent_running", "Whether the agent's store and pipeline are running.", 0)
            return
        yield _gauge("pdm_agent_running", "Whether the agent's store and pipeline are running.", 1)
        for part in (self._model, self._store, self._pipeline, self._sync, self._drivers, self._machines,
                     self._scoring):
            try:
                metrics = list(part())
            except Exception as exc:  # noqa: BLE001 - the rest of the scrape is still worth having
                errors += 1
                log.warning("metrics: %s failed: %s", part.__name__.strip("_"), exc)
                continue
            yield from metrics
        yield _gauge("pdm_status_scrape_errors", "Parts of the agent's state this scrape could not read.", errors)

    def _model(self) -> Iterable[Metric]:
        model = self.agent.pipeline.scorer.model
        info = InfoMetricFamily("pdm_model", "The model package scoring the readings.")
        info.add_metric([], {"name": model.name, "version": model.version, "sha256": model.sha256})
        yield info

    def _store(self) -> Iterable[Metric]:
        store, config = self.agent.store, self.agent.config
        counters = store.counters()
        readings = CounterMetricFamily("pdm_readings", "Readings by outcome, and rejected readings by reason.",
                                       labels=["outcome", "reason"])
        readings.add_metric(["accepted", ""], counters.get("readings_accepted", 0))
        readings.add_metric(["duplicate", ""], counters.get("readings_duplicate", 0))
        for reason, n in _prefixed(counters, "rejected_").items():
            readings.add_metric(["rejected", reason], n)
        yield readings
        yield _counter("pdm_quarantine_evicted", "Rejected readings evicted from the quarantine by its cap.",
                       counters.get("quarantine_evicted", 0))
        dropped = CounterMetricFamily("pdm_buffer_dropped", "Unsynced records the buffer cap forced out, by kind.",
                                      labels=["kind"])
        for kind in ("quarantine", "readings", "summaries"):
            dropped.add_metric([kind], counters.get(f"dropped_{kind}", 0))
        yield dropped
        set_aside = CounterMetricFamily("pdm_sync_set_aside", "Records central refused as invalid, set aside.",
                                        labels=["kind"])
        for kind in ("event", "summary"):
            set_aside.add_metric([kind], counters.get(f"set_aside_{kind}", 0))
        yield set_aside
        yield _gauge("pdm_database_used_bytes", "Bytes of database pages holding data.", store.used_bytes())
        yield _gauge("pdm_database_size_bytes", "Size of the database file.", store.size_bytes())
        yield _gauge("pdm_database_max_bytes", "The buffer cap.", config.buffer.max_db_mb * 2**20)
        pending, oldest = store.outbox_backlog()
        yield _gauge("pdm_outbox_pending", "Summaries and events not yet accepted by central.", pending)
        yield _gauge("pdm_outbox_oldest_pending_age_seconds", "Age of the oldest record not yet accepted by central "
                     "(0 when none).", 0.0 if oldest is None else max(0.0, time.time() - oldest))

    def _pipeline(self) -> Iterable[Metric]:
        pipeline, config = self.agent.pipeline, self.agent.config
        yield _gauge("pdm_pipeline_queue_depth", "Readings waiting for the pipeline.", pipeline.depth)
        yield _gauge("pdm_pipeline_queue_capacity", "The pipeline queue's size.", config.pipeline.queue_max)
        yield _counter("pdm_pipeline_batches", "Batches committed.", pipeline.batches)
        yield from pipeline.batch_size.collect()
        by_machine = CounterMetricFamily("pdm_machine_readings", "Readings committed since the agent started, by "
                                         "machine and outcome (accepted or rejected).", labels=["machine", "outcome"])
        for (machine, outcome), n in sorted(pipeline.readings_by_machine.items()):
            by_machine.add_metric([machine, outcome], n)
        yield by_machine
        yield _counter("pdm_pipeline_errors", "Unexpected errors committing a batch (retried).", pipeline.errors)
        yield _gauge("pdm_database_up", "Whether the last database write succeeded.", int(pipeline.database.up))
        yield _counter("pdm_database_write_failures", "Failed database writes (retried).",
                       pipeline.database.failures_total)

    def _sync(self) -> Iterable[Metric]:
        agent = self.agent
        yield _gauge("pdm_sync_enabled", "Whether sync to central is configured.", int(agent.config.central.enabled))
        last = agent.sync.last_success if agent.sync else None
        yield _gauge("pdm_sync_last_success_timestamp_seconds", "When the outbox was last emptied into central "
                     "(0: never).", last.timestamp() if last else 0.0)
        rounds = CounterMetricFamily("pdm_sync_rounds", "Sync rounds since the agent started, by result: synced "
                                     "(outbox emptied), retry (central unreachable or failing), refused (401/403).",
                                     labels=["result"])
        for outcome in Outcome:
            rounds.add_metric([outcome.value], agent.sync_rounds[outcome.value])
        yield rounds
        yield _counter("pdm_sync_records_sent", "Summaries and events central has accepted since the agent started.",
                       agent.sync_records["sent"])

    def _drivers(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("pdm_driver_up", "Whether the driver's connections are up (every device connected).",
                               labels=["driver"])
        device_up = GaugeMetricFamily("pdm_driver_device_up", "Whether one polled device is connected.",
                                      labels=["driver", "device"])
        errors = CounterMetricFamily("pdm_driver_errors", "Driver errors since the agent started, by device (empty "
                                     "for a driver's own connection) and kind.", labels=["driver", "device", "kind"])
        polls = CounterMetricFamily("pdm_driver_polls", "Polls of one device since the agent started.",
                                    labels=["driver", "device"])
        skips = CounterMetricFamily("pdm_driver_poll_skips", "Polls of one device skipped because the previous one "
                                    "was still running.", labels=["driver", "device"])
        for driver in map(_driver, self.agent.drivers):
            up.add_metric([driver.name], 1 if driver.connected else 0)
            for kind, n in (driver.errors.items() if not driver.devices else ()):
                errors.add_metric([driver.name, "", kind], n)
            for device in driver.devices:
                device_up.add_metric([driver.name, device.device], int(device.connected))
                details = driver.details["devices"][device.device]
                for kind, n in _counts(details).items():
                    errors.add_metric([driver.name, device.device, kind], n)
                polls.add_metric([driver.name, device.device], details.get("polls", 0))
                skips.add_metric([driver.name, device.device], details.get("skipped_overlaps", 0))
        yield from (up, device_up, errors, polls, skips)

    def _machines(self) -> Iterable[Metric]:
        store = self.agent.store
        states = _alarm_states(store)
        now = time.time()
        health = GaugeMetricFamily("pdm_machine_health", "Health of the latest reading, 0-100.", labels=["machine"])
        level = GaugeMetricFamily("pdm_machine_alarm_level", "Alarm state after the hysteresis: 0 ok, 1 warning, "
                                  "2 alarm.", labels=["machine"])
        p_failure = GaugeMetricFamily("pdm_machine_failure_probability", "p_failure of the latest reading.",
                                      labels=["machine"])
        risk = GaugeMetricFamily("pdm_machine_mode_risk", "Risk of each failure mode in the latest reading.",
                                 labels=["machine", "mode"])
        ood = GaugeMetricFamily("pdm_machine_ood_inputs", "Inputs of the latest reading outside the training range.",
                                labels=["machine"])
        age = GaugeMetricFamily("pdm_machine_last_reading_age_seconds", "Since the latest reading was received.",
                                labels=["machine"])
        for reading in labelled(store.latest_by_machine().values(), self.agent.config.machines.forget_after_h, now):
            machine_id = reading.machine_id
            health.add_metric([machine_id], reading.health)
            level.add_metric([machine_id], LEVELS.get(states.get(machine_id, reading.state), 0))
            p_failure.add_metric([machine_id], reading.p_failure)
            for mode, value in reading.risk.items():
                risk.add_metric([machine_id, mode], value)
            ood.add_metric([machine_id], len(reading.ood))
            age.add_metric([machine_id], max(0.0, now - reading.received_at))
        yield from (health, level, p_failure, risk, ood, age)

    def _scoring(self) -> Iterable[Metric]:
        histogram = getattr(self.agent.pipeline, "score_seconds", None)
        if histogram is not None:
            yield from histogram.collect()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


# --- the server -----------------------------------------------------------------------------------------------------

class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class StatusServer:
    """The status API in a background thread: `start()` returns once it listens, `stop()` ends it.

    Who calls it: the agent, from its main thread: start() after the pipeline started, stop() first thing when it
    stops (before the store closes). `stop()` is safe twice and without `start()`. `port=0` (tests) listens on a
    free port: `url` tells which."""

    def __init__(self, agent: Agent, host: str | None = None, port: int | None = None) -> None:
        self.agent = agent
        self.host = host if host is not None else agent.config.status.host
        self.port = port if port is not None else agent.config.status.port
        self._server: _Uvicorn | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.limits = ConnectionLimits()  # per address and per request (agent/http_server.py)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Raises OSError when the address cannot be bound (in use, not this machine's), RuntimeError when the
        server does not come up."""
        if self._thread is not None:
            return
        # Bound here, not by uvicorn: a bind error reaches the caller (uvicorn would sys.exit its thread).
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.agent), log_config=None, log_level="warning", access_log=False, lifespan="off",
            http=limited_h11(self.limits), ws="none", loop="asyncio", server_header=False, proxy_headers=False,
            limit_concurrency=64, timeout_keep_alive=15, timeout_graceful_shutdown=int(STOP_TIMEOUT_S),
        )
        server = _Uvicorn(config)

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException:  # SystemExit included: uvicorn exits on a failed startup
                log.exception("the status API stopped")
            finally:
                server.listening.set()  # wake start() if it failed before listening

        self._server, self._socket = server, sock
        self._thread = threading.Thread(target=serve, name="status-api", daemon=True)
        self._thread.start()
        if not server.listening.wait(START_TIMEOUT_S) or not server.started:
            self.stop()
            raise RuntimeError(f"the status API did not start on {self.url}")
        log.info("status API on %s%s", self.url, "" if self.agent.config.status.token else " (no token: loopback only)")

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight (up to STOP_TIMEOUT_S), close connections."""
        thread, server = self._thread, self._server
        if thread is None or server is None:
            return
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S + 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
        self._thread = self._server = self._socket = None


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"the status API cannot listen on {host}:{port}: {exc.strerror}; "
                                 "set status.bind to a free address") from exc
    return sock
