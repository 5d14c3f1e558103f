"""What the Dockerfile tests need without a Docker engine: the file parsed into stages, the build context that
.dockerignore lets through, the build stage replayed in a temporary folder, and a stand-in for the HEALTHCHECK's
target."""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.conftest import REPO

CONTEXT_LITTER = ("__pycache__", "*.py[cod]", "*.db*", ".env", "secrets", "certs", "*.pem", "*.key")


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def stages(dockerfile: Path) -> list[Stage]:
    """The Dockerfile's stages, each with its instructions (continuation lines joined, comments dropped)."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
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


def dockerignore_rules() -> list[str]:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def allowed_context() -> list[str]:
    """The paths .dockerignore lets into the build context: it is an allow-list (`*`, then `!path` lines)."""
    rules = dockerignore_rules()
    assert rules[0] == "*", ".dockerignore should start by excluding everything"
    return [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]


def copy_context(build: Stage, context: Path) -> None:
    """What the build stage COPYs, from the repository into `context` (without caches, databases or secrets)."""
    for args in build.all("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns(*CONTEXT_LITTER),
                                dirs_exist_ok=True)
            else:
                (context / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, context / source)


def replay_build(build: Stage, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """Run the build stage as written with /opt/venv and /src moved into tmp_path, in this environment without its
    PDM_ settings; pip's cache is allowed (it changes how fast, not what is installed). Returns the venv, the
    source folder and the build's final environment."""
    context = tmp_path / "context"
    copy_context(build, context)
    venv, work, bin_dir = tmp_path / "opt-venv", tmp_path / "src", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)  # the image's `python`
    env = {name: value for name, value in os.environ.items() if not name.startswith("PDM_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
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
            result = subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=False, capture_output=True,
                                    text=True, timeout=900)
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
    return venv, work, env


def healthcheck_argv(healthcheck: str | list[str], port: int) -> list[str]:
    """The HEALTHCHECK (Dockerfile text, or compose's ["CMD", ...] list) pointed at 127.0.0.1:`port`."""
    argv = json.loads(healthcheck.split(" CMD ", 1)[1]) if isinstance(healthcheck, str) else list(healthcheck[1:])
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:-1],
            argv[-1].replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")]


@contextmanager
def healthz_server() -> Iterator[int]:
    """An HTTP server on a free loopback port answering 200 on /healthz; yields its port."""
    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def probe(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, timeout=30)
