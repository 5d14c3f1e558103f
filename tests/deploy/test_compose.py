"""central/deploy/compose.yaml brought up with podman-compose: PostgreSQL, the one-shot migrate, central under gunicorn
(two instances), nginx terminating TLS. Where the official postgres and nginx images cannot be pulled (no image
registry here), stand-ins built from Debian's packages (deploy/standins/, whose README says which parts of the
official images' contract they cover) are named by a Compose override file, which also publishes nginx on loopback
ports of its own instead of 80 and 443. Then an agent (a process on this machine) syncs through nginx over TLS;
the dashboard answers through nginx; restarting central loses nothing; the secrets are files. Full level.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import engine

pytestmark = pytest.mark.timeout(2400)
STANDINS = {"postgres": "localhost/pdm-standin-postgres:15", "nginx": "localhost/pdm-standin-nginx:1.22"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compose_tool() -> list[str]:
    """podman-compose >= 1.1 (depends_on conditions, replicas); Debian 12's 1.0.3 has neither: from PyPI into a
    virtual environment in the cache."""
    tools = engine.cache_dir() / "tools"
    exe = tools / "bin/podman-compose"
    if not exe.exists():
        engine.sh("/usr/bin/python3", "-m", "venv", tools)
        engine.sh(tools / "bin/pip", "install", "--quiet", "podman-compose==1.6.0")
    return [str(exe)]


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = engine.sh("bash", engine.REPO / "scripts/debian-rootfs.sh", "python", "--image",
                     "localhost/pdm-python:3.11-bookworm", timeout=1800).stdout.strip()
    for name, tag in STANDINS.items():
        engine.sh("podman", "build", "--quiet", "--build-arg", f"BASE={base}", "-t", tag,
                  engine.REPO / "deploy/standins" / name, timeout=1200)
    tmp = tmp_path_factory.mktemp("compose")
    deploy = tmp / "deploy"
    shutil.copytree(engine.REPO / "central/deploy", deploy)
    secrets, certs = deploy / "secrets", deploy / "certs"
    secrets.mkdir()
    certs.mkdir()
    password, ops = os.urandom(24).hex(), os.urandom(32).hex()
    (secrets / "postgres_password").write_text(password + "\n")
    (secrets / "database_url").write_text(f"postgresql://pdm_central:{password}@db:5432/pdm_central\n")
    (secrets / "ops_token").write_text(ops + "\n")
    os.chown(secrets / "postgres_password", 999, 999)
    for name in ("database_url", "ops_token"):
        os.chown(secrets / name, 10001, 10001)
    for path in secrets.iterdir():
        path.chmod(0o400)
    engine.sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
              "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", certs / "privkey.pem",
              "-out", certs / "fullchain.pem")
    https, http = free_port(), free_port()
    (deploy / "compose.test.yaml").write_text(f"""# the deployment tests' override: stand-in images, loopback ports
services:
  db:
    image: {STANDINS['postgres']}
  nginx:
    image: {STANDINS['nginx']}
    ports: !override
      - "127.0.0.1:{http}:80"
      - "127.0.0.1:{https}:443"
""")
    project = f"pdm-test-compose-{os.getpid()}"
    env = {**os.environ, "PDM_CENTRAL_IMAGE": images["pdm-central"]}
    compose = [*compose_tool(), "--project-name", project, "-f", str(deploy / "compose.yaml"),
               "-f", str(deploy / "compose.test.yaml")]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return engine.sh(*compose, *args, check=check, cwd=deploy, env=env, timeout=900)

    def healthy(service: str) -> bool:
        names = engine.sh("podman", "ps", "--format", "{{.Names}}", "--filter",
                          f"label=io.podman.compose.project={project}", "--filter",
                          f"label=io.podman.compose.service={service}").stdout.split()
        return bool(names) and all(engine.sh("podman", "healthcheck", "run", name, check=False).returncode == 0
                                   for name in names)

    try:
        started = time.monotonic()
        # podman 4.3 has no "healthy" dependency conditions (podman-compose says so and ignores them): the start
        # order compose.yaml asks for (db healthy -> migrate exited 0 -> central healthy -> nginx), done step by step
        run("up", "-d", "--no-deps", "db")
        engine.wait_for("db healthy", lambda: healthy("db"), timeout=180)
        run("up", "--no-deps", "--abort-on-container-exit", "migrate")
        status = engine.sh("podman", "ps", "-a", "--format", "{{.Names}} {{.ExitCode}}", "--filter",
                           f"label=io.podman.compose.project={project}", "--filter",
                           "label=io.podman.compose.service=migrate").stdout.split()
        assert status[-1] == "0", status
        run("up", "-d", "--no-deps", "central")
        engine.wait_for("central healthy", lambda: healthy("central"), timeout=180)
        run("up", "-d", "--no-deps", "nginx")
        info = {"run": run, "https": https, "http": http, "ops": ops, "ca": certs / "fullchain.pem",
                "project": project, "tmp": tmp}
        engine.wait_for("/readyz through nginx", lambda: get(info, "/readyz")[0] == 200, timeout=300)
        print(f"\ncompose up to ready through nginx: {time.monotonic() - started:.1f} s")
        yield info
    finally:
        logs = run("logs", check=False)
        (tmp / "compose.log").write_text(logs.stdout + logs.stderr)
        run("down", "--volumes", "--timeout", "10", check=False)
        left = engine.sh("podman", "ps", "-aq", "--filter", f"label=io.podman.compose.project={project}",
                         check=False).stdout.split()
        for name in left:
            engine.remove(name)


def get(info: dict[str, object], path: str, token: str | None = None,
        https: bool = True) -> tuple[int, dict[str, str], str]:
    context = ssl.create_default_context(cafile=str(info["ca"]))
    url = f"https://localhost:{info['https']}{path}" if https else f"http://127.0.0.1:{info['http']}{path}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()
    except OSError:
        return 0, {}, ""


def test_the_stack_answers_through_nginx_over_tls(stack: dict[str, object]) -> None:
    status, headers, body = get(stack, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert "max-age" in headers.get("Strict-Transport-Security", "")
    assert get(stack, "/", https=False)[0] == 308  # plain http is redirected
    assert get(stack, "/api/v1/fleet")[0] == 401
    assert get(stack, "/api/v1/fleet", str(stack["ops"]))[0] == 200
    login = get(stack, "/login")
    assert login[0] == 200 and "<form" in login[2]  # the dashboard's sign-in page, through nginx


def test_the_secrets_are_files_not_environment_values(stack: dict[str, object]) -> None:
    project = str(stack["project"])
    names = engine.sh("podman", "ps", "--format", "{{.Names}}", "--filter",
                      f"label=io.podman.compose.project={project}").stdout.split()
    centrals = [n for n in names if "_central_" in n]
    assert len(centrals) == 2, names  # deploy.replicas
    for name in [*centrals, next(n for n in names if "_db_" in n)]:
        env = engine.sh("podman", "inspect", "--format", "{{json .Config.Env}}", name).stdout
        assert "postgresql://" not in env and str(stack["ops"]) not in env, env
    assert engine.sh("podman", "exec", centrals[0], "cat", "/run/secrets/ops_token").stdout.strip() == stack["ops"]
    assert engine.sh("podman", "exec", centrals[0], "id", "-u").stdout.strip() == "10001"


def test_an_agent_syncs_through_nginx_and_a_central_restart_loses_nothing(stack: dict[str, object],
                                                                          tmp_path: Path) -> None:
    run = stack["run"]
    token = run("run", "--rm", "-T", "central", "pdm-central", "add-gateway", "gw-compose-1").stdout  # type: ignore[operator]
    token = token.strip().splitlines()[-1]
    (tmp_path / "token").write_text(token + "\n")
    config = (engine.REPO / "examples/simulator-modbus.toml").read_text()
    port = free_port()
    config = config.replace('gateway_id = "simulator"', 'gateway_id = "gw-compose-1"').replace(
        'data_dir = "/tmp/pdm-edge-simulator"', f'data_dir = "{tmp_path / "data"}"').replace(
        "port = 5020", f"port = {port}").replace('bind = "127.0.0.1:8080"', f'bind = "127.0.0.1:{free_port()}"')
    config += (f'\n[central]\nurl = "https://localhost:{stack["https"]}"\nca_file = "{stack["ca"]}"\n'
               "sync_interval_s = 2\n\n[central.on_change]\nenabled = false\n"  # new summaries every window
               "\n[summary]\nwindow_s = 5\ngrace_s = 1\n")
    (tmp_path / "agent.toml").write_text(config)
    pdm_edge = str(Path(sys.executable).parent / "pdm-edge")
    env = {**os.environ, "PDM_CENTRAL__TOKEN_FILE": str(tmp_path / "token")}
    plant = subprocess.Popen([pdm_edge, "simulate", "modbus", "--machines", "5", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = subprocess.Popen([pdm_edge, "run", "--config", str(tmp_path / "agent.toml")], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "w"))  # noqa: SIM115
    try:
        def at_central() -> int:
            status, _, body = get(stack, "/api/v1/machines?gateway=gw-compose-1", str(stack["ops"]))
            if status != 200:
                return 0
            data = json.loads(body)
            items = data if isinstance(data, list) else data.get("machines", data.get("items", []))
            return len(items)

        engine.wait_for("the agent's machines at central, through nginx", lambda: at_central() >= 2, timeout=180)
        summaries_before = summary_count(stack)
        assert summaries_before > 0
        project = str(stack["project"])
        centrals = engine.sh("podman", "ps", "--format", "{{.Names}}", "--filter",
                             f"label=io.podman.compose.project={project}").stdout.split()
        for name in [n for n in centrals if "_central_" in n]:
            engine.sh("podman", "restart", "--time", "40", name)
        engine.wait_for("/readyz after restarting central", lambda: get(stack, "/readyz")[0] == 200, timeout=180)
        assert summary_count(stack) >= summaries_before  # in PostgreSQL's volume, not in the containers
        engine.wait_for("new summaries after the restart", lambda: summary_count(stack) > summaries_before,
                        timeout=180)
    finally:
        for process in (agent, plant):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]


def summary_count(stack: dict[str, object]) -> int:
    project = str(stack["project"])
    db = next(n for n in engine.sh("podman", "ps", "--format", "{{.Names}}", "--filter",
                                   f"label=io.podman.compose.project={project}").stdout.split() if "_db_" in n)
    out = engine.sh("podman", "exec", db, "psql", "-U", "pdm_central", "-d", "pdm_central", "-Atc",
                    "SELECT count(*) FROM summaries s JOIN gateways g ON g.id = s.gateway_id "
                    "WHERE g.name = 'gw-compose-1'")
    return int(out.stdout.strip())
