"""A full disk under `pdm-edge run` (SPEC §8, README "Buffer cap"): the data folder is a small tmpfs that fills
long before the buffer cap. The agent stays up, commits nothing it cannot write and acknowledges nothing it did not
commit (the broker keeps those readings), says so on /readyz, /api/v1/status and /metrics, loses nothing it had
accepted, survives a kill -9 while the disk is full, and takes everything once the disk has room again.

The real-filesystem test needs root (mount -t tmpfs), as on the project's CI machine; the same promise with
SQLite's page limit (`PRAGMA max_page_count`) as the full disk runs anywhere, in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import requests

from agent.config import PipelineConfig
from agent.pipeline import Pipeline
from agent.store import Store
from testkit.mqtt import Publisher
from tests.agent.test_pipeline import raw
from tests.agent.test_run import AgentProcess, reading, wait_for
from tests.reliability.plant import agent_status, error_lines, integrity, status_base

DISK_MB, ROOMY_MB = 3, 64
TOTAL = 12_000


def mount_tmpfs(folder, size_mb: int, remount: bool = False) -> None:
    options = f"{'remount,' if remount else ''}size={size_mb}m"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: run it as root (./scripts/reliability.sh does on CI)")
    folder = tmp_path / "data"
    folder.mkdir()
    mount_tmpfs(folder, DISK_MB)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def metric(agent: AgentProcess, name: str) -> float:
    text = requests.get(status_base(agent) + "/metrics", timeout=5).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_full_disk_holds_readings_at_the_broker_reports_it_and_resumes_when_space_returns(
        tmp_path, small_disk, private_broker):
    agent = AgentProcess(tmp_path, private_broker.url)
    assert agent.data == small_disk
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([reading(i % 20, i) for i in range(TOTAL)], qos=1, timeout=120)
        wait_for(lambda: not agent_status(agent)["pipeline"]["database_up"], 60, "the disk to fill")
        assert requests.get(status_base(agent) + "/readyz", timeout=5).status_code == 503
        wait_for(lambda: agent_status(agent)["pipeline"]["database_failures"] >= 3, 30, "retried writes")
        assert metric(agent, "pdm_database_up") == 0
        held = agent.count("readings")
        full = agent_status(agent)["pipeline"]
        print(f"\ndisk of {DISK_MB} MB full after {held} of {TOTAL} readings: {full['database_last_error']}")
        assert 0 < held < TOTAL
        assert "full" in full["database_last_error"]
        assert agent.process.poll() is None  # the agent stays up

        agent.process.kill()  # a crash while the disk is full: it opens clean and holds again
        agent.process.wait()
        assert integrity(agent) == "ok" and agent.count("readings") == held
        agent.start()
        wait_for(lambda: not agent_status(agent)["pipeline"]["database_up"], 60, "the full disk seen after the restart")

        mount_tmpfs(small_disk, ROOMY_MB, remount=True)  # an operator makes room
        wait_for(lambda: agent.count("readings") == TOTAL, 120, "every reading the broker held")
        wait_for(lambda: agent_status(agent)["pipeline"]["database_up"], 30, "the database to be reported back")
        assert requests.get(status_base(agent) + "/readyz", timeout=5).status_code == 200
        assert integrity(agent) == "ok"
        with agent.db() as db:
            stored = sorted(ts for (ts,) in db.execute("SELECT ts FROM readings"))
            counters = dict(db.execute("SELECT name, value FROM counters"))
        assert stored == [float(1_790_000_000 + i) for i in range(TOTAL)]  # each once, none lost
        assert counters["readings_accepted"] == TOTAL and not counters.get("dropped_readings")
        assert agent.signal(signal.SIGTERM) == 0
        assert not error_lines(agent), error_lines(agent)[:3]
    finally:
        agent.stop()


def test_the_sqlite_page_limit_as_a_full_disk_acknowledges_nothing_uncommitted_and_resumes(scorer, tmp_path):
    total, acked = 5_000, []
    with Store.open(tmp_path / "agent.db") as store:
        with store._guard("limiting") as connection:  # the store's own connection: the limit is per connection
            connection.execute("PRAGMA max_page_count = 150")  # 600 KB
        pipeline = Pipeline(scorer, store, PipelineConfig())
        pipeline.start()
        for i in range(total):
            pipeline.put(raw(i, ack=lambda i=i: acked.append(i)))
        wait_for(lambda: pipeline.database.failures_total >= 3, 30, "the page limit to be reached")
        held = store.counters().readings_accepted
        assert 0 < held < total and len(acked) == held  # acknowledged exactly what was committed
        assert not pipeline.database.up and "full" in pipeline.database.last_error
        with store._guard("making room") as connection:
            connection.execute("PRAGMA max_page_count = 1000000")
        assert pipeline.stop(timeout=60)
        assert sorted(acked) == list(range(total)) and pipeline.database.up
        assert store.counters().readings_accepted == total and store.integrity_ok()
