"""pdm-central.service under a real systemd (Debian 12 in a container, the one test_systemd_agent.py uses) with the machine's PostgreSQL 15 (Debian's
package, in the same container), installed by `systemd/install.sh --central` from the project's wheel: migrate,
READY from gunicorn, /readyz, JSON logs in the journal, the admin commands with the credential store, kill -9,
stop, upgrade and rollback; and a database in the wrong encoding refused in one line.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from tests.deploy import engine
from tests.deploy.systemd_box import PIP_OFFLINE, SystemdBox

pytestmark = pytest.mark.timeout(1200)
UNIT = "pdm-central.service"
NOTIFIER = "pdm-central-notify.service"
PY = "/opt/pdm-central/venv/bin/python"
ADMIN = ("env", "PDM_CENTRAL_DATABASE_URL_FILE=/etc/credstore/pdm-central.database_url", "/usr/local/bin/pdm-central")


def get(box: SystemdBox, path: str, token: str | None = None) -> tuple[int, str]:
    """GET http://127.0.0.1:8000{path} from inside the server: (status, body)."""
    script = ("import sys, urllib.request, urllib.error\n"
              "req = urllib.request.Request('http://127.0.0.1:8000' + sys.argv[1])\n"
              "if len(sys.argv) > 2: req.add_header('Authorization', 'Bearer ' + sys.argv[2])\n"
              "try:\n    r = urllib.request.urlopen(req, timeout=5); print(r.status); print(r.read().decode())\n"
              "except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
              "except OSError as e:\n    print(0); print(e)\n")
    out = box.exec("/usr/bin/python3", "-c", script, path, *([token] if token else [])).stdout
    status, _, body = out.partition("\n")
    return int(status), body


@pytest.fixture(scope="module")
def server(systemd_host: SystemdBox) -> SystemdBox:
    engine.wait_for("PostgreSQL", lambda: systemd_host.active("postgresql@15-main.service"), timeout=120)
    return systemd_host


@pytest.fixture(scope="module")
def ops_token(server: SystemdBox, wheel: Path) -> str:
    box = server
    password, token = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    box.sh(f"""
        cd /
        sudo -u postgres psql -q -v ON_ERROR_STOP=1 -c "CREATE ROLE pdm_central LOGIN PASSWORD '{password}'"
        sudo -u postgres createdb --owner pdm_central pdm_central
        install -d -m 0700 /etc/credstore
        printf '%s\\n' 'postgresql://pdm_central:{password}@127.0.0.1:5432/pdm_central' |
            install -m 0600 /dev/stdin /etc/credstore/pdm-central.database_url
        printf '%s\\n' '{token}' | install -m 0600 /dev/stdin /etc/credstore/pdm-central.ops_token
        # Only in a container: PrivateUsers=yes with ProtectProc=invisible fails there with 217/USER ("Failed to set
        # up user namespacing", systemd issue 29656); on a machine's own systemd the unit runs as shipped.
        for unit in pdm-central pdm-central-notify; do
            printf '[Service]\\nProtectProc=default\\n' |
                install -D -m 0644 /dev/stdin /etc/systemd/system/$unit.service.d/50-container.conf
        done
    """)
    started = time.monotonic()
    result = box.exec("env", f"PDM_PIP_ARGS={PIP_OFFLINE}", "/src/systemd/install.sh", "--central", "--from",
                      f"/dist/{wheel.name}", check=False, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr + box.diagnose(UNIT)
    print(f"\ninstall.sh --central to active (READY): {time.monotonic() - started:.1f} s")
    return token


def test_install_migrates_and_starts_gunicorn_ready_with_json_logs(server: SystemdBox, ops_token: str) -> None:
    box = server
    props = box.show(UNIT, "ActiveState", "SubState", "Type", "UnitFileState", "User")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify" and props["UnitFileState"] == "enabled"
    status, body = get(box, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready", body
    assert get(box, "/api/v1/fleet")[0] == 401  # the ops API wants the token
    assert get(box, "/api/v1/fleet", ops_token)[0] == 200
    users = set(box.exec("ps", "-o", "user=", "--ppid", str(box.main_pid(UNIT))).stdout.split())
    assert users == {"pdm-central"}  # the workers
    lines = [m for m in box.messages(UNIT) if m.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert any("ready" in str(r.get("message", "")).lower() for r in records), box.messages(UNIT)
    assert not any(ops_token in m for m in box.messages(UNIT))
    # the secrets came as credentials, not as environment values of the running service
    environ = box.exec("cat", f"/proc/{box.main_pid(UNIT)}/environ").stdout
    assert "postgresql://" not in environ and ops_token not in environ


def test_admin_commands_with_the_credential_store(server: SystemdBox, ops_token: str) -> None:
    box = server
    token = box.exec(*ADMIN, "add-gateway", "gw-central-test").stdout.strip()
    assert len(token) >= 32
    assert "gw-central-test" in box.exec(*ADMIN, "list-gateways").stdout
    again = box.exec(*ADMIN, "migrate")
    assert "already up to date" in again.stderr


def test_kill_9_is_restarted(server: SystemdBox, ops_token: str) -> None:
    box = server
    pid = box.main_pid(UNIT)
    box.exec("kill", "-9", str(pid))

    def back() -> bool:
        props = box.show(UNIT, "ActiveState", "MainPID")
        return props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, pid) and get(box, "/readyz")[0] \
            == 200

    engine.wait_for("pdm-central after kill -9", back, timeout=120)
    assert "gw-central-test" in box.exec(*ADMIN, "list-gateways").stdout


def test_the_notifier_runs_beside_the_api_restarted_on_kill_9_stopped_and_started_with_it(server: SystemdBox,
                                                                                          ops_token: str) -> None:
    box = server
    props = box.show(NOTIFIER, "ActiveState", "SubState", "User")
    assert props == {"ActiveState": "active", "SubState": "running", "User": "pdm-central"}, box.diagnose(NOTIFIER)
    pid = box.main_pid(NOTIFIER)
    command = box.exec("cat", f"/proc/{pid}/cmdline").stdout.split("\0")
    assert "notify" in command and any(arg.endswith("/bin/pdm-central") for arg in command), command
    box.exec("kill", "-9", str(pid))

    def back() -> bool:
        props = box.show(NOTIFIER, "ActiveState", "MainPID")
        return props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, pid)

    engine.wait_for("pdm-central-notify after kill -9", back, timeout=60)
    box.systemctl("stop", UNIT)
    assert box.show(NOTIFIER, "ActiveState")["ActiveState"] == "inactive"  # PartOf=
    box.systemctl("start", UNIT)
    engine.wait_for("pdm-central-notify with the API", lambda: box.active(NOTIFIER), timeout=60)
    engine.wait_for("pdm-central ready", lambda: get(box, "/readyz")[0] == 200, timeout=120)


def test_stop_exits_0_and_upgrade_and_rollback(server: SystemdBox, ops_token: str, wheel: Path) -> None:
    box = server
    box.systemctl("stop", UNIT)
    props = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    box.systemctl("start", UNIT)
    first = box.exec("readlink", "/opt/pdm-central/venv").stdout.strip()
    upgrade = box.exec("env", f"PDM_PIP_ARGS={PIP_OFFLINE}", "PDM_SETTLE_S=5", "/src/systemd/install.sh", "--central",
                       "--upgrade",
                       "--from", f"/dist/{wheel.name}", check=False, timeout=900)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr + box.diagnose(UNIT)
    assert box.exec("readlink", "/opt/pdm-central/venv").stdout.strip() != first
    assert get(box, "/readyz")[0] == 200
    rollback = box.exec("env", "PDM_SETTLE_S=5", "/src/systemd/install.sh", "--central", "--rollback", check=False,
                        timeout=300)
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr + box.diagnose(UNIT)
    assert box.exec("readlink", "/opt/pdm-central/venv").stdout.strip() == first
    engine.wait_for("/readyz after the rollback", lambda: get(box, "/readyz")[0] == 200, timeout=60)
    assert "gw-central-test" in box.exec(*ADMIN, "list-gateways").stdout


def test_migrate_refuses_a_database_not_in_utf8_in_one_line(server: SystemdBox, ops_token: str) -> None:
    box = server
    box.sh("cd / && sudo -u postgres createdb --owner pdm_central --encoding SQL_ASCII --locale C "
           "--template template0 pdm_ascii")
    url = box.exec("cat", "/etc/credstore/pdm-central.database_url").stdout.strip().rsplit("/", 1)[0] + "/pdm_ascii"
    result = box.exec("env", f"PDM_CENTRAL_DATABASE_URL={url}", "/usr/local/bin/pdm-central", "migrate",
                      check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "SQL_ASCII" in result.stderr and "UTF8" in result.stderr, result.stderr
