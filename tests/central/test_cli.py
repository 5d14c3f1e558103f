"""`pdm-central migrate | add-gateway | revoke-gateway | list-gateways`, run as the installed command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from central.auth import TOKEN_PREFIX
from testkit.net import free_port
from testkit.postgres import create_database, drop_database

COMMAND = shutil.which("pdm-central", path=str(Path(sys.executable).parent)) or "pdm-central"


def run(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("PDM_CENTRAL_")}
    environ.update({"PDM_CENTRAL_DATABASE_URL": url, **env})
    return subprocess.run([COMMAND, *args], check=False, capture_output=True, text=True, env=environ, timeout=60)


@pytest.fixture
def fresh(postgres):
    name = create_database(postgres, prefix="pdm_cli")
    yield postgres.url(name)
    drop_database(postgres, name)


def test_migrate_twice(fresh):
    first = run(fresh, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stderr
    second = run(fresh, "migrate")
    assert second.returncode == 0, second.stderr
    assert "applied" not in second.stderr and "already up to date" in second.stderr
    with psycopg.connect(fresh) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] >= 1


def test_add_gateway_prints_a_token_once_and_stores_only_its_hash(central_url):
    name = f"gw-cli-{uuid.uuid4().hex[:8]}"
    result = run(central_url, "add-gateway", name)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # nothing else on stdout
    assert token.startswith(TOKEN_PREFIX) and len(token) >= len(TOKEN_PREFIX) + 43
    assert token not in result.stderr and "shown again" in result.stderr
    with psycopg.connect(central_url) as conn:
        row = conn.execute("SELECT token_hash, g::text FROM gateways g WHERE name = %s", [name]).fetchone()
    assert bytes(row[0]) == hashlib.sha256(token.encode()).digest()
    assert token not in row[1] and token[len(TOKEN_PREFIX):] not in row[1]

    again = run(central_url, "add-gateway", name)
    assert again.returncode == 1 and again.stdout == ""
    assert "already exists and is active" in again.stderr


def test_every_token_is_new(central_url):
    tokens = {run(central_url, "add-gateway", f"gw-cli-{uuid.uuid4().hex[:8]}").stdout for _ in range(3)}
    assert len(tokens) == 3


def test_revoke_then_add_again_issues_a_new_token(central_url):
    name = f"gw-cli-{uuid.uuid4().hex[:8]}"
    old = run(central_url, "add-gateway", name).stdout.strip()
    revoked = run(central_url, "revoke-gateway", name)
    assert revoked.returncode == 0 and "revoked at" in revoked.stderr
    assert run(central_url, "revoke-gateway", name).returncode == 0  # idempotent
    listing = json.loads(run(central_url, "list-gateways", "--json").stdout)
    assert next(g for g in listing if g["name"] == name)["revoked_at"] is not None
    new = run(central_url, "add-gateway", name).stdout.strip()
    assert new and new != old
    with psycopg.connect(central_url) as conn:
        hash_, revoked_at = conn.execute("SELECT token_hash, revoked_at FROM gateways WHERE name = %s",
                                         [name]).fetchone()
    assert bytes(hash_) == hashlib.sha256(new.encode()).digest() and revoked_at is None
    assert name in run(central_url, "list-gateways").stdout


@pytest.mark.parametrize(("args", "message"), [
    (("revoke-gateway", "no-such-gateway"), "no gateway named 'no-such-gateway'"),
    (("add-gateway", "bad name;"), "invalid gateway name"),
    (("add-gateway", "x" * 65), "invalid gateway name"),
])
def test_refusals_exit_1_with_the_reason(central_url, args, message):
    result = run(central_url, *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_database_exits_1_without_the_password():
    result = run(f"postgresql://pdm:hunter2@127.0.0.1:{free_port()}/pdm", "migrate")
    assert result.returncode == 1
    assert "database unavailable" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


def test_an_unmigrated_database_says_to_migrate(fresh):
    result = run(fresh, "add-gateway", "gw-1")
    assert result.returncode == 1 and "pdm-central migrate" in result.stderr


def test_bad_settings_exit_2(central_url):
    result = run(central_url, "list-gateways", PDM_CENTRAL_POOL_MAX_SIZE="many")
    assert result.returncode == 2 and "PDM_CENTRAL_POOL_MAX_SIZE" in result.stderr


def test_maintain_creates_the_coming_days_partitions_then_has_nothing_to_do(fresh):
    assert run(fresh, "migrate").returncode == 0
    first = run(fresh, "maintain", PDM_CENTRAL_PARTITIONS_AHEAD_DAYS="3")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stderr and "summaries_p" in first.stderr
    with psycopg.connect(fresh) as conn:
        days = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'summaries'::regclass").fetchone()[0]
    assert days == 4  # today and the next 3
    second = run(fresh, "maintain", PDM_CENTRAL_PARTITIONS_AHEAD_DAYS="3")
    assert second.returncode == 0 and "created 0 partition(s), dropped 0" in second.stderr


def test_maintain_without_a_database_says_so_in_one_line(fresh):
    result = run(f"postgresql://127.0.0.1:{free_port()}/x", "maintain")
    assert result.returncode == 1
    assert result.stderr.startswith("pdm-central: database unavailable") and "Traceback" not in result.stderr
