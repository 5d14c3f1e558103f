"""scripts/venv.sh, which every script sources: `ensure_venv EXTRAS` installs the project into .venv only when
pyproject.toml changed since the last install or an extra is asked for that was not installed with it (the install is
editable: code changes need none). Checked on a small project of its own, in a real virtual environment."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PYPROJECT = """[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "venv-script-probe"
version = "{version}"

[project.optional-dependencies]
extra = []

[tool.setuptools]
py-modules = []
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "venv.sh", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(version="1.0"))
    venv.create(tmp_path / ".venv", with_pip=True)
    return tmp_path


def ensure_venv(project: Path, extras: str) -> None:
    subprocess.run(["bash", "-euo", "pipefail", "-c", f'source scripts/venv.sh && ensure_venv "{extras}"'],
                   cwd=project, check=True, capture_output=True, timeout=300)


def installed(project: Path) -> list[str]:
    """The installed versions of the project (its dist-info folders)."""
    found = (project / ".venv").glob("lib/python*/site-packages/venv_script_probe-*.dist-info")
    return [path.name.removesuffix(".dist-info").split("-")[1] for path in found]


def forget_install(project: Path) -> None:
    """Remove the project's metadata: only a new install brings it back."""
    for path in (project / ".venv").glob("lib/python*/site-packages/venv_script_probe-*.dist-info"):
        shutil.rmtree(path)


def test_the_project_is_installed_again_only_when_pyproject_or_the_extras_change(project: Path) -> None:
    ensure_venv(project, "")
    assert installed(project) == ["1.0"]
    forget_install(project)
    ensure_venv(project, "")
    assert installed(project) == [], "installed again though pyproject.toml did not change"

    ensure_venv(project, "extra")
    assert installed(project) == ["1.0"], "an extra not installed yet was not installed"
    forget_install(project)
    ensure_venv(project, "")
    ensure_venv(project, "extra")
    assert installed(project) == [], "installed again though it holds the extras asked for"

    (project / "pyproject.toml").write_text(PYPROJECT.format(version="1.1"))
    ensure_venv(project, "")
    assert installed(project) == ["1.1"]
