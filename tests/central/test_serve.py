"""The real servers: `pdm-central serve` (uvicorn) and gunicorn with central/gunicorn_conf.py, over TCP."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time

import pytest
import requests

from central import auth
from testkit import batches
from testkit.central import OPS_TOKEN
from testkit.net import LOCALHOST, free_port
from tests.central.support import GUNICORN, OPS, PDM_CENTRAL, Server, bearer, environment


@pytest.fixture
def registered(central_url, gateways):
    return gateways.add("served")


def exercise(server: Server, name: str, token: str, conn) -> None:
    """What a gateway and an ops tool do, over real HTTP."""
    body = gzip.compress(json.dumps(batches.batch(name)).encode())
    response = requests.post(server.base + "/api/v1/ingest", data=body, timeout=10,
                             headers={**bearer(token), "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == {"summaries": 3, "events": 1}
    assert "server" not in response.headers and response.headers["x-frame-options"] == "DENY"
    refused = requests.post(server.base + "/api/v1/ingest", json=batches.batch(name), timeout=10,
                            headers={**bearer(token + "x")})
    assert refused.status_code == 401
    fleet = requests.get(server.base + "/api/v1/fleet", headers=OPS, timeout=10).json()["gateways"]
    assert next(g for g in fleet if g["name"] == name)["machines"] == 1
    seen = conn.execute("SELECT last_addr FROM gateways WHERE name = %s", [name]).fetchone()[0]
    assert str(seen) == LOCALHOST


def test_pdm_central_serve(central_url, registered, conn, tmp_path):
    name, token = registered
    port = free_port()
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)], environment(central_url), port, tmp_path / "log")
    try:
        server.wait_ready()
        exercise(server, name, token, conn)
    finally:
        code = server.terminate()
    assert code == 0, server.log.read_text()
    log = server.log.read_text()
    assert token not in log and OPS_TOKEN not in log
    [ready] = [record for record in map(json.loads, filter(lambda line: line.startswith("{"), log.splitlines()))
               if record.get("message", "").startswith("pdm-central")]
    assert ready["settings"]["bind"] == f"127.0.0.1:{port}"  # where it listens (--port), not PDM_CENTRAL_BIND's


def test_gunicorn_with_uvicorn_workers(central_url, registered, conn, tmp_path):
    name, token = registered
    port = free_port()
    env = environment(central_url, PDM_CENTRAL_BIND=f"{LOCALHOST}:{port}", PDM_CENTRAL_WORKERS="2",
                      PDM_CENTRAL_POOL_MAX_SIZE="4")
    server = Server([GUNICORN, "-c", "python:central.gunicorn_conf"], env, port, tmp_path / "log")
    try:
        server.wait_ready()
        exercise(server, name, token, conn)
        log = server.log.read_text()
        assert log.count("Booting worker") == 2, log
        assert "2 workers x up to 4 PostgreSQL connections each: at most 8 on the primary" in log
    finally:
        code = server.terminate()
    assert code == 0, server.log.read_text()


def test_gunicorn_workers_log_the_apps_records_as_json_lines(central_url, tmp_path):
    """The app's own records (here: ready to serve, with the effective settings) reach the log under gunicorn as
    under `pdm-central serve`: one JSON object per line, secrets redacted."""
    port = free_port()
    env = environment(central_url, PDM_CENTRAL_BIND=f"{LOCALHOST}:{port}", PDM_CENTRAL_WORKERS="1")
    server = Server([GUNICORN, "-c", "python:central.gunicorn_conf"], env, port, tmp_path / "log")
    try:
        server.wait_ready()
    finally:
        code = server.terminate()
    log = server.log.read_text()
    assert code == 0, log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    [ready] = [r for r in records if r.get("logger") == "central" and r["message"].startswith("pdm-central")]
    assert ready["level"] == "info" and ready["settings"]["ops_token"] == "***" and OPS_TOKEN not in log


@pytest.mark.parametrize("command", ["serve", "gunicorn"])
def test_production_mode_refuses_to_start_with_weak_settings(central_url, tmp_path, command):
    env = environment(central_url, PDM_CENTRAL_MODE="production", PDM_CENTRAL_OPS_TOKEN="changeme",
                      PDM_CENTRAL_CORS_ORIGINS="*", PDM_CENTRAL_BIND=f"{LOCALHOST}:{free_port()}")
    argv = [PDM_CENTRAL, "serve"] if command == "serve" else [GUNICORN, "-c", "python:central.gunicorn_conf"]
    result = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for variable in ("PDM_CENTRAL_OPS_TOKEN", "PDM_CENTRAL_CORS_ORIGINS"):
        assert variable in output, output
    assert "changeme" not in output and "Traceback" not in output


def test_tokens_made_by_the_cli_work_against_the_server(central_url, tmp_path):
    """add-gateway's printed token is what a gateway puts in central.token: nothing else is needed."""
    name = f"gw-cli-serve-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    added = subprocess.run([PDM_CENTRAL, "add-gateway", name], check=False, env=environment(central_url),
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    port = free_port()
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)], environment(central_url), port, tmp_path / "log")
    try:
        server.wait_ready()
        response = requests.post(server.base + "/api/v1/ingest", json=batches.batch(name), timeout=10,
                                 headers=bearer(added.stdout.strip()))
        assert response.status_code == 200, response.text
    finally:
        server.terminate()
    assert auth.TOKEN_PREFIX in added.stdout
