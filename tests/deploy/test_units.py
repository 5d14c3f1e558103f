"""The systemd units: `systemd-analyze verify` is clean, `systemd-analyze security --offline=true` rates each 2.0 or
less (the figure is printed), and what the units promise matches the code they start (credential names, paths,
stop timeout, settings)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.deploy.conftest import PROGRAMS, SYSTEMD, UNITS, exposure, minimal_root, verify

MAX_EXPOSURE = 2.0


def directives(unit: str) -> dict[str, list[str]]:
    """The unit's settings: key -> every value, in order (systemd allows a key more than once)."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units installed under a minimal root, each with a stand-in for its program."""
    root = minimal_root(tmp_path_factory.mktemp("root"))
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD / unit, units / unit)
        program = root / PROGRAMS[unit]
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_verify_is_clean(systemd_analyze: str, root: Path, unit: str) -> None:
    result = verify(systemd_analyze, root, unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure(systemd_analyze: str, root: Path, unit: str, capsys: pytest.CaptureFixture) -> None:
    level, report = exposure(systemd_analyze, root, unit)
    with capsys.disabled():
        print(f"\n{unit}: systemd-analyze security --offline=true: overall exposure {level}")
    assert level <= MAX_EXPOSURE, report


def test_agent_unit_matches_the_agent() -> None:
    from agent.config import DEFAULT_CONFIG_FILE
    from agent.secrets import SECRET_KEYS, dotted
    from agent.service import STOP_TIMEOUT_S

    unit = directives("pdm-edge.service")
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"/opt/pdm-edge/venv/bin/pdm-edge run --config {DEFAULT_CONFIG_FILE}"]
    assert seconds(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["always"]
    # SIGTERM: the agent may take STOP_TIMEOUT_S to commit what is queued; systemd must not SIGKILL it before.
    assert seconds(unit["TimeoutStopSec"][0]) > STOP_TIMEOUT_S
    assert unit["User"] == ["pdm-edge"] and unit["SupplementaryGroups"] == ["dialout"]
    assert unit["StateDirectory"] == ["pdm-edge"] and unit["ConfigurationDirectory"] == ["pdm-edge"]
    assert unit["ReadOnlyPaths"] == ["/etc/pdm-edge"]
    assert {"MemoryMax", "TasksMax"} <= unit.keys()
    # Each credential the agent reads, under the name it reads, from a pdm-edge.* file of the credential store.
    credentials = dict(value.split(":") for value in unit["LoadCredential"])
    assert credentials == {dotted(key): f"pdm-edge.{dotted(key)}" for key in SECRET_KEYS}


def test_central_unit_matches_central() -> None:
    import importlib.util

    from central.settings import SECRETS, Settings

    unit = directives("pdm-central.service")
    assert unit["Type"] == ["notify"]  # gunicorn's arbiter sends READY=1
    assert unit["ExecStart"] == ["/opt/pdm-central/venv/bin/gunicorn -c python:central.gunicorn_conf"]
    assert importlib.util.find_spec("central.gunicorn_conf") is not None
    # The notifications are delivered by pdm-central-notify.service, which the API starts: its own worker is off.
    assert unit["Environment"] == ["PDM_CENTRAL_MODE=production", "PDM_CENTRAL_NOTIFY_WORKER=off"]
    assert "pdm-central-notify.service" in unit["Wants"]
    assert unit["EnvironmentFile"] == ["/etc/pdm-central/central.env"]
    assert unit["Restart"] == ["always"] and unit["User"] == ["pdm-central"]
    credentials = dict(value.split(":") for value in unit["LoadCredential"])
    assert credentials == {key: f"pdm-central.{key}" for key in SECRETS}
    # The example environment file names only settings central knows (an unknown PDM_CENTRAL_ variable is fatal).
    example = (SYSTEMD / "central.env.example").read_text().splitlines()
    names = {line.lstrip("# ").split("=")[0] for line in example if line.lstrip("# ").startswith("PDM_CENTRAL_")}
    known = {f"PDM_CENTRAL_{field.upper()}" for field in Settings.model_fields if field != "sources"}
    assert names and names <= known, names - known


def test_notifier_unit_matches_central_and_follows_the_api() -> None:
    from central.cli import parser

    unit, api = directives("pdm-central-notify.service"), directives("pdm-central.service")
    assert unit["ExecStart"] == ["/opt/pdm-central/venv/bin/pdm-central notify"]
    assert parser().parse_args(["notify"]).command == "notify"
    assert unit["PartOf"] == ["pdm-central.service"]  # stopped and restarted with the API, which Wants= it
    assert unit["Restart"] == ["always"]  # a notifier that dies is started again; the outbox keeps what it owed
    assert unit["Environment"] == ["PDM_CENTRAL_MODE=production"]  # not NOTIFY_WORKER=off: it is the worker
    for same in ("EnvironmentFile", "User", "Group", "WorkingDirectory", "ConfigurationDirectory", "ReadOnlyPaths"):
        assert unit[same] == api[same], same
    credentials = dict(value.split(":") for value in unit["LoadCredential"])
    assert credentials == {"database_url": "pdm-central.database_url"}  # no ops token: it serves nothing


def test_backoff_drop_in_is_for_new_systemd_only() -> None:
    # RestartSteps= and RestartMaxDelaySec= exist from systemd 254 on: not in the units, which must verify cleanly
    # on Debian 12's 252; install.sh adds the drop-in where they are known (tests/deploy/test_install.py).
    text = (SYSTEMD / "backoff.conf").read_text()
    assert "RestartSteps=" in text and "RestartMaxDelaySec=" in text
    for unit in UNITS:
        assert not {"RestartSteps", "RestartMaxDelaySec"} & directives(unit).keys()
