"""schemathesis against the central API's own OpenAPI document, over real HTTP (`pdm-central serve` on a real
PostgreSQL): for every operation, generated requests (valid and invalid) with valid tokens get no 5xx, a documented
status and content type, and a body that matches the documented schema."""

from __future__ import annotations

import gzip
import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from sync.protocol import IngestBatch
from testkit import batches
from testkit.central import OPS_TOKEN
from testkit.net import free_port
from tests.central.conftest import Gateways, central_url  # noqa: F401
from tests.central.support import PDM_CENTRAL, Server, bearer, environment
from tests.scale import scaled

INGEST = "/api/v1/ingest"


@pytest.fixture(scope="module")
def central(central_url, tmp_path_factory):  # noqa: F811
    """A served central with one gateway that has sent a batch: (server, gateway name, gateway token)."""
    port = free_port()
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)], environment(central_url), port,
                    tmp_path_factory.mktemp("central-schema") / "log")
    try:
        server.wait_ready()
        name, token = Gateways(central_url).add("schema")
        sent = requests.post(server.base + INGEST, data=gzip.compress(json.dumps(batches.batch(name)).encode()),
                             headers={**bearer(token), "Content-Type": "application/json",
                                      "Content-Encoding": "gzip"}, timeout=10)
        assert sent.status_code == 200, sent.text
        yield server, name, token
    finally:
        server.terminate()


DOCUMENT = "/api/v1/openapi.json"  # both servers' (the agent's status API too); /openapi.json redirects there


def served_document(base: str) -> dict:
    return requests.get(base + DOCUMENT, timeout=10).json()


@pytest.fixture(scope="module")
def document(central):
    server, _, _ = central
    return served_document(server.base)


@pytest.fixture(scope="module")
def schema(central):
    server, _, _ = central
    return schemathesis.openapi.from_url(server.base + DOCUMENT)


def operations(document: dict) -> list[str]:
    return sorted(f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item)


SUMMARIES = "GET /api/v1/gateways/{gateway}/machines/{machine_id}/summaries"
DESIRED = "GET /api/v1/gateways/{gateway_id}/desired"
OPERATIONS = ["GET /healthz", "GET /readyz", f"POST {INGEST}", "GET /api/v1/fleet", "GET /api/v1/machines", SUMMARIES,
              "GET /api/v1/events", DESIRED, "GET /api/v1/models/{name}/{version}/bundle",
              "GET /api/v1/rollouts/current"]
ALARMS = ["GET /api/v1/alarms", "GET /api/v1/alarms/{episode_id}", "POST /api/v1/alarms/{episode_id}/acknowledge",
          "POST /api/v1/alarms/{episode_id}/comment", "POST /api/v1/alarms/{episode_id}/assign",
          "POST /api/v1/alarms/{episode_id}/label", "GET /api/v1/notifications/deliveries"]
OPERATIONS += ALARMS
DASHBOARD = ["GET /api/v1/dashboard/fleet", "GET /api/v1/dashboard/gateways/{gateway}/machines/{machine_id}"]
# Requests the document cannot tell from valid ones, rightly refused: a batch beyond the schema (a window that ends
# before it starts, a time off the calendar once in UTC: central/ingest.py) and a cursor not of central's making.
BEYOND_THE_DOCUMENT = {f"POST {INGEST}", SUMMARIES, "GET /api/v1/events", "GET /api/v1/alarms",
                       "GET /api/v1/notifications/deliveries"}


def test_every_route_is_fuzzed(document):
    """The dashboard's data routes are fuzzed with the dashboard (tests/central/test_dashboard*.py)."""
    assert operations(document) == sorted(OPERATIONS + DASHBOARD)


def test_regression_the_ingest_body_and_the_ops_errors_are_documented(document):
    """schemathesis had nothing to send to the ingest route: it reads its body itself, so FastAPI documented none;
    a 404 of the summaries route and the ops routes' 401 and 503 were documented nowhere."""
    body = document["paths"][INGEST]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/IngestBatch"}
    schemas = document["components"]["schemas"]
    assert set(schemas["IngestBatch"]["properties"]) == set(IngestBatch.model_fields)
    assert {"Summary", "Event", "ModelRef", "Spread", "GatewayStatus"} <= set(schemas)
    for operation in OPERATIONS:
        method, path = operation.split(" ")
        if path.startswith("/api/v1/") and path != INGEST:
            assert {"401", "503"} <= set(document["paths"][path][method.lower()]["responses"]), operation
    assert "404" in document["paths"][SUMMARIES.split(" ")[1]]["get"]["responses"]


def test_regression_every_error_is_documented_as_the_envelope_the_api_answers(central, document):
    """Issue 14 item 16: 422 was documented as FastAPI's {"detail": [...]}, the ingest's 401, 403, 413, 415 and 503
    had no schema, and 429 was nowhere. The document is at /api/v1/openapi.json, as the agent's status API's."""
    server, _, _ = central
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and set(schemas["Error"]["required"]) == {"error"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (method, path, status)
            if "401" in operation["responses"]:
                assert "429" in operation["responses"], (method, path)
    ingest = document["paths"][INGEST]["post"]["responses"]
    assert {"401", "403", "413", "415", "422", "429", "503"} <= set(ingest)
    moved = requests.get(server.base + "/openapi.json", timeout=10, allow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == DOCUMENT


WITHOUT_INPUT = {"GET /healthz", "GET /readyz", "GET /api/v1/fleet", "GET /api/v1/rollouts/current"}  # nothing to get wrong: positive cases only


@pytest.mark.parametrize(("operation", "mode"), [
    *((operation, GenerationMode.POSITIVE) for operation in OPERATIONS),
    *((operation, GenerationMode.NEGATIVE) for operation in OPERATIONS if operation not in WITHOUT_INPUT),
], ids=lambda value: getattr(value, "value", value))
def test_the_central_api_keeps_its_documented_contract(central, schema, operation, mode):
    server, name, token = central
    method, path = operation.split(" ")
    ingest = path == INGEST
    headers = bearer(token if path in (INGEST, DESIRED.split(" ")[1]) else OPS_TOKEN)
    excluded = [schemathesis.checks.positive_data_acceptance] if operation in BEYOND_THE_DOCUMENT else []

    @given(case=schema[path][method].as_strategy(mode))
    @settings(max_examples=scaled(15, 500), deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def contract(case):
        if ingest and isinstance(case.body, dict) and mode is GenerationMode.POSITIVE:
            case.body["gateway_id"] = name  # the token's gateway: the batch reaches the database
        if path == DESIRED.split(" ")[1] and mode is GenerationMode.POSITIVE:
            case.path_parameters["gateway_id"] = name  # the token's gateway: 200 and 304, not only 403
        case.call_and_validate(base_url=server.base, headers=headers, excluded_checks=excluded, timeout=10)

    contract()
