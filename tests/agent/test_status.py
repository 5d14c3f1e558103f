"""The local status API and page (agent/status.py) over real HTTP, on a real agent: its store, pipeline and model,
and an MQTT driver connected to a real broker."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import requests
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.config import load_config
from agent.service import Agent
from agent.status import TREND_POINTS, StatusServer
from agent.status.models import GatewayInfo
from drivers.base import Availability, RawReading
from model.validate import Reason, Rejection
from testkit.modbus import ModbusServers, ModbusUnit
from testkit.net import free_port
from tests.reliability.plant import healthy_unit, modbus_devices

TOKEN = "status-token-for-tests-0123456789"
HEALTHY = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
           "tool_wear": 10.0, "machine_type": "M"}
HEAT = {**HEALTHY, "air_temperature": 302.0, "process_temperature": 309.0, "rotational_speed": 1250.0}  # HDF alarm
WORN = {**HEALTHY, "tool_wear": 300.0}  # beyond the training range (253 min): OSF alarm, out of distribution
READINGS_EACH = 10
SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer",
            "cache-control": "no-store"}


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Served:
    agent: Agent
    server: StatusServer
    fed_at: float = 0.0

    @property
    def url(self) -> str:
        return self.server.url

    def get(self, path: str, token: str | None = None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(kwargs.pop("method", "GET"), self.url + path, headers=headers, timeout=10, **kwargs)


def write_config(directory: Path, tables: str = "", **sections: dict) -> Path:
    """The agent's TOML: `sections` as tables of JSON-compatible values, then `tables` as written."""
    lines = ['gateway_id = "gw-status-test"', f'data_dir = "{directory / "data"}"']
    sections["status"] = {"bind": f"127.0.0.1:{free_port()}", **sections.get("status", {})}
    for section, values in sections.items():
        lines += [f"[{section}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n" + tables)
    return path


def make_agent(directory: Path, tables: str = "", **sections: dict) -> Agent:
    """An agent from a TOML file alone: no PDM_ variable, credential or .env of the machine leaks in."""
    path = write_config(directory, tables, **sections)
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("PDM_") or n == "CREDENTIALS_DIRECTORY"]:
            patch.delenv(name)
        patch.chdir(directory)
        return Agent(load_config(path))


@contextmanager
def serving(directory: Path, start_agent: bool = True, tables: str = "", **sections: dict) -> Iterator[Served]:
    """The agent's own status server when Agent.start() starts one, else one started here for it."""
    agent = make_agent(directory, tables, **sections)
    server = StatusServer(agent, port=0)
    try:
        if start_agent:
            agent.start()
            if isinstance(getattr(agent, "status", None), StatusServer):
                server = agent.status
        if server is not getattr(agent, "status", None):
            server.start()
        yield Served(agent, server)
    finally:
        server.stop()
        agent.stop()


def feed(agent: Agent) -> float:
    """Three machines (healthy; heat dissipation; a worn tool beyond the training range) and one malformed
    message; returns once all of it is committed."""
    now = time.time()
    for i in range(READINGS_EACH):
        ts = now - 100 + i
        agent.pipeline.put(RawReading("m-ok", ts, dict(HEALTHY), "test", time.time()))
        agent.pipeline.put(RawReading("m-hdf", ts, dict(HEAT), "test", time.time()))
        agent.pipeline.put(RawReading("m-ood", ts + 0.5, dict(WORN), "test", time.time()))
    garbage = Rejection(Reason.MALFORMED, "not JSON")
    agent.pipeline.put(RawReading(None, now, {}, "test:garbage", now, "garbage", garbage))
    store = agent.store
    wait_for(lambda: store.counters().readings_accepted == 3 * READINGS_EACH
             and store.counters().rejected.get("malformed") == 1
             and len(store.outbox("event", pending=False)) == 2, "the readings and both alarm events to be committed")
    return now


@contextmanager
def open_agent(directory: Path, broker) -> Iterator[Served]:
    """A fed agent without a status token (loopback only), with an MQTT driver on a topic of its own."""
    name = f"pdm-status-{directory.name}-{uuid.uuid4().hex[:8]}"  # unique on a broker other test runs share
    mqtt = {"url": f"mqtt://{broker.host}:{broker.port}", "client_id": name, "topics": [f"{name}/+/telemetry"], "default_machine_type": "M",
            "session_expiry_s": 0}
    with serving(directory, mqtt=mqtt) as running:
        running.fed_at = feed(running.agent)
        wait_for(lambda: running.agent.drivers[0].stats().connected, "the MQTT driver to connect")
        yield running


@contextmanager
def token_agent(directory: Path) -> Iterator[Served]:
    """A fed agent with a status token and one CORS origin, and no driver."""
    with serving(directory, status={"token": TOKEN, "cors_origins": ["https://ops.example"]}) as running:
        running.fed_at = feed(running.agent)
        yield running


@pytest.fixture(scope="module")
def served(tmp_path_factory, mqtt_broker) -> Iterator[Served]:
    with open_agent(tmp_path_factory.mktemp("status"), mqtt_broker) as running:
        yield running


@pytest.fixture(scope="module")
def polling(tmp_path_factory) -> Iterator[Served]:
    """An agent polling two Modbus devices (m1, m2) on a real pymodbus server, 10 times a second."""
    with ModbusServers() as servers:
        port = servers.tcp({1: healthy_unit(), 2: healthy_unit()})
        with serving(tmp_path_factory.mktemp("polling"), tables=modbus_devices(port, 2, 0.1)) as running:
            yield running


@pytest.fixture
def with_token(tmp_path) -> Iterator[Served]:
    with token_agent(tmp_path) as running:
        yield running


def error_of(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


# --- probes ---------------------------------------------------------------------------------------------------------

def test_healthz_and_readyz(served):
    assert served.get("/healthz").json()["status"] == "ok"
    assert served.get("/healthz", method="HEAD").status_code == 200  # for probes that send HEAD
    assert served.get("/readyz", method="HEAD").status_code == 200
    ready = served.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"model": True, "store": True, "database_writes": True,
                                                          "data_dir_writable": True, "pipeline": True}}


def test_readyz_is_503_while_database_writes_fail(served, monkeypatch):
    class Down(Availability):  # down whatever the pipeline reports meanwhile
        up = False

    down = Down("database", logging.getLogger("test"))
    down.failed("disk I/O error")
    monkeypatch.setattr(served.agent.pipeline, "database", down)
    error = error_of(served.get("/readyz"), 503, "not_ready")
    assert "disk I/O error" in error["message"]
    assert [d["check"] for d in error["details"]] == ["database_writes"]
    assert served.get("/healthz").status_code == 200  # alive all the same
    monkeypatch.undo()
    assert served.get("/readyz").status_code == 200


def test_an_agent_not_started_is_alive_but_not_ready(tmp_path):
    with serving(tmp_path, start_agent=False) as idle:
        assert idle.get("/healthz").status_code == 200
        assert error_of(idle.get("/readyz"), 503, "not_ready")["details"] == [
            {"check": "started", "message": "the agent has not started"}]
        for path in ("/api/v1/status", "/api/v1/machines", "/api/v1/machines/m-1", "/api/v1/events"):
            error_of(idle.get(path), 503, "not_ready")
        metrics = families(idle.get("/metrics").text)
        assert value(metrics, "pdm_agent_running") == 0


# --- the data -------------------------------------------------------------------------------------------------------

def test_status_describes_the_gateway(served):
    response = served.get("/api/v1/status")
    # Encoded by the route, as FastAPI encodes the response model: pydantic's JSON of a GatewayInfo.
    assert response.content == GatewayInfo.model_validate_json(response.content).model_dump_json().encode()
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    model = served.agent.pipeline.scorer.model
    assert status["gateway_id"] == "gw-status-test" and status["agent_version"] == __version__
    assert status["model"]["name"] == model.name and status["model"]["version"] == model.version
    assert status["model"]["sha256"] == model.sha256 and len(status["model"]["sha256"]) == 64
    assert status["model"]["modes"] == ["TWF", "HDF", "PWF", "OSF"]
    assert 0 < status["uptime_s"] < 600
    assert status["machines"] == {"ok": 1, "warning": 0, "alarm": 2}
    buffer = status["buffer"]
    assert buffer["pending"] >= 2  # both events, and the summaries of closed windows
    assert 0 <= buffer["oldest_pending_age_s"] < 600 and buffer["oldest_pending_at"].endswith("Z")
    assert buffer["used_bytes"] > 0 and buffer["max_bytes"] == 512 * 2**20 and buffer["dropped_total"] == 0
    assert status["readings"] == {"accepted": 30, "duplicate": 0, "rejected": {"malformed": 1}, "rejected_total": 1,
                                  "quarantine_evicted": 0}
    assert status["sync"] == {"enabled": False, "url": None, "last_success": None, "last_success_age_s": None,
                              "last_error": None, "set_aside": {},
                              "actions_error": None}
    pipeline = status["pipeline"]
    assert pipeline["queue_depth"] == 0 and pipeline["queue_max"] == 10_000 and pipeline["batches"] >= 1
    assert pipeline["database_up"] is True and pipeline["errors"] == 0
    [driver] = status["drivers"]
    assert driver["name"] == "mqtt" and driver["connected"] is True and driver["last_error"] is None
    assert driver["errors"]["connection_failures"] == 0
    assert driver["details"]["broker"].startswith("mqtt://")


def test_machines_worst_first_with_state_health_risk_and_ood(served):
    body = served.get("/api/v1/machines").json()
    machines = {m["machine_id"]: m for m in body["machines"]}
    assert [m["machine_id"] for m in body["machines"]] == ["m-hdf", "m-ood", "m-ok"]

    heat = machines["m-hdf"]
    assert heat["state"] == "alarm" and heat["reading_state"] == "alarm" and heat["health"] < 40
    assert heat["dominant"]["mode"] == "HDF" and heat["dominant"]["elevated"] is True
    assert heat["dominant"]["label"] == "heat dissipation"
    assert "temperature difference too small at low speed" in heat["dominant"]["meaning"]
    assert max(heat["risk"], key=heat["risk"].get) == "HDF" and heat["ood"] == []
    assert heat["values"] == {k: v for k, v in HEAT.items() if k != "machine_type"} and heat["machine_type"] == "M"

    worn = machines["m-ood"]
    assert worn["ood"] == ["tool_wear"] and worn["dominant"]["mode"] == "OSF" and worn["state"] == "alarm"

    fine = machines["m-ok"]
    assert fine["state"] == "ok" and fine["health"] > 70 and fine["dominant"]["elevated"] is False
    assert len(fine["trend"]) == READINGS_EACH and all(h == round(fine["health"], 1) for h in fine["trend"])
    assert 0 <= fine["last_reading_age_s"] < 300
    measured = datetime.fromisoformat(fine["last_reading_at"])
    assert measured.tzinfo is not None and abs(measured.timestamp() - (served.fed_at - 100 + 9)) < 1e-3


def test_trends_follow_new_readings_between_requests(tmp_path):
    """The trend is kept from one request to the next and brought up to date with what was committed since."""
    with serving(tmp_path) as running:
        feed(running.agent)
        trend = {m["machine_id"]: m["trend"] for m in running.get("/api/v1/machines").json()["machines"]}
        healthy = trend["m-ok"][-1]
        assert trend["m-ok"] == [healthy] * READINGS_EACH

        store, start = running.agent.store, time.time()
        for i in range(TREND_POINTS - 5):  # m-ok overheats: TREND_POINTS - 5 newer readings, at a lower health
            running.agent.pipeline.put(RawReading("m-ok", start + i, dict(HEAT), "test", time.time()))
        wait_for(lambda: store.counters().readings_accepted == 3 * READINGS_EACH + TREND_POINTS - 5,
                 "the new readings to be committed")
        hot = round(store.history("m-ok", 0.0, 1)[0].health, 1)
        [machine] = [m for m in running.get("/api/v1/machines").json()["machines"] if m["machine_id"] == "m-ok"]
        assert machine["trend"] == [healthy] * 5 + [hot] * (TREND_POINTS - 5) and hot < healthy
        assert machine["trend"] == [round(r.health, 1) for r in store.history("m-ok", 0.0, TREND_POINTS)]
        trends = [[m["machine_id"], m["trend"]] for m in running.get("/api/v1/machines").json()["machines"]]
        assert trends == [[m["machine_id"], m["trend"]] for m in running.get("/api/v1/machines").json()["machines"]]

        running.agent.pipeline.put(RawReading("m-ok", start - 50, dict(HEALTHY), "test", time.time()))  # late
        wait_for(lambda: len(store.history("m-ok", 0.0, 1000)) == READINGS_EACH + TREND_POINTS - 4, "the late one")
        [machine] = [m for m in running.get("/api/v1/machines").json()["machines"] if m["machine_id"] == "m-ok"]
        assert machine["trend"][-1] == hot  # the trend shows the newest readings; the late one is in the history


def test_a_machine_whose_saved_state_is_unreadable_is_still_listed(tmp_path, caplog):
    with serving(tmp_path) as running:
        feed(running.agent)
        with sqlite3.connect(running.agent.store.path) as db:
            db.execute("UPDATE machines SET state = 'not json' WHERE machine_id = 'm-hdf'")
        machines = {m["machine_id"]: m for m in running.get("/api/v1/machines").json()["machines"]}
        assert machines["m-hdf"]["state"] == machines["m-hdf"]["reading_state"] == "alarm"  # the reading's own
        assert machines["m-ood"]["state"] == "alarm" and "machine m-hdf: saved state unreadable" in caplog.text


def test_machine_detail_has_ranges_history_and_events(served):
    detail = served.get("/api/v1/machines/m-ood").json()
    manifest = served.agent.pipeline.scorer.model.manifest
    assert [i["name"] for i in detail["inputs"]] == list(manifest.input_names)
    wear = next(i for i in detail["inputs"] if i["name"] == "tool_wear")
    spec = next(i for i in manifest.inputs if i.name == "tool_wear")
    assert wear == {"name": "tool_wear", "unit": "min", "description": spec.description, "value": 300.0,
                    "training_min": spec.training_range.min, "training_max": spec.training_range.max,
                    "physical_min": spec.physical_range.min, "physical_max": spec.physical_range.max, "ood": True}
    assert not any(i["ood"] for i in detail["inputs"] if i["name"] != "tool_wear")
    assert [m["mode"] for m in detail["modes"]] == ["TWF", "HDF", "PWF", "OSF"]
    assert all(m["threshold"] == manifest.thresholds.modes[m["mode"]] for m in detail["modes"])
    history = detail["history"]
    assert len(history) == READINGS_EACH and [h["ts"] for h in history] == sorted(h["ts"] for h in history)
    assert history[-1]["ts"] == detail["last_reading_at"]
    [event] = detail["events"]
    assert (event["machine_id"], event["from_state"], event["to_state"]) == ("m-ood", "ok", "alarm")
    assert event["dominant_mode"] == "OSF" and event["dominant_label"] == "overstrain"

    short = served.get("/api/v1/machines/m-ood?history=3").json()["history"]
    assert [h["ts"] for h in short] == [h["ts"] for h in history[-3:]]


def test_unknown_machine_is_a_404_json_error(served):
    assert "no-such-machine" in error_of(served.get("/api/v1/machines/no-such-machine"), 404, "not_found")["message"]


@pytest.mark.parametrize("query", ["history=0", "history=abc", "history=100000"])
def test_bad_history_is_a_422_json_error(served, query):
    error = error_of(served.get(f"/api/v1/machines/m-ok?{query}"), 422, "invalid_request")
    assert error["details"][0]["loc"] == ["query", "history"]


def test_events_newest_first_with_since_and_limit(served):
    events = served.get("/api/v1/events").json()["events"]
    assert [(e["machine_id"], e["from_state"], e["to_state"]) for e in events] == [
        ("m-ood", "ok", "alarm"), ("m-hdf", "ok", "alarm")]  # m-ood's readings are half a second later
    assert events[0]["ts"] > events[1]["ts"] and events[0]["synced"] is False
    assert events[1]["mode_risk"]["HDF"] > 0.5 and events[1]["reading"]["rotational_speed"] == 1250.0

    assert served.get("/api/v1/events?limit=1").json()["events"] == events[:1]
    assert served.get("/api/v1/events", params={"machine_id": "m-hdf"}).json()["events"] == events[1:]
    later = served.get("/api/v1/events", params={"since": events[0]["ts"]}).json()["events"]
    assert later == events[:1]  # since is inclusive
    epoch = served.fed_at + 10
    assert served.get(f"/api/v1/events?since={epoch}").json()["events"] == []
    naive = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(served.fed_at - 200))  # no offset: UTC
    assert served.get(f"/api/v1/events?since={naive}").json()["events"] == events


def test_events_say_which_central_has_and_ignore_summaries(tmp_path):
    with serving(tmp_path) as running:
        feed(running.agent)
        store = running.agent.store
        summaries = store.outbox("summary", pending=False)
        [heat] = [r for r in store.outbox("event") if r.machine_id == "m-hdf"]
        store.mark_synced([heat.record_id, *(r.record_id for r in summaries)])
        events = running.get("/api/v1/events").json()["events"]
        assert [(e["machine_id"], e["synced"]) for e in events] == [("m-ood", False), ("m-hdf", True)]
        assert running.get("/api/v1/machines/m-hdf").json()["events"][0]["synced"] is True


@pytest.mark.parametrize("query,field", [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=many", "limit"),
                                         ("since=yesterday", "since"), ("since=2026-13-45T00:00:00Z", "since")])
def test_bad_event_queries_are_422_json_errors(served, query, field):
    error = error_of(served.get(f"/api/v1/events?{query}"), 422, "invalid_request")
    assert error["details"][0]["loc"] == ["query", field] and field in error["message"]


def test_unknown_routes_and_methods_are_json_errors(served):
    error_of(served.get("/api/v2/nothing"), 404, "not_found")
    error_of(served.get("/api/v1/status", method="POST"), 405, "method_not_allowed")


def test_an_internal_error_is_a_json_500_with_the_headers(served, monkeypatch, caplog):
    def broken() -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr(served.agent.store, "counters", broken)
    response = served.get("/api/v1/status")
    error = error_of(response, 500, "internal")
    assert "boom" not in error["message"]  # details go to the log, not to the client
    assert all(response.headers[name] == value for name, value in SECURITY.items())
    assert "boom" in caplog.text
    metrics = families(served.get("/metrics").text)  # the scrape survives, and says a part failed
    assert value(metrics, "pdm_status_scrape_errors") == 1
    assert value(metrics, "pdm_machine_health", machine="m-ok") > 70


# --- the page -------------------------------------------------------------------------------------------------------

def test_page_is_self_contained_and_allowed_by_its_csp(served):
    response = served.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert re.findall(r"https?://", html) == []  # no other host: no CDN, no fonts, works offline
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*stylesheet|@import|url\(", html)
    assert 'href="data:,"' in html  # the icon, so the browser asks no /favicon.ico
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    for tag in ("script", "style"):
        [block] = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp  # the browser runs exactly this inline code
    assert "setInterval(refresh" in html and "fetch(" in html  # refreshes itself without reloading
    for route in ("api/v1/status", "api/v1/machines"):
        assert route in html


# --- headers, auth, CORS --------------------------------------------------------------------------------------------

PATHS = ["/healthz", "/readyz", "/api/v1/status", "/api/v1/machines", "/api/v1/machines/m-ok",
         "/api/v1/machines/nope", "/api/v1/events", "/api/v1/events?limit=0", "/metrics", "/api/v1/openapi.json",
         "/", "/nope"]


@pytest.mark.parametrize("path", PATHS)
def test_security_headers_on_every_response(served, path):
    response = served.get(path, headers={"Origin": "https://elsewhere.example"})
    for name, expected in SECURITY.items():
        assert response.headers.get(name) == expected, (name, response.headers)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert "access-control-allow-origin" not in response.headers  # no CORS unless configured
    assert "server" not in response.headers


def test_without_a_token_only_loopback_host_names_are_answered(served):
    assert served.get("/api/v1/status", headers={"Host": f"localhost:{served.server.port}"}).status_code == 200
    error = error_of(served.get("/api/v1/status", headers={"Host": "rebound.example"}), 400, "bad_host")
    assert "status.token" in error["message"]


@pytest.mark.parametrize("path", ["/readyz", "/api/v1/status", "/api/v1/machines", "/api/v1/machines/m-ok",
                                  "/api/v1/events", "/metrics", "/api/v1/openapi.json", "/nope"])
def test_with_a_token_every_endpoint_needs_it(with_token, path):
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-the-same-sort"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}):
        response = with_token.get(path, headers=headers)
        error_of(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["x-frame-options"] == "DENY"
    assert with_token.get(path, token=TOKEN).status_code == (404 if path == "/nope" else 200)


def test_with_a_token_healthz_and_the_empty_page_stay_open(with_token):
    assert with_token.get("/healthz").json()["status"] == "ok"
    page = with_token.get("/")
    assert page.status_code == 200 and "gw-status-test" not in page.text and "m-hdf" not in page.text
    # any host name: the token protects the data
    assert with_token.get("/api/v1/status", token=TOKEN, headers={"Host": "gateway-7.plant"}).status_code == 200


def test_cors_only_for_configured_origins(with_token, served):
    allowed = with_token.get("/api/v1/status", token=TOKEN, headers={"Origin": "https://ops.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ops.example"
    other = with_token.get("/api/v1/status", token=TOKEN, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers

    preflight = {"Origin": "https://ops.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    answer = with_token.get("/api/v1/status", method="OPTIONS", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://ops.example"
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert answer.headers["x-content-type-options"] == "nosniff"
    error_of(served.get("/api/v1/status", method="OPTIONS", headers=preflight), 405, "method_not_allowed")


# --- metrics, OpenAPI -----------------------------------------------------------------------------------------------

def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(metrics: dict, family: str, sample: str | None = None, **labels: str) -> float:
    found = [s.value for s in metrics[family].samples
             if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, metrics[family].samples)
    return found[0]


def test_the_readme_names_every_metric_as_exported(served, polling):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The status page and API", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(pdm_\w+)`", section))
    exported: dict[str, set[str]] = {}
    for agent in (served, polling):
        for f in families(agent.get("/metrics").text).values():
            if f.name.startswith("pdm_") and not f.name.endswith("_created"):  # creation times of series
                exported.setdefault(f.name, set()).update(s.name for s in f.samples)
    names = {name for family, samples in exported.items() for name in (family, *samples)}
    assert documented <= names, documented - names
    assert {f for f, samples in exported.items() if not documented & {f, *samples}} == set()


def test_metrics_read_the_agents_state(served):
    response = served.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    metrics = families(response.text)
    model = served.agent.pipeline.scorer.model
    assert value(metrics, "pdm_readings", outcome="accepted") == 30
    assert value(metrics, "pdm_readings", outcome="rejected", reason="malformed") == 1
    assert metrics["pdm_readings"].type == "counter"
    assert value(metrics, "pdm_model_info", sha256=model.sha256, version=model.version) == 1
    assert value(metrics, "pdm_agent_info", gateway_id="gw-status-test", version=__version__) == 1
    assert value(metrics, "pdm_pipeline_queue_depth") == 0
    assert value(metrics, "pdm_pipeline_queue_capacity") == 10_000
    assert value(metrics, "pdm_database_used_bytes") > 0
    assert value(metrics, "pdm_outbox_pending") >= 2
    assert 0 <= value(metrics, "pdm_outbox_oldest_pending_age_seconds") < 600
    assert value(metrics, "pdm_database_up") == 1
    assert value(metrics, "pdm_sync_enabled") == 0 and value(metrics, "pdm_sync_last_success_timestamp_seconds") == 0
    assert value(metrics, "pdm_driver_up", driver="mqtt") == 1
    assert value(metrics, "pdm_driver_errors", driver="mqtt", kind="connection_failures") == 0
    assert value(metrics, "pdm_machine_alarm_level", machine="m-hdf") == 2
    assert value(metrics, "pdm_machine_alarm_level", machine="m-ok") == 0
    assert value(metrics, "pdm_machine_mode_risk", machine="m-hdf", mode="HDF") > 0.5
    assert value(metrics, "pdm_machine_ood_inputs", machine="m-ood") == 1
    assert value(metrics, "pdm_status_scrape_errors") == 0
    assert value(metrics, "pdm_machine_readings", machine="m-hdf", outcome="accepted") == 10
    assert value(metrics, "pdm_machine_readings", machine="unknown", outcome="rejected") == 1  # the garbage
    batches = value(metrics, "pdm_pipeline_batches")
    assert value(metrics, "pdm_pipeline_batch_size", sample="pdm_pipeline_batch_size_count") == batches
    assert value(metrics, "pdm_pipeline_batch_size", sample="pdm_pipeline_batch_size_sum") == 31
    assert value(metrics, "pdm_sync_rounds", result="synced") == 0
    assert "process_resident_memory_bytes" in metrics  # the process collector, on Linux


def test_metrics_count_each_devices_polls_and_the_readings_of_each_machine(polling):
    def polls(device: str) -> float:
        return value(families(polling.get("/metrics").text), "pdm_driver_polls", driver="modbus", device=device)

    wait_for(lambda: polls("m1") >= 5 and polls("m2") >= 5, "five polls of each device")
    metrics = families(polling.get("/metrics").text)
    assert value(metrics, "pdm_driver_poll_skips", driver="modbus", device="m1") == 0  # a quick device, never late
    assert value(metrics, "pdm_driver_device_up", driver="modbus", device="m2") == 1
    assert value(metrics, "pdm_machine_readings", machine="m1", outcome="accepted") >= 4  # the 5th may be in flight
    assert value(metrics, "pdm_pipeline_batch_size", sample="pdm_pipeline_batch_size_sum") \
        == sum(value(metrics, "pdm_machine_readings", machine=m, outcome="accepted") for m in ("m1", "m2"))


def test_a_device_that_answers_but_yields_no_reading_is_down_and_named_in_the_error_metrics(tmp_path):
    """m2's unit id has no register mapped: it answers IllegalAddress to every poll. Readiness is the agent's own
    (model, store, pipeline): a device down does not make it unready."""
    with ModbusServers() as servers:
        port = servers.tcp({1: healthy_unit(), 2: ModbusUnit()})
        with serving(tmp_path, tables=modbus_devices(port, 2, 0.1)) as polling:
            def metric(family: str, **labels: str) -> float:
                return value(families(polling.get("/metrics").text), family, driver="modbus", **labels)

            wait_for(lambda: metric("pdm_driver_device_up", device="m2") == 0, "m2 down")
            wait_for(lambda: metric("pdm_driver_errors", device="m2", kind="failed_polls") >= 3, "3 failed polls")
            assert metric("pdm_driver_device_up", device="m1") == 1
            assert metric("pdm_driver_errors", device="m1", kind="failed_polls") == 0
            assert metric("pdm_driver_up") == 0
            (modbus,) = polling.get("/api/v1/status").json()["drivers"]
            assert modbus["connected"] is False
            assert "exception 2 (IllegalAddress)" in modbus["last_error"]
            assert polling.get("/readyz").status_code == 200


def test_metrics_export_the_pipelines_scoring_histogram_when_it_has_one(served, monkeypatch):
    histogram = Histogram("pdm_scoring_seconds", "Scoring one batch.", registry=None)
    histogram.observe(0.004)
    monkeypatch.setattr(served.agent.pipeline, "score_seconds", histogram, raising=False)
    metrics = families(served.get("/metrics").text)
    assert value(metrics, "pdm_scoring_seconds", sample="pdm_scoring_seconds_count") == 1


def test_openapi_document_lists_every_route(served):
    document = served.get("/api/v1/openapi.json").json()
    assert document["info"]["version"] == __version__
    assert set(document["paths"]) >= {"/healthz", "/readyz", "/api/v1/status", "/api/v1/machines",
                                      "/api/v1/machines/{machine_id}", "/api/v1/events", "/metrics"}
    assert "ErrorResponse" in document["components"]["schemas"]
    assert served.get("/docs").status_code == 404  # Swagger UI would load assets from a CDN


# --- the server -----------------------------------------------------------------------------------------------------

def test_server_start_stop_is_idempotent_and_frees_the_port(tmp_path):
    agent = make_agent(tmp_path)
    server = StatusServer(agent, port=0)
    server.stop()  # before start: nothing to do
    server.start()
    url = server.url
    with requests.Session() as session:  # a keep-alive connection does not hold the stop up
        assert session.get(url + "/healthz", timeout=5).status_code == 200
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 5
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=5)


def test_server_start_fails_when_the_port_is_taken(tmp_path):
    agent = make_agent(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = StatusServer(agent, port=taken.getsockname()[1])
        with pytest.raises(OSError, match="status API cannot listen on 127.0.0.1:.*set status.bind"):
            server.start()
        server.stop()
