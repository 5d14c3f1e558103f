"""The container engine of the deployment tests: podman (with runc), images made from Debian's packages, a cache of
wheels, and containers that are always removed.

Levels (PDM_DEPLOY_TESTS):
- unset or "default": the systemd tests (the agent and central under a real systemd in a container, the .deb);
- "full": also the images, the agent container, the Compose stack and arm64 (scripts/deploy-tests.sh);
- "off": none of them.
When podman cannot run a container here, every test that needs it is skipped with the reason.

Caches live outside the repository (PDM_CACHE, default ~/.cache/pdm-edge) so that a fresh clone on the same machine
reuses them: the debootstrapped root file systems (scripts/debian-rootfs.sh) and the wheels of the dependencies.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LEVEL_ENV = "PDM_DEPLOY_TESTS"
SYSTEMD_IMAGE = "localhost/pdm-test-systemd:bookworm"
PYTHON_IMAGE = "localhost/pdm-test-python:bookworm"
LABEL = "pdm-edge-tests"  # every container the tests start carries it (podman ps --filter label=...)


def level() -> str:
    return os.environ.get(LEVEL_ENV, "default").strip().lower() or "default"


def cache_dir() -> Path:
    base = os.environ.get("PDM_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                              / "pdm-edge")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sh(*args: str | os.PathLike[str], check: bool = True, timeout: float = 900,
       **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured as text; on an unexpected exit code fail showing both outputs."""
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=timeout,
                            **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


@functools.cache
def engine_problem() -> str | None:
    """Why containers cannot run here, or None."""
    if level() == "off":
        return f"{LEVEL_ENV}=off"
    if sys.platform != "linux":
        return "the deployment tests need Linux"
    if os.geteuid() != 0:
        return "the deployment tests need root (debootstrap, systemd in a container)"
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/deploy-tools.sh installs it from Debian's packages)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (scripts/deploy-tools.sh installs it from Debian's packages)"
    probe = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                           text=True, check=False, timeout=120)
    if probe.returncode != 0:
        return f"podman does not work here: {probe.stderr.strip()[-300:]}"
    return None


def need_engine() -> None:
    problem = engine_problem()
    if problem is not None:
        pytest.skip(problem)


def need_full() -> None:
    need_engine()
    if level() != "full":
        pytest.skip(f"slow deployment test (image builds, Compose, arm64): {LEVEL_ENV}=full or scripts/deploy-tests.sh")


def rootfs_image(flavour: str) -> str:
    """The image made from the cached Debian root file system (built once: minutes cold, nothing warm)."""
    name = SYSTEMD_IMAGE if flavour == "systemd" else PYTHON_IMAGE
    return sh("bash", REPO / "scripts/debian-rootfs.sh", flavour, "--image", name, timeout=1800).stdout.strip()


def rootfs_tarball(flavour: str, arch: str) -> Path:
    return Path(sh("bash", REPO / "scripts/debian-rootfs.sh", flavour, arch, timeout=1800).stdout.strip())


AARCH64 = tuple(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)) + ("manylinux2014_aarch64",)


def wheelhouse(project_wheel: Path, extras: str = "", arch: str = "amd64") -> Path:
    """Wheels of every dependency of the project (with extras), cached outside the repository: what install.sh, the
    .deb and the arm64 install take with --no-index. arch "arm64": the aarch64 wheels of Debian 12 (glibc 2.36)."""
    out = cache_dir() / "wheels" / arch
    out.mkdir(parents=True, exist_ok=True)
    spec = f"{project_wheel}[{extras}]" if extras else str(project_wheel)
    args: list[str | os.PathLike[str]] = [sys.executable, "-m", "pip", "download", "--quiet",
                                          "--disable-pip-version-check", "--dest", out, "--find-links", out, spec]
    if arch == "arm64":
        args[4:4] = ["--only-binary=:all:", *(f"--platform={tag}" for tag in AARCH64), "--python-version", "3.11",
                     "--implementation", "cp", "--abi", "cp311"]
    # offline first: a warm cache answers without asking the index (seconds saved in every run)
    if subprocess.run([str(a) for a in [*args[:4], "--no-index", *args[4:]]], capture_output=True, check=False,
                      timeout=600).returncode != 0:
        sh(*args, timeout=1800)
    for stale in out.glob("pdm_edge-*"):  # the project's own wheel comes from the test, not from the cache
        stale.unlink()
    return out


def _name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Container:
    """A running container; exec runs commands inside it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def exec(self, *args: str, check: bool = True, timeout: float = 600, user: str | None = None,
             env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd: list[str] = ["podman", "exec"]
        if stdin is not None:
            cmd.append("-i")
        if user is not None:
            cmd += ["--user", user]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        return sh(*cmd, self.name, *args, check=check, timeout=timeout, input=stdin)

    def sh(self, script: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.exec("bash", "-euo", "pipefail", "-c", script, check=check, timeout=timeout)

    def copy_in(self, source: Path, dest: str) -> None:
        sh("podman", "cp", source, f"{self.name}:{dest}")

    def inspect(self, template: str) -> str:
        return sh("podman", "inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = sh("podman", "logs", self.name, check=False)
        return result.stdout + result.stderr


def remove(name: str) -> None:
    subprocess.run(["podman", "rm", "--force", "--time", "5", name], capture_output=True, check=False, timeout=120)


@contextmanager
def container(image: str, *args: str, prefix: str = "pdm-test", command: tuple[str, ...] = ()) -> Iterator[Container]:
    """`podman run -d` of image; the container is removed however the block ends."""
    name = _name(prefix)
    try:
        sh("podman", "run", "-d", "--name", name, "--label", LABEL, *args, image, *command, timeout=300)
        yield Container(name)
    finally:
        remove(name)


def wait_for(what: str, check: object, timeout: float = 120, interval: float = 0.5) -> object:
    """Poll check() until it returns something true; fail after timeout with what was awaited."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()  # type: ignore[operator]
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
