"""The sync tests' fixtures: a scripted central on loopback and a real SQLite outbox."""

from __future__ import annotations

import pytest

from agent.store import Store
from tests.sync.test_client import Central, accept_all


@pytest.fixture
def central():
    server = Central()
    server.judge = accept_all
    yield server
    server.close()


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "agent.db") as store:
        yield store
