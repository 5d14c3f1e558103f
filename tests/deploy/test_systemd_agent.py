"""pdm-edge.service under a real systemd (Debian 12, systemd 252, in a container, shared with test_systemd_central.py), installed by systemd/install.sh
from the project's wheel, polling the plant simulator over Modbus TCP. In order, as an operator meets it: install
and READY, JSON logs in the journal, the sandbox, kill -9, a stalled pipeline and the watchdog, stop, upgrade and
rollback. The container is removed however the tests end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.deploy import engine
from tests.deploy.systemd_box import PIP_OFFLINE, SystemdBox

pytestmark = pytest.mark.timeout(1200)

GATEWAY = "gw-systemd-1"
UNIT = "pdm-edge.service"
DB = "/var/lib/pdm-edge/agent.db"
PY = "/opt/pdm-edge/venv/bin/python"


def config() -> str:
    """examples/simulator-modbus.toml for this gateway: two machines, JSON logs, the unit's data folder."""
    text = (engine.REPO / "examples/simulator-modbus.toml").read_text()
    text = text.replace('gateway_id = "simulator"', f'gateway_id = "{GATEWAY}"')
    text = text.replace('data_dir = "/tmp/pdm-edge-simulator"', 'data_dir = "/var/lib/pdm-edge"')
    return text.replace('log_format = "text"', 'log_format = "json"')


def readings(box: SystemdBox) -> int:
    """Readings in the buffer, read as the operator would (the agent keeps running)."""
    out = box.exec(PY, "-c", "import sqlite3, sys; c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
                   "print(c.execute('SELECT COUNT(*) FROM readings').fetchone()[0])", DB).stdout
    return int(out)


def healthz(box: SystemdBox) -> bool:
    result = box.exec(PY, "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', "
                      "timeout=3).read()", check=False)
    return result.returncode == 0


def restarted(box: SystemdBox, old_pid: int) -> bool:
    props = box.show(UNIT, "ActiveState", "SubState", "MainPID")
    return props["ActiveState"] == "active" and props["SubState"] == "running" and int(props["MainPID"]) not in (
        0, old_pid)


@pytest.fixture(scope="module")
def gateway(systemd_host: SystemdBox) -> SystemdBox:
    systemd_host.exec("tee", "/root/agent.toml", stdin=config())
    return systemd_host


@pytest.fixture(scope="module")
def installed(gateway: SystemdBox, wheel: Path) -> SystemdBox:
    box = gateway
    started = time.monotonic()
    result = box.exec("env", f"PDM_PIP_ARGS={PIP_OFFLINE}", "/src/systemd/install.sh", "--from",
                      f"/dist/{wheel.name}", "--config", "/root/agent.toml", check=False, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr + box.diagnose(UNIT)
    print(f"\ninstall.sh to active (READY): {time.monotonic() - started:.1f} s")
    # the plant: the simulator's five machines over Modbus TCP, a transient unit beside the agent
    box.exec("systemd-run", "--unit=plant-simulator", "--property=Restart=always", PY.replace("python", "pdm-edge"),
             "simulate", "modbus", "--machines", "5", "--port", "5020")
    engine.wait_for("readings stored", lambda: readings(box) > 20, timeout=120)
    return box


def test_install_starts_the_agent_ready_with_its_status_and_json_logs_in_the_journal(installed: SystemdBox) -> None:
    box = installed
    props = box.show(UNIT, "ActiveState", "SubState", "Type", "StatusText", "UnitFileState", "User")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify"  # so "active" above is the agent's own READY=1
    assert props["StatusText"] == f"gateway {GATEWAY}: running"
    assert props["UnitFileState"] == "enabled"  # comes back after a reboot
    assert box.exec("ps", "-o", "user=", "-p", str(box.main_pid(UNIT))).stdout.strip() == "pdm-edge"
    assert healthz(box)
    # the journal holds the agent's log lines as JSON objects, secrets-free, with a level and a message
    lines = [m for m in box.messages(UNIT) if m.startswith("{")]
    assert lines, box.messages(UNIT)
    records = [json.loads(line) for line in lines]
    assert all("level" in r and "message" in r for r in records), records[:3]
    assert any(r["level"].lower() == "info" for r in records)
    # `pdm-edge status` in the operator's shell (the command install.sh links) sees the machines
    status = box.exec("/usr/local/bin/pdm-edge", "status", "--json", check=False)
    assert status.returncode == 0, status.stderr
    assert "m1" in status.stdout


def test_the_sandbox_leaves_the_buffer_writable_and_everything_else_read_only(installed: SystemdBox) -> None:
    box = installed
    pid = box.main_pid(UNIT)
    mounts = box.exec("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()

    def options(path: str) -> str:
        found = [line.split()[5] for line in mounts if line.split()[4] == path]
        assert found, f"{path} not a mount point of the agent: {mounts}"
        return found[-1]

    assert options("/var/lib/pdm-edge").startswith("rw")
    assert options("/").startswith("ro")  # ProtectSystem=strict
    assert options("/etc/pdm-edge").startswith("ro")  # the agent reads its configuration, never writes it
    # the credential store stays closed to the agent's user
    denied = box.exec("setpriv", "--reuid=pdm-edge", "--regid=pdm-edge", "--init-groups", "ls", "/etc/credstore",
                      check=False)
    assert denied.returncode != 0


def test_kill_9_is_restarted_and_the_buffer_kept(installed: SystemdBox) -> None:
    box = installed
    before = readings(box)
    pid = box.main_pid(UNIT)
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    started = time.monotonic()
    box.exec("kill", "-9", str(pid))
    engine.wait_for("the agent restarted after kill -9", lambda: restarted(box, pid), timeout=120)
    print(f"\nkill -9 to active again: {time.monotonic() - started:.1f} s")
    assert int(box.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    engine.wait_for("readings stored after the restart", lambda: readings(box) > before, timeout=120)


def test_a_stalled_agent_is_killed_by_the_watchdog_and_restarted(installed: SystemdBox) -> None:
    box = installed
    pid = box.main_pid(UNIT)
    cursor = box.cursor()
    started = time.monotonic()
    box.exec("kill", "-STOP", str(pid))  # the pipeline stops making progress: no more WATCHDOG=1
    try:
        engine.wait_for("the watchdog's restart", lambda: restarted(box, pid), timeout=180, interval=1)
    finally:
        box.exec("kill", "-CONT", str(pid), check=False)
    print(f"\nSIGSTOP to active again (WatchdogSec=30 + RestartSec=10): {time.monotonic() - started:.1f} s")
    system = box.exec("journalctl", "--no-pager", "-o", "cat", "--after-cursor", cursor, "-u", UNIT).stdout
    assert "Watchdog timeout" in system, system
    assert healthz(box) or engine.wait_for("/healthz after the restart", lambda: healthz(box), timeout=60)


def test_stop_commits_what_is_queued_and_exits_0(installed: SystemdBox) -> None:
    box = installed
    cursor = box.cursor()
    box.systemctl("stop", UNIT)
    props = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    messages = [json.loads(m)["message"] for m in box.messages(UNIT, cursor) if m.startswith("{")]
    assert "pdm-edge stopped" in messages, messages  # not "...; readings still queued were not acknowledged"
    stored = readings(box)
    integrity = box.exec(PY, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
                         "'PRAGMA integrity_check').fetchone()[0])", DB).stdout.strip()
    assert integrity == "ok"
    box.systemctl("start", UNIT)
    assert box.active(UNIT)
    assert readings(box) >= stored


def test_upgrade_and_rollback_on_the_running_service_keep_configuration_and_buffer(installed: SystemdBox,
                                                                                    wheel: Path) -> None:
    box = installed
    config_before = box.exec("sha256sum", "/etc/pdm-edge/agent.toml").stdout
    first = box.exec("readlink", "/opt/pdm-edge/venv").stdout.strip()
    before = readings(box)
    upgrade = box.exec("env", f"PDM_PIP_ARGS={PIP_OFFLINE}", "PDM_SETTLE_S=5", "/src/systemd/install.sh", "--upgrade",
                       "--from",
                       f"/dist/{wheel.name}", check=False, timeout=900)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    second = box.exec("readlink", "/opt/pdm-edge/venv").stdout.strip()
    assert second != first
    assert box.exec("readlink", "/opt/pdm-edge/venv.prev").stdout.strip() == first
    assert box.active(UNIT) and box.show(UNIT, "ExecMainStatus")["ExecMainStatus"] == "0"
    backups = box.exec("ls", "/var/backups/pdm-edge").stdout.split()
    assert any(name.startswith("agent-0.") and name.endswith(".db") for name in backups), backups
    engine.wait_for("readings after the upgrade", lambda: readings(box) > before, timeout=120)

    rollback = box.exec("env", "PDM_SETTLE_S=5", "/src/systemd/install.sh", "--rollback", check=False, timeout=300)
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    assert box.exec("readlink", "/opt/pdm-edge/venv").stdout.strip() == first
    assert box.active(UNIT)
    assert box.exec("sha256sum", "/etc/pdm-edge/agent.toml").stdout == config_before
    after = readings(box)
    engine.wait_for("readings after the rollback", lambda: readings(box) > after, timeout=120)
