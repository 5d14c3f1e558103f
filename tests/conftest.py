"""Fixtures shared by every test: the data set (read from ../shared, never from the repo), the shipped model, a
candidate trained on the data set, and the real services: MQTT brokers, PostgreSQL."""

from __future__ import annotations

import os

import pytest

from model import data
from model.package import SHIPPED, load
from model.score import Scorer
from testkit.models import train_package
from testkit.mqtt import Broker, Mosquitto
from testkit.net import LOCALHOST, port_open
from testkit.postgres import (
    POSTGRES_PORT,
    Postgres,
    ThrowawayPostgres,
    create_database,
    drop_database,
    postgres_answers,
)


@pytest.fixture(scope="session")
def ai4i_path():
    path = data.default_path()
    if not path.is_file():
        message = (f"the AI4I 2020 data set is not at {path}: the model tests need {data.where_to_get_it()} "
                   "(it is never committed to this repository)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ai4i(ai4i_path):
    return data.load(ai4i_path)


@pytest.fixture(scope="session")
def trained_candidate(ai4i_path, tmp_path_factory):
    """A package trained by `pdm-edge train` like the shipped one but with seed 7 and 12 trees (about 10 s): another
    graph, version 2.0.0, a candidate for shadow scoring and rollouts."""
    return train_package(tmp_path_factory.mktemp("trained"), "2.0.0", ai4i_path, seed=7)


@pytest.fixture(scope="session")
def shipped_model():
    return load(SHIPPED)


@pytest.fixture(scope="session")
def scorer(shipped_model):
    return Scorer(shipped_model)


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """An MQTT broker shared by the session: the machine's own on 127.0.0.1:1883 when it answers (its limits are
    unknown, e.g. Mosquitto's default 1,000 queued messages per client), else a throwaway one. Use
    `private_broker` for load, agent restarts or broker restarts."""
    if port_open(LOCALHOST, 1883):
        yield Broker(LOCALHOST, 1883)
        return
    with Mosquitto.start(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture
def private_broker(tmp_path):
    """A throwaway Mosquitto for this test alone, with unlimited queues; it may be restarted."""
    with Mosquitto.start(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server shared by the session: the machine's own on 127.0.0.1:5432 when it lets `postgres` in
    without a password, else a throwaway one (stopped and deleted at the end). Tests use databases of their own
    (`postgres_database`), never its existing ones. TEST_POSTGRES=throwaway skips the machine's server (to try
    what a fresh machine does)."""
    if os.environ.get("TEST_POSTGRES") != "throwaway" and postgres_answers(LOCALHOST, POSTGRES_PORT):
        yield Postgres(LOCALHOST, POSTGRES_PORT)
        return
    with ThrowawayPostgres.create() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_database(postgres):
    """The URL of a new, empty database for this test session, dropped at its end."""
    name = create_database(postgres)
    try:
        yield postgres.url(name)
    finally:
        drop_database(postgres, name)


@pytest.fixture
def private_postgres():
    """A throwaway PostgreSQL server for this test alone; it may be stopped and started again."""
    with ThrowawayPostgres.create() as server:
        yield server


@pytest.fixture
def isolated_config(monkeypatch, tmp_path):
    """Configuration tests: no PDM_ variable, credential or .env of the machine running the tests leaks in, and the
    working folder (where a .env would be read) is the test's own."""
    for name in list(os.environ):
        if name.upper().startswith("PDM_") or name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
