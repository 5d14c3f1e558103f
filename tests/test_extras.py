"""The commands in a plain gateway install (no extra: what ./scripts/demo.sh makes): a command that needs an extra
says which one and how to install it, in one line, exit code 2; `pdm-central --help` works without psycopg.

A real virtual environment with the gateway install only (pip, from its cache: 25-35 s)."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from model.data import TARGETS, TYPE_COLUMN
from model.features import INPUTS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gateway_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("gateway") / "venv"
    venv.create(env, with_pip=False)  # this pip installs into it: no ensurepip, a few seconds less
    install = subprocess.run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "-q",
                              "--disable-pip-version-check", "-e", REPO],
                             check=False, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    missing = subprocess.run([env / "bin" / "python", "-c", "import psycopg"], check=False, capture_output=True)
    assert missing.returncode != 0, "the gateway install brought psycopg: pyproject's dependencies changed"
    return env / "bin"


@pytest.fixture(scope="module")
def made_up_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV with the AI4I 2020 columns and invented values: enough to get past reading the data."""
    header = [TYPE_COLUMN, *(i.source_column for i in INPUTS), *TARGETS.values()]
    rows = [["M", *("1" for _ in INPUTS), *(str(n % 2) for _ in TARGETS)] for n in range(20)]
    path = tmp_path_factory.mktemp("data") / "made-up.csv"
    path.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")
    return path


def run(bin_dir: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([bin_dir / args[0], *args[1:]], check=False, capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_central_help_needs_no_psycopg(gateway_bin: Path, tmp_path: Path) -> None:
    result = run(gateway_bin, "pdm-central", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "migrate" in result.stdout and "list-gateways" in result.stdout


@pytest.mark.parametrize(("command", "extra", "module"), [
    (("pdm-central", "migrate"), "central", "psycopg"),
    (("pdm-central", "list-gateways"), "central", "psycopg"),
    (("pdm-edge", "train", "--data", "{csv}", "--out", "{tmp}/package"), "train", "onnx"),
    (("pdm-edge", "model", "evaluate", "--data", "{csv}"), "train", "sklearn"),
])
def test_a_missing_extra_is_named_with_how_to_install_it(gateway_bin: Path, made_up_csv: Path, tmp_path: Path,
                                                         command: tuple[str, ...], extra: str, module: str) -> None:
    result = run(gateway_bin, *(word.format(csv=made_up_csv, tmp=tmp_path) for word in command), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    name = " ".join(word for word in command if not word.startswith(("-", "{")))
    assert "Traceback" not in result.stderr
    assert re.fullmatch(  # the last line: `model evaluate` may note first that the CSV is not the evaluated one
        rf"{name} needs the {extra} extra, which is not installed \({module} is missing\): "
        rf"{re.escape(str(gateway_bin))}/python[0-9.]* -m pip install 'pdm-edge\[{extra}\]'",
        result.stderr.splitlines()[-1]), result.stderr


def test_a_module_no_extra_provides_is_not_blamed_on_an_extra() -> None:
    from web.extras import missing_extra

    with pytest.raises(ModuleNotFoundError):
        missing_extra("pdm-edge run", ModuleNotFoundError("No module named 'paho'", name="paho"))
    assert sys.modules["web.extras"].extra_for(ModuleNotFoundError(name="sklearn.metrics")) == "train"
