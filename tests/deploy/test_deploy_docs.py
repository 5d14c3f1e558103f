"""DEPLOYMENT.md and PRODUCTION_CHECKLIST.md stay true: the figures they quote are the ones measured, the commands
and options they name exist, and the SQL they give operators runs on the agent's own schema."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.deploy.conftest import PROGRAMS, REPO, SYSTEMD, UNITS, exposure, minimal_root

DEPLOYMENT = (REPO / "DEPLOYMENT.md").read_text()
CHECKLIST = (REPO / "PRODUCTION_CHECKLIST.md").read_text()


def test_troubleshooting_names_the_tools() -> None:
    for needed in ("journalctl -u pdm-edge", "pdm-edge check-config", "quarantine", "pdm-edge model verify",
                   "dead_letters", "systemctl status pdm-edge"):
        assert needed in DEPLOYMENT, needed


def test_every_install_option_is_documented() -> None:
    options = set(re.findall(r"^\s+(--[a-z-]+)\)", (SYSTEMD / "install.sh").read_text(), re.MULTILINE))
    assert {"--upgrade", "--rollback", "--uninstall", "--purge", "--central", "--config", "--from"} <= options
    undocumented = {option for option in options if option not in DEPLOYMENT}
    assert not undocumented


def test_topics_the_issue_asks_for() -> None:
    for topic in ("max_queued_messages", "pg_dump", ".backup", "LoadCredential", "mqtts://", "https://",
                  "--rollback", "--upgrade", "docker compose", "stop_grace_period"):
        assert topic in DEPLOYMENT, topic


@pytest.mark.parametrize("floor", [
    # The earlier audit's checklist is a floor: each of its points has a checked item here.
    "environment", "secret", "CORS", "security headers", "Health checks", "JSON",
    "gunicorn", "Docker", "Schema migrated", "nginx", "backups", "Monitoring", "Alerts", "Logs", "Staging",
    "Load", "Runbook", "TLS",
])
def test_checklist_covers_the_audit_floor(floor: str) -> None:
    assert floor.lower() in CHECKLIST.lower()


def test_quoted_exposure_figures_are_measured(systemd_analyze: str, tmp_path: Path) -> None:
    root = minimal_root(tmp_path)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        program = PROGRAMS[unit]
        (root / "etc/systemd/system" / unit).write_bytes((SYSTEMD / unit).read_bytes())
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text("#!/bin/sh\n")
        (root / program).chmod(0o755)
        level, _ = exposure(systemd_analyze, root, unit)
        assert f"**{level}**" in DEPLOYMENT, f"DEPLOYMENT.md should quote {unit}'s exposure {level}"
        assert f"({level} as shipped)" in CHECKLIST


def test_documented_queries_run_on_the_agent_schema(tmp_path: Path) -> None:
    from agent.store import Store

    db = tmp_path / "agent.db"
    Store.open(db).close()
    queries = [re.sub(r"\s+", " ", q) for q in re.findall(r'"(SELECT [^"]+)"', DEPLOYMENT)]
    assert len(queries) >= 4
    with sqlite3.connect(db) as connection:
        for query in queries:
            connection.execute(query).fetchall()
