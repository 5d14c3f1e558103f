"""The status API's FastAPI app (`create_app`): its routes, each reading one `AgentSnapshot`, and its JSON errors."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

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
)
from pydantic import BeforeValidator, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import __version__
from agent.config import StatusConfig
from agent.snapshot import AgentSnapshot, NotRunning
from agent.status import alarms
from agent.status.gateway import gateway_info, ready
from agent.status.guard import ERRORS, ApiError, Guard, documented, error
from agent.status.listing import MachineListing
from agent.status.machines import event_infos, machine_detail
from agent.status.metrics import AgentCollector, exposition
from agent.status.models import EventList, GatewayInfo, Health, MachineDetail, MachineList
from agent.status.page import page
from web.http import STATUS_CODES, BodyLimit

API = "/api/v1"
HISTORY_DEFAULT, HISTORY_MAX = 300, 5000
EVENTS_DEFAULT, EVENTS_MAX = 100, 1000
EPOCH_MAX_S = 2e10  # pydantic reads a larger number as milliseconds; in seconds it is the year 2603
GATEWAY = TypeAdapter(GatewayInfo)
# What `since` takes, documented by hand: FastAPI would document a datetime as a date-time string only.
SINCE_SCHEMA = [{"type": "string", "format": "date-time"}, {"type": "number", "minimum": 0, "maximum": EPOCH_MAX_S}]


def create_app(read: Callable[[], AgentSnapshot], status: StatusConfig) -> FastAPI:
    """The status API over the snapshots `read` takes. It may be created before the agent starts: until then the
    data routes and /readyz answer 503."""
    token = status.token.get_secret_value() if status.token else None
    html, html_csp = page()
    app = FastAPI(title="pdm-edge status API", version=__version__, openapi_url=f"{API}/openapi.json",
                  docs_url=None, redoc_url=None,  # their pages load assets from a CDN: not on a gateway
                  description="The gateway agent's local status: machines, their health and risk, alarm "
                              "transitions, the gateway itself. Errors are {\"error\": {\"code\", \"message\"}}.")
    if status.cors_origins:  # inside the guard (the last added is the outermost): preflights get its headers too
        app.add_middleware(CORSMiddleware, allow_origins=status.cors_origins, allow_methods=["GET"],
                           allow_headers=["Authorization"], max_age=600)
    app.add_middleware(BodyLimit)  # inside the guard: a body is read only once the token is right
    app.add_middleware(Guard, token=token, bind_host=status.host, cors=bool(status.cors_origins))
    _handlers(app)
    registry = CollectorRegistry()
    registry.register(AgentCollector(read))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    listing = MachineListing()

    @app.get("/healthz", response_model=Health, responses=documented(400, 500), tags=["probes"])
    def healthz() -> Health:
        """Liveness: the process answers. Open without the token."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses=ERRORS, tags=["probes"])
    def readyz() -> Health:
        """Readiness: a model is loaded, the store answers and takes writes, the pipeline goes round."""
        return ready(read())

    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD too, for probes that send it
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get(f"{API}/status", response_model=GatewayInfo, responses=ERRORS, tags=["gateway"])
    def gateway_status() -> Response:
        """The gateway: versions, model, uptime, buffer, sync, pipeline, drivers."""
        # Encoded here as FastAPI would encode it, without its validating the model again in another worker thread.
        return Response(GATEWAY.dump_json(gateway_info(read())), media_type="application/json")

    @app.get(f"{API}/machines", response_model=MachineList, responses=ERRORS, tags=["machines"])
    def machines() -> Response:
        """Every machine that sent a reading, the worst first (alarm, warning, ok), then by id."""
        # Encoded here, each machine's row once per change of it (agent/status/listing.py), rather than validated
        # again and encoded by FastAPI at each request.
        return Response(listing.body(read()), media_type="application/json")

    @app.get(f"{API}/machines/{{machine_id}}", response_model=MachineDetail, responses=ERRORS, tags=["machines"])
    def machine(machine_id: str,
                history: Annotated[int, Query(ge=1, le=HISTORY_MAX, description="readings of history")]
                = HISTORY_DEFAULT) -> MachineDetail:
        """One machine: its latest reading against the model's ranges, recent history and alarm transitions."""
        return machine_detail(read(), machine_id, history)

    @app.get(f"{API}/events", response_model=EventList, responses=ERRORS, tags=["machines"])
    def events(since: Annotated[datetime | None, BeforeValidator(_epoch_seconds), Query(
                   description="ISO-8601 (UTC if no offset) or epoch seconds; events at or after it",
                   json_schema_extra={"anyOf": SINCE_SCHEMA})] = None,
               machine_id: Annotated[str | None, Query(max_length=64)] = None,
               limit: Annotated[int, Query(ge=1, le=EVENTS_MAX)] = EVENTS_DEFAULT) -> EventList:
        """Alarm state transitions from the outbox (synced or not, until retention forgets them), newest first."""
        return EventList(events=event_infos(read().records, machine_id, _aware(since) if since else None, limit))

    alarms.routes(app, read, status)

    @app.get("/metrics", response_class=Response, tags=["gateway"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **documented(400, 401, 429, 500)})
    def metrics() -> Response:
        """Prometheus metrics, read from the agent at scrape time."""
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": html_csp})

    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(NotRunning)
    async def not_running(request: Request, exc: NotRunning) -> JSONResponse:
        return error(503, "not_ready", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), message,
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        where = ", ".join(".".join(map(str, e["loc"][1:] or e["loc"])) for e in exc.errors())
        return error(422, "invalid_request", f"invalid {where}", details)


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


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


